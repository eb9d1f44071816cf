/// One bit per page of guest RAM, indexed by RAM page (RAM offset / 4096): the form in which
/// trackers hand dirty pages to their users (migration, rate measurement).
public struct DirtyPageBitmap: Sendable, Equatable {
    public private(set) var words: [UInt64]
    public let pageCount: Int

    public init(pageCount: Int, allSet: Bool = false) {
        self.pageCount = pageCount
        words = [UInt64](repeating: allSet ? ~0 : 0, count: (pageCount + 63) / 64)
        if allSet { trimTail() }
    }

    /// A bitmap from its words (as they travel in a pass plan); bits past `pageCount` are dropped.
    public init(pageCount: Int, words: [UInt64]) {
        precondition(words.count == (pageCount + 63) / 64)
        self.pageCount = pageCount
        self.words = words
        trimTail()
    }

    @inline(__always)
    public mutating func set(_ page: Int) {
        words[page >> 6] |= 1 << UInt64(page & 63)
    }

    @inline(__always)
    public mutating func clear(_ page: Int) {
        words[page >> 6] &= ~(1 << UInt64(page & 63))
    }

    @inline(__always)
    public func contains(_ page: Int) -> Bool {
        words[page >> 6] & (1 << UInt64(page & 63)) != 0
    }

    /// ORs `count` words into this bitmap starting at word `wordOffset` (page = 64 * word).
    public mutating func merge(words source: UnsafePointer<UInt64>, count: Int, atWord wordOffset: Int) {
        for index in 0..<count where source[index] != 0 {
            words[wordOffset + index] |= source[index]
        }
    }

    /// Sets a run of pages, a word at a time where it can.
    public mutating func set(_ range: Range<Int>) {
        var page = range.lowerBound
        while page < range.upperBound {
            if page & 63 == 0 && range.upperBound - page >= 64 {
                words[page >> 6] = ~0
                page += 64
            } else {
                set(page)
                page += 1
            }
        }
    }

    public mutating func formUnion(_ other: DirtyPageBitmap) {
        precondition(other.pageCount == pageCount)
        for index in words.indices { words[index] |= other.words[index] }
    }

    /// Clears every page set in `other`.
    public mutating func subtract(_ other: DirtyPageBitmap) {
        precondition(other.pageCount == pageCount)
        for index in words.indices { words[index] &= ~other.words[index] }
    }

    public mutating func setAll() {
        for index in words.indices { words[index] = ~0 }
        trimTail()
    }

    public mutating func removeAll() {
        for index in words.indices { words[index] = 0 }
    }

    public var count: Int { words.reduce(0) { $0 + $1.nonzeroBitCount } }
    public var isEmpty: Bool { words.allSatisfy { $0 == 0 } }

    /// The set pages as a dense list of page numbers, in order (one scan of every word).
    public func pageList() -> [UInt32] {
        var pages: [UInt32] = []
        for (index, word) in words.enumerated() where word != 0 {
            var bits = word
            while bits != 0 {
                pages.append(UInt32(index * 64 + bits.trailingZeroBitCount))
                bits &= bits - 1
            }
        }
        return pages
    }

    /// Runs of consecutive dirty pages, as page ranges, in order.
    public func runs() -> [Range<Int>] {
        var result: [Range<Int>] = []
        var start: Int? = nil
        for (wordIndex, word) in words.enumerated() {
            if word == 0 {
                if let s = start { result.append(s..<wordIndex * 64); start = nil }
                continue
            }
            if word == ~0 {
                if start == nil { start = wordIndex * 64 }
                continue
            }
            for bit in 0..<64 {
                let page = wordIndex * 64 + bit
                if word & (1 << UInt64(bit)) != 0 {
                    if start == nil { start = page }
                } else if let s = start {
                    result.append(s..<page)
                    start = nil
                }
            }
        }
        if let s = start { result.append(s..<min(words.count * 64, pageCount)) }
        return result
    }

    private mutating func trimTail() {
        let extra = words.count * 64 - pageCount
        if extra > 0, let last = words.indices.last { words[last] &= ~0 >> UInt64(extra) }
    }
}
