import Foundation
import Synchronization

/// Where a source that resumes post-copy reaches the destination's post-copy thread: the
/// receiver hands it the control connection of a resume hello (with the new session its faults
/// connection joins), the thread that waits in `waitForResume` takes it.
///
/// A resume is accepted once the guest runs here (before, the source still holds the whole VM
/// and has nothing to resume), and until post-copy ends. It is accepted even while this side
/// still believes its link is up: the source would not make a new link if the old one worked
/// (its failure may not have reached this side yet), so the old link is shut down and the
/// post-copy thread pauses and takes the new one at once. A newer offer replaces one not yet
/// taken (the source gave up on that attempt).
final class PostCopyResumePoint: @unchecked Sendable {
    // @unchecked: `condition` guards `state`.
    struct Offer {
        let control: any MigrationConnection
        /// Where the resumed link's other connections (its faults connection) join.
        let session: IncomingSession
    }

    let session: SessionID
    let pageCount: Int
    private let condition = NSCondition()
    private struct State {
        var switched = false
        var ended = false
        var offer: Offer?
        /// Shuts the link in use down (a resume proves it dead).
        var abandon: (@Sendable () -> Void)?
    }
    private var state = State()

    init(session: SessionID, pageCount: Int) {
        self.session = session
        self.pageCount = pageCount
    }

    /// The guest runs here over the link `abandon` shuts down; resumes are accepted from now on.
    func linkUp(abandon: @escaping @Sendable () -> Void) {
        condition.lock(); defer { condition.unlock() }
        state.switched = true
        state.abandon = abandon
    }

    /// A resume's connections; why not (the refusal its source shows), or nil once handed over.
    func offer(_ offer: Offer) -> String? {
        condition.lock()
        guard state.switched, !state.ended else {
            condition.unlock()
            return state.ended ? "the post-copy of session \(session) has ended here: there is nothing to resume"
                : "session \(session) has not switched to post-copy here: there is nothing to resume"
        }
        let replaced = state.offer
        state.offer = offer
        let abandon = state.abandon
        state.abandon = nil
        condition.broadcast()
        condition.unlock()
        replaced?.control.shutdown()
        replaced?.session.end("replaced by a newer resume")
        abandon?()
        return nil
    }

    /// Waits for a resume (the link failed and post-copy is paused here): for as long as it
    /// takes, since the pages the guest lacks are at the source and nowhere else.
    func waitForResume() -> Offer {
        condition.lock(); defer { condition.unlock() }
        while state.offer == nil { condition.wait() }
        defer { state.offer = nil }
        return state.offer!
    }

    /// Post-copy ended here: later resumes are refused, an offer not taken is closed.
    func end() {
        condition.lock()
        state.ended = true
        let left = state.offer
        state.offer = nil
        state.abandon = nil
        condition.unlock()
        left?.control.shutdown()
        left?.session.end("post-copy ended")
    }
}

/// Where the destination's fault thread sends page requests: the faults connection of the link
/// in use, or nowhere while post-copy is paused (the requests are not lost: the page map keeps
/// every page asked for and not landed, and they are asked for again over the next link).
/// Sends are serialized, so that asking again over a new link and a new fault never interleave
/// their frames.
final class PostCopyRequestSink: Sendable {
    private let channel = Mutex<MigrationChannel?>(nil)

    /// Asks for `pages` over the current link, if any. A request that cannot go out (the link
    /// failed) leaves its vCPU waiting: the page is still at the source, and nothing else may
    /// stand in for it.
    func request(_ pages: [UInt64]) {
        channel.withLock { channel in
            guard let channel else { return }
            var start = 0
            while start < pages.count {
                let end = min(pages.count, start + PageRequest.maxPages)
                try? channel.send(.pageRequest, PageRequest(pages: Array(pages[start..<end])).encode())
                start = end
            }
        }
    }

    /// Requests go over `channel` from now on (nil: nowhere). Shut the old link down first: a
    /// send blocked on it holds the lock until it fails.
    func attach(_ channel: MigrationChannel?) { self.channel.withLock { $0 = channel } }
}
