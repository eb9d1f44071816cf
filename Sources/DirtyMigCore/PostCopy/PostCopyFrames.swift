/// The frames of post-copy, each typed at both ends with the bounds the receiver checks.
///
///     source (control)                      destination
///     … pre-copy passes …
///     postcopySwitch  ───────────────────▶  (vCPU and device state, the pages it lacks)
///                     ◀───────────────────  postcopyRunning (the guest runs here now, or why not)
///     pages …         (background: the lacking pages, from where the guest last faulted)
///     postcopyEnd     (every lacking page has been sent, on one connection or the other)
///                     ◀───────────────────  postcopyResult (every page landed; verify; figures)
///
///     source (faults)                       destination
///                     ◀───────────────────  pageRequest (pages the guest faulted on)
///     pages …         (the answers, ahead of anything queued on the control connection)
///
/// The pages frames are the pre-copy passes' (PageFrames.swift) on both connections.
///
/// A link that fails after the switch pauses post-copy on both sides; the source resumes it over
/// new connections of the same session:
///
///     source (new control)                  destination
///     hello (flag resume, the session id that switched; joins: 1 faults)
///                     ◀───────────────────  helloReply (accepted, or why not)
///     (the faults connection joins again)
///                     ◀───────────────────  postcopyResume (the pages it still lacks)
///     pages …, postcopyEnd …                (as above; the destination asks again for the
///                                            pages its vCPUs wait on)

/// The switch: the paused VM's state and the pages the destination must not use as they are
/// (never received, or dirtied since they were), as a bitmap of all RAM.
struct PostCopySwitch: Equatable {
    var state: [UInt8]
    var lackingWords: [UInt64]

    static func maxPayload(pageCount: Int) -> Int { 4 + MigrationWire.maxStateBytes + PageBitmapWire.maxBytes(pageCount: pageCount) }

    func encode() -> [UInt8] {
        WireWriter.encoding { writer in
            writer.blob(state)
            for word in lackingWords { writer.u64(word) }
        }
    }

    /// The bitmap must be exactly one of a RAM of `pageCount` pages.
    init(decoding payload: [UInt8], pageCount: Int) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "post-copy switch")
        state = try reader.blob(max: MigrationWire.maxStateBytes)
        lackingWords = try PageBitmapWire.read(&reader, pageCount: pageCount, what: "a post-copy switch")
        try reader.finish()
    }

    init(state: [UInt8], lacking: DirtyPageBitmap) {
        self.state = state
        lackingWords = lacking.words
    }

    func lacking(pageCount: Int) -> DirtyPageBitmap { DirtyPageBitmap(pageCount: pageCount, words: lackingWords) }
}

/// A RAM-sized page bitmap on the wire: its words, nothing more; the reader knows the RAM's size
/// and takes exactly that many words, with no bit past the last page.
enum PageBitmapWire {
    static func maxBytes(pageCount: Int) -> Int { 8 * ((pageCount + 63) / 64) }

    static func read(_ reader: inout WireReader, pageCount: Int, what: String) throws(MigrationProtocolError) -> [UInt64] {
        let words = (pageCount + 63) / 64
        guard reader.remaining == 8 * words else {
            throw .malformed("\(what) whose page bitmap is \(reader.remaining) bytes for \(pageCount) pages of RAM")
        }
        var bitmap: [UInt64] = []
        bitmap.reserveCapacity(words)
        for _ in 0..<words { bitmap.append(try reader.u64()) }
        // Bits past the last page would name pages outside RAM.
        if pageCount % 64 != 0, let last = bitmap.last, last >> UInt64(pageCount % 64) != 0 {
            throw .malformed("\(what) naming pages past the end of RAM")
        }
        return bitmap
    }
}

/// A frame that is one bitmap of all RAM (u64 words), exactly as long as the RAM it names and
/// naming no page past its end (PageBitmapWire): postcopyPrepare and postcopyResume.
protocol PageBitmapFrame: Equatable {
    var words: [UInt64] { get }
    init(words: [UInt64])
    /// What the frame is, for a refusal ("a post-copy resume").
    static var what: String { get }
}

