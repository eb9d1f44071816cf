import Glibc

/// The migration wire protocol: binary, framed, versioned.
///
/// Every frame is an 8-byte header (u32 type, u32 payload length, little-endian) and a payload
/// whose length is bounded per type, so no input makes the receiver allocate without bound.
/// A migration is a session: its first connection (role `control`) opens it with a hello that
/// names a fresh session id, and further connections (roles `pages`, `faults`) join it with a
/// hello naming that id (SessionFrames.swift). Today's migrations use the control connection
/// alone, which carries, in this order:
///
///     sender                               receiver
///     hello  ─────────────────────────────▶  checks version, role, layout, vCPUs, CPU, host
///            ◀─────────────────────────────  helloReply (accepted, or why not)
///     passPlan               (which pages pass 1 will carry, so the receiver can allocate ahead)
///     pages … iterationEnd   (pass 1: all RAM that holds data; pass n: what was dirtied;
///                             a batch whose pages compress travels as compressedPages)
///            ◀─────────────────────────────  iterationAck (the pass is in guest memory)
///     …   (the source pauses its vCPUs)
///     pages … iterationEnd   (the last dirty pages)
///     state                  (vCPU and in-kernel device state)
///     complete               (digests, when verifying)
///            ◀─────────────────────────────  result (resumed, or why not)
///
/// Continuous replication (hello flag `replicate`, see ReplicationProtocol.swift) starts the
/// same way, passes and all, and then, instead of `state` and `complete`, sends checkpoints:
///
///     checkpointPages …      (one epoch's dirty pages, copied while the vCPUs were paused;
///                             pages that compress travel as checkpointCompressedPages)
///     checkpointEnd          (the epoch's vCPU/device state and a digest of the whole epoch)
///            ◀─────────────────────────────  checkpointAck (the standby's copy is this epoch now)
///     heartbeat              (when no checkpoint went out for a while)
///     replicationEnd         (the primary stops replicating, or gave up on its standby: the
///                             standby discards its copy)
///            ◀─────────────────────────────  replicationEnded (the copy is discarded: the
///                                            primary's stop is safe)
///            ◀─────────────────────────────  tookOver (the standby resumed the VM, after the
///                                            primary fell silent: the primary's copy is stale)
///
/// A primary that lost its standby greets it again over a new connection as the same
/// replication (its session id, flags `replicate` and `resume`): a standby that still holds a
/// checkpoint of it answers with that checkpoint's epoch (`helloReply.heldEpoch`), drops the
/// old connection, and takes the pages changed since that checkpoint as a pre-copy's passes,
/// then a first checkpoint, as at the start.
///
/// Either side may send `abort` with a reason instead of its next frame.
public enum MigrationWire {
    /// "DMIG" at the start of every hello: a stream that does not start with it is not ours.
    public static let magic: UInt32 = 0x4749_4D44
    /// 2: the passPlan frame. 3: hello's flags (the destination hashes pages as they land).
    /// 4: the result frame says how long the destination took to resume the VM.
    /// 5: replication (hello flag, checkpoint frames; the hello reply carries the heartbeat).
    /// 6: replicationEnded and tookOver; the standby times silence, not whole frames.
    /// 7: hello's link timeout (both sides give up on the same silent link).
    /// 8: every connection opens with its role and a session id (the hello's head); a control
    /// hello announces the connections that will join its session.
    /// 9: the hello names the VM's boot source and carries its announcement (the workload
    /// guest's config block), which the generic code does not read; saved state carries the
    /// userspace devices' states (MachineState version 2).
    /// 10: hello's page codec; the compressedPages and checkpointCompressedPages frames.
    /// 11: post-copy (hello flag, its frames, the faults connection).
    /// 12: post-copy recovery (hello flag `resume`, the postcopyResume frame).
    /// 13: postcopyPrepare and postcopyPrepared (stale pages dropped before the pause).
    /// 14: a replication resumes (hello flags `replicate` and `resume`: the primary greets its
    /// standby again as the same replication); the hello reply says what kind of refusal it is
    /// and which checkpoint a standby holds.
    public static let version: UInt32 = 14
    public static let frameHeaderSize = 8
    public static let maxStringBytes = 4096
    /// Ranges per page batch and data per batch: what the receiver accepts at most.
    public static let maxRangesPerBatch = 4096
    public static let maxBatchDataBytes = 64 << 20
    /// Data per compressed batch, before compression: the receiver decompresses into a buffer
    /// of this size at most (the sender's batches are 2 MiB, PageSender.batchDataBytes).
    public static let maxCompressedBatchDataBytes = 8 << 20
    public static let maxStateBytes = 16 << 20

