import Glibc

/// Scheduling of dirtymig's own helper threads relative to the vCPU threads.
public enum ThreadPriority {
    /// Asks for SCHED_FIFO (the lowest real-time priority) for the calling thread, so that it
    /// runs the moment it wakes even when every core is busy. The dirty-ring harvester needs
    /// this: on a 2-core host running two unpaced vCPUs plus a migration's sender and receiver,
    /// a normal-priority harvester waited long enough for a vCPU to overrun its 4096-entry ring
    /// (about 9 ms of unpaced writing), and an overrun on this machine's kernel can leave the
    /// vCPU stuck in ring-full exits for good. The thread sleeps between polls, so it never holds
    /// a core for long. Without CAP_SYS_NICE the request fails and the thread keeps its normal
    /// priority; returns whether it took.
    @discardableResult
    public static func preferRealtime() -> Bool {
        var parameters = sched_param()
        parameters.sched_priority = 1
        return pthread_setschedparam(pthread_self(), SCHED_FIFO, &parameters) == 0
    }
}