extension PageBitmapFrame {
    static func maxPayload(pageCount: Int) -> Int { PageBitmapWire.maxBytes(pageCount: pageCount) }

    func encode() -> [UInt8] { WireWriter.encoding { writer in for word in words { writer.u64(word) } } }

    /// The bitmap must be exactly one of the RAM of `pageCount` pages.
    init(decoding payload: [UInt8], pageCount: Int) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: Self.what)
        let words = try PageBitmapWire.read(&reader, pageCount: pageCount, what: "a " + Self.what)
        try reader.finish()
        self.init(words: words)
    }

    func pages(pageCount: Int) -> DirtyPageBitmap { DirtyPageBitmap(pageCount: pageCount, words: words) }
}

/// The destination's first frame on a resumed post-copy link: the pages it still lacks. The
/// source sends exactly those again (pages that were in flight when the link failed; never one
/// that landed).
struct PostCopyResume: PageBitmapFrame {
    var words: [UInt64]
    static let what = "post-copy resume"
    init(words: [UInt64]) { self.words = words }
    init(lacking: DirtyPageBitmap) { words = lacking.words }
    func lacking(pageCount: Int) -> DirtyPageBitmap { pages(pageCount: pageCount) }
}

/// The source's word just before it pauses for the switch: the pages dirtied since they were
/// last sent, whose copies at the destination are stale. The destination drops them while the
/// guest still runs at the source, then answers `postcopyPrepared`; only what the guest dirties
/// after this is left to drop during the pause. (Dropping 512 MiB of stale pages took 84 ms
/// here, all of a post-copy pause that came to 85 ms.)
struct PostCopyPrepare: PageBitmapFrame {
    var words: [UInt64]
    static let what = "post-copy prepare"
    init(words: [UInt64]) { self.words = words }
    init(stale: DirtyPageBitmap) { words = stale.words }
    func stale(pageCount: Int) -> DirtyPageBitmap { pages(pageCount: pageCount) }
}

/// The destination's answer to `postcopyPrepare`: the stale copies are gone; how long that took.
struct PostCopyPrepared: Equatable {
    var droppedNanoseconds: UInt64

    func encode() -> [UInt8] { WireWriter.encoding { $0.u64(droppedNanoseconds) } }

    init(droppedNanoseconds: UInt64) { self.droppedNanoseconds = droppedNanoseconds }

    init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "post-copy prepared")
        droppedNanoseconds = try reader.u64()
        try reader.finish()
    }
}

/// The destination's answer to the switch.
struct PostCopyRunning: Equatable {
    /// false: the destination did not start the guest (why in `message`); the source still
    /// holds the whole VM and resumes it.
    var running: Bool
    /// What the destination spent between the switch frame and the guest running.
    var resumeNanoseconds: UInt64
    var message: String

    func encode() -> [UInt8] {
        WireWriter.encoding { writer in
            writer.u8(running ? 1 : 0); writer.u64(resumeNanoseconds); writer.string(message)
        }
    }

    init(running: Bool, resumeNanoseconds: UInt64 = 0, message: String = "") {
        self.running = running
        self.resumeNanoseconds = resumeNanoseconds
        self.message = message
    }

    init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "post-copy running")
        let flag = try reader.u8()
        guard flag <= 1 else { throw .malformed("post-copy running flag \(flag)") }
        running = flag == 1
        resumeNanoseconds = try reader.u64()
        message = try reader.peerText()
        try reader.finish()
    }
}

/// Pages the destination's guest faulted on, asked of the source.
struct PageRequest: Equatable {
    /// At most this many per frame (a fault thread reads at most 64 faults at a time).
    static let maxPages = 1024
    static var maxPayload: Int { 4 + 8 * maxPages }

    var pages: [UInt64]

    func encode() -> [UInt8] {
        WireWriter.encoding { writer in
            writer.u32(UInt32(pages.count))
            for page in pages { writer.u64(page) }
        }
    }

    init(pages: [UInt64]) { self.pages = pages }

