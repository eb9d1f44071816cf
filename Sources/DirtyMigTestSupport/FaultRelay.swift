import DirtyMigCore
import Foundation
import Glibc
import Synchronization

/// A loopback relay between a sender and a receiver, for faults a real link has: it forwards
/// both ways until told to stall (stop forwarding, keep the connections open: a link that went
/// silent), to cut (close both sides), or to tear the next frame of a type from the sender (pass
/// half its payload on, then stall or cut). It reads the sender's stream frame by frame (the
/// migration protocol's 8-byte headers), so "half a checkpoint" is exact. Used by the tests
/// (DirtyMigTestSupport: not part of the `dirtymig` executable). It serves one connection, or
/// with `servesMany` every connection made to it (a session's several connections, and the new
/// ones a sender makes after a cut), each relayed alike; `setDown` makes it refuse new ones (each
/// is closed at once, as a link that is down fails a connect).
public final class FaultRelay: @unchecked Sendable {
    // @unchecked: the descriptors are set once, under `state`, before the threads use them.
    public enum Tear: Sendable { case stall, cut }

    private let listener: Int32
    public let port: UInt16
    private let target: UInt16
    private let state = Mutex(State())

    private let servesMany: Bool

    private struct State {
        /// Every relayed connection's two sockets.
        var pairs: [(client: Int32, server: Int32)] = []
        var down = false
        var accepted = 0
        var stalled = false
        var tear: (type: UInt32, then: Tear)?
        var framesForwarded: [UInt32: Int] = [:]
    }

    public init(to targetPort: UInt16, servesMany: Bool = false) throws(SystemError) {
        target = targetPort
        self.servesMany = servesMany
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(listener, 4) == 0 else { throw SystemError("relay listen") }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) }
        }
        self.listener = listener
        port = UInt16(bigEndian: address.sin_port)
        _ = OSThread(name: "relay-accept") { [self] in
            while acceptOne() && servesMany {}
        }
    }

    public var endpoint: HostPort { HostPort(host: "127.0.0.1", port: port) }

    /// Stops forwarding in both directions; the connections stay open.
    public func stall() { state.withLock { $0.stalled = true } }

    /// Closes every connection relayed so far (each side sees a reset or the end of the stream).
    public func cut() {
        let pairs = state.withLock { state in
            state.stalled = false   // the forwarding threads then see the closed sockets and end
            return state.pairs
        }
        for (client, server) in pairs {
            shutdown(client, Int32(SHUT_RDWR))
            shutdown(server, Int32(SHUT_RDWR))
        }
    }

    /// Closes every connection and stops accepting (a relay that `servesMany` accepts until then).
    public func stop() {
        cut()
        shutdown(listener, Int32(SHUT_RDWR))
    }

    /// While down, a new connection is closed as soon as it is accepted (`servesMany`).
    public func setDown(_ down: Bool) { state.withLock { $0.down = down } }

    /// The link is back after a stall (and `setDown`): what waited in the buffers flows on, and
    /// new connections are relayed again.
    public func restore() {
        state.withLock { state in
            state.stalled = false
            state.down = false
        }
    }

    /// Connections relayed so far.
    public var relayedConnections: Int { state.withLock { $0.pairs.count } }

    /// The next frame of `type` from the sender is passed on only half, then the link stalls or
    /// is cut.
    public func tearNext(frameType: UInt32, then: Tear) { state.withLock { $0.tear = (frameType, then) } }

    public func forwarded(_ type: UInt32) -> Int { state.withLock { $0.framesForwarded[type] ?? 0 } }

    /// Accepts one connection and relays it (or closes it, while down); false once the
    /// listener is closed.
    private func acceptOne() -> Bool {
        let client = accept(listener, nil, nil)
        guard client >= 0 else { return false }
        if state.withLock({ $0.down }) {
            close(client)
            return true
        }
        let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = target.bigEndian
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(server, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { close(client); close(server); return true }
        state.withLock { $0.pairs.append((client, server)) }
        _ = OSThread(name: "relay-up") { [self] in forwardFrames(from: client, to: server) }
        _ = OSThread(name: "relay-down") { [self] in forwardBytes(from: server, to: client) }
        return true
    }

    private func readExactly(_ fd: Int32, _ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let got = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, count - done, 0) }
            if got <= 0 { return nil }
            done += got
        }
        return bytes
    }

    private func writeAll(_ fd: Int32, _ bytes: ArraySlice<UInt8>) -> Bool {
        var offset = bytes.startIndex
        while offset < bytes.endIndex {
            let sent = bytes[offset...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if sent <= 0 { return false }
            offset += sent
        }
        return true
    }

    /// Waits while stalled (the bytes stay unread in the kernel's buffers, as on a dead link).
    private func waitWhileStalled() {
        while state.withLock({ $0.stalled }) { usleep(5_000) }
    }

    private func forwardFrames(from source: Int32, to sink: Int32) {
        while true {
            guard let header = readExactly(source, 8) else { break }
            let type = UInt32(header[0]) | UInt32(header[1]) << 8 | UInt32(header[2]) << 16 | UInt32(header[3]) << 24
            let length = Int(UInt32(header[4]) | UInt32(header[5]) << 8 | UInt32(header[6]) << 16 | UInt32(header[7]) << 24)
            guard let payload = readExactly(source, length) else { break }
            waitWhileStalled()
            let tear = state.withLock { state -> Tear? in
                guard let armed = state.tear, armed.type == type else { return nil }
                state.tear = nil
                return armed.then
            }
            if let tear {
                _ = writeAll(sink, header[...])
                _ = writeAll(sink, payload[0..<length / 2])
                if tear == .cut { cut(); break }
                stall()
                waitWhileStalled()
                continue
            }
            guard writeAll(sink, header[...]), writeAll(sink, payload[...]) else { break }
            state.withLock { $0.framesForwarded[type, default: 0] += 1 }
        }
        shutdown(sink, Int32(SHUT_WR))
    }

    private func forwardBytes(from source: Int32, to sink: Int32) {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let got = buffer.withUnsafeMutableBytes { recv(source, $0.baseAddress, 65536, 0) }
            if got <= 0 { break }
            waitWhileStalled()
            guard writeAll(sink, buffer[0..<got]) else { break }
        }
        shutdown(sink, Int32(SHUT_WR))
    }

    deinit {
        cut()
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
    }
}
