// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "dirtymig",
    products: [
        .executable(name: "dirtymig", targets: ["DirtyMigCLI"]),
        .executable(name: "dirtymig-bench", targets: ["DirtyMigBench"]),
        .library(name: "DirtyMigCore", targets: ["DirtyMigCore"]),
    ],
    targets: [
        // <linux/kvm.h> for Swift: ioctl numbers, struct layouts, kvm_run union accessors. No logic.
        .target(name: "CKVM"),
        // <linux/userfaultfd.h> for Swift: post-copy's demand faults. No logic.
        .target(name: "CUserfaultfd"),
        // The system's OpenSSL (libssl, libcrypto) for Swift: TLS 1.3 contexts, PSK and certificate
        // glue, the handshake's outcome. No cryptography of our own; `.ci/run` installs libssl-dev.
        .target(name: "CTLS", linkerSettings: [.linkedLibrary("ssl"), .linkedLibrary("crypto")]),
        // The system's libzstd for Swift: contexts with their bounds set, the frame header's
        // declared size. zstd does all compression; `.ci/run` installs libzstd-dev.
        .target(name: "CZstd", linkerSettings: [.linkedLibrary("zstd")]),
        // Everything with logic in it: KVM layer, guest memory, guest image, tracking, control protocol.
        .target(
            name: "DirtyMigCore",
            dependencies: ["CKVM", "CTLS", "CZstd", "CUserfaultfd"],
            exclude: ["Guest/src"]
        ),
        // The `dirtymig` executable: argument parsing, one file per subcommand, output.
        .executableTarget(name: "DirtyMigCLI", dependencies: ["DirtyMigCore"]),
        // Helpers that drive dirtymig and its peers from outside, for the tests and the benchmarks
        // only: a loopback relay that stalls, cuts or tears a link on cue (FaultRelay), a QMP client
        // for QEMU. Kept out of DirtyMigCore so that the `dirtymig` executable does not carry them.
        .target(name: "DirtyMigTestSupport", dependencies: ["DirtyMigCore"]),
        // Benchmarks that print tables (tracking cost, ...).
        .executableTarget(name: "DirtyMigBench", dependencies: ["DirtyMigCore", "DirtyMigTestSupport"]),
        .testTarget(name: "DirtyMigCoreTests", dependencies: ["DirtyMigCore", "DirtyMigTestSupport"]),
        .testTarget(name: "DirtyMigCLITests", dependencies: ["DirtyMigCore", "DirtyMigCLI", "DirtyMigTestSupport"]),
    ]
)
