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
                    shared.digest.withLock { $0?.landed(first..<first + pages, from: UnsafeRawPointer(bytes)) }
                    do { try resolver.place(firstPage: first, count: pages, bytes: bytes) } catch {
                        throw .machine("cannot place pages in guest memory: \(error)")
                    }
                case .zero:
                    shared.digest.withLock { digest in for page in first..<first + pages { digest?.zeroed(page) } }
                    do { try resolver.placeZeros(firstPage: first, count: pages) } catch {
                        throw .machine("cannot place zero pages in guest memory: \(error)")
                    }
                }
            }
        }
    }

    /// Demand-fault machinery of guests whose post-copy broke after they began to run here: kept,
    /// so that their vCPUs wait for the pages still at the source rather than read zeros in their
    /// place (unregistering would make every missing page an empty one). Nothing resumes them
    /// yet: recovering a broken post-copy is not built.
    private static let broken = Mutex<[DemandFaultResolver]>([])

    /// How the post-copy phase ended here: the guest runs in both cases.
    enum Outcome {
        case completed
        /// The link or the source failed after the guest began to run here; `pagesAtSource`
        /// pages are still there, and the vCPUs that touch them wait.
        case broken(reason: String, pagesAtSource: Int)
    }

    /// After the `postcopySwitch` header (`payloadLength`) on `control`. `digest`: what the
    /// pre-copy passes left (with --verify). Throws only before the guest runs here (the source
    /// then resumes its copy); after that, returns once every page has landed, or `.broken`.
    static func run<VM: IncomingVM>(_ vm: VM, control: MigrationChannel, payloadLength: Int,
                                    digest: LandedPagesDigest?, faults: (any MigrationConnection)?,
                                    linkTimeoutSeconds: Double, commit: () -> Bool,
                                    running: (VM) -> Void) throws(MigrationError) -> Outcome {
        let received = MonotonicClock.nanoseconds()
        let payload = try control.receivePayload(payloadLength)
        let pageCount = vm.memory.pageCount
        func refuse(_ message: String) throws(MigrationError) -> Never {
            try? control.send(.postcopyRunning, PostCopyRunning(running: false, message: message).encode())
            throw .machine(message)
        }
        let frame = try MigrationError.wrap { () throws(MigrationProtocolError) in try PostCopySwitch(decoding: payload, pageCount: pageCount) }
        guard let faults else { try refuse("the post-copy switch came, but no faults connection joined the session") }
        let resolver: DemandFaultResolver
        do {
            try vm.restoreState(try MachineState(decoding: frame.state))
            faults.allowConcurrentSendAndReceive()
            // Answers come only when the guest faults, which it may not do for minutes: the
            // connection waits without an idle timeout, and the link rule (the kernel's, at the
            // source's --link-timeout) says when it is dead.
            faults.tcp.watchLink(timeoutSeconds: linkTimeoutSeconds)
            faults.setTimeouts(send: linkTimeoutSeconds, receive: 0)
            let faultChannel = MigrationChannel(transport: faults)
            resolver = try DemandFaultResolver(memory: vm.memory, lacking: frame.lacking(pageCount: pageCount)) { pages in
                // A request that cannot go out (the link failed) leaves its vCPU waiting: the
                // page is still at the source, and nothing else may stand in for it.
                var start = 0
                while start < pages.count {
                    let end = min(pages.count, start + PageRequest.maxPages)
                    try? faultChannel.send(.pageRequest, PageRequest(pages: Array(pages[start..<end])).encode())
                    start = end
                }
            }
            try resolver.start()
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
        // at the source, which keeps them).
        func broke(_ reason: String) -> Outcome {
            broken.withLock { $0.append(resolver) }
            return .broken(reason: reason, pagesAtSource: resolver.map.remaining)
        }
        do {
            try control.send(.postcopyRunning,
                             PostCopyRunning(running: true, resumeNanoseconds: MonotonicClock.nanoseconds() - received).encode())
        } catch {
            return broke("the post-copy switch could not be confirmed to the source: \(error)")
        }

        let shared = SharedDigest(digest)
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
                    if !resolver.map.isComplete { answersFailure.withLock { $0 = error } }
                    return
                }
            }
        }
        let placer = Placer(resolver: resolver, digest: shared, pageCount: pageCount)
        let end: PostCopyEnd
        do throws(MigrationError) {
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
        } catch {
            faults.shutdown()
            answers.join()
            return broke("\(error)")
        }
        // Every page is in: from here a missing page is an ordinary one (the guest's own).
        resolver.finish()
        faults.shutdown()
        answers.join()
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
        do { try control.send(.postcopyResult, result.encode()) } catch {
            // The source has sent everything: the VM is whole here. Its report lacks our word.
        }
        return .completed
    }
}
