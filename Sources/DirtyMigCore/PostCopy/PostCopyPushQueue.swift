import Synchronization

/// The source's side of post-copy: the pages the destination still lacks, and who sends each.
///
/// Two senders share it: the request server answers the destination's demand faults on their own
/// connection, the background stream pushes everything else in page order. Each page is claimed
/// once, by whichever gets there first, so no page is sent twice; a request for a page already
/// claimed by the stream is not answered (the page is on its way).
///
/// After a link failure the destination says which pages it still lacks, and the queue starts
/// again from exactly those (`resume`).
///
/// Pre-paging: a fault at page P says the guest works near P, so the stream moves its position to
/// just after P and pushes on from there (wrapping around at the end of RAM), as QEMU's
/// post-copy does: the pages the guest is about to touch arrive before it faults on them.
public final class PostCopyPushQueue: Sendable {
    private struct State {
        /// The pages the destination lacked at the switch.
        let initial: DirtyPageBitmap
        var unsent: DirtyPageBitmap
        var remaining: Int
        var cursor: Int
        var requested = 0
        var answered = 0
        var pushed = 0
        var resent = 0
    }
    private let state: Mutex<State>
    public let pageCount: Int
    /// The pages the destination lacked at the switch.
    public let total: Int

    public init(missing: DirtyPageBitmap) {
        pageCount = missing.pageCount
        total = missing.count
        state = Mutex(State(initial: missing, unsent: missing, remaining: missing.count, cursor: 0))
    }

    /// What has gone out so far.
    public struct Tally: Sendable, Equatable {
        /// Pages the destination asked for (each at most once counted).
        public var requested: Int
        /// Requested pages answered on the fault connection (the rest were already on their way).
        public var answered: Int
        /// Pages pushed by the background stream.
        public var pushed: Int
        /// Pages not yet claimed by either.
        public var remaining: Int
        /// Pages claimed again after a link failure because the destination still lacked them
        /// (they had been in flight); included in `answered` and `pushed` when they go again.
        public var resent: Int

        public init(requested: Int, answered: Int, pushed: Int, remaining: Int, resent: Int = 0) {
            self.requested = requested
            self.answered = answered
            self.pushed = pushed
            self.remaining = remaining
            self.resent = resent
        }
    }

    public var tally: Tally {
        state.withLock {
            Tally(requested: $0.requested, answered: $0.answered, pushed: $0.pushed, remaining: $0.remaining, resent: $0.resent)
        }
    }

    public var isDrained: Bool { state.withLock { $0.remaining == 0 } }

    /// The destination asked for `pages`: claims those not yet sent for the request server to
    /// answer now (in the order asked), and moves the stream's position to after the last one.
    /// Pages outside RAM are ignored (the caller has refused the frame already).
    public func claimRequested(_ pages: [UInt64]) -> [UInt64] {
        state.withLock { state in
            var claimed: [UInt64] = []
            for page in pages where page < UInt64(pageCount) {
                state.requested += 1
                let index = Int(page)
                guard state.unsent.contains(index) else { continue }
                state.unsent.clear(index)
                state.remaining -= 1
                state.answered += 1
                claimed.append(page)
            }
            if let last = pages.last(where: { $0 < UInt64(pageCount) }) {
                state.cursor = Int(last + 1) % max(pageCount, 1)
            }
            return claimed
        }
    }

    /// Claims the next run of at most `maxPages` unsent pages from the stream's position (a run:
    /// consecutive pages, so one range in a batch), wrapping around once at the end of RAM; empty
    /// when every page has been claimed.
    public func claimNextRun(maxPages: Int) -> Range<Int>? {
        state.withLock { state in
            guard state.remaining > 0, maxPages > 0 else { return nil }
            guard let first = Self.firstSet(in: state.unsent, from: state.cursor)
                    ?? Self.firstSet(in: state.unsent, from: 0) else { return nil }
            var end = first + 1
            while end < pageCount && end - first < maxPages && state.unsent.contains(end) { end += 1 }
            for page in first..<end { state.unsent.clear(page) }
            state.remaining -= end - first
            state.pushed += end - first
            state.cursor = end % max(pageCount, 1)
            return first..<end
        }
    }

    /// The link failed and post-copy resumes: the destination still lacks exactly `lacking`, so
    /// those are the pages left to send, whoever had claimed them (pages in flight when the link
    /// failed go again; a page that landed never does). Pages outside the set the destination
    /// lacked at the switch are ignored: it cannot lack a page it was never missing. Returns how
    /// many of them had gone out before (sent again: the report's resent pages).
    @discardableResult
    public func resume(lacking: DirtyPageBitmap) -> Int {
        precondition(lacking.pageCount == pageCount)
        return state.withLock { state in
            var unsent = DirtyPageBitmap(pageCount: pageCount)
            var again = 0
            for run in lacking.runs() {
                for page in run where state.initial.contains(page) {
                    unsent.set(page)
                    if !state.unsent.contains(page) { again += 1 }
                }
            }
            state.unsent = unsent
            state.remaining = unsent.count
            state.resent += again
            return again
        }
    }

    /// The first set bit at or after `start`, word by word.
    private static func firstSet(in bitmap: DirtyPageBitmap, from start: Int) -> Int? {
        guard start < bitmap.pageCount else { return nil }
        var wordIndex = start / 64
        var word = bitmap.words[wordIndex] & (~UInt64(0) << UInt64(start % 64))
        while true {
            if word != 0 {
                let page = wordIndex * 64 + word.trailingZeroBitCount
                return page < bitmap.pageCount ? page : nil
            }
            wordIndex += 1
            if wordIndex >= bitmap.words.count { return nil }
            word = bitmap.words[wordIndex]
        }
    }
}
