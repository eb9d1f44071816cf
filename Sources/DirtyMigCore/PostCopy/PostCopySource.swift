import Synchronization

/// The source after the switch: its VM is paused for good and its memory is the only copy of
/// the pages the destination lacks. Two senders empty the `PostCopyPushQueue`:
/// - the request server, on its own thread and its own connection (role `faults`), answers each
///   page request at once: requests never wait behind the background stream;
/// - the background stream, on the control connection, pushes the rest in runs, from wherever
///   the destination last faulted, paced by `--bandwidth`.
/// When every page has been sent, `postcopyEnd` (with the source's digest of the memory, which
/// has not changed since the pause) asks for the destination's word: every page landed, verified.
/// One source serves the whole phase; each link (the first, and each after a failure) is one
/// `run`.
final class PostCopySource: @unchecked Sendable {
    // @unchecked: `limiter`, `pushedBytes` and `digest` are used by the background stream alone
    // (the calling thread); the request server shares only the queue and the counters, which are
    // thread-safe, and `serverFailure`, reset before each run's server starts.
    /// Pages per background run: 256 KiB, a batch big enough that headers are noise, small enough
    /// that a request's answer on the other connection does not share the link with a long one.
    static let runPages = 64

    let queue: PostCopyPushQueue
    private let memory: GuestMemory
    private let limiter: BandwidthLimiter
    private let serverFailure = Mutex<MigrationError?>(nil)
    private let answeredBytes = Atomic<UInt64>(0)
    private var pushedBytes: UInt64 = 0
    /// The source's digest of its memory and what hashing it took: computed once (the memory
    /// does not change after the pause), even when the link fails after `postcopyEnd`.
    private var digest: (value: UInt64, nanoseconds: UInt64)?

    init(memory: GuestMemory, lacking: DirtyPageBitmap, bandwidth: @escaping () -> UInt64?) {
        self.memory = memory
        queue = PostCopyPushQueue(missing: lacking)
        limiter = BandwidthLimiter(rate: bandwidth)
    }

    /// The connections one run of the phase goes over: the session's control connection (the
    /// background stream, the end) and its faults connection (requests and their answers).
    struct Link {
        var control: MigrationChannel
        var faults: any MigrationConnection
    }

    /// What the post-copy phase sent, and what the destination said of it.
    struct Outcome {
        var tally: PostCopyPushQueue.Tally
        var pushedBytes: UInt64
        var answeredBytes: UInt64
        var result: PostCopyResult
        /// Hashing the source's memory for --verify (not downtime: the guest runs there).
        var verifyNanoseconds: UInt64
    }

    /// Bytes sent so far on either connection, over every link.
    var sentBytes: UInt64 { pushedBytes + answeredBytes.load(ordering: .relaxed) }

    /// Runs the phase over `link` until the destination's word, or until the link fails (thrown:
    /// the queue keeps what was claimed, and `PostCopyPushQueue.resume` says what goes again
    /// over the next link). A cancel can no longer take the VM back, so it is not asked here;
    /// `onBatch` reports each background batch (progress).
    func run(over link: Link, verify: Bool, onBatch: (PageSendTally) -> Void) throws(MigrationError) -> Outcome {
        serverFailure.withLock { $0 = nil }
        let faults = link.faults
        let server = OSThread(name: "postcopy-server") { [self] in serveRequests(on: faults) }
        defer {
            // The destination closes its end once it has answered; make sure the server's read
            // returns however the phase ended.
            faults.shutdown()
            server.join()
        }
        // Paced after each run, not before: a page claimed by the stream is only sent by it, so a
        // run claimed and then held by the limiter made every fault on its pages wait out the
        // limiter too (a sequential writer at 60 MiB/s: faults waited 3.6 ms at p50, for runs
        // of 256 KiB held 4.4 ms each). Claimed now, a run goes out at once.
        let stream = PageSender(channel: link.control, memory: memory, limiter: BandwidthLimiter(bytesPerSecond: nil))
        while let run = queue.claimNextRun(maxPages: Self.runPages) {
            if let failure = serverFailure.withLock({ $0 }) { throw failure }
            let sent = try stream.send(runs: [run], onBatch: onBatch)
            pushedBytes += sent.bytes
            limiter.willSend(Int(sent.bytes))
        }
        if let failure = serverFailure.withLock({ $0 }) { throw failure }
        if digest == nil {
            let hashStart = MonotonicClock.nanoseconds()
            let value = verify ? MemoryDigest.compute(memory) : 0
            digest = (value, MonotonicClock.nanoseconds() - hashStart)
        }
        try link.control.send(.postcopyEnd, PostCopyEnd(verify: verify, memoryDigest: digest!.value).encode())
        // The destination waits for the last answers on the other connection, then hashes
        // nothing more (it hashed pages as they landed): its word comes within the link rule.
        let result = try link.control.receive(.postcopyResult, PostCopyResult.init(decoding:))
        return Outcome(tally: queue.tally, pushedBytes: pushedBytes, answeredBytes: answeredBytes.load(ordering: .relaxed),
                       result: result, verifyNanoseconds: digest!.nanoseconds)
    }

    /// The request server: each request's pages that are not on their way yet go out at once on
    /// the faults connection. Ends when the connection does (the destination closes it once
    /// every page landed, or `run` shuts it down).
    private func serveRequests(on faults: any MigrationConnection) {
        let channel = MigrationChannel(transport: faults)
        // Answers are never paced: they are what a vCPU waits for.
        let answers = PageSender(channel: channel, memory: memory, limiter: BandwidthLimiter(bytesPerSecond: nil))
        while true {
            do {
                let request = try channel.receive(.pageRequest) { payload throws(MigrationProtocolError) in
                    try PageRequest(decoding: payload, pageCount: memory.pageCount)
                }
                let claimed = queue.claimRequested(request.pages)
                guard !claimed.isEmpty else { continue }
                let sent = try answers.send(runs: Self.runs(of: claimed))
                answeredBytes.add(sent.bytes, ordering: .relaxed)
            } catch {
                // Once every page has gone out the connection's end is expected; before, it is
                // the phase's failure.
                if !queue.isDrained { serverFailure.withLock { $0 = $0 ?? error } }
                return
            }
        }
    }

    /// Pages as ascending runs of consecutive pages.
    static func runs(of pages: [UInt64]) -> [Range<Int>] {
        var runs: [Range<Int>] = []
        for page in pages.sorted().map({ Int($0) }) {
            if let last = runs.last, last.upperBound == page {
                runs[runs.count - 1] = last.lowerBound..<page + 1
            } else if runs.last?.contains(page) != true {
                runs.append(page..<page + 1)
            }
        }
        return runs
    }
}
