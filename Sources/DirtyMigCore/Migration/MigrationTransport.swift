import Glibc
import Synchronization

/// What a migration channel runs over: a TCP connection (`TCPSocket`), or bytes in memory
/// (`MemoryTransport`), which lets the receiver's state machine be driven without sockets (the
/// fuzz test feeds it that way).
public protocol MigrationTransport: AnyObject, Sendable {
    /// Sends every byte of every buffer, in order.
    func send(_ buffers: [UnsafeRawBufferPointer]) throws(SystemError)
    /// Receives exactly `count` bytes. A peer that ends the stream first is ECONNRESET.
    func receive(into destination: UnsafeMutableRawPointer, count: Int) throws(SystemError)
    /// Every receive from now on must complete by `deadline` (monotonic ns); nil clears it.
    func setReceiveDeadline(_ deadline: UInt64?)
    /// Wakes any thread blocked on the transport; later calls fail.
    func shutdown()
}

extension MigrationTransport {
    public func send(_ bytes: [UInt8]) throws(SystemError) {
        let result = bytes.withUnsafeBytes { buffer in Result { () throws(SystemError) in try send([buffer]) } }
        try result.get()
    }

    public func receive(count: Int) throws(SystemError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        guard count > 0 else { return bytes }
        let result = bytes.withUnsafeMutableBytes { buffer in
            Result { () throws(SystemError) in try receive(into: buffer.baseAddress!, count: count) }
        }
        try result.get()
        return bytes
    }
}

/// A transport whose peer is a fixed byte string: receives read it in order and then see the
/// peer close; sends are counted and kept up to `keptBytes` (enough to read the replies).
public final class MemoryTransport: MigrationTransport {
    private struct State {
        var input: [UInt8]
        var offset = 0
        var output: [UInt8] = []
        var sentBytes = 0
        var closed = false
        var largestReceive = 0
    }
    private let state: Mutex<State>
    private let keptBytes: Int

    public init(input: [UInt8], keptBytes: Int = 1 << 16) {
        state = Mutex(State(input: input))
        self.keptBytes = keptBytes
    }

    /// The first `keptBytes` this side sent.
    public var output: [UInt8] { state.withLock { $0.output } }
    public var sentBytes: Int { state.withLock { $0.sentBytes } }
    /// The most bytes one receive asked for: what the reader was ready to allocate for one read.
    public var largestReceive: Int { state.withLock { $0.largestReceive } }

    public func send(_ buffers: [UnsafeRawBufferPointer]) throws(SystemError) {
        let closed = state.withLock { state -> Bool in
            guard !state.closed else { return true }
            for buffer in buffers {
                state.sentBytes += buffer.count
                let room = keptBytes - state.output.count
                if room > 0 { state.output.append(contentsOf: buffer.prefix(room)) }
            }
            return false
        }
        if closed { throw SystemError("send (the transport was shut down)", errno: EPIPE) }
    }

    public func receive(into destination: UnsafeMutableRawPointer, count: Int) throws(SystemError) {
        let copied = state.withLock { state -> Bool in
            state.largestReceive = max(state.largestReceive, count)
            guard !state.closed, state.input.count - state.offset >= count else {
                state.offset = state.input.count
                return false
            }
            state.input.withUnsafeBytes { source in
                destination.copyMemory(from: source.baseAddress! + state.offset, byteCount: count)
            }
            state.offset += count
            return true
        }
        if !copied { throw SystemError("receive (the peer closed the connection)", errno: ECONNRESET) }
    }

    public func setReceiveDeadline(_ deadline: UInt64?) {}

    public func shutdown() { state.withLock { $0.closed = true } }
}
