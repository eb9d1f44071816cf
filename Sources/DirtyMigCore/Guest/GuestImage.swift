import Foundation

/// A multiboot kernel image in the a.out-kludge form (flat binary, load addresses in the header),
/// the form QEMU's `-kernel` accepts for 64-bit kernels and our own VMM loads the same way.
public struct GuestImage: Sendable {
    public let bytes: [UInt8]
    public let loadAddress: UInt64
    public let loadEndAddress: UInt64
    public let bssEndAddress: UInt64
    public let entryAddress: UInt64

    public enum ImageError: Error, CustomStringConvertible {
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
        guard let data = Data(base64Encoded: base64, options: .ignoreUnknownCharacters),
              let image = try? GuestImage(bytes: [UInt8](data)) else {
            fatalError("the embedded guest image is corrupt: rebuild it with Guest/src/build.sh")
        }
        return image
    }()

    public init(bytes: [UInt8]) throws(ImageError) {
        func word(_ offset: Int) -> UInt32 {
            UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16
                | UInt32(bytes[offset + 3]) << 24
        }
        var found: Int? = nil
        for offset in stride(from: 0, to: min(bytes.count - 32, 8192), by: 4)
            where word(offset) == 0x1BAD_B002 && word(offset) &+ word(offset + 4) &+ word(offset + 8) == 0 {
            found = offset
            break
        }
        guard let header = found else { throw .noMultibootHeader }
        guard word(header + 4) & (1 << 16) != 0 else { throw .notAnAoutKludge }
        let headerAddress = UInt64(word(header + 12))
        loadAddress = UInt64(word(header + 16))
        loadEndAddress = UInt64(word(header + 20))
        bssEndAddress = UInt64(word(header + 24))
        entryAddress = UInt64(word(header + 28))
        guard headerAddress - loadAddress == UInt64(header) else {
            throw .inconsistentAddresses("header_addr does not match the header's offset in the file")
        }
        guard loadEndAddress > loadAddress, loadEndAddress - loadAddress <= UInt64(bytes.count) else {
            throw .inconsistentAddresses("load_end_addr is outside the file")
        }
        guard entryAddress >= loadAddress, entryAddress < loadEndAddress else {
            throw .inconsistentAddresses("the entry point is outside the loaded image")
        }
        self.bytes = Array(bytes.prefix(Int(loadEndAddress - loadAddress)))
    }
}
