import Synchronization

/// The destination from the switch on: it restores the state, drops its stale copies of the
/// pages it lacks, registers RAM for demand faults, takes the commit point and runs the guest at
/// once; then it places pages as they come on either connection (answers to its requests on the
/// faults connection, the background stream on the control connection) until every lacking page
/// has landed, and gives its word: landed, verified, and what the faults cost.
///
/// Until `postcopyRunning` says the guest runs here, the source holds the whole VM: a failure
/// before it is answered `running: false`, the guest is stopped here, and the source resumes.
/// After it, this host runs the guest and the source holds the pages it still lacks: nothing is
/// discarded on either side.
enum PostCopyDestination {
    /// The destination's half of --verify, kept as pages land, shared by the two threads that
    /// place pages.
    final class SharedDigest: Sendable {
        let digest: Mutex<LandedPagesDigest?>
        init(_ digest: LandedPagesDigest?) { self.digest = Mutex(digest) }
    }

    /// Reads pages frames and places their pages. A frame's data is read into one bounce buffer
    /// (UFFDIO_COPY copies from memory outside the registered range), reused from frame to frame
    /// and as large as the largest frame so far (bounded by the frame's checked length).
    final class Placer {
        let resolver: DemandFaultResolver
        let shared: SharedDigest
        let pageCount: Int
        private var buffer: UnsafeMutableRawPointer?
        private var bufferBytes = 0

        init(resolver: DemandFaultResolver, digest: SharedDigest, pageCount: Int) {
            self.resolver = resolver
            self.shared = digest
            self.pageCount = pageCount
        }

        deinit { buffer?.deallocate() }

        /// The runs of `pages` that have not landed yet.
        private func lackingRuns(_ pages: Range<Int>) -> [Range<Int>] {
            var runs: [Range<Int>] = []
            var page = pages.lowerBound
            while page < pages.upperBound {
                guard resolver.map.lacks(page) else { page += 1; continue }
                var end = page + 1
                while end < pages.upperBound && resolver.map.lacks(end) { end += 1 }
                runs.append(page..<end)
                page = end
            }
            return runs
        }

        private func bounce(_ bytes: Int) -> UnsafeMutableRawPointer {
            if let buffer, bufferBytes >= bytes { return buffer }
            buffer?.deallocate()
            buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 4096)
            bufferBytes = bytes
            return buffer!
        }

