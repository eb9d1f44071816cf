import Foundation
import Glibc

/// The destination side: accepts one migration at a time and runs it as an explicit state
/// machine. A migration that fails half-way (peer gone, bad data, verification failure) drops
/// its partial VM; only a migration that completes yields a running Machine.
public final class MigrationReceiver: Sendable {
    public let listener: TCPSocket
    public let kvm: KVMSystem
    /// The name the received VM gets (its control socket); nil keeps the sender's name.
    public let name: String?

    public init(listener: TCPSocket, kvm: KVMSystem, name: String? = nil) {
        self.listener = listener
        self.kvm = kvm
        self.name = name
    }

    /// Listens on `endpoint`. A port in use is a clear error.
    public static func listen(on endpoint: HostPort, kvm: KVMSystem, name: String? = nil) throws(MigrationError) -> MigrationReceiver {
        do { return MigrationReceiver(listener: try TCPSocket.listen(endpoint), kvm: kvm, name: name) } catch {
            if error.errno == EADDRINUSE {
                throw .connection(SystemError("listen on \(endpoint)", errno: EADDRINUSE))
            }
            throw .connection(error)
        }
    }

    public var port: UInt16 { listener.localPort }

    /// Wakes a receiver blocked in accept (it then throws).
    public func stop() { listener.shutdown() }

    /// The receiver's states. Each frame is legal in exactly one of them.
    enum Phase {
        case awaitingHello
        case receivingMemory(Machine, PageReceiver)
        case awaitingCompletion(Machine, PageReceiver, stateBytes: [UInt8])
    }

    /// Accepts the next connection and receives one migration. Returns the running VM, or
    /// throws why this migration failed (its partial VM is gone; call again for the next one).
    public func receiveOne() throws(MigrationError) -> Machine {
        let socket: TCPSocket
        do { socket = try listener.accept() } catch { throw .connection(error) }
        defer { socket.shutdown() }
        // A sender that goes quiet for this long is gone (it sends at least every pass).
        socket.setTimeouts(send: 10, receive: 30)
        let channel = MigrationChannel(socket: socket)
        do {
            return try run(channel)
        } catch {
            channel.sendAbort(error.description)
            throw error
        }
    }