    /// A whole frame: header and payload.
    public static func frame(_ type: MigrationFrameType, _ payload: [UInt8]) -> [UInt8] {
        MigrationFrameHeader(type, payloadLength: payload.count).encode() + payload
    }
}

/// The 8 bytes before every payload: u32 type, u32 payload length. Decoded, the type is known
/// and the length within the type's bound, before any byte of the payload is read.
struct MigrationFrameHeader: Equatable {
    var type: MigrationFrameType
    var payloadLength: Int

    init(_ type: MigrationFrameType, payloadLength: Int) {
        self.type = type
        self.payloadLength = payloadLength
    }

    /// Appends the header to `writer` (a sender that builds a frame's head in one buffer).
    func encode(into writer: inout WireWriter) {
        writer.u32(type.rawValue); writer.u32(UInt32(payloadLength))
    }

    func encode() -> [UInt8] { WireWriter.encoding(encode(into:)) }

    init(decoding bytes: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(bytes, what: "frame header")
        let rawType = try reader.u32()
        let length = Int(try reader.u32())
        guard let type = MigrationFrameType(rawValue: rawType) else {
            // A foreign stream usually fails here on its first bytes.
            throw .notDirtymig("frame type 0x\(String(rawType, radix: 16))")
        }
        guard length <= type.maxPayload else {
            throw .malformed("a \(type) frame of \(length) bytes (at most \(type.maxPayload))")
        }
        self.init(type, payloadLength: length)
    }
}

public enum MigrationFrameType: UInt32, Sendable {
    case hello = 1, helloReply = 2, pages = 3, iterationEnd = 4, state = 5, complete = 6, result = 7, abort = 8,
         iterationAck = 9, passPlan = 10,
         checkpointPages = 11, checkpointEnd = 12, checkpointAck = 13, heartbeat = 14, replicationEnd = 15,
         replicationEnded = 16, tookOver = 17, compressedPages = 18, checkpointCompressedPages = 19,
         postcopySwitch = 20, postcopyRunning = 21, pageRequest = 22, postcopyEnd = 23, postcopyResult = 24,
         postcopyResume = 25, postcopyPrepare = 26, postcopyPrepared = 27

    /// The largest payload a frame of this type may carry.
    var maxPayload: Int {
        switch self {
        case .hello: return 104 + MigrationWire.maxStringBytes + MigrationHello.maxBootAnnouncementBytes
        case .helloReply: return 32 + MigrationWire.maxStringBytes
        case .abort: return 16 + MigrationWire.maxStringBytes
        case .pages: return 4 + 16 * MigrationWire.maxRangesPerBatch + MigrationWire.maxBatchDataBytes
        // Smaller than the pages it holds, or it would have been sent as they are.
        case .compressedPages: return 4 + 16 * MigrationWire.maxRangesPerBatch + MigrationWire.maxCompressedBatchDataBytes
        case .iterationEnd: return 12
        case .iterationAck: return 4
        case .passPlan: return 4 + 8 * Int(GuestLayout.maxAddressableBytes / GuestLayout.pageSize / 64)
        case .state: return MigrationWire.maxStateBytes
        case .complete: return 17
        case .result: return 24 + MigrationWire.maxStringBytes
        case .checkpointPages, .checkpointCompressedPages: return 12 + CheckpointWire.maxPagesPerFrame * (4 + 4096)
        case .checkpointEnd: return 32 + MigrationWire.maxStateBytes
        case .checkpointAck, .heartbeat, .replicationEnded, .tookOver: return 8
        case .replicationEnd: return 4 + MigrationWire.maxStringBytes
        case .postcopySwitch: return PostCopySwitch.maxPayload(pageCount: Int(GuestLayout.maxAddressableBytes / GuestLayout.pageSize))
        case .postcopyRunning: return 13 + MigrationWire.maxStringBytes
        case .pageRequest: return PageRequest.maxPayload
        case .postcopyEnd: return 9
        case .postcopyResult: return PostCopyResult.maxPayload
        case .postcopyResume: return PostCopyResume.maxPayload(pageCount: Int(GuestLayout.maxAddressableBytes / GuestLayout.pageSize))
        case .postcopyPrepare: return PostCopyPrepare.maxPayload(pageCount: Int(GuestLayout.maxAddressableBytes / GuestLayout.pageSize))
        case .postcopyPrepared: return 8
        }
    }
}

