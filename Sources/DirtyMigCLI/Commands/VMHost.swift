import DirtyMigCore
import Foundation

/// Runs a VM in this process until SIGINT/SIGTERM, `quit`, a failure, or a migration that
/// moved it elsewhere; serves its control socket meanwhile. Shared by `boot` and `receive`.
enum VMHost {
    static func serve(_ machine: Machine, server: ControlServer, stop: StopSignals, ready: String) -> Int32 {
        run(attach(machine, server: server, stop: stop), ready: ready)
    }

    /// A VM whose commands and handlers are in place; `done` is signalled when it is to stop.
    struct Hosted: Sendable {
        let machine: Machine
        let server: ControlServer
        let done: DispatchSemaphore
    }

    /// Registers the VM's commands on `server` (replacing any of the same name), its event
    /// handlers and its stop signals. `receive` does this before the source is told that the VM
    /// runs here, so a script that queries the VM when `migrate` returns finds its commands.
    static func attach(_ machine: Machine, server: ControlServer, stop: StopSignals) -> Hosted {
        let done = DispatchSemaphore(value: 0)
        machine.events.onConsoleLine = { vcpu, line in printError("guest (vCPU \(vcpu)): \(line)") }
        machine.events.onFailure = { error in
            printError("dirtymig: the VM stopped: \(error)")
            done.signal()
        }
        let migrations = MigrationControl.register(on: server, machine: machine) {
            printError("dirtymig: the VM was migrated; it runs at the destination now")
            done.signal()
        }
        let replication = ReplicationControl.register(on: server, machine: machine) { printError($0) }
        /// A VM stopped on purpose must not come back on its standby: the standby is told and
        /// confirms (as long as the link carries data), or the log says it could not be.
        @Sendable func endReplication(_ reason: String) {
            guard let figures = replication.stop(reason: reason) else { return }
            if figures.endConfirmed == true {
                printError("dirtymig: replication ended: the standby \(figures.standby) discarded its copy")
            } else if figures.status != .superseded {
                printError("dirtymig: the standby \(figures.standby) could not be told that the VM stopped on purpose (\(figures.error ?? "no answer")): it may resume the VM from checkpoint \(figures.lastAcknowledgedEpoch.map(String.init) ?? "?"); stop it there with 'dirtymig stop'")
            }
        }
        /// A VM whose migration switched to post-copy holds the only copy of the pages the
        /// destination lacks: it stops once post-copy has ended (also when its link is paused:
        /// it keeps serving its control socket, so `migrate --resume` still reaches it).
        @Sendable func stopOnce(_ why: String) {
            guard migrations.holdsPostCopy else {
                done.signal()
                return
            }
            printError("dirtymig: \(why): post-copy is under way, and this VM holds the only copy of the pages the destination still lacks: it stops once post-copy has ended (SIGKILL would lose the VM)")
            migrations.whenIdle { done.signal() }
        }
        // `quit` (what `dirtymig stop` sends) does what SIGTERM does.
        MachineControl.register(on: server, machine: machine) {
            endReplication("the primary was asked to quit: the VM stopped on purpose")
            migrations.cancel(reason: "the source was asked to quit: the migration was cancelled, the destination discarded its copy, and the VM stopped at the source")
            stopOnce("asked to quit")
        }
        LimitControl.register(on: server, machine: machine)
        // SIGINT/SIGTERM: a migration under way is cancelled first (the destination is told and
        // discards its copy), then the VM stops as it does when idle. Stopping the control
        // server waits for the `migrate` command's thread, which the cancel ends within a batch.
        // A migration past its commit point ends as the destination says instead.
        stop.onSignal {
            endReplication("the primary was asked to stop (\(stop.name)): the VM stopped on purpose")
            if migrations.cancel(reason: "the source was asked to stop (\(stop.name)): the migration was cancelled, the destination discarded its copy, and the VM stopped at the source") {
                printError("dirtymig: stopping: cancelling the migration under way first")
            }
            stopOnce(stop.name)
        }
        return Hosted(machine: machine, server: server, done: done)
    }

    /// Serves the control socket, prints `ready`, and runs until the VM is to stop.
    static func run(_ hosted: Hosted, ready: String) -> Int32 {
        hosted.server.serve()
        emit(ready)
        hosted.done.wait()
        hosted.server.stop()
        hosted.machine.stop()
        return hosted.machine.events.firstFailure == nil ? 0 : 1
    }
}

/// SIGINT, SIGTERM and SIGHUP end the run cleanly instead of killing the process (SIGHUP: the
/// terminal went away, which used to kill a VM without removing its socket). All are blocked in
/// every thread (this must run before any thread is created, so all inherit the mask) and taken
/// by one thread with sigwait: a signal source that lets the kernel pick a thread can lose the
/// signal to a vCPU thread. A signal that arrives before a handler is set is kept for it.
final class StopSignals: @unchecked Sendable {
    // @unchecked: `handler` and `received` are guarded by `lock`.
    private let lock = NSLock()
    private var handler: (@Sendable () -> Void)?
    private var received = false
    private var signalNumber: Int32 = 0

    /// The signal that came, by name ("SIGINT"), once one has.
    var name: String {
        lock.lock(); defer { lock.unlock() }
        switch signalNumber {
        case SIGINT: return "SIGINT"
        case SIGTERM: return "SIGTERM"
        case SIGHUP: return "SIGHUP"
        default: return "a signal"
        }
    }

    init() {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        sigaddset(&set, SIGHUP)
        pthread_sigmask(SIG_BLOCK, &set, nil)
        let waitSet = set
        _ = OSThread(name: "stop-signals") { [self] in
            var mask = waitSet
            var number: Int32 = 0
            while true {
                guard sigwait(&mask, &number) == 0 else { continue }
                lock.lock()
                received = true
                signalNumber = number
                let action = handler
                lock.unlock()
                action?()
            }
        }
    }

    /// What to do on SIGINT/SIGTERM/SIGHUP (replaces the previous action; runs at once if one came).
    func onSignal(_ action: @escaping @Sendable () -> Void) {
        lock.lock()
        handler = action
        let already = received
        lock.unlock()
        if already { action() }
    }
}