        /// One pages frame (its header read): the range table checked against RAM and the frame's
        /// length before any page byte is read, then each range placed (each page once).
        func receive(from channel: MigrationChannel, payloadLength: Int) throws(MigrationError) {
            let table = try PageBatchTable.receive(from: channel, payloadLength: payloadLength, pageCount: pageCount)
            try MigrationError.wrap { () throws(MigrationProtocolError) in try table.checkPlain(payloadLength: payloadLength) }
            for range in table.ranges {
                let first = Int(range.firstPage), pages = Int(range.count)
                switch range.kind {
                case .data:
                    let bytes = bounce(pages * 4096)
                    do { try channel.transport.receive(into: bytes, count: pages * 4096) } catch { throw .connection(error) }
                    // Only pages that had not landed count: a page sent again after a link
                    // failure that had landed meanwhile is not placed again (UFFDIO_COPY keeps
                    // the copy present, which the guest may have written since).
                    shared.digest.withLock { digest in
                        guard digest != nil else { return }
                        for run in lackingRuns(first..<first + pages) {
                            digest!.landed(run, from: UnsafeRawPointer(bytes + (run.lowerBound - first) * 4096))
                        }
                    }
                    do { try resolver.place(firstPage: first, count: pages, bytes: bytes) } catch {
                        throw .machine("cannot place pages in guest memory: \(error)")
                    }
                case .zero:
                    shared.digest.withLock { digest in
                        for page in first..<first + pages where resolver.map.lacks(page) { digest?.zeroed(page) }
                    }
                    do { try resolver.placeZeros(firstPage: first, count: pages) } catch {
                        throw .machine("cannot place zero pages in guest memory: \(error)")
                    }
                }
            }
        }
    }

    /// Demand-fault machinery of guests whose post-copy failed here (the fault thread or a
    /// placement failed) after they began to run: kept, so that their vCPUs wait for the pages
    /// still at the source rather than read zeros in their place (unregistering would make every
    /// missing page an empty one). A failed link is not this: it pauses post-copy until the
    /// source resumes it.
    private static let broken = Mutex<[DemandFaultResolver]>([])

    /// How the post-copy phase ended here: the guest runs in both cases.
    enum Outcome {
        case completed
        /// This host failed after the guest began to run here; `pagesAtSource` pages are still
        /// there, and the vCPUs that touch them wait.
        case broken(reason: String, pagesAtSource: Int)
    }

    /// The connections one link of post-copy goes over.
    struct Link {
        var control: MigrationChannel
        var faults: any MigrationConnection
    }

    /// After the `postcopySwitch` header (`payloadLength`) on `control`. `digest`: what the
    /// pre-copy passes left (with --verify). `dropped`: stale pages dropped already, at the
    /// source's `postcopyPrepare` (`prepare`). Throws only before the guest runs here (the source
    /// then resumes its copy); after that, returns once every page has landed, or `.broken`.
    /// A link that fails meanwhile pauses post-copy (`vm.postcopyLink`) until the source resumes
    /// it through `resumes`; the vCPUs that touch a missing page wait until then.
    /// The source's `postcopyPrepare` (its header read): while the guest still runs there, the
    /// pages it names are dropped here, once every page of the passes before is in memory, and
    /// `postcopyPrepared` answers. Returns the pages dropped, for `run`.
    static func prepare(_ memory: GuestMemory, pages: PageReceiver, control: MigrationChannel,
                        payloadLength: Int) throws(MigrationError) -> DirtyPageBitmap {
        let payload = try control.receivePayload(payloadLength)
        let stale = try MigrationError.wrap { () throws(MigrationProtocolError) in
            try PostCopyPrepare(decoding: payload, pageCount: memory.pageCount).stale(pageCount: memory.pageCount)
        }
        // Nothing may write a page after its hole is punched: the prefaulter stops, the writer
        // drains what it holds.
        pages.passEnded()
        try pages.settle()
        let started = MonotonicClock.nanoseconds()
        do { try DemandFaultResolver.dropStale(stale, from: memory) } catch {
            throw .machine("cannot drop stale pages before post-copy: \(error)")
        }
        try control.send(.postcopyPrepared, PostCopyPrepared(droppedNanoseconds: MonotonicClock.nanoseconds() - started).encode())
        return stale
    }

    static func run<VM: IncomingVM>(_ vm: VM, control: MigrationChannel, payloadLength: Int,
                                    digest: LandedPagesDigest?, dropped: DirtyPageBitmap? = nil, faults: (any MigrationConnection)?,
                                    linkTimeoutSeconds: Double, resumes: PostCopyResumePoint?, commit: () -> Bool,
                                    running: (VM) -> Void, log: (String) -> Void = { _ in }) throws(MigrationError) -> Outcome {
        let received = MonotonicClock.nanoseconds()
        let payload = try control.receivePayload(payloadLength)
        let pageCount = vm.memory.pageCount
        func refuse(_ message: String) throws(MigrationError) -> Never {
            try? control.send(.postcopyRunning, PostCopyRunning(running: false, message: message).encode())
            throw .machine(message)
        }
        let frame = try MigrationError.wrap { () throws(MigrationProtocolError) in try PostCopySwitch(decoding: payload, pageCount: pageCount) }
        guard let faults else { try refuse("the post-copy switch came, but no faults connection joined the session") }
        let requests = PostCopyRequestSink()
        let resolver: DemandFaultResolver
        do {
            try vm.restoreState(try MachineState(decoding: frame.state))
            resolver = try DemandFaultResolver(memory: vm.memory, lacking: frame.lacking(pageCount: pageCount)) { pages in
                requests.request(pages)
            }
            requests.attach(prepare(faults, linkTimeoutSeconds: linkTimeoutSeconds))
            try resolver.start(dropped: dropped)
        } catch {
            try refuse("cannot run the VM here for post-copy: \(error)")
        }
        // The commit point: a stop asked before it refuses the switch (the source resumes).
        guard commit() else {
            resolver.finish()
            try? control.send(.postcopyRunning, PostCopyRunning(running: false, message: MigrationReceiver.stoppingReason).encode())
            throw .cancelled(MigrationReceiver.stoppingReason)
        }
        do { try vm.start() } catch {
            resolver.finish()
            vm.stop()
            try refuse("cannot resume the VM here: \(error)")
        }
        running(vm)
        // From here the guest runs here: whatever fails, it is not dropped (its missing pages are
        // at the source, which keeps them), and a failed link pauses post-copy until the source
        // resumes it.
        defer { resumes?.end() }
        let shared = SharedDigest(digest)
        var link = Link(control: control, faults: faults)
        var confirmed: Bool
        do {
            try control.send(.postcopyRunning,
                             PostCopyRunning(running: true, resumeNanoseconds: MonotonicClock.nanoseconds() - received).encode())
            confirmed = true
        } catch {
            confirmed = false
        }
        while true {
            let failure: MigrationError
            if confirmed {
                let current = link
                resumes?.linkUp { current.control.transport.shutdown(); current.faults.shutdown() }
                switch runLink(link, resolver: resolver, digest: shared, pageCount: pageCount, linkTimeoutSeconds: linkTimeoutSeconds) {
                case .success(let end):
                    finishLink(link, resolver: resolver, vm: vm, end: end, digest: shared)
                    return .completed
                case .failure(let error):
                    failure = error
                }
            } else {
                failure = .machine("the post-copy switch could not be confirmed to the source")
            }
            if let fatal = resolver.threadFailure {
                broken.withLock { $0.append(resolver) }
                return .broken(reason: "the fault thread failed: \(fatal)", pagesAtSource: resolver.map.remaining)
            }
            if case .machine(let why) = failure, confirmed {
                broken.withLock { $0.append(resolver) }
                return .broken(reason: why, pagesAtSource: resolver.map.remaining)
            }
            // The link failed: paused until the source comes back over a new one.
            link.control.transport.shutdown()
            link.faults.shutdown()
            requests.attach(nil)
            guard let resumes else {
                broken.withLock { $0.append(resolver) }
                return .broken(reason: "\(failure)", pagesAtSource: resolver.map.remaining)
            }
            vm.postcopyLink.paused("\(failure)")
            log("post-copy paused: \(failure); \(resolver.map.remaining) pages are still at the source, vCPUs that touch them wait until it resumes")
            link = awaitResume(resumes, requests: requests, resolver: resolver, linkTimeoutSeconds: linkTimeoutSeconds, log: log)
            confirmed = true
            vm.postcopyLink.resumed()
            log("post-copy resumed: \(resolver.map.remaining) pages still lacking")
        }
    }

    /// Link rule on a faults connection, and the channel requests go out on. Answers come only
    /// when the guest faults, which it may not do for minutes: the connection waits without an
    /// idle timeout, and the link rule (the kernel's, at the source's --link-timeout) says when
    /// it is dead.
    private static func prepare(_ faults: any MigrationConnection, linkTimeoutSeconds: Double) -> MigrationChannel {
        faults.allowConcurrentSendAndReceive()
        faults.tcp.watchLink(timeoutSeconds: linkTimeoutSeconds)
        faults.setTimeouts(send: linkTimeoutSeconds, receive: 0)
        return MigrationChannel(transport: faults)
    }

    /// Waits until the source resumes over a link that works: its control connection (handed
    /// over by the receiver), the pages still lacking sent on it, its faults connection joined;
    /// then asks again for every page a vCPU waits on. An attempt that fails half-way is
    /// dropped, and the next one awaited.
    private static func awaitResume(_ resumes: PostCopyResumePoint, requests: PostCopyRequestSink,
                                    resolver: DemandFaultResolver, linkTimeoutSeconds: Double,
                                    log: (String) -> Void) -> Link {
        while true {
            let offer = resumes.waitForResume()
            let control = offer.control
            control.tcp.watchLink(timeoutSeconds: linkTimeoutSeconds)
            control.setTimeouts(send: linkTimeoutSeconds, receive: linkTimeoutSeconds)
            let channel = MigrationChannel(transport: control)
            // Exact: nothing lands while paused (the old link's threads have ended).
            let lacking = resolver.map.lackingPages()
            guard (try? channel.send(.postcopyResume, PostCopyResume(lacking: lacking).encode())) != nil,
                  let faults = offer.session.take(.faults, timeout: MigrationSession.stallSeconds) else {
                log("a resume of post-copy failed half-way (no faults connection, or its link failed): waiting for the next")
                control.shutdown()
                offer.session.end("failed half-way")
                continue
            }
            requests.attach(prepare(faults, linkTimeoutSeconds: linkTimeoutSeconds))
            requests.request(resolver.map.awaitedPages())
            return Link(control: channel, faults: faults)
        }
    }

    /// One link of post-copy: places pages as they come on either connection until the
    /// source's `postcopyEnd` and every lacking page has landed (its end frame), or the link
    /// fails (the failure).
    private static func runLink(_ link: Link, resolver: DemandFaultResolver, digest shared: SharedDigest, pageCount: Int,
                                linkTimeoutSeconds: Double) -> Result<PostCopyEnd, MigrationError> {
        let faults = link.faults, control = link.control
        let answersFailure = Mutex<MigrationError?>(nil)
        let answers = OSThread(name: "postcopy-answers") {
            let channel = MigrationChannel(transport: faults)
            let placer = Placer(resolver: resolver, digest: shared, pageCount: pageCount)
            while !resolver.map.isComplete {
                do throws(MigrationError) {
                    let (type, length) = try channel.receiveHeader()
                    guard type == .pages else { throw .protocolError(.unexpected("a \(type) frame on the faults connection")) }
                    try placer.receive(from: channel, payloadLength: length)
                } catch {
                    // Once every page is in, the end of this connection is expected (it is shut
                    // down below); before, the link failed, and the control connection's read
                    // must learn it too rather than wait on for a page.
                    if !resolver.map.isComplete {
                        answersFailure.withLock { $0 = error }
                        control.transport.shutdown()
                    }
                    return
                }
            }
        }
        defer {
            faults.shutdown()   // however this link ended: the answers thread's read returns
            answers.join()
        }
        let placer = Placer(resolver: resolver, digest: shared, pageCount: pageCount)
        do throws(MigrationError) {
            let end: PostCopyEnd
            while true {
                let (type, length) = try control.receiveHeader()
                if type == .pages { try placer.receive(from: control, payloadLength: length); continue }
                let body = try control.receivePayload(length)
                if type == .abort { throw .peerAborted(MigrationChannel.abortReason(body)) }
                guard type == .postcopyEnd else { throw .protocolError(.unexpected("a \(type) frame during post-copy")) }
                end = try MigrationError.wrap { () throws(MigrationProtocolError) in try PostCopyEnd(decoding: body) }
                break
            }
            // The last answers may still be on the other connection.
            let deadline = MonotonicClock.nanoseconds() + UInt64(linkTimeoutSeconds * 1e9)
            while !resolver.map.isComplete {
                if let failure = answersFailure.withLock({ $0 }) { throw failure }
                if let failure = resolver.threadFailure { throw .machine("the fault thread failed: \(failure)") }
                if MonotonicClock.nanoseconds() > deadline {
                    throw .timedOut("\(resolver.map.remaining) pages never arrived within --link-timeout \(linkTimeoutSeconds) s of the source's end")
                }
                MonotonicClock.sleep(nanoseconds: 200_000)
            }
            return .success(end)
        } catch {
            // A failure of the faults connection shut the control connection down: say the first.
            if let failure = answersFailure.withLock({ $0 }), case .connection = error { return .failure(failure) }
            return .failure(error)
        }
    }

    /// Every page is in: the fault machinery goes (from here a missing page is an ordinary one,
    /// the guest's own), and the source gets the word: landed, verified, what the faults cost.
    private static func finishLink<VM: IncomingVM>(_ link: Link, resolver: DemandFaultResolver, vm: VM, end: PostCopyEnd,
                                                   digest shared: SharedDigest) {
        resolver.finish()
        let figures = resolver.map.figures
        let blocked = vm.vcpuThreadIDs.map { figures.blockedNanosecondsByThread[$0] ?? 0 }
        var result = PostCopyResult(status: .resumed, figures: figures, vcpuBlockedNanoseconds: blocked)
        if end.verify {
            let ours = shared.digest.withLock { $0 }
            result.verifyNanoseconds = ours?.nanoseconds ?? 0
            if ours?.value != end.memoryDigest {
                result.status = .verifyFailed
                result.message = ours == nil
                    ? "the destination did not keep a digest (the hello did not ask for --verify)"
                    : "memory digest differs (source 0x\(String(end.memoryDigest, radix: 16)), destination 0x\(String(ours!.value, radix: 16)))"
            }
        }
        do { try link.control.send(.postcopyResult, result.encode()) } catch {
            // The source has sent everything: the VM is whole here. Its report lacks our word.
        }
    }
}
