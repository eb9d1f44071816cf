import Dispatch
import Glibc

/// One epoch of the primary, copied out of guest memory while the vCPUs were paused: its dirty
/// pages (a dense list and their bytes, page after page) and its vCPU and device state. It is
/// sent after the vCPUs run again, so the pause costs a memory copy of the dirty pages, not a
/// network transfer. One buffer, reused from epoch to epoch (grown when an epoch needs more).
final class StagedCheckpoint {
    private(set) var epoch: UInt64 = 0
    private(set) var pages: [UInt32] = []
    private(set) var state: [UInt8] = []
    private(set) var resync = false
    private var buffer: UnsafeMutableRawPointer?
    private var capacityPages = 0

    /// Up to this (256 MiB) the buffer stays as large as the largest epoch so far, warm; beyond
    /// it (a resync of a big VM after a ring overrun) it is given back after that epoch. A
    /// buffer freed and allocated again costs a first-touch fault per page: with 64 MiB as the
    /// limit, 160 MiB/s writers spiralled into 256 MiB epochs taking seconds each.
    static let keptCapacityPages = 65536

    deinit { buffer?.deallocate() }

    var dataBytes: Int { pages.count * 4096 }

    /// A buffer of `pages` pages, allocated and faulted in now, before any pause needs it: on
    /// this machine the first touch of a fresh page costs microseconds, which a copy made
    /// while the vCPUs are paused would pay page by page.
    init(preparedPages: Int = 4096) { reserve(preparedPages) }

    private func reserve(_ needed: Int) {
        guard buffer == nil || needed > capacityPages else { return }
        buffer?.deallocate()
        capacityPages = max(needed + needed / 2, 256)
        let fresh = UnsafeMutableRawPointer.allocate(byteCount: capacityPages * 4096, alignment: 4096)
        memset(fresh, 0, capacityPages * 4096)
        buffer = fresh
    }

    /// Copies `pages` from guest memory (the vCPUs are paused, so the other core is free: the
    /// copy is split in two from 256 pages on).
    func stage(pages: [UInt32], from memory: GuestMemory, resync: Bool) {
        if capacityPages > Self.keptCapacityPages && pages.count <= Self.keptCapacityPages {
            buffer?.deallocate()
            buffer = nil
        }
        reserve(pages.count)
        self.pages = pages
        self.resync = resync
        let source = UInt(bitPattern: memory.base), target = UInt(bitPattern: buffer!)
        let count = pages.count
        let parts = count >= 256 ? 2 : 1
        pages.withUnsafeBufferPointer { list in
            let numbers = UInt(bitPattern: list.baseAddress)
            DispatchQueue.concurrentPerform(iterations: parts) { part in
                let list = UnsafePointer<UInt32>(bitPattern: numbers)!
                for index in count * part / parts..<count * (part + 1) / parts {
                    memcpy(UnsafeMutableRawPointer(bitPattern: target)! + index * 4096,
                           UnsafeRawPointer(bitPattern: source)! + Int(list[index]) * 4096, 4096)
                }
            }
        }
    }

    func setState(_ bytes: [UInt8]) { state = bytes }
    func setEpoch(_ value: UInt64) { epoch = value }

    /// Puts the checkpoint on the wire: checkpointPages frames of up to 512 pages straight from
    /// the buffer (one sendmsg each), then checkpointEnd with the digest. Returns the bytes sent.
    func send(over channel: MigrationChannel) throws(MigrationError) -> UInt64 {
        var digest = CheckpointDigest()
        var sent: UInt64 = 0
        var first = 0
        let data = UnsafeRawPointer(buffer)
        while first < pages.count {
            let count = min(CheckpointWire.maxPagesPerFrame, pages.count - first)
            let header = CheckpointPagesHeader(epoch: epoch, count: UInt32(count)).encode()
            let payload = header.count + count * 4 + count * 4096
            let frame = channel.header(.checkpointPages, payloadLength: payload)
            for index in first..<first + count { digest.add(page: pages[index], bytes: data! + index * 4096) }
            let result = frame.withUnsafeBytes { frameBytes in
                header.withUnsafeBytes { headerBytes in
                    pages.withUnsafeBytes { numbers in
                        // Page numbers travel little-endian, which is how x86 holds them.
                        let list = UnsafeRawBufferPointer(rebasing: numbers[(first * 4)..<((first + count) * 4)])
                        let bytes = UnsafeRawBufferPointer(start: data! + first * 4096, count: count * 4096)
                        return Result { () throws(SystemError) in try channel.transport.send([frameBytes, headerBytes, list, bytes]) }
                    }
                }
            }
            do { try result.get() } catch { throw .connection(error) }
            sent += UInt64(frame.count + payload)
            first += count
        }
        let end = CheckpointEnd(epoch: epoch, pageCount: UInt32(pages.count), resync: resync,
                                digest: digest.finished(epoch: epoch, state: state), state: state)
        let encoded = end.encode()
        try channel.send(.checkpointEnd, encoded)
        return sent + UInt64(MigrationWire.frameHeaderSize + encoded.count)
    }
}
