/// How the primary tells a standby that is slow to answer from one that is gone.
///
/// A checkpoint is acknowledged only once the standby has all of it, so on a link slower than
/// the guest dirties memory an acknowledgement can take longer than any fixed timeout (a 2 MiB
/// checkpoint takes 0.84 s at 20 Mbit/s) while the standby is well. Timing acknowledgements alone
/// made the primary give up on such a standby. So two things count as the standby living, and
/// the standby is lost only when neither has happened for `lossNanoseconds`:
/// - a frame from it (an acknowledgement, or any other);
/// - its TCP taking more of our bytes (its host is up and its reader takes data: a reader that
///   stops closes its window and the count stops) — but only while it does not hold everything
///   we sent already: once it does, an answer it owes is up to its reader alone, and silence from
///   then on counts. Bytes sent after that (heartbeats: the next checkpoint waits for the answer)
///   do not excuse it: a heartbeat in flight is not the checkpoint the answer is owed for, and a
///   stalled reader's host takes heartbeats as long as its buffer has room.
/// Pure logic with times passed in, so that it is tested without sockets or clocks.
struct StandbyLiveness {
    let lossNanoseconds: UInt64
    private var lastHeard: UInt64
    private var lastProgress: UInt64
    private var acknowledgedBytes: UInt64?
    /// Since when the standby's host has held everything we sent, while we await an answer.
    private var drainedSince: UInt64?

    enum Verdict: Equatable {
        /// Nothing from the standby and none of our bytes taken, for this long (ms).
        case silent(milliseconds: UInt64)
        /// It has held all we sent for this long (ms) without answering.
        case notAnswering(milliseconds: UInt64)
    }

    init(lossNanoseconds: UInt64, now: UInt64) {
        self.lossNanoseconds = lossNanoseconds
        lastHeard = now
        lastProgress = now
    }

    /// A frame arrived from the standby.
    mutating func heard(at now: UInt64) {
        lastHeard = now
        drainedSince = nil
    }

    /// What the connection says now (`progress`: nil where the kernel does not tell), and whether
    /// an answer is owed (a checkpoint or the end of replication not yet acknowledged). Returns
    /// why the standby is lost, or nil while it lives.
    mutating func observe(_ progress: TCPSocket.Progress?, awaitingAnswer: Bool, at now: UInt64) -> Verdict? {
        if let progress {
            if progress.bytesAcknowledged != acknowledgedBytes {
                if acknowledgedBytes != nil { lastProgress = now }
                acknowledgedBytes = progress.bytesAcknowledged
            }
            if awaitingAnswer && progress.allAcknowledged {
                if drainedSince == nil { drainedSince = now }
            } else if !awaitingAnswer {
                drainedSince = nil
            }
        }
        let alive = max(lastHeard, lastProgress)
        if now > alive, now - alive > lossNanoseconds { return .silent(milliseconds: (now - alive) / 1_000_000) }
        if let drained = drainedSince {
            let since = max(drained, lastHeard)
            if now > since, now - since > lossNanoseconds { return .notAnswering(milliseconds: (now - since) / 1_000_000) }
        }
        return nil
    }
}
