import Dispatch
import Synchronization

/// Writes received pages into guest memory on a second thread, while the receiving thread reads
/// the next chunk from the connection: reading (with TLS: decrypting) and writing into fresh
/// guest memory overlap instead of taking turns on one thread.
///
/// Why: the receiving thread was the migration's critical path. perf over the 2 GiB scenario
/// (1 GiB written, loopback, two processes, 30 Nov) put 1.27 CPU-s on it in plaintext and 1.77
/// with TLS, of which the pwrite into fresh memfd pages took 0.41-0.53 s either way and, with
/// TLS, AES-GCM 0.36 s and OpenSSL's copy out of its read buffer 0.28 s. The sender's thread took
/// 0.27 s (0.92 with TLS), so the receiving thread set the pace.
///
/// The receiving thread fills one of `slotCount` chunks (`buffer`), hands it over (`submit`) and
/// goes on with the next; the writer writes chunks in the order submitted, hashes them for
/// --verify while they are in cache, and tells the prefaulter how far it got. `settle` waits
/// until everything submitted is in guest memory, and reports a failed write; the receiver
/// settles before anything else touches guest memory or reads the digest (a zero range over
/// pages that hold data, a pass's end, any other frame), so each page still lands in the order
/// the source sent it.
final class PageWriter: @unchecked Sendable {
    // @unchecked: `slots` is raw memory; a chunk belongs to the receiving thread from `buffer`
    // to `submit`, then to the writer until it signals `free`. Everything else is in `state`.
    static let chunkPages = 64
    /// Chunks in flight: the receiving thread may run this many chunks ahead of the writer.
    static let slotCount = 4

    private struct Job {
        let slot: Int
        let firstPage: Int
        let pageCount: Int
        let prefaulter: PagePrefaulter?
    }

    private struct State {
        var jobs: [Job] = []
        var failure: SystemError?
        var closed = false
        var digest: LandedPagesDigest?
    }

    private let memory: GuestMemory
    private let slots: UnsafeMutableRawPointer
    private let state: Mutex<State>
    /// One permit per chunk that is not queued or being written. Made with 0 and given its
    /// permits in init: libdispatch traps on a semaphore freed below its initial value, which
    /// this one is after a failed migration (chunks queued when the writer closed never return).
    private let free = DispatchSemaphore(value: 0)
    /// One permit per queued job (and one to wake the writer when closing).
    private let queued = DispatchSemaphore(value: 0)
    /// The chunk `buffer` gives next: chunks are written in order, so they come free in order.
    private var nextSlot = 0
    private var thread: OSThread?

    init(memory: GuestMemory, digest: LandedPagesDigest?) {
        self.memory = memory
        state = Mutex(State(digest: digest))
        slots = UnsafeMutableRawPointer.allocate(byteCount: Self.slotCount * Self.chunkPages * 4096, alignment: 4096)
        for _ in 0..<Self.slotCount { free.signal() }
    }

    deinit { slots.deallocate() }

    /// A chunk of `chunkPages` pages for the receiving thread to fill, once the writer has
    /// finished with it. Throws the writer's failure, if one came.
    func buffer() throws(MigrationError) -> UnsafeMutableRawPointer {
        if thread == nil { thread = OSThread(name: "page-writer") { [self] in run() } }
        free.wait()
        if let failure = state.withLock({ $0.failure }) {
            free.signal()
            throw .connection(failure)
        }
        return slots + nextSlot * Self.chunkPages * 4096
    }

    /// The chunk `buffer` gave holds pages `firstPage ..< firstPage + pageCount`: write them.
    func submit(firstPage: Int, pageCount: Int, prefaulter: PagePrefaulter?) {
        let job = Job(slot: nextSlot, firstPage: firstPage, pageCount: pageCount, prefaulter: prefaulter)
        nextSlot = (nextSlot + 1) % Self.slotCount
        state.withLock { $0.jobs.append(job) }
        queued.signal()
    }

    /// The chunk `buffer` gave is not used after all (the connection failed while filling it).
    func giveBack() { free.signal() }

    /// Waits until every submitted chunk is in guest memory. Throws the writer's failure.
    func settle() throws(MigrationError) {
        guard thread != nil else { return }
        for _ in 0..<Self.slotCount { free.wait() }
        for _ in 0..<Self.slotCount { free.signal() }
        if let failure = state.withLock({ $0.failure }) { throw .connection(failure) }
    }

    /// The --verify digest of what landed; pages zeroed by the receiving thread (after `settle`).
    func withDigest<R>(_ body: (inout LandedPagesDigest?) -> R) -> R {
        state.withLock { body(&$0.digest) }
    }

    /// Ends the writer once the chunk it is writing is done (queued ones are dropped) and waits
    /// for it: the migration is over, or failed and drops its guest memory.
    func close() {
        guard let thread else { return }
        state.withLock { $0.closed = true }
        queued.signal()
        thread.join()
        self.thread = nil
    }

    private func run() {
        while true {
            queued.wait()
            let (next, failed) = state.withLock { state -> (Job?, Bool) in
                guard !state.closed, !state.jobs.isEmpty else { return (nil, false) }
                return (state.jobs.removeFirst(), state.failure != nil)
            }
            guard let job = next else { return }
            defer { free.signal() }
            if failed { continue }   // the receiving thread learns it at its next buffer or settle
            let chunk = slots + job.slot * Self.chunkPages * 4096
            let bytes = job.pageCount * 4096
            do {
                // The memory file, not the mapping: no page fault in this process (GuestMemory.write).
                try memory.write(chunk, count: bytes, at: UInt64(job.firstPage) * 4096)
                state.withLock { $0.digest?.landed(job.firstPage..<job.firstPage + job.pageCount, from: chunk) }
                job.prefaulter?.received(upTo: job.firstPage + job.pageCount)
            } catch {
                state.withLock { $0.failure = error }
            }
        }
    }
}
