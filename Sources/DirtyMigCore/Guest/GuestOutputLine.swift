/// One line of the guest's output stream: what a check vCPU's output record says (GuestLayout's
/// output records), as `vcpu=V seq=N pages=P errors=E sum=0123456789abcdef`.
public struct GuestOutputLine: Sendable, Equatable {
    /// The vCPU (APIC ID) that wrote it.
    public var vcpu: Int
    /// 1 for a vCPU's first line, then +1 for each one after (the count lives in guest memory,
    /// so it carries across migrations).
    public var sequence: UInt64
    /// Pages the vCPU had touched.
    public var pages: UInt64
    /// Mismatches its check had found.
    public var errors: UInt64
    /// The wrapping sum of the first words it read in its last complete pass (CheckWorkload.checksum).
    public var sum: UInt64

    public init(vcpu: Int, sequence: UInt64, pages: UInt64, errors: UInt64, sum: UInt64) {
        self.vcpu = vcpu
        self.sequence = sequence
        self.pages = pages
        self.errors = errors
        self.sum = sum
    }

    /// Reads an output record (64 bytes at GuestLayout.outputRecordAddress) from the host's
    /// mapping of guest memory.
    public init(record: UnsafeRawPointer) {
        func u64(_ offset: Int) -> UInt64 { record.load(fromByteOffset: offset, as: UInt64.self) }
        self.init(vcpu: Int(record.load(fromByteOffset: 48, as: UInt32.self)), sequence: u64(0), pages: u64(8),
                  errors: u64(16), sum: u64(24))
    }

    public var text: String {
        let hex = String(sum, radix: 16)
        return "vcpu=\(vcpu) seq=\(sequence) pages=\(pages) errors=\(errors) sum=\(String(repeating: "0", count: 16 - hex.count))\(hex)"
    }

    /// Reads `text` back; nil for anything else (a torn or foreign line).
    public init?(parsing line: Substring) {
        let fields = line.split(separator: " ")
        let names = ["vcpu=", "seq=", "pages=", "errors=", "sum="]
        guard fields.count == names.count, zip(fields, names).allSatisfy({ $0.hasPrefix($1) }) else { return nil }
        let values = zip(fields, names).map { $0.dropFirst($1.count) }
        guard let vcpu = Int(values[0]), let sequence = UInt64(values[1]), let pages = UInt64(values[2]),
              let errors = UInt64(values[3]), values[4].count == 16, let sum = UInt64(values[4], radix: 16) else { return nil }
        self.init(vcpu: vcpu, sequence: sequence, pages: pages, errors: errors, sum: sum)
    }
}
