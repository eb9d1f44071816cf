/// A primary's new connection to the replication a standby follows (a hello with `replicate`
/// and `resume`, naming that replication's session id), handed from the thread that read its
/// hello to the replication's thread, which drops the old connection and takes the resync on
/// this one (`StandbySession.acceptResume`). The replication's thread owns the connection from
/// then on and closes it when the replication ends.
struct StandbyResume: Sendable {
    let connection: any MigrationConnection
    /// Frames over `connection`, with the receiver's frame deadline.
    let channel: MigrationChannel
    let hello: MigrationHello
    let codec: PageCodec
    let peer: String
}