public enum MigrationProtocolError: Error, Equatable, CustomStringConvertible {
    /// Not a dirtymig migration stream at all.
    case notDirtymig(String)
    /// A dirtymig peer that speaks another protocol version.
    case versionMismatch(peer: UInt32, ours: UInt32)
    case malformed(String)
    case unexpected(String)

    public var description: String {
        switch self {
        case .notDirtymig(let what): return "not a dirtymig migration stream (\(what))"
        case .versionMismatch(let peer, let ours):
            return "the peer speaks migration protocol version \(peer); this dirtymig speaks version \(ours): run the same dirtymig release on both hosts"
        case .malformed(let what): return "malformed migration stream: \(what)"
        case .unexpected(let what): return "unexpected in the migration stream: \(what)"
        }
    }
}

/// What the sender announces before anything is allocated: enough for the receiver to build the
/// same VM, and to refuse one it cannot run.
public struct MigrationHello: Sendable, Equatable {
    public var version: UInt32 = MigrationWire.version
    public var name: String
    public var memorySize: UInt64
    public var vcpuCount: Int
    public var tracking: TrackingMode?
    public var ringEntries: Int
    /// The TSC frequency the guest paces itself with; the destination must tick at the same rate.
    public var tscKHz: UInt64
    /// CPUID features the guest needs (leaf 1 EDX/ECX, leaf 0x80000001 EDX), as bit masks.
    public var requiredFeatures: CPUFeatureSet
    /// What the VM boots (the destination builds the same)...
    public var bootSource: BootSourceKind
    /// ...and what that boot source announces (the workload guest: its config block, which gives
    /// each vCPU's workload). Read by the boot source alone (`BootSources.decode`).
    public var bootAnnouncement: [UInt8]
    /// Largest boot source announcement a receiver reads.
    public static let maxBootAnnouncementBytes = 64 << 10
    /// The sender will ask for --verify: the destination hashes each page as it lands, so that
    /// its half of the digest costs no downtime.
    public var verify = false
    /// The sender starts continuous replication: the receiver must be a standby.
    public var replicate = false
    /// The sender may switch to post-copy (`migrate --postcopy`): a destination that cannot
    /// serve demand faults refuses here, before anything is switched.
    public var postcopy = false
    /// This control connection resumes session `session` over a new link, rather than opening a
    /// migration: with `postcopy`, the paused post-copy of the session that switched (the
    /// destination refuses it unless it holds that session's post-copy); with `replicate`, the
    /// replication a standby follows (it answers with the checkpoint it holds, or refuses).
    public var resume = false
    /// How long the link may carry nothing before the migration fails (`--link-timeout`): the
    /// destination watches its side of the link with the same deadline, so both sides give up
    /// together, and neither before. Ignored by a standby, which has its `--failover-after`.
    public var linkTimeoutMilliseconds: UInt32 = MigrationHello.defaultLinkTimeoutMilliseconds
    public static let defaultLinkTimeoutMilliseconds: UInt32 = 30_000
    /// What a destination accepts: a hostile hello cannot make it wait for days, nor give up at once.
    static let linkTimeoutMillisecondsRange: ClosedRange<UInt32> = 1_000...3_600_000
    /// The session this hello opens: a fresh id (the sender's `MigrationSession` sets its own).
    public var session = SessionID.random()
    /// The connections that will join the session, besides this one.
    public var joins = SessionJoins.none
    /// The codec of the compressedPages frames the sender may send (`--compress`), as on the
    /// wire: a receiver refuses a code it does not know (`pageCodec` nil) before it builds anything.
    public var pageCodecCode: UInt32 = PageCodec.none.rawValue
    /// The codec announced, if this build knows it.
    public var pageCodec: PageCodec? { PageCodec(rawValue: pageCodecCode) }

