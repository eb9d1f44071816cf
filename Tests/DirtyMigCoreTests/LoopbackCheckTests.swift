import DirtyMigCore
import Foundation
import XCTest

/// Plaintext is for loopback: a name is resolved once, every address it gives must be a
/// loopback one, and the socket listens or connects on exactly those addresses; a name that
/// does not resolve is refused, never let through.
final class LoopbackCheckTests: XCTestCase {
    /// A resolver that answers every name with `hosts` (numeric addresses), and counts its calls.
    private func resolver(_ hosts: @escaping @Sendable (Int) -> [String], calls: Lines = Lines()) -> NameResolver {
        NameResolver { endpoint, passive throws(SystemError) in
            calls.append(endpoint.host)
            var addresses: [SocketAddress] = []
            for host in hosts(calls.all.count) {
                addresses += try NameResolver.system.addresses(HostPort(host: host, port: endpoint.port), passive: passive)
            }
            return addresses
        }
    }

    func testANameThatDoesNotResolveIsRefusedForPlaintext() {
        let endpoint = HostPort(host: "no-such-host.invalid", port: 4444)
        XCTAssertThrowsError(try ChannelSecurity.plain.checkListening(on: endpoint)) {
            XCTAssertTrue("\($0)".contains("cannot listen on 'no-such-host.invalid': the name does not resolve"), "\($0)")
        }
        XCTAssertThrowsError(try ChannelSecurity.plain.checkConnecting(to: endpoint)) {
            XCTAssertTrue("\($0)".contains("'no-such-host.invalid' does not resolve"), "\($0)")
        }
        XCTAssertNoThrow(try ChannelSecurity.plain.checkListening(on: HostPort(host: "localhost", port: 4444)))
        XCTAssertNoThrow(try ChannelSecurity.plain.checkConnecting(to: HostPort(host: "127.0.0.1", port: 4444)))
        XCTAssertNoThrow(try ChannelSecurity(credentials: .none, insecure: true).checkListening(on: HostPort(host: "", port: 4444)))
        XCTAssertThrowsError(try ChannelSecurity.plain.checkListening(on: HostPort(host: "", port: 4444)))
    }

    func testPlaintextNeedsEveryAddressToBeLoopback() throws {
        let endpoint = HostPort(host: "db.example", port: 4444)
        let elsewhere = resolver { _ in ["10.1.2.3"] }, mixed = resolver { _ in ["127.0.0.1", "10.1.2.3"] }
        for names in [elsewhere, mixed] {
            XCTAssertThrowsError(try ChannelSecurity.plain.checkListening(on: endpoint, resolver: names)) {
                XCTAssertTrue("\($0)".contains("refusing to listen on db.example:4444 (which resolves to"), "\($0)")
            }
            XCTAssertThrowsError(try ChannelSecurity.plain.checkConnecting(to: endpoint, resolver: names)) {
                XCTAssertTrue("\($0)".contains("refusing to migrate to db.example:4444 (which resolves to"), "\($0)")
            }
            XCTAssertNoThrow(try ChannelSecurity(credentials: .none, insecure: true).checkConnecting(to: endpoint, resolver: names))
        }
        let loopback = try ChannelSecurity.plain.checkConnecting(to: endpoint, resolver: resolver { _ in ["127.0.0.1", "::1"] })
        XCTAssertEqual(loopback.map(\.description), ["127.0.0.1", "::1"])
        XCTAssertTrue(loopback.allSatisfy(\.isLoopback))
        let failing = NameResolver { endpoint, _ throws(SystemError) in
            throw SystemError("resolve \(endpoint.host): Temporary failure in name resolution", errno: EHOSTUNREACH)
        }
        XCTAssertThrowsError(try ChannelSecurity.plain.checkConnecting(to: endpoint, resolver: failing)) {
            XCTAssertTrue("\($0)".contains("Temporary failure in name resolution"), "\($0)")
        }
    }

    /// A name that resolves to loopback when checked and elsewhere afterwards: the connection
    /// goes where the check looked, and the name is resolved once.
    func testTheConnectionGoesToTheAddressesThatWereChecked() throws {
        let listener = try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0))
        let calls = Lines()
        let rebinding = resolver({ call in call == 1 ? ["127.0.0.1"] : ["10.1.2.3"] }, calls: calls)
        let endpoint = HostPort(host: "rebinding.example", port: listener.localPort)
        let connection = try MigrationConnector.connect(to: endpoint, security: .plain, timeout: 2, resolver: rebinding)
        defer { connection.shutdown() }
        XCTAssertEqual(calls.all.count, 1, "resolved once")
        let accepted = try listener.accept()
        XCTAssertTrue(accepted.peerDescription.hasPrefix("127.0.0.1:"), accepted.peerDescription)

        let listenCalls = Lines()
        let addresses = try ChannelSecurity.plain.checkListening(on: HostPort(host: "rebinding.example", port: 0),
                                                                 resolver: resolver({ call in call == 1 ? ["127.0.0.1"] : ["10.1.2.3"] }, calls: listenCalls))
        let bound = try TCPSocket.listen(HostPort(host: "rebinding.example", port: 0), addresses: addresses)
        XCTAssertEqual(listenCalls.all.count, 1)
        let probe = try TCPSocket.connect(HostPort(host: "127.0.0.1", port: bound.localPort), timeout: 2)
        probe.shutdown()
    }
}
