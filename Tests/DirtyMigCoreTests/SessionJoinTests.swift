@testable import DirtyMigCore
import Foundation
import XCTest

/// A migration with more than one connection, end to end through a real receiver: a connection
/// that names a running session's id and a role its hello announced is authenticated as the
/// first was and handed to that session; one with an unknown id, a role not announced, beyond
/// the number announced, or in plaintext to a TLS receiver is refused with a reason its sender
/// shows; the connections that joined close when the session ends.
final class SessionJoinTests: XCTestCase {
    private static let memory: UInt64 = 64 << 20

    private func hello(_ kvm: KVMSystem, joins: SessionJoins) -> MigrationHello {
        let tsc = ((try? HostTSC.frequency(kvm: kvm)) ?? 2_000_000_000) / 1000
        let config = GuestConfig(tscHz: tsc * 1000, memorySize: Self.memory, vcpus: [VCPUWorkload(kind: .idle, seed: 0)])
        var hello = MigrationHello(name: "t", memorySize: Self.memory, vcpuCount: 1, tracking: .bitmap, ringEntries: 4096,
                                   tscKHz: tsc, requiredFeatures: .workloadGuest, bootSource: .workloadGuest, bootAnnouncement: config.encode())
        hello.joins = joins
        return hello
    }

    /// A receiver whose outcomes and log lines are collected.
    private func startReceiver(_ kvm: KVMSystem, security: ChannelSecurity = .plain) throws -> (MigrationReceiver, Lines, Lines, OSThread) {
        let log = Lines(), outcomes = Lines()
        let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm,
                                                    security: security) { log.append($0) }
        let serving = OSThread(name: "test-receiver") {
            while true {
                do throws(MigrationError) {
                    try receiver.receiveOne().stop()
                    outcomes.append("received")
                } catch {
                    if case .receiverStopped = error { return }
                    outcomes.append("\(error)")
                }
            }
        }
        return (receiver, log, outcomes, serving)
    }

    /// A session opened at `receiver`: connected with `security`, its hello (announcing `joins`)
    /// accepted.
    private func openSession(_ receiver: MigrationReceiver, _ kvm: KVMSystem, joins: SessionJoins,
                             security: ChannelSecurity = .plain) throws -> MigrationSession {
        let session = try MigrationSession.connect(to: HostPort(host: "127.0.0.1", port: receiver.port), security: security)
        do { _ = try session.greet(hello(kvm, joins: joins)) } catch {   // a refusal is thrown
            session.close()
            throw error
        }
        return session
    }

    /// A join's hello sent over a bare plaintext connection, and the reply.
    private func plaintextJoin(_ port: UInt16, _ join: SessionJoin) throws -> MigrationHelloReply {
        let socket = try TCPSocket.connect(HostPort(host: "127.0.0.1", port: port))
        defer { socket.shutdown() }
        socket.setTimeouts(send: 5, receive: 5)
        let channel = MigrationChannel(transport: socket)
        try channel.send(.hello, join.encode())
        return try channel.receive(.helloReply, MigrationHelloReply.init(decoding:))
    }

    private func wait(until condition: () -> Bool, seconds: Double = 10) {
        let deadline = Date().addingTimeInterval(seconds)
        while !condition() && Date() < deadline { usleep(10_000) }
    }

    func testAConnectionJoinsARunningSessionAndIsHandedToIt() throws {
        let kvm = try requireKVM()
        let (receiver, _, _, serving) = try startReceiver(kvm)
        defer { receiver.stop(); serving.join() }
        let session = try openSession(receiver, kvm, joins: SessionJoins(pages: 1, faults: 1))
        defer { session.close() }
        let incoming = try XCTUnwrap(receiver.activeSession)
        XCTAssertEqual(incoming.id, session.id, "the receiver learned the session's id from its hello")
        XCTAssertEqual(incoming.announced, SessionJoins(pages: 1, faults: 1))

        let faults = try session.join(.faults)
        let pages = try session.join(.pages)
        let takenFaults = try XCTUnwrap(incoming.take(.faults, timeout: 5))
        let takenPages = try XCTUnwrap(incoming.take(.pages, timeout: 5))
        XCTAssertEqual(incoming.joinedCount, 2)
        // Each taken connection is the one its role names: bytes cross it both ways.
        try faults.send(Array("request".utf8))
        XCTAssertEqual(try takenFaults.receive(count: 7), Array("request".utf8))
        try takenPages.send([1, 2, 3])
        XCTAssertEqual(try pages.receive(count: 3), [1, 2, 3])
        // The control connection carries the migration on: a pass ends and is acknowledged.
        try session.channel.send(.iterationEnd, MigrationPassEnd(pass: 1).encode())
        XCTAssertEqual(try session.channel.receive(.iterationAck, MigrationPassEnd.init(decodingAck:)).pass, 1)
    }

    func testTheJoinedConnectionsCloseWhenTheSessionEnds() throws {
        let kvm = try requireKVM()
        let (receiver, _, outcomes, serving) = try startReceiver(kvm)
        defer { receiver.stop(); serving.join() }
        let session = try openSession(receiver, kvm, joins: SessionJoins(pages: 2, faults: 1))
        let faults = try session.join(.faults)
        let pages = try session.join(.pages)
        let incoming = try XCTUnwrap(receiver.activeSession)
        XCTAssertNotNil(incoming.take(.faults, timeout: 5))   // taken or waiting, both close with the session
        wait { incoming.joinedCount == 2 }

        // The source goes away: the migration fails, its session ends.
        session.control.shutdown()
        wait { outcomes.all.count >= 1 }
        XCTAssertTrue(incoming.isEnded)
        XCTAssertThrowsError(try faults.receive(count: 1), "the taken faults connection was closed")
        XCTAssertThrowsError(try pages.receive(count: 1), "the pages connection was closed")
        // A late join hears that its session ended, not that it never existed.
        XCTAssertThrowsError(try session.join(.pages)) { error in
            XCTAssertTrue("\(error)".hasPrefix("the destination refused the migration: session \(session.id) has ended (failed: "), "\(error)")
        }
        session.close()
    }

    func testJoinsThatDoNotBelongAreRefusedWithAReason() throws {
        let kvm = try requireKVM()
        let (receiver, log, _, serving) = try startReceiver(kvm)
        defer { receiver.stop(); serving.join() }
        let session = try openSession(receiver, kvm, joins: SessionJoins(pages: 0, faults: 1))
        defer { session.close() }

        // An id no session has.
        let stranger = SessionJoin(session: .random(), role: .faults)
        let unknown = try plaintextJoin(receiver.port, stranger)
        XCTAssertFalse(unknown.accepted)
        XCTAssertEqual(unknown.reason, "no session \(stranger.session) is open here (it never began here, or ended long ago): a connection joins only the session its control connection opened")
        // A role the hello did not announce, as the sender shows it.
        XCTAssertThrowsError(try session.join(.pages)) { error in
            XCTAssertEqual("\(error)", "the destination refused the migration: session \(session.id) did not announce a pages connection (its hello announced 1 faults)")
        }
        // The announced one joins; one more of its role is refused.
        _ = try session.join(.faults)
        XCTAssertThrowsError(try session.join(.faults)) { error in
            XCTAssertEqual("\(error)", "the destination refused the migration: session \(session.id) already has the 1 faults connection its hello announced")
        }
        wait { receiver.activeSession?.joinedCount == 1 && log.all.filter { $0.hasPrefix("refused a") }.count >= 3 }
        XCTAssertEqual(receiver.activeSession?.joinedCount, 1, "only the admitted connection was handed over")
        XCTAssertEqual(log.all.filter { $0.hasPrefix("refused a faults connection from 127.0.0.1:") }.count, 2, "\(log.all)")
        XCTAssertEqual(log.all.filter { $0.hasPrefix("refused a pages connection from 127.0.0.1:") }.count, 1, "\(log.all)")
        // Refusals leave the session running: its control connection still works.
        try session.channel.send(.iterationEnd, MigrationPassEnd(pass: 1).encode())
        XCTAssertEqual(try session.channel.receive(.iterationAck, MigrationPassEnd.init(decodingAck:)).pass, 1)
    }

    func testAJoinIsAuthenticatedAsTheFirstConnectionWas() throws {
        let kvm = try requireKVM()
        let directory = try privateTemporaryDirectory("dmjoin")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let file = directory + "/key.psk"
        _ = FileManager.default.createFile(atPath: file, contents: Data("test:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n".utf8),
                                           attributes: [.posixPermissions: 0o600])
        let security = try ChannelSecurity.load(pskFile: file, tlsDirectory: nil, peerName: nil, insecure: false)
        let (receiver, log, _, serving) = try startReceiver(kvm, security: security)
        defer { receiver.stop(); serving.join() }
        let session = try openSession(receiver, kvm, joins: SessionJoins(pages: 0, faults: 1), security: security)
        defer { session.close() }

        // The right id in plaintext: refused before its hello is read, in clear, as any plaintext
        // migration at a TLS receiver is; the session's faults connection is still to come.
        let plaintext = try plaintextJoin(receiver.port, SessionJoin(session: session.id, role: .faults))
        XCTAssertFalse(plaintext.accepted)
        XCTAssertTrue(plaintext.reason.hasPrefix("this destination accepts only encrypted migrations"), plaintext.reason)
        wait { log.all.contains { $0.contains("a plaintext migration, refused") } }
        XCTAssertTrue(log.all.contains { $0.contains("a plaintext migration, refused") }, "\(log.all)")

        // With the session's own credentials it joins, encrypted at both ends.
        let faults = try session.join(.faults)
        XCTAssertTrue(faults.channel.encrypted)
        let taken = try XCTUnwrap(receiver.activeSession?.take(.faults, timeout: 5))
        XCTAssertTrue(taken.channel.encrypted)
        try faults.send(Array("fault".utf8))
        XCTAssertEqual(try taken.receive(count: 5), Array("fault".utf8))
    }
}