    init(decoding payload: [UInt8], pageCount: Int) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "page request")
        let count = Int(try reader.u32())
        guard count > 0, count <= Self.maxPages, reader.remaining == 8 * count else {
            throw .malformed("a page request of \(count) pages in \(payload.count) bytes")
        }
        var pages: [UInt64] = []
        pages.reserveCapacity(count)
        for _ in 0..<count {
            let page = try reader.u64()
            guard page < UInt64(pageCount) else { throw .malformed("a request for page \(page) outside RAM (\(pageCount) pages)") }
            pages.append(page)
        }
        self.pages = pages
        try reader.finish()
    }
}

/// Every lacking page is on its way: the source's digest of the VM's memory at the switch (its
/// copy has not changed since), when verifying.
struct PostCopyEnd: Equatable {
    var verify: Bool
    var memoryDigest: UInt64

    func encode() -> [UInt8] { WireWriter.encoding { $0.u8(verify ? 1 : 0); $0.u64(memoryDigest) } }

    init(verify: Bool, memoryDigest: UInt64) {
        self.verify = verify
        self.memoryDigest = memoryDigest
    }

    init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "post-copy end")
        let flag = try reader.u8()
        guard flag <= 1 else { throw .malformed("post-copy end flag \(flag)") }
        verify = flag == 1
        memoryDigest = try reader.u64()
        try reader.finish()
    }
}

/// The destination's word at the end of post-copy: every page landed (or why not), whether its
/// memory matched the source's digest, and what the demand faults cost its guest.
struct PostCopyResult: Equatable {
    static let maxVCPUs = GuestLayout.maxVCPUs

    var status: MigrationResult.Status
    var message: String
    var verifyNanoseconds: UInt64
    var faults: UInt64
    var requested: UInt64
    /// Fault to landing: p50, p99, max, in microseconds (0 without requests).
    var latencyP50Microseconds: UInt32
    var latencyP99Microseconds: UInt32
    var latencyMaxMicroseconds: UInt32
    /// Per vCPU: the time it waited for pages, nanoseconds.
    var vcpuBlockedNanoseconds: [UInt64]

    func encode() -> [UInt8] {
        WireWriter.encoding { writer in
            writer.u8(status.rawValue); writer.string(message); writer.u64(verifyNanoseconds)
            writer.u64(faults); writer.u64(requested)
            writer.u32(latencyP50Microseconds); writer.u32(latencyP99Microseconds); writer.u32(latencyMaxMicroseconds)
            writer.u32(UInt32(vcpuBlockedNanoseconds.count))
            for blocked in vcpuBlockedNanoseconds { writer.u64(blocked) }
        }
    }

    static var maxPayload: Int { 1 + 4 + MigrationWire.maxStringBytes + 8 * 3 + 4 * 3 + 4 + 8 * maxVCPUs }

    init(status: MigrationResult.Status, message: String = "", verifyNanoseconds: UInt64 = 0,
         figures: PostCopyFaultFigures? = nil, vcpuBlockedNanoseconds: [UInt64] = []) {
        self.status = status
        self.message = message
        self.verifyNanoseconds = verifyNanoseconds
        faults = UInt64(figures?.faults ?? 0)
        requested = UInt64(figures?.requested ?? 0)
        latencyP50Microseconds = figures?.latencyMicroseconds(percentile: 0.5) ?? 0
        latencyP99Microseconds = figures?.latencyMicroseconds(percentile: 0.99) ?? 0
        latencyMaxMicroseconds = figures?.latencyMicroseconds(percentile: 1) ?? 0
        self.vcpuBlockedNanoseconds = vcpuBlockedNanoseconds
    }

    init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "post-copy result")
        guard let status = MigrationResult.Status(rawValue: try reader.u8()) else { throw .malformed("post-copy result status") }
        self.status = status
        message = try reader.peerText()
        verifyNanoseconds = try reader.u64()
        faults = try reader.u64()
        requested = try reader.u64()
        latencyP50Microseconds = try reader.u32()
        latencyP99Microseconds = try reader.u32()
        latencyMaxMicroseconds = try reader.u32()
        let count = Int(try reader.u32())
        guard count <= Self.maxVCPUs else { throw .malformed("post-copy result for \(count) vCPUs") }
        var blocked: [UInt64] = []
        for _ in 0..<count { blocked.append(try reader.u64()) }
        vcpuBlockedNanoseconds = blocked
        try reader.finish()
    }
}
