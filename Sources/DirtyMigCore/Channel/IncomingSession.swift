import Foundation

/// The receiver's side of one session (a migration or a replication): its id, the connections
/// its hello announced, and the connections that joined it, which whoever runs the session
/// takes by role. A connection is admitted before anything is kept for it, only while the
/// session is open, only for a role the hello announced, and no more of a role than announced.
/// Ending the session closes every connection that joined it, taken or not: a joined
/// connection never outlives its session.
public final class IncomingSession: @unchecked Sendable {
    // @unchecked: `condition` guards `state`.
    public let id: SessionID
    public let announced: SessionJoins
    private let condition = NSCondition()
    private var state = State()

    private struct State {
        /// Admitted so far, by role (delivered or about to be).
        var admitted: [ConnectionRole: Int] = [:]
        /// Delivered and not yet taken.
        var waiting: [(role: ConnectionRole, connection: any MigrationConnection)] = []
        /// Every connection delivered, taken or not: what `end` closes.
        var joined: [any MigrationConnection] = []
        /// How the session ended (nil while it is open).
        var ended: String?
    }

    public init(id: SessionID, announced: SessionJoins) {
        self.id = id
        self.announced = announced
    }

    /// Connections that joined (delivered) and are still open, of every role: 0 once ended.
    public var joinedCount: Int {
        condition.lock(); defer { condition.unlock() }
        return state.joined.count
    }

    /// Admits one connection of `role`, or says why not (the refusal the joining sender shows).
    /// Admitted, it counts against the session's bound at once, before its reply is sent.
    func admit(_ role: ConnectionRole) -> String? {
        condition.lock(); defer { condition.unlock() }
        if let ended = state.ended { return Self.endedReason(id, ended) }
        let bound = announced.count(of: role)
        guard bound > 0 else {
            return "session \(id) did not announce a \(role) connection (its hello announced \(announced.summary))"
        }
        let admitted = state.admitted[role, default: 0]
        guard admitted < bound else {
            return "session \(id) already has the \(bound) \(role) connection\(bound == 1 ? "" : "s") its hello announced"
        }
        state.admitted[role] = admitted + 1
        return nil
    }

    /// Hands an admitted connection (its acceptance already sent) to the session. A session
    /// that ended meanwhile closes it at once.
    func deliver(_ connection: any MigrationConnection, role: ConnectionRole) {
        condition.lock()
        let open = state.ended == nil
        if open {
            state.waiting.append((role, connection))
            state.joined.append(connection)
            condition.broadcast()
        }
        condition.unlock()
        if !open { connection.shutdown() }
    }

    /// A connection of `role` that joined, waiting up to `timeout` seconds for one; nil if none
    /// came in time or the session ended. The session still closes it when it ends.
    public func take(_ role: ConnectionRole, timeout: Double) -> (any MigrationConnection)? {
        let deadline = Date(timeIntervalSinceNow: max(timeout, 0))
        condition.lock(); defer { condition.unlock() }
        while true {
            if state.ended != nil { return nil }
            if let index = state.waiting.firstIndex(where: { $0.role == role }) {
                return state.waiting.remove(at: index).connection
            }
            if !condition.wait(until: deadline) { return nil }
        }
    }

    /// Ends the session (`how`: "completed", "failed", "cancelled"): every connection that
    /// joined it is closed, and no other is admitted.
    func end(_ how: String) {
        condition.lock()
        let first = state.ended == nil
        if first { state.ended = how }
        let joined = state.joined
        state.joined = []
        state.waiting = []
        condition.broadcast()
        condition.unlock()
        for connection in joined { connection.shutdown() }
    }

    public var isEnded: Bool {
        condition.lock(); defer { condition.unlock() }
        return state.ended != nil
    }

    /// Why a connection cannot join a session that has ended.
    static func endedReason(_ id: SessionID, _ how: String) -> String {
        "session \(id) has ended (\(how)): no connection joins it any more"
    }
}