    /// Bit 0 of the flags word.
    static let verifyFlag: UInt32 = 1
    /// Bit 1.
    static let replicateFlag: UInt32 = 2
    /// The source may switch to post-copy: the destination must be able to serve demand faults.
    static let postcopyFlag: UInt32 = 4
    /// Resumes the paused post-copy (protocol 12), or the replication (protocol 14), of the
    /// session named.
    static let resumeFlag: UInt32 = 8

    public init(name: String, memorySize: UInt64, vcpuCount: Int, tracking: TrackingMode?, ringEntries: Int,
                tscKHz: UInt64, requiredFeatures: CPUFeatureSet, bootSource: BootSourceKind, bootAnnouncement: [UInt8]) {
        self.name = name
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
        self.tracking = tracking
        self.ringEntries = ringEntries
        self.tscKHz = tscKHz
        self.requiredFeatures = requiredFeatures
        self.bootSource = bootSource
        self.bootAnnouncement = bootAnnouncement
    }

    static let trackingCodes: [TrackingMode?] = [nil, .bitmap, .ring, .quota]

    /// The control connection's hello: the opening (role `control`, the session id), then the
    /// announcement.
    public func encode() -> [UInt8] {
        var writer = WireWriter()
        var opening = ConnectionOpening(role: .control, session: session)
        opening.version = version
        opening.encode(into: &writer)
        writer.u64(memorySize); writer.u32(UInt32(vcpuCount))
        writer.u32(UInt32(MigrationHello.trackingCodes.firstIndex(of: tracking) ?? 0))
        writer.u32(UInt32(ringEntries)); writer.u64(tscKHz)
        writer.u32(requiredFeatures.leaf1EDX); writer.u32(requiredFeatures.leaf1ECX)
        writer.u32(requiredFeatures.extendedEDX)
        writer.u32((verify ? MigrationHello.verifyFlag : 0) | (replicate ? MigrationHello.replicateFlag : 0)
                   | (postcopy ? MigrationHello.postcopyFlag : 0) | (resume ? MigrationHello.resumeFlag : 0))
        writer.u32(linkTimeoutMilliseconds)
        joins.encode(into: &writer)
        writer.u32(pageCodecCode)
        writer.string(name)
        writer.u32(bootSource.rawValue)
        writer.blob(bootAnnouncement)
        return writer.bytes
    }

