import Glibc
import Synchronization

/// Closes refused connections gently, all on one thread: each is held (its sending half shut)
/// until the peer closes its end or `seconds` pass, reading and dropping whatever it sends.
/// Closing a socket with unread bytes (a ClientHello, a hello) resets the connection, and a
/// reset can reach the peer before it has read the refusal sent just before it. One thread
/// serves them all, and at most `capacity` wait at once (beyond that they are closed at once):
/// a flood costs neither a thread per connection nor unbounded descriptors.
final class LingeringClose: Sendable {
    private struct Held {
        let socket: TCPSocket
        let until: UInt64
    }
    private struct State {
        var held: [Held] = []
        var running = false
    }
    private let state = Mutex(State())
    let capacity: Int
    let seconds: Double

    init(capacity: Int = 64, seconds: Double = 2) {
        self.capacity = capacity
        self.seconds = seconds
    }

    /// Takes `socket` over: it is closed when its peer has closed, or after `seconds`.
    func close(_ socket: TCPSocket) {
        socket.shutdownSending()
        let until = MonotonicClock.nanoseconds() + UInt64(seconds * 1e9)
        let start = state.withLock { state -> Bool? in
            guard state.held.count < capacity else { return nil }
            state.held.append(Held(socket: socket, until: until))
            defer { state.running = true }
            return !state.running
        }
        guard let start else { return socket.shutdown() }   // full: dropped now (its reference goes with it)
        if start { _ = OSThread(name: "migr-linger") { [self] in drain() } }
    }

    /// How many are held now.
    var count: Int { state.withLock { $0.held.count } }

    private func drain() {
        var scratch = [UInt8](repeating: 0, count: 16 << 10)
        while true {
            let held = state.withLock { state -> [Held] in
                if state.held.isEmpty { state.running = false }
                return state.held
            }
            if held.isEmpty { return }
            var entries = held.map { pollfd(fd: $0.socket.fd.rawValue, events: Int16(POLLIN), revents: 0) }
            _ = poll(&entries, nfds_t(entries.count), 100)
            let now = MonotonicClock.nanoseconds()
            var done: Set<Int32> = []
            for (index, entry) in entries.enumerated() {
                var finished = now >= held[index].until
                if entry.revents != 0 {
                    let got = scratch.withUnsafeMutableBytes { recv(entry.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                    if got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR) { finished = true }
                }
                if finished { done.insert(entry.fd) }
            }
            guard !done.isEmpty else { continue }
            state.withLock { state in state.held.removeAll { done.contains($0.socket.fd.rawValue) } }
        }
    }
}
