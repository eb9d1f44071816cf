import CKVM
import Glibc

/// A POSIX timer that sends the kick signal to one thread (SIGEV_THREAD_ID): the way a
/// paced vCPU bounds its own run slice. The signal interrupts KVM_RUN on that very thread, so the
/// slice ends on time however busy the host's cores are, unlike a kick from another thread, which
/// first has to be scheduled. Create, arm and delete it on the thread it signals.
final class ThreadTimer {
    private var timer: timer_t?

    /// A timer that signals the calling thread; nil if the kernel refuses one.
    init?(signal: Int32) {
        var event = sigevent()
        event.sigev_notify = 4   // SIGEV_THREAD_ID
        event.sigev_signo = signal
        event._sigev_un._tid = ckvm_gettid()
        var created: timer_t? = nil
        guard timer_create(CLOCK_MONOTONIC, &event, &created) == 0 else { return nil }
        timer = created
    }

    /// Fires `nanoseconds` from now and then every `nanoseconds` until disarmed (re-arming
    /// replaces the previous schedule).
    func arm(every nanoseconds: UInt64) {
        let period = timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
        var spec = itimerspec(it_interval: period, it_value: period)
        timer_settime(timer, 0, &spec, nil)
    }

    func disarm() {
        var spec = itimerspec()
        timer_settime(timer, 0, &spec, nil)
    }

    deinit { timer_delete(timer) }
}