    /// A control connection's hello; the hello of a connection that joins a session is refused
    /// here (see `ConnectionHello` for a first frame that may be either).
    public init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "hello")
        let opening = try ConnectionOpening(reading: &reader, payloadLength: payload.count)
        guard opening.role == .control else {
            throw .unexpected("the hello of a \(opening.role) connection joining session \(opening.session), where a migration's first hello belongs")
        }
        try self.init(opening: opening, announcement: &reader)
    }

    /// The rest of a control hello, after its opening.
    init(opening: ConnectionOpening, announcement reader: inout WireReader) throws(MigrationProtocolError) {
        version = opening.version
        session = opening.session
        memorySize = try reader.u64()
        vcpuCount = Int(try reader.u32())
        let code = Int(try reader.u32())
        guard code < MigrationHello.trackingCodes.count else { throw .malformed("tracking mode code \(code)") }
        tracking = MigrationHello.trackingCodes[code]
        ringEntries = Int(try reader.u32())
        tscKHz = try reader.u64()
        requiredFeatures = CPUFeatureSet(leaf1EDX: try reader.u32(), leaf1ECX: try reader.u32(), extendedEDX: try reader.u32())
        let flags = try reader.u32()
        let known = MigrationHello.verifyFlag | MigrationHello.replicateFlag | MigrationHello.postcopyFlag | MigrationHello.resumeFlag
        guard flags & ~known == 0 else {
            throw .malformed("hello flags 0x\(String(flags, radix: 16))")
        }
        verify = flags & MigrationHello.verifyFlag != 0
        replicate = flags & MigrationHello.replicateFlag != 0
        postcopy = flags & MigrationHello.postcopyFlag != 0
        resume = flags & MigrationHello.resumeFlag != 0
        guard !resume || postcopy != replicate else {
            throw .malformed("a hello resuming neither a post-copy nor a replication, or both")
        }
        linkTimeoutMilliseconds = try reader.u32()
        guard Self.linkTimeoutMillisecondsRange.contains(linkTimeoutMilliseconds) else {
            throw .malformed("link timeout \(linkTimeoutMilliseconds) ms (1 s to 1 h)")
        }
        joins = try SessionJoins(reading: &reader)
        pageCodecCode = try reader.u32()
        name = try reader.peerText()
        let kind = try reader.u32()
        guard let bootSource = BootSourceKind(rawValue: kind) else { throw .malformed("boot source \(kind)") }
        self.bootSource = bootSource
        bootAnnouncement = try reader.blob(max: Self.maxBootAnnouncementBytes)
        try reader.finish()
    }
}

/// CPUID feature bits, as the three registers that hold the ones our guest depends on.
public struct CPUFeatureSet: Sendable, Equatable {
    public var leaf1EDX: UInt32
    public var leaf1ECX: UInt32
    public var extendedEDX: UInt32

    public init(leaf1EDX: UInt32, leaf1ECX: UInt32, extendedEDX: UInt32) {
        self.leaf1EDX = leaf1EDX
        self.leaf1ECX = leaf1ECX
        self.extendedEDX = extendedEDX
    }

    /// What the workload guest uses: TSC, MSR, PAE, APIC, PGE, FXSR/SSE/SSE2 (leaf 1 EDX), and
    /// long mode, NX (0x80000001 EDX). Nothing in leaf 1 ECX.
    public static let workloadGuest = CPUFeatureSet(
        leaf1EDX: 1 << 4 | 1 << 5 | 1 << 6 | 1 << 9 | 1 << 13 | 1 << 24 | 1 << 25 | 1 << 26,
        leaf1ECX: 0, extendedEDX: 1 << 29 | 1 << 20)

    /// The bits of `self` that `available` lacks, named for the error message.
    public func missing(in available: CPUFeatureSet) -> [String] {
        let names: [(KeyPath<CPUFeatureSet, UInt32>, Int, String)] = [
            (\.leaf1EDX, 4, "tsc"), (\.leaf1EDX, 5, "msr"), (\.leaf1EDX, 6, "pae"), (\.leaf1EDX, 9, "apic"),
            (\.leaf1EDX, 13, "pge"), (\.leaf1EDX, 24, "fxsr"), (\.leaf1EDX, 25, "sse"), (\.leaf1EDX, 26, "sse2"),
            (\.extendedEDX, 29, "lm"), (\.extendedEDX, 20, "nx"),
        ]
        var missing = names.filter { self[keyPath: $0.0] & (1 << $0.1) != 0 && available[keyPath: $0.0] & (1 << $0.1) == 0 }.map(\.2)
        let unnamed = (leaf1EDX & ~available.leaf1EDX) | (leaf1ECX & ~available.leaf1ECX) | (extendedEDX & ~available.extendedEDX)
        if missing.isEmpty && unnamed != 0 { missing.append("CPUID bits 0x\(String(unnamed, radix: 16))") }
        return missing
    }
}

