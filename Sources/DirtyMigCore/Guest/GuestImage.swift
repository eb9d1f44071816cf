import Foundation

/// A multiboot kernel image in the a.out-kludge form (flat binary, load addresses in the header),
/// the form QEMU's `-kernel` accepts for 64-bit kernels and our own VMM loads the same way.
public struct GuestImage: Sendable {
    /// The bytes to load at `loadAddress` (exactly `loadEndAddress - loadAddress` of them);
    /// `loadEndAddress..<bssEndAddress` is zeroed by the loader.
    public let bytes: [UInt8]
    public let loadAddress: UInt64
    public let loadEndAddress: UInt64
    public let bssEndAddress: UInt64
    public let entryAddress: UInt64

    public static let multibootMagic: UInt32 = 0x1BAD_B002
    /// Header flag bit 16: the address fields are valid (the a.out kludge).
    public static let addressFieldsFlag: UInt32 = 1 << 16
    /// Multiboot v1: the header must lie, 4-byte aligned, within the first 8 KiB of the file.
    public static let headerSearchLimit = 8192

    public enum ImageError: Error, CustomStringConvertible, Equatable {
        case noMultibootHeader
        case notAnAoutKludge
        case inconsistentAddresses(String)

        public var description: String {
            switch self {
            case .noMultibootHeader: return "no multiboot header in the first 8 KiB of the image"
            case .notAnAoutKludge: return "the multiboot header does not give load addresses (flag bit 16)"
            case .inconsistentAddresses(let why): return "the multiboot header's addresses are inconsistent: \(why)"
            }
        }
    }

    /// The workload guest built from Guest/src (bytes in GuestImageBytes.swift).
    public static let workload: GuestImage = {
        guard let data = Data(base64Encoded: base64, options: .ignoreUnknownCharacters) else {
            fatalError("the embedded guest image is not valid base64: rebuild it with Guest/src/build.sh")
        }
        do {
            return try GuestImage(bytes: [UInt8](data))
        } catch {
            fatalError("the embedded guest image is corrupt (\(error)): rebuild it with Guest/src/build.sh")
        }
    }()

    /// Finds and checks the multiboot header; keeps the bytes the loader loads.
    public init(bytes: [UInt8]) throws(ImageError) {
        func word(_ offset: Int) -> UInt32 {
            UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16
                | UInt32(bytes[offset + 3]) << 24
        }
        var found: Int? = nil
        // The kludge header is 32 bytes (magic, flags, checksum, five addresses), all of it
        // within the first 8 KiB.
        var offset = 0
        while offset + 32 <= min(bytes.count, GuestImage.headerSearchLimit) {
            if word(offset) == GuestImage.multibootMagic,
               word(offset) &+ word(offset + 4) &+ word(offset + 8) == 0 {
                found = offset
                break
            }
            offset += 4
        }
        guard let header = found else { throw .noMultibootHeader }
        guard word(header + 4) & GuestImage.addressFieldsFlag != 0 else { throw .notAnAoutKludge }
        let headerAddress = UInt64(word(header + 12))
        let load = UInt64(word(header + 16))
        let loadEnd = UInt64(word(header + 20))
        let bssEnd = UInt64(word(header + 24))
        let entry = UInt64(word(header + 28))
        guard headerAddress >= load, headerAddress - load == UInt64(header) else {
            throw .inconsistentAddresses("header_addr does not match the header's offset in the file")
        }
        guard loadEnd > load, loadEnd - load <= UInt64(bytes.count) else {
            throw .inconsistentAddresses("load_end_addr is outside the file")
        }
        guard bssEnd == 0 || bssEnd >= loadEnd else {
            throw .inconsistentAddresses("bss_end_addr lies before load_end_addr")
        }
        guard entry >= load, entry < loadEnd else {
            throw .inconsistentAddresses("the entry point is outside the loaded image")
        }
        loadAddress = load
        loadEndAddress = loadEnd
        bssEndAddress = max(bssEnd, loadEnd)
        entryAddress = entry
        self.bytes = Array(bytes.prefix(Int(loadEnd - load)))
    }
}
