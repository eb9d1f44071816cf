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
        // Everything with logic in it: KVM layer, guest memory, guest image, tracking, control protocol.
        .target(
            name: "DirtyMigCore",
            dependencies: ["CKVM"],
            exclude: ["Guest/src"]
        ),
        // The `dirtymig` executable: argument parsing, one file per subcommand, output.
        .executableTarget(name: "DirtyMigCLI", dependencies: ["DirtyMigCore"]),
        // Benchmarks that print tables (tracking cost, ...).
        .executableTarget(name: "DirtyMigBench", dependencies: ["DirtyMigCore"]),
        .testTarget(name: "DirtyMigCoreTests", dependencies: ["DirtyMigCore"]),
        .testTarget(name: "DirtyMigCLITests", dependencies: ["DirtyMigCore", "DirtyMigCLI"]),
    ]
)
