import Synchronization

/// Where the workload guest's ports report: in a Machine its events and its output
/// (`MachineGuestReports`); a test's fake records them.
protocol WorkloadGuestReports: Sendable {
    /// A console line, escaped and bounded (ConsoleLine).
    func consoleLine(vcpu: Int, _ line: String)
    /// The guest reported an error code (GuestError) on the error port.
    func guestReportedError(vcpu: Int, code: UInt32)
    /// A check vCPU's output line (its output record, read as it announced it).
    func emitOutput(vcpu: Int, line: String)
    /// An announcement on the output port that was not the announcing vCPU's own record.
    func refuseOutput()
}

/// The workload guest's four I/O ports, one device (GuestLayout): the console (0xE9, bytes, as
/// lines per vCPU), the error port (0x5D0, a dword GuestError), the park port (0x5D4: this vCPU's
/// work is done, never run it again) and the output port (0x5D8, a dword: a check vCPU's APIC
/// ID, announcing its new output record). Each port is registered alone: the ports between them
/// stay unclaimed. Reads see what any unclaimed port gives (the exit's data left as it is).
///
/// String I/O (`rep outsb`) reaches the device as one access with all its elements, as KVM
/// reports it: the console takes every byte of every element, as before the bus; the error and
/// output ports read the first element of a dword access and ignore other widths, so a string
/// OUT there counts once, as it always did (delivering element by element, as kvmtool does,
/// would have made a hostile guest's `rep outsd` to the output port emit once per element).
final class WorkloadGuestPorts: BusDevice {
    static let ports: [UInt16] = [GuestLayout.consolePort, GuestLayout.errorPort, GuestLayout.parkPort, GuestLayout.outputPort]

    /// One console line under assembly per vCPU; only that vCPU's thread touches its own (the
    /// lock is never contended).
    private final class Console: Sendable {
        let line = Mutex(ConsoleLine())
    }

    private let memory: GuestMemory
    private let reports: any WorkloadGuestReports
    private let consoles: [Console]

    init(vcpuCount: Int, memory: GuestMemory, reports: any WorkloadGuestReports) {
        self.memory = memory
        self.reports = reports
        consoles = (0..<vcpuCount).map { _ in Console() }
    }

    /// The device on each of its ports, registered alone (the ports between them stay unclaimed).
    var machineDevice: MachineDevice { MachineDevice(self, ports: Self.ports.map { $0...$0 }) }

    func read(_ access: DeviceAccess, into data: IOData) -> DeviceRequest { .none }

    func write(_ access: DeviceAccess, _ data: IOData) -> DeviceRequest {
        switch UInt16(truncatingIfNeeded: access.address) {
        case GuestLayout.consolePort:
            guard consoles.indices.contains(access.vcpu) else { return .none }
            for byte in data.bytes {
                if let line = consoles[access.vcpu].line.withLock({ $0.take(byte) }) {
                    reports.consoleLine(vcpu: access.vcpu, line)
                }
            }
        case GuestLayout.parkPort:
            return .parkVCPU
        case GuestLayout.errorPort:
            if let code = data.firstDoubleWord { reports.guestReportedError(vcpu: access.vcpu, code: code) }
        case GuestLayout.outputPort:
            if let id = data.firstDoubleWord { emitOutput(vcpu: access.vcpu, announced: id) }
        default:
            break
        }
        return .none
    }

    /// A check vCPU wrote its output record and announced it: read the record now, while the
    /// vCPU waits in this exit (it cannot write the next one before the OUT completes), and
    /// hand its line on. Only a vCPU's own record, named by its own id, is taken.
    private func emitOutput(vcpu: Int, announced id: UInt32) {
        guard id == UInt32(vcpu), consoles.indices.contains(vcpu) else { reports.refuseOutput(); return }
        let record = UnsafeRawPointer(memory.hostPointer(ramOffset: GuestLayout.outputRecordAddress(vcpu: vcpu)))
        let line = GuestOutputLine(record: record)
        guard line.vcpu == vcpu else { reports.refuseOutput(); return }
        reports.emitOutput(vcpu: vcpu, line: line.text)
    }
}

/// A Machine's workload guest reports to its events (console, errors) and its output.
struct MachineGuestReports: WorkloadGuestReports {
    let events: MachineEvents
    let output: GuestOutput

    func consoleLine(vcpu: Int, _ line: String) { events.consoleLine(vcpu, line) }
    func guestReportedError(vcpu: Int, code: UInt32) { events.guestReportedError(vcpu, code) }
    func emitOutput(vcpu: Int, line: String) { output.emit(vcpu: vcpu, line: line) }
    func refuseOutput() { output.refuse() }
}
