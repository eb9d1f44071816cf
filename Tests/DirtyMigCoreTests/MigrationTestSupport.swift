import DirtyMigCore
import Foundation
import XCTest

/// Receives one migration on a background thread.
final class Arrival: @unchecked Sendable {
    private let lock = NSLock()
    private var result: Result<Machine, MigrationError>?
    let receiver: MigrationReceiver
    private var thread: OSThread?

    init(_ kvm: KVMSystem, guestOutput: (@Sendable (String) -> Void)? = nil) throws {
        receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm, guestOutput: guestOutput)
        thread = OSThread(name: "test-receive") { [self] in
            let outcome: Result<Machine, MigrationError>
            do throws(MigrationError) { outcome = .success(try receiver.receiveOne()) } catch { outcome = .failure(error) }
            lock.lock(); result = outcome; lock.unlock()
        }
    }

    var endpoint: HostPort { HostPort(host: "127.0.0.1", port: receiver.port) }

    func wait() -> Result<Machine, MigrationError> {
        thread?.join()
        receiver.stop()
        lock.lock(); defer { lock.unlock() }
        return result!
    }
}
