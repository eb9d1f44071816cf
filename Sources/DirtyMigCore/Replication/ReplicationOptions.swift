/// What `migrate --continuous` (the `replicate` control command) asks for.
public struct ReplicationOptions: Sendable {
    public var standby: HostPort
    /// An epoch ends after this long (Remus: 25 ms, 40 checkpoints a second).
    public var intervalSeconds: Double = 0.025
    /// Or as soon as the guest has dirtied this many pages (ring and quota tracking only).
    public var checkpointPages: Int?
    /// One JSON line of figures per second goes here (written by the VM's process).
    public var statsPath: String?
    /// Credentials for the channel (TLS 1.3), as a migration's.
    public var security = ChannelSecurity.plain
    /// How the initial copy's page batches and the checkpoints' pages travel (`--compress`).
    public var compression: PageCompression = .none
    /// Copy an epoch's dirty pages into the staging buffer while it runs as well as in its pause
    /// (see StagedCheckpoint). Always on for users; the benchmark turns it off to show what the
    /// pause costs without it.
    public var stagesWhileRunning = true

    public init(standby: HostPort) { self.standby = standby }

    public static let intervalRange: ClosedRange<Double> = 0.0001...60
    public static let checkpointPagesRange: ClosedRange<Double> = 1...Double(1 << 24)

    public enum Invalid: Error, Equatable, CustomStringConvertible {
        case interval, checkpointPages, pagesNeedRing

        public var description: String {
            switch self {
            case .interval: return "checkpoint interval must be from 100 µs (0.1ms) to 60 s (--checkpoint-interval / checkpoint_interval_ms)"
            case .checkpointPages: return "checkpoint pages must be a whole number from 1 to 16777216 (--checkpoint-pages / checkpoint_pages)"
            case .pagesNeedRing: return "--checkpoint-pages needs a VM booted with --track ring or quota: the bitmap learns of dirty pages only when it is read, so with --track bitmap checkpoints end on --checkpoint-interval alone"
            }
        }
    }

    /// The one place the values are checked, for the command line and the control socket alike.
    public mutating func set(intervalSeconds: Double?, checkpointPages: Double?) throws(Invalid) {
        if let intervalSeconds {
            guard Self.intervalRange.contains(intervalSeconds) else { throw .interval }
            self.intervalSeconds = intervalSeconds
        }
        if let checkpointPages {
            guard Self.checkpointPagesRange.contains(checkpointPages), checkpointPages.rounded() == checkpointPages else {
                throw .checkpointPages
            }
            self.checkpointPages = Int(checkpointPages)
        }
    }
}
