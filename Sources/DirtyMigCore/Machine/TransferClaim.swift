import Synchronization

/// At most one thing copies a VM's memory elsewhere at a time: a migration or a replication.
/// Both collect the tracker's dirty pages, and a collection hands pages to one consumer only.
public final class TransferClaim: Sendable {
    private let holder = Mutex<String?>(nil)

    public init() {}

    /// Takes the claim for `what` ("a migration to HOST:PORT"); returns what holds it instead.
    public func claim(_ what: String) -> String? {
        holder.withLock { holder in
            if let current = holder { return current }
            holder = what
            return nil
        }
    }

    public func release() { holder.withLock { $0 = nil } }

    public var current: String? { holder.withLock { $0 } }
}

extension Machine {
    /// Why no migration or replication may start from this copy, if one may not: its standby
    /// took over (see Replicator), so the VM that counts runs there.
    var supersededRefusal: String? {
        output.isFenced ? "this copy of the VM is superseded: its standby took over and runs the VM; migrate or replicate that one, and stop this one ('dirtymig stop')" : nil
    }
}
