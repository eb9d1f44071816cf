import Glibc

/// The standby's staging area for one checkpoint: its pages arrive here, not in guest memory,
/// and are applied only when the checkpoint's end has arrived with a matching page count and
/// digest. A connection lost half-way leaves guest memory exactly at the previous checkpoint.
final class CheckpointStaging {
    let memory: GuestMemory
    private var epoch: UInt64?
    private var pages: [UInt32] = []
    private var buffer: UnsafeMutableRawPointer?
    private var capacityPages = 0
    private var digest = CheckpointDigest()

    /// Decompresses checkpointCompressedPages frames; nil unless the hello announced a codec.
    private let decompressor: PageBatchDecompressor?

    init(memory: GuestMemory, decompressor: PageBatchDecompressor? = nil) {
        self.memory = memory
        self.decompressor = decompressor
    }

    deinit { buffer?.deallocate() }

    /// One checkpointPages frame (its header already read): validated before any byte of page
    /// data is read; the staging area never grows past the VM's own size.
    func receivePages(from channel: MigrationChannel, payloadLength: Int) throws(MigrationError) {
        try receive(from: channel, payloadLength: payloadLength) { header throws(MigrationProtocolError) in
            (try header.checkedCount(payloadLength: payloadLength), nil)
        }
    }

    /// One checkpointCompressedPages frame: as a checkpointPages frame, but the pages' bytes are
    /// one zstd frame, decompressed straight into the staging area, to exactly the pages
    /// announced (and refused whole if it does not hold exactly them).
    func receiveCompressedPages(from channel: MigrationChannel, payloadLength: Int) throws(MigrationError) {
        guard decompressor != nil else {
            throw .protocolError(.unexpected("a compressed checkpoint from a primary that announced no compression"))
        }
        try receive(from: channel, payloadLength: payloadLength) { header throws(MigrationProtocolError) in
            let (count, compressed) = try header.checkedCompressed(payloadLength: payloadLength)
            return (count, compressed)
        }
    }

    /// The steps both frames share; `check` gives the pages a header announces and, for a
    /// compressed frame, the length of its zstd frame.
    private func receive(from channel: MigrationChannel, payloadLength: Int,
                         check: (CheckpointPagesHeader) throws(MigrationProtocolError) -> (Int, Int?)) throws(MigrationError) {
        try MigrationError.wrap { () throws(MigrationProtocolError) in try CheckpointPagesHeader.checkFrame(payloadLength: payloadLength) }
        let headerBytes = try channel.receivePayload(CheckpointPagesHeader.size)
        let (header, count, compressedLength) = try MigrationError.wrap { () throws(MigrationProtocolError) in
            let header = try CheckpointPagesHeader(decoding: headerBytes)
            let (count, compressed) = try check(header)
            return (header, count, compressed)
        }
        if let epoch, epoch != header.epoch {
            throw .protocolError(.malformed("pages of checkpoint \(header.epoch) while checkpoint \(epoch) is unfinished"))
        }
        guard pages.count + count <= memory.pageCount else {
            throw .protocolError(.malformed("a checkpoint of more pages than the VM has (\(memory.pageCount))"))
        }
        epoch = header.epoch
        let numbers = try channel.receivePayload(count * 4)
        let first = pages.count
        try MigrationError.wrap { () throws(MigrationProtocolError) in
            try CheckpointPageList.decode(numbers, count: count, pageCount: memory.pageCount, appendingTo: &pages)
        }
        try reserve(pages.count)
        let target = buffer! + first * 4096
        if let compressedLength, let decompressor {
            let compressed = decompressor.compressedBuffer(compressedLength)
            do { try channel.transport.receive(into: compressed, count: compressedLength) } catch { throw .connection(error) }
            try MigrationError.wrap { () throws(MigrationProtocolError) in
                try decompressor.decompress(compressedLength, into: UnsafeMutableRawBufferPointer(start: target, count: count * 4096))
            }
        } else {
            do { try channel.transport.receive(into: target, count: count * 4096) } catch { throw .connection(error) }
        }
        for index in first..<pages.count { digest.add(page: pages[index], bytes: buffer! + index * 4096) }
    }

    /// Room for `needed` pages. An epoch is staged whole before it is applied, so a resync (every
    /// page, after the primary lost dirty information) needs as much again as the VM: growth is
    /// checked against the memory this host has now, and an epoch that does not fit is refused
    /// (the standby keeps its copy and says why) rather than taking the process down.
    private func reserve(_ needed: Int) throws(MigrationError) {
        guard needed > capacityPages else { return }
        let capacity = min(max(needed, capacityPages * 2, 4096), memory.pageCount)
        do {
            try MemoryBudget.check(needed: UInt64(capacity - capacityPages) * 4096,
                                   for: "staging a checkpoint of \(needed) pages (\(ByteSize.format(UInt64(needed) * 4096)))")
        } catch {
            throw .protocolError(.unexpected("the standby has no memory for this checkpoint: \(error)"))
        }
        let grown = UnsafeMutableRawPointer.allocate(byteCount: capacity * 4096, alignment: 4096)
        // Faulted in now, once: the pages of every later checkpoint land in warm memory.
        memset(grown + capacityPages * 4096, 0, (capacity - capacityPages) * 4096)
        if let buffer {
            memcpy(grown, buffer, capacityPages * 4096)
            buffer.deallocate()
        }
        buffer = grown
        capacityPages = capacity
    }

    /// The checkpoint's end: if it matches what was staged, the pages go into guest memory (the
    /// VM does not run here) and the state is returned; otherwise the whole epoch is refused.
    func apply(_ end: CheckpointEnd) throws(MigrationError) -> [UInt8] {
        defer { reset() }
        if let epoch, epoch != end.epoch {
            throw .protocolError(.malformed("the end of checkpoint \(end.epoch) after pages of checkpoint \(epoch)"))
        }
        guard Int(end.pageCount) == pages.count else {
            throw .protocolError(.malformed("checkpoint \(end.epoch) announces \(end.pageCount) pages and carried \(pages.count)"))
        }
        guard digest.finished(epoch: end.epoch, state: end.state) == end.digest else {
            throw .protocolError(.malformed("checkpoint \(end.epoch)'s digest does not match its pages and state: it was refused whole"))
        }
        let base = memory.base
        for (index, page) in pages.enumerated() {
            memcpy(base + Int(page) * 4096, buffer! + index * 4096, 4096)
        }
        return end.state
    }

    /// Drops what is staged (a torn epoch).
    func reset() {
        epoch = nil
        pages.removeAll(keepingCapacity: true)
        digest = CheckpointDigest()
        if capacityPages > StagedCheckpoint.keptCapacityPages {
            buffer?.deallocate()
            buffer = nil
            capacityPages = 0
        }
    }
}