/// A run of pages in a batch: `count` pages from RAM page `firstPage`, with their bytes in the
/// batch (`.data`) or all zero (`.zero`, no bytes on the wire).
public struct PageRange: Sendable, Equatable {
    public enum Kind: UInt32, Sendable { case data = 0, zero = 1 }
    public var firstPage: UInt64
    public var count: UInt32
    public var kind: Kind
}

/// The receiver's answer to a hello: it builds the VM and takes the migration, or why not.
public struct MigrationHelloReply: Sendable, Equatable {
    public var accepted: Bool
    /// The receiver's protocol version.
    public var version: UInt32 = MigrationWire.version
    public var reason: String
    /// A standby's: how often the primary must send something (a checkpoint or a heartbeat),
    /// in milliseconds; a fifth of its --failover-after. 0 for a migration.
    public var heartbeatMilliseconds: UInt32 = 0
    /// What kind of refusal this is, where the sender acts on it (a replication that resumes).
    public var refusal = HelloRefusal.other
    /// A standby's answer to a replication that resumes: the checkpoint it holds committed (the
    /// primary sends what changed since); with refusal `tookOver`, the one it resumed the VM from.
    public var heldEpoch: UInt64?

    /// Why a hello was refused, where the sender acts differently on it.
    public enum HelloRefusal: UInt8, Sendable {
        /// Anything else: the reason says what to do.
        case other = 0
        /// A standby that holds no checkpoint of the replication resuming (it was started
        /// again, discarded its copy, or is copying): the primary starts the replication afresh.
        case nothingToResume = 1
        /// The standby took over the replication resuming: the primary's copy is stale.
        case tookOver = 2
    }

    public static let accept = MigrationHelloReply(accepted: true, reason: "")
    public static func refuse(_ reason: String, _ refusal: HelloRefusal = .other, epoch: UInt64? = nil) -> MigrationHelloReply {
        var reply = MigrationHelloReply(accepted: false, reason: reason)
        reply.refusal = refusal
        reply.heldEpoch = epoch
        return reply
    }

    public init(accepted: Bool, reason: String) {
        self.accepted = accepted
        self.reason = reason
    }

    func encode() -> [UInt8] {
        var writer = WireWriter()
        writer.u8(accepted ? 1 : 0); writer.u32(version); writer.string(reason); writer.u32(heartbeatMilliseconds)
        writer.u8(refusal.rawValue); writer.u8(heldEpoch == nil ? 0 : 1); writer.u64(heldEpoch ?? 0)
        return writer.bytes
    }

    init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "hello reply")
        accepted = try reader.u8() == 1
        version = try reader.u32()
        reason = try reader.peerText()
        // An older receiver's reply ends here: its refusal (a version mismatch) still reads.
        heartbeatMilliseconds = reader.remaining >= 4 ? try reader.u32() : 0
        if reader.remaining > 0 {
            let code = try reader.u8()
            guard let refusal = HelloRefusal(rawValue: code) else { throw .malformed("hello refusal kind \(code)") }
            self.refusal = refusal
            let held = try reader.u8()
            guard held <= 1 else { throw .malformed("hello reply epoch flag \(held)") }
            let epoch = try reader.u64()
            heldEpoch = held == 1 ? epoch : nil
        }
        try reader.finish()
    }
}

/// The end of a pass (`iterationEnd`), and the receiver's acknowledgement of it (`iterationAck`):
/// every page of the pass is in guest memory.
public struct MigrationPassEnd: Sendable, Equatable {
    public var pass: UInt32

    func encode() -> [UInt8] {
        var writer = WireWriter()
        writer.u32(pass); writer.u64(0)   // reserved
        return writer.bytes
    }

    init(pass: UInt32) { self.pass = pass }

    init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "iteration end")
        pass = try reader.u32()
        _ = try reader.u64()
        try reader.finish()
    }

    func encodeAck() -> [UInt8] {
        var writer = WireWriter()
        writer.u32(pass)
        return writer.bytes
    }

    init(decodingAck payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "iteration ack")
        pass = try reader.u32()
        try reader.finish()
    }
}

/// The sender's last frame: its digests, when verifying.
public struct MigrationCompletion: Sendable, Equatable {
    public var verify: Bool
    public var memoryDigest: UInt64
    public var stateDigest: UInt64

