import Dispatch
import Glibc
import Synchronization

/// Guest memory allocated before any migration arrives: `receive --memory SIZE`, what QEMU's
/// destination does when it is started with `-m SIZE -mem-prealloc`.
///
/// Why: on this machine the receiver's first pass is bound by page faults, not by the socket.
/// Memory the host has taken back is an outer fault per page (1 GiB of cold memfd: 0.65 s with
/// one thread, 0.35 s with two; up to 1.4 s), and a receiver that allocates when the hello
/// arrives pays that inside the migration, however well `PagePrefaulter` overlaps it. Allocated
/// here, the pages are resident before the source starts its clock, so the first pass only
/// copies into them. The cost moves to `receive`'s start, where a person or a script waits for
/// the "listening" line anyway; the RAM is held from then on, as QEMU's is.
///
/// The memory serves one VM of exactly its size. A VM of another size gets fresh memory as
/// without the option; one that fails after landing here spoils it (part of its pages are
/// written), so new memory is prepared in the background for the next attempt.
public final class PreparedMemory: Sendable {
    public let size: UInt64
    /// How long the last preparation took, for the receiver's log.
    public var secondsToPrepare: Double { state.withLock { $0.seconds } }
    private let log: @Sendable (String) -> Void
    private let state = Mutex(State())

    private struct State {
        var memory: GuestMemory?
        var seconds = 0.0
        /// Given to a VM, not yet replaced.
        var taken = false
    }

    /// Whether a VM of the prepared size would land in prepared memory now: `ready`; `inUse` by
    /// the VM (or the standby's copy) that took it; `preparing` before `prepare()` has finished,
    /// or while memory is prepared again after a failure.
    public enum Availability: String, Sendable {
        case ready
        case inUse = "in_use"
        case preparing
    }

    public var availability: Availability {
        state.withLock { $0.memory != nil ? .ready : $0.taken ? .inUse : .preparing }
    }

    /// Nothing is allocated until `prepare()`.
    public init(size: UInt64, log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.size = size
        self.log = log
    }

    /// Allocates and populates the memory, refusing a size the guest cannot have or the host
    /// has not got now. Blocks until it is resident.
    public func prepare() throws(MachineError) {
        let start = MonotonicClock.nanoseconds()
        let memory = try Self.allocate(size)
        state.withLock {
            $0.memory = memory
            $0.seconds = Double(MonotonicClock.nanoseconds() - start) / 1e9
        }
    }

    /// The prepared memory for a VM of `size` bytes, at most once; nil for another size, or
    /// while new memory is being prepared.
    public func take(size: UInt64) -> GuestMemory? {
        state.withLock { state in
            guard size == self.size, let memory = state.memory else { return nil }
            state.memory = nil
            state.taken = true
            return memory
        }
    }

    /// The VM built on the prepared memory failed before it ran (its partial memory was
    /// dropped): prepares new memory on a background thread. Nothing if it was not taken (or
    /// is being replaced already: `taken` is cleared here, once).
    public func replaceIfTaken() {
        let wasTaken = state.withLock { state -> Bool in
            defer { state.taken = false }
            return state.taken
        }
        guard wasTaken else { return }
        _ = OSThread(name: "prepare-memory") { [self] in
            do {
                try prepare()
                log("prepared \(ByteSize.format(size)) of guest memory again in \(String(format: "%.2f", secondsToPrepare)) s")
            } catch {
                log("could not prepare \(ByteSize.format(size)) of guest memory again (\(error)): the next VM gets fresh memory")
            }
        }
    }

    /// Allocates and populates, in 64 MiB steps spread over the host's CPUs (two threads
    /// populate 1 GiB of cold memory in about half the time of one, see the type's comment).
    private static func allocate(_ size: UInt64) throws(MachineError) -> GuestMemory {
        try MachineConfiguration.validate(memorySize: size)
        try MemoryBudget.check(needed: size + MemoryBudget.processOverhead,
                               for: "prepared guest memory (receive --memory \(ByteSize.format(size)))")
        let memory: GuestMemory
        do { memory = try GuestMemory(size: size, allocatedAhead: true) } catch { throw .system(error) }
        let step: UInt64 = 64 << 20
        let steps = Int((size + step - 1) / step)
        let failure = Mutex<SystemError?>(nil)
        DispatchQueue.concurrentPerform(iterations: steps) { index in
            let start = UInt64(index) * step
            do throws(SystemError) { try memory.populate(start..<min(size, start + step)) } catch {
                failure.withLock { $0 = $0 ?? error }
            }
        }
        if let error = failure.withLock({ $0 }) { throw .system(error) }
        return memory
    }
}
