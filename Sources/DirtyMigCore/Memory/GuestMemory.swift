import CKVM
import Glibc

/// Guest RAM: one memfd, mapped once, split into KVM memory slots the way GuestLayout places RAM
/// (below 4 GiB, and above it when the VM is large). Offsets into the memfd are "RAM offsets";
/// page N of RAM is page N of the memfd, so one bitmap indexes all of RAM.
///
/// The memfd is what lets migration skip never-written memory without reading it: pages nobody
/// touched are holes (SEEK_HOLE / SEEK_DATA), and reading a hole costs nothing.
public final class GuestMemory: @unchecked Sendable {
    // @unchecked: the mapping is guest memory, shared with vCPUs by design; the metadata is immutable.

    /// One KVM memory slot.
    public struct Region: Sendable, Equatable {
        public let slot: UInt32
        public let guestPhysicalAddress: UInt64
        public let size: UInt64
        public let ramOffset: UInt64

        public var firstPage: Int { Int(ramOffset / GuestLayout.pageSize) }
        public var pageCount: Int { Int(size / GuestLayout.pageSize) }
    }

    public let size: UInt64
    public let regions: [Region]
    public let fd: FileDescriptor
    private let mapping: MappedRegion

    /// Populated in full before a VM was built on it (PreparedMemory, `receive --memory`): a
    /// receiver has no pages to allocate ahead of its writes or after the VM resumes.
    public let allocatedAhead: Bool

    public init(size: UInt64, allocatedAhead: Bool = false) throws(SystemError) {
        precondition(size % GuestLayout.pageSize == 0)
        self.size = size
        self.allocatedAhead = allocatedAhead
        let raw = ckvm_memfd_create("dirtymig-guest-ram", 1 /* MFD_CLOEXEC */)
        if raw < 0 { throw SystemError("memfd_create") }
        fd = FileDescriptor(owning: raw)
        if ftruncate(raw, off_t(size)) != 0 { throw SystemError("ftruncate guest memory to \(size) bytes") }
        mapping = try MappedRegion(length: Int(size), protection: PROT_READ | PROT_WRITE,
                                   flags: MAP_SHARED | MAP_NORESERVE, fd: raw, offset: 0)
        let low = GuestLayout.lowMemorySize(forTotal: size)
        var regions = [Region(slot: 0, guestPhysicalAddress: 0, size: low, ramOffset: 0)]
        if size > low {
            regions.append(Region(slot: 1, guestPhysicalAddress: GuestLayout.highMemoryBase, size: size - low,
                                  ramOffset: low))
        }
        self.regions = regions
    }

    public var pageCount: Int { Int(size / GuestLayout.pageSize) }
    public var base: UnsafeMutableRawPointer { mapping.base }

    public func hostAddress(region: Region) -> UnsafeMutableRawPointer {
        mapping.base + Int(region.ramOffset)
    }

    public func hostPointer(ramOffset: UInt64) -> UnsafeMutableRawPointer {
        precondition(ramOffset < size)
        return mapping.base + Int(ramOffset)
    }

    /// Host pointer for a guest-physical address inside RAM, or nil when it is not RAM.
    public func hostPointer(guestPhysicalAddress gpa: UInt64) -> UnsafeMutableRawPointer? {
        for region in regions where gpa >= region.guestPhysicalAddress
            && gpa - region.guestPhysicalAddress < region.size {
            return mapping.base + Int(region.ramOffset + (gpa - region.guestPhysicalAddress))
        }
        return nil
    }

    /// Copies bytes into guest memory at a guest-physical address (must lie within one region).
    public func write(_ bytes: [UInt8], at gpa: UInt64) {
        guard let destination = hostPointer(guestPhysicalAddress: gpa),
              hostPointer(guestPhysicalAddress: gpa + UInt64(max(bytes.count, 1)) - 1) != nil else {
            preconditionFailure("write of \(bytes.count) bytes at \(gpa) is outside guest RAM")
        }
        bytes.withUnsafeBytes { destination.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
    }

    public func read(count: Int, at gpa: UInt64) -> [UInt8] {
        guard let source = hostPointer(guestPhysicalAddress: gpa) else { return [] }
        return Array(UnsafeRawBufferPointer(start: source, count: count))
    }

    /// RAM-offset ranges that hold data: everything else is a hole the guest never wrote (or
    /// read: reading a shmem hole from the guest allocates a zero page). Found with SEEK_DATA /
    /// SEEK_HOLE, without touching the memory.
    public func dataRanges() -> [Range<UInt64>] {
        var ranges: [Range<UInt64>] = []
        var offset: off_t = 0
        let end = off_t(size)
        while offset < end {
            let dataStart = lseek(fd.rawValue, offset, 3 /* SEEK_DATA */)
            if dataStart < 0 { break }   // ENXIO: no data after offset
            var holeStart = lseek(fd.rawValue, dataStart, 4 /* SEEK_HOLE */)
            if holeStart < 0 { holeStart = end }
            ranges.append(UInt64(dataStart)..<UInt64(min(holeStart, end)))
            offset = holeStart
        }
        return ranges
    }
}

extension GuestMemory {
    /// The pages that hold data (not holes), as a bitmap indexed by RAM page.
    public func dataPages() -> DirtyPageBitmap {
        var pages = DirtyPageBitmap(pageCount: pageCount)
        for range in dataRanges() {
            let first = Int(range.lowerBound / GuestLayout.pageSize)
            let end = min(pageCount, Int((range.upperBound + GuestLayout.pageSize - 1) / GuestLayout.pageSize))
            pages.set(first..<end)
        }
        return pages
    }

    /// Writes `count` bytes at RAM offset `offset` through the memory file (pwrite), not through
    /// the mapping: the page cache takes them with no page fault in this process. A receiver
    /// filling fresh memory is bound by faults on this machine (1 GiB of cold memfd: touching
    /// every page through the mapping 1.1-1.2 s, pwrite 0.66-0.72 s, one thread each), and the
    /// destination's mapping is not used until the VM runs, when KVM maps what the guest touches.
    public func write(_ source: UnsafeRawPointer, count: Int, at offset: UInt64) throws(SystemError) {
        var done = 0
        while done < count {
            let written = pwrite(fd.rawValue, source + done, count - done, off_t(offset) + off_t(done))
            if written > 0 { done += written; continue }
            if written < 0 && errno == EINTR { continue }
            throw SystemError("pwrite \(count - done) bytes of guest memory at \(offset + UInt64(done))")
        }
    }

    /// Allocates the host pages behind a RAM range now (MADV_POPULATE_WRITE) rather than at the
    /// guest's first touch, which under nested/paravirtual KVM costs tens of microseconds a page
    /// and would make a workload's first pass slower than its configured rate.
    public func populate(_ range: Range<UInt64>) throws(SystemError) {
        let start = range.lowerBound & ~(GuestLayout.pageSize - 1)
        let end = min(size, (range.upperBound + GuestLayout.pageSize - 1) & ~(GuestLayout.pageSize - 1))
        guard end > start else { return }
        if madvise(base + Int(start), Int(end - start), 23 /* MADV_POPULATE_WRITE */) != 0 {
            throw SystemError("madvise(MADV_POPULATE_WRITE) over \(end - start) bytes of guest memory")
        }
    }
}
