import Foundation

/// What vCPU threads report to the rest of the program: console lines, guest errors, and the
/// first fatal vCPU failure (which ends the VM's run). Observers are set before the VM starts.
public final class MachineEvents: @unchecked Sendable {
    // @unchecked: mutable state is guarded by `lock`; observers are set before start().
    private let lock = NSLock()
    private var failure: Error?
    private var guestErrorCode: UInt32 = 0
    private let failed = DispatchSemaphore(value: 0)

    /// A guest's console line, escaped and bounded already (ConsoleLine): fit to print as it is.
    public var onConsoleLine: (@Sendable (Int, String) -> Void)?
    public var onFailure: (@Sendable (Error) -> Void)?

    public init() {}

    func consoleLine(_ vcpu: Int, _ line: String) { onConsoleLine?(vcpu, line) }

    func guestReportedError(_ vcpu: Int, _ code: UInt32) {
        lock.lock(); guestErrorCode = code; lock.unlock()
        let reason = GuestError(rawValue: code)?.explanation ?? "code \(code)"
        vcpuFailed(vcpu, MachineError.guestFailed("the guest reported an error on vCPU \(vcpu): \(reason)"))
    }

    func vcpuFailed(_ vcpu: Int, _ error: Error) {
        lock.lock()
        let first = failure == nil
        if first { failure = error }
        lock.unlock()
        if first {
            onFailure?(error)
            failed.signal()
        }
    }

    /// The first fatal error, if a vCPU has died.
    public var firstFailure: Error? {
        lock.lock(); defer { lock.unlock() }
        return failure
    }

    /// Waits up to `timeout` seconds for a failure; returns it, or nil on timeout.
    public func waitForFailure(timeout: Double) -> Error? {
        if failed.wait(timeout: .now() + timeout) == .success {
            failed.signal()
            return firstFailure
        }
        return nil
    }
}