    func encode() -> [UInt8] {
        var writer = WireWriter()
        writer.u8(verify ? 1 : 0); writer.u64(memoryDigest); writer.u64(stateDigest)
        return writer.bytes
    }

    init(verify: Bool, memoryDigest: UInt64, stateDigest: UInt64) {
        self.verify = verify
        self.memoryDigest = memoryDigest
        self.stateDigest = stateDigest
    }

    init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "complete")
        let flag = try reader.u8()
        guard flag <= 1 else { throw .malformed("complete's verify flag is \(flag)") }
        verify = flag == 1
        memoryDigest = try reader.u64()
        stateDigest = try reader.u64()
        try reader.finish()
    }
}

/// The payload of an abort, and of a replicationEnd: why, as text (at most 4 KiB, escaped where
/// it enters). Bytes after the text are ignored, as they always were.
struct MigrationReason: Equatable {
    var text: String

    init(_ text: String) { self.text = text }

    func encode() -> [UInt8] { WireWriter.encoding { $0.string(text) } }

    init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "abort")
        text = try reader.peerText()
    }
}

/// The receiver's answer at the end: the VM runs here now, or why not.
public struct MigrationResult: Sendable, Equatable {
    public enum Status: UInt8, Sendable { case resumed = 0, verifyFailed = 1, failed = 2 }
    public var status: Status
    /// What verification cost the receiver (hashing its memory), in nanoseconds.
    public var verifyNanoseconds: UInt64
    /// What the destination spent, after the complete frame, to check, restore and start the VM
    /// (the report's downtime_parts.destination_ms).
    public var resumeNanoseconds: UInt64
    public var message: String

    func encode() -> [UInt8] {
        var writer = WireWriter()
        writer.u8(status.rawValue); writer.u64(verifyNanoseconds); writer.u64(resumeNanoseconds); writer.string(message)
        return writer.bytes
    }

    init(status: Status, verifyNanoseconds: UInt64 = 0, resumeNanoseconds: UInt64 = 0, message: String = "") {
        self.status = status
        self.verifyNanoseconds = verifyNanoseconds
        self.resumeNanoseconds = resumeNanoseconds
        self.message = message
    }

    init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "result")
        guard let status = Status(rawValue: try reader.u8()) else { throw .malformed("result status") }
        self.status = status
        verifyNanoseconds = try reader.u64()
        resumeNanoseconds = try reader.u64()
        message = try reader.peerText()
        try reader.finish()
    }
}

/// One framed connection: typed frames in and out, with the per-type bounds enforced.
final class MigrationChannel: Sendable {
    let transport: any MigrationTransport
    /// How long one frame may take to arrive, from the moment its header is awaited (nil: only
    /// the transport's idle timeout applies). A peer that trickles bytes cannot hold the
    /// receiver longer than this per frame.
    let frameSeconds: Double?

    init(transport: any MigrationTransport, frameSeconds: Double? = nil) {
        self.transport = transport
        self.frameSeconds = frameSeconds
    }

    func send(_ type: MigrationFrameType, _ payload: [UInt8]) throws(MigrationError) {
        do { try transport.send(MigrationWire.frame(type, payload)) } catch { throw .connection(error) }
    }

    func sendAbort(_ reason: String) {
        try? send(.abort, MigrationReason(reason).encode())
    }

    /// Reads a frame header; the payload is left on the transport for the caller, to be read
    /// within the same frame deadline.
    func receiveHeader() throws(MigrationError) -> (MigrationFrameType, Int) {
        if let frameSeconds { transport.setReceiveDeadline(MonotonicClock.nanoseconds() + UInt64(frameSeconds * 1e9)) }
        let bytes: [UInt8]
        do { bytes = try transport.receive(count: MigrationWire.frameHeaderSize) } catch { throw .connection(error) }
        let header = try MigrationError.wrap { () throws(MigrationProtocolError) in try MigrationFrameHeader(decoding: bytes) }
        return (header.type, header.payloadLength)
    }

