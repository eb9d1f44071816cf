import CUserfaultfd
import Glibc
import Synchronization

/// The destination's demand-fault machinery: guest RAM registered with a userfaultfd, a fault
/// thread that turns each fault on a lacking page into a request, and `place` for the pages as
/// they arrive (answers and background pushes alike). A vCPU that touches a lacking page waits
/// in the kernel, inside KVM_RUN, until its page is placed.
///
/// Pages are placed with UFFDIO_COPY, never written through the memfd: the copy is atomic and
/// refuses a page that is present, so a page that landed (or was zero-filled, or written by the
/// guest since) is never overwritten by a late duplicate.
public final class DemandFaultResolver: @unchecked Sendable {
    // @unchecked: the userfaultfd, memory and map are thread-safe; `thread` is set once in start
    // and joined once in finish (under `lifecycle`).
    public let map: PostCopyPageMap
    private let memory: GuestMemory
    private let userFault: UserFaultFD
    private let request: @Sendable ([UInt64]) -> Void
    private let stopPipe: (read: FileDescriptor, write: FileDescriptor)
    private let failure = Mutex<SystemError?>(nil)
    private let lifecycle = Mutex<(thread: OSThread?, registered: Bool)>((nil, false))

    /// `lacking`: the pages whose contents are still at the source. `request` sends page requests
    /// (it is called on the fault thread, so it must not wait for the answer).
    public init(memory: GuestMemory, lacking: DirtyPageBitmap,
                request: @escaping @Sendable ([UInt64]) -> Void) throws(SystemError) {
        precondition(lacking.pageCount == memory.pageCount)
        self.memory = memory
        self.map = PostCopyPageMap(lacking: lacking)
        self.request = request
        userFault = try UserFaultFD.open()
        var fds: [Int32] = [-1, -1]
        if cuffd_pipe_cloexec_nonblock(&fds) != 0 { throw SystemError("pipe2") }
        stopPipe = (FileDescriptor(owning: fds[0]), FileDescriptor(owning: fds[1]))
    }

    /// Drops whatever the destination holds of the lacking pages (a copy from an earlier pass,
    /// stale since the guest wrote it again), except those `dropped` already (`dropStale` before
    /// the pause), registers RAM for missing faults and starts the fault thread. Call it before
    /// any vCPU runs.
    public func start(dropped: DirtyPageBitmap? = nil) throws(SystemError) {
        var stale = map.lackingPages()
        if let dropped { stale.subtract(dropped) }
        try Self.dropStale(stale, from: memory)
        try userFault.registerMissing(memory.base, length: Int(memory.size))
        lifecycle.withLock { $0.registered = true }
        let thread = OSThread(name: "postcopy-faults") { [self] in faultLoop() }
        lifecycle.withLock { $0.thread = thread }
    }

    /// Punches holes where `pages` are. A lacking page that is present at the destination is
    /// stale: without the hole the guest would read the old copy and no fault would ever fetch
    /// the new one. Freeing them is most of what the switch costs here (512 MiB: 84 ms), so the
    /// pages known before the pause are dropped before it (`postcopyPrepare`).
    public static func dropStale(_ pages: DirtyPageBitmap, from memory: GuestMemory) throws(SystemError) {
        for run in pages.runs() {
            if cuffd_punch_hole(memory.fd.rawValue, run.lowerBound * 4096, run.count * 4096) != 0 {
                throw SystemError("fallocate(PUNCH_HOLE) of \(run.count) stale pages")
            }
        }
    }

    /// Places `count` pages from `bytes` at `firstPage` (each page once: one already present is
    /// left as it is) and wakes whoever waited on them. Returns how many were new.
    @discardableResult
    public func place(firstPage: Int, count: Int, bytes: UnsafeRawPointer) throws(SystemError) -> Int {
        precondition(firstPage >= 0 && count >= 0 && firstPage + count <= memory.pageCount)
        var placed = 0
        var page = firstPage
        while page < firstPage + count {
            // Runs of pages still lacking go in one copy; a page that landed already is skipped.
            guard map.lacks(page) else { page += 1; continue }
            var end = page + 1
            while end < firstPage + count && map.lacks(end) { end += 1 }
            let source = bytes + (page - firstPage) * 4096
            let outcome = try userFault.copy(from: source, to: memory.base + page * 4096, length: (end - page) * 4096)
            if outcome == .alreadyPresent {
                // Part of the run was present (the guest cannot write a lacking page, so only a
                // racing placement could have put it there): place page by page.
                for single in page..<end {
                    if try userFault.copy(from: bytes + (single - firstPage) * 4096,
                                          to: memory.base + single * 4096, length: 4096) == .alreadyPresent {
                        try userFault.wake(memory.base + single * 4096, length: 4096)
                    }
                }
            }
            let now = MonotonicClock.nanoseconds()
            for landed in page..<end where map.landed(page: landed, at: now) { placed += 1 }
            page = end
        }
        return placed
    }

    /// The source sent `count` pages at `firstPage` as zero (all-zero there): placed as zero pages,
    /// each once. Returns how many were new.
    @discardableResult
    public func placeZeros(firstPage: Int, count: Int) throws(SystemError) -> Int {
        precondition(firstPage >= 0 && count >= 0 && firstPage + count <= memory.pageCount)
        var placed = 0
        for page in firstPage..<firstPage + count where map.lacks(page) {
            let address = memory.base + page * 4096
            if try userFault.zero(address, length: 4096) == .alreadyPresent { try userFault.wake(address, length: 4096) }
            if map.landed(page: page, at: MonotonicClock.nanoseconds()) { placed += 1 }
        }
        return placed
    }

    /// The first error the fault thread met (it stops there; vCPUs waiting on faults would wait
    /// for ever, so the caller fails the migration).
    public var threadFailure: SystemError? { failure.withLock { $0 } }

    /// Stops the fault thread and unregisters RAM: from here every missing page reads as zero.
    /// Called once every page has landed, or to give up (the VM is then not usable).
    public func finish() {
        var one: UInt8 = 1
        _ = write(stopPipe.write.rawValue, &one, 1)
        let thread = lifecycle.withLock { state -> OSThread? in
            defer { state.thread = nil }
            return state.thread
        }
        thread?.join()
        let wasRegistered = lifecycle.withLock { state -> Bool in
            defer { state.registered = false }
            return state.registered
        }
        if wasRegistered { try? userFault.unregister(memory.base, length: Int(memory.size)) }
    }

    private func faultLoop() {
        let base = UInt64(UInt(bitPattern: memory.base)), end = base + memory.size
        while true {
            guard userFault.waitForFaults(orReadable: stopPipe.read.rawValue, timeoutMilliseconds: 1000) else {
                var byte: UInt8 = 0
                if read(stopPipe.read.rawValue, &byte, 1) == 1 { return }
                continue
            }
            do {
                let faults = try userFault.readFaults()
                guard !faults.isEmpty else { continue }
                let now = MonotonicClock.nanoseconds()
                var wanted: [UInt64] = []
                for fault in faults where fault.address >= base && fault.address < end {
                    let page = Int((fault.address - base) / 4096)
                    let address = memory.base + page * 4096
                    switch map.fault(page: page, thread: fault.threadID, at: now) {
                    case .request: wanted.append(UInt64(page))
                    case .wait: break
                    case .placeZero:
                        if try userFault.zero(address, length: 4096) == .alreadyPresent {
                            try userFault.wake(address, length: 4096)
                        }
                    }
                }
                if !wanted.isEmpty { request(wanted) }
            } catch {
                failure.withLock { $0 = error }
                return
            }
        }
    }

    deinit { finish() }
}
