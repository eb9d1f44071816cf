/// One pre-copy pass on the wire: a set of pages sent straight from guest memory, the pass's
/// end, and the receiver's acknowledgement that every page of it is in its memory. A migration's
/// passes and a replication's initial copy are the same step.
final class PassTransfer {
    let channel: MigrationChannel
    private(set) var pages: PageSender
    /// The shortest wait for an acknowledgement seen so far: what the final one will cost at
    /// least (a round trip, and the receiver draining what is in flight).
    private(set) var shortestAcknowledgementSeconds = Double.infinity

    /// `bandwidth`: the cap in force (nil: none), asked before every batch. `compression`:
    /// `--compress` (the hello announced its codec).
    init(channel: MigrationChannel, memory: GuestMemory, bandwidth: @escaping () -> UInt64?,
         compression: PageCompression = .none) throws(MigrationError) {
        self.channel = channel
        pages = PageSender(channel: channel, memory: memory, limiter: BandwidthLimiter(rate: bandwidth))
        self.compression = compression
        if compression != .none {
            guard let compressor = PageBatchCompressor(mode: compression) else {
                throw .machine("cannot make a zstd compression context (out of memory)")
            }
            pages.compressor = compressor
        }
    }

    let compression: PageCompression

    /// What compression did so far.
    var compressionReport: CompressionReport {
        CompressionReport(mode: compression, tally: pages.compressor?.tally ?? CompressionTally())
    }

    /// The plan of pass 1 (which pages it carries), so the receiver can allocate them ahead on
    /// a second thread while they arrive.
    func sendPlan(_ set: DirtyPageBitmap) throws(MigrationError) {
        try channel.send(.passPlan, PassPlan(pass: 1, words: set.words).encode())
    }

    /// The pages of `set`, from guest memory (see PageSender).
    func send(_ set: DirtyPageBitmap, shouldStop: () -> Bool = { false },
              onBatch: (PageSendTally) -> Void = { _ in }) throws(MigrationError) -> PageSendTally {
        try pages.send(set, shouldStop: shouldStop, onBatch: onBatch)
    }

    /// Ends pass `pass` and waits until the receiver has it all (socket buffers hold megabytes,
    /// which a receiver faulting in fresh pages may need tens of milliseconds to drain).
    func end(pass: Int) throws(MigrationError) {
        let sentEnd = MonotonicClock.nanoseconds()
        try channel.send(.iterationEnd, MigrationPassEnd(pass: UInt32(pass)).encode())
        let acknowledged = try channel.receive(.iterationAck, MigrationPassEnd.init(decodingAck:)).pass
        shortestAcknowledgementSeconds = min(shortestAcknowledgementSeconds, Double(MonotonicClock.nanoseconds() - sentEnd) / 1e9)
        guard acknowledged == UInt32(pass) else {
            throw .protocolError(.unexpected("an acknowledgement of pass \(acknowledged) after pass \(pass)"))
        }
    }
}

extension MigrationHello {
    /// What `machine` announces to a receiver.
    init(announcing machine: Machine) {
        self.init(name: machine.configuration.name, memorySize: machine.configuration.memorySize,
                  vcpuCount: machine.configuration.vcpuCount, tracking: machine.configuration.tracking,
                  ringEntries: machine.configuration.ringEntries, tscKHz: machine.tscHz / 1000,
                  requiredFeatures: machine.bootSource.requiredFeatures, bootSource: machine.bootSource.kind,
                  bootAnnouncement: machine.bootSource.announcement(tscHz: machine.tscHz))
    }
}