    private func run(_ channel: MigrationChannel) throws(MigrationError) -> Machine {
        var phase = Phase.awaitingHello
        defer {
            // However it ends, no thread keeps allocating pages for this migration.
            if case .receivingMemory(_, let pages) = phase { pages.passEnded() }
        }
        while true {
            switch phase {
            case .awaitingHello:
                let (_, payload) = try channel.receive([.hello])
                let hello = try MigrationError.wrap { () throws(MigrationProtocolError) in try MigrationHello(decoding: payload) }
                let machine: Machine
                do { machine = try build(hello) } catch {
                    var reply = WireWriter()
                    reply.u8(0); reply.u32(MigrationWire.version); reply.string(error.description)
                    try? channel.send(.helloReply, reply.bytes)
                    throw error
                }
                var reply = WireWriter()
                reply.u8(1); reply.u32(MigrationWire.version); reply.string("")
                do { try channel.send(.helloReply, reply.bytes) } catch { throw .connection(error) }
                phase = .receivingMemory(machine, PageReceiver(memory: machine.memory, verifying: hello.verify))

            case .receivingMemory(let machine, let pages):
                let (type, length) = try channel.receiveHeader()
                switch type {
                case .pages:
                    try pages.receive(from: channel, payloadLength: length)
                case .passPlan:
                    try pages.receivePlan(from: channel, payloadLength: length)
                case .iterationEnd:
                    var reader = WireReader(try channel.receivePayload(length), what: "iteration end")
                    let (iteration, _, _) = try MigrationError.wrap { () throws(MigrationProtocolError) in
                        (try reader.u32(), try reader.u64(), try reader.finish())
                    }
                    pages.passEnded()
                    // Everything of the pass is in guest memory now: say so, so the sender
                    // measures real bandwidth and never pauses with a backlog still in flight.
                    var ack = WireWriter()
                    ack.u32(iteration)
                    do { try channel.send(.iterationAck, ack.bytes) } catch { throw .connection(error) }
                case .state:
                    phase = .awaitingCompletion(machine, pages, stateBytes: try channel.receivePayload(length))
                case .abort:
                    var reader = WireReader(try channel.receivePayload(length), what: "abort")
                    throw .peerAborted((try? reader.string()) ?? "no reason given")
                default:
                    throw .protocolError(.unexpected("a \(type) frame while receiving memory"))
                }

            case .awaitingCompletion(let machine, let pages, let stateBytes):
                let (_, payload) = try channel.receive([.complete])
                var reader = WireReader(payload, what: "complete")
                let (verify, memoryDigest, stateDigest) = try MigrationError.wrap { () throws(MigrationProtocolError) in
                    let fields = (try reader.u8(), try reader.u64(), try reader.u64())
                    try reader.finish()
                    return fields
                }
                var verifyNanoseconds: UInt64 = 0
                if verify == 1 {
                    let start = MonotonicClock.nanoseconds()
                    // Kept as pages landed when the hello announced --verify; otherwise hashed now.
                    let ours = pages.digest?.value ?? MemoryDigest.compute(machine.memory)
                    let oursState = MemoryDigest.hash(stateBytes)
                    verifyNanoseconds = MonotonicClock.nanoseconds() - start + (pages.digest?.nanoseconds ?? 0)
                    if ours != memoryDigest || oursState != stateDigest {
                        let what = ours != memoryDigest ? "memory digest" : "state digest"
                        let message = "\(what) differs (source 0x\(String(ours != memoryDigest ? memoryDigest : stateDigest, radix: 16)), destination 0x\(String(ours != memoryDigest ? ours : oursState, radix: 16)))"
                        try? channel.send(.result, MigrationResult(status: .verifyFailed, verifyNanoseconds: verifyNanoseconds,
                                                                   message: message).encode())
                        throw .verifyFailed(message)
                    }
                }
                do {
                    let state = try MachineState(decoding: stateBytes)
                    try machine.restoreState(state)
                    try machine.start()
                } catch {
                    let message = "cannot resume the VM here: \(error)"
                    try? channel.send(.result, MigrationResult(status: .failed, message: message).encode())
                    machine.stop()
                    throw .machine(message)
                }
                do {
                    try channel.send(.result, MigrationResult(status: .resumed, verifyNanoseconds: verifyNanoseconds).encode())
                } catch {
                    // The source never learns that we run the VM; it resumes its own copy. Two
                    // copies must never run: drop ours.
                    machine.stop()
                    throw .connection(error)
                }
                pages.populateAfterResume()
                return machine
            }
        }
    }

    /// Checks the sender's announcement against this host, then builds the empty VM.
    private func build(_ hello: MigrationHello) throws(MigrationError) -> Machine {
        let config: GuestConfig
        do { config = try GuestConfig(decoding: hello.guestConfig) } catch {
            throw .protocolError(.malformed("guest config block: \(error)"))
        }
        guard config.memorySize == hello.memorySize, config.vcpus.count == hello.vcpuCount else {
            throw .refused("the guest config block (\(config.vcpus.count) vCPUs, \(config.memorySize) bytes) disagrees with the announced VM (\(hello.vcpuCount) vCPUs, \(hello.memorySize) bytes)")
        }
        let missing = hello.requiredFeatures.missing(in: kvm.cpuFeatures)
        guard missing.isEmpty else {
            throw .refused("this host's CPU lacks what the guest uses: \(missing.joined(separator: ", "))")
        }
        let configuration = MachineConfiguration(
            name: name ?? hello.name, memorySize: hello.memorySize, vcpuCount: hello.vcpuCount,
            workloads: config.vcpus, tracking: hello.tracking, ringEntries: hello.ringEntries)
        do { try configuration.validate(against: kvm) } catch { throw .refused("\(error)") }
        do { return try Machine(configuration, kvm: kvm, boot: .incoming) } catch {
            throw .refused("cannot build the VM here: \(error)")
        }
    }
}