    func receivePayload(_ length: Int) throws(MigrationError) -> [UInt8] {
        do { return try transport.receive(count: length) } catch { throw .connection(error) }
    }

    /// The next whole frame, which must be one of `expected` (an abort is turned into an error).
    /// The type is checked from the header, before the payload is read: a frame that does not
    /// belong here costs nothing however long it says it is (16 connections announcing 64 MiB
    /// page batches before their hello once took a receiver from 22 MB to 1 GB of RSS).
    func receive(_ expected: Set<MigrationFrameType>) throws(MigrationError) -> (MigrationFrameType, [UInt8]) {
        let (type, length) = try receiveHeader()
        if type == .abort && !expected.contains(.abort) {
            // An abort is bounded to a reason's few KiB (maxPayload): read why.
            throw .peerAborted(MigrationChannel.abortReason(try receivePayload(length)))
        }
        guard expected.contains(type) else {
            throw .protocolError(.unexpected("a \(type) frame where \(expected.map { "\($0)" }.sorted().joined(separator: " or ")) belongs"))
        }
        return (type, try receivePayload(length))
    }

    /// The next frame, which must be `type`, decoded.
    func receive<Frame>(_ type: MigrationFrameType, _ decode: ([UInt8]) throws(MigrationProtocolError) -> Frame) throws(MigrationError) -> Frame {
        let (_, payload) = try receive([type])
        do { return try decode(payload) } catch { throw .protocolError(error) }
    }

    static func abortReason(_ payload: [UInt8]) -> String {
        (try? MigrationReason(decoding: payload))?.text ?? "no reason given"
    }
}

/// Why a migration failed, in words that say what to do.
public enum MigrationError: Error, CustomStringConvertible {
    case connection(SystemError)
    /// The receiver could not listen where it was asked to.
    case listen(SystemError)
    case protocolError(MigrationProtocolError)
    case refused(String)
    case peerAborted(String)
    case notConverging(String)
    case timedOut(String)
    case verifyFailed(String)
    case machine(String)
    case cancelled(String)
    /// `MigrationReceiver.stop()` was called: no more migrations come from it.
    case receiverStopped
    /// The secure channel: unusable credentials, plaintext across hosts, or a refused handshake.
    case channel(ChannelError)

    public var description: String {
        switch self {
        case .connection(let error):
            if let unresolved = ChannelError.connectUnresolved(error) { return unresolved }
            switch error.errno {
            case ECONNREFUSED: return "nothing listens at the destination (\(error.operation)); start 'dirtymig receive --listen HOST:PORT' there first"
            default: return "connection failed: \(error)"
            }
        case .listen(let error):
            if let unresolved = ChannelError.listenUnresolved(error) { return unresolved }
            switch error.errno {
            case EADDRINUSE: return "\(error.operation): the port is in use; choose another with --listen HOST:PORT"
            case EADDRNOTAVAIL: return "\(error.operation): that address is not one of this host's; use one of its addresses, or :PORT for all"
            case EACCES: return "\(error.operation): ports below 1024 need privileges; choose a port from 1024 up"
            default: return "cannot listen: \(error)"
            }
        case .protocolError(let error): return error.description
        case .refused(let why): return "the destination refused the migration: \(why)"
        case .peerAborted(let why): return "the peer aborted the migration: \(why)"
        case .notConverging(let why): return why
        case .timedOut(let why): return why
        case .verifyFailed(let why): return "verification failed: \(why)"
        case .machine(let why): return why
        case .cancelled(let why): return why
        case .receiverStopped: return "the receiver was stopped"
        case .channel(let error): return error.description
        }
    }

    /// What a refusal sent to the peer says: the reason itself for `.refused` (the peer adds
    /// "the destination refused the migration" on its side), the description otherwise.
    var reasonForPeer: String {
        if case .refused(let why) = self { return why }
        return description
    }

    static func wrap<T>(_ body: () throws(MigrationProtocolError) -> T) throws(MigrationError) -> T {
        do { return try body() } catch { throw .protocolError(error) }
    }
}
