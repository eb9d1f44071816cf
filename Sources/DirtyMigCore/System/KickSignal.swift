import Glibc

/// The signal that kicks a vCPU thread out of KVM_RUN. Its handler does nothing: the point is that
/// the blocking ioctl returns EINTR. Installed once, without SA_RESTART. Paired with
/// `kvm_run.immediate_exit` so a kick that lands just before KVM_RUN is not lost.
public enum KickSignal {
    public static let number: Int32 = SIGUSR1

    private static let installOnce: Void = {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0
        sigaction(SIGUSR1, &action, nil)
    }()

    public static func install() { _ = installOnce }

    public static func send(to thread: pthread_t) {
        pthread_kill(thread, number)
    }
}
