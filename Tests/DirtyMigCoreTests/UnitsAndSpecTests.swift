import DirtyMigCore
import XCTest

final class UnitsAndSpecTests: XCTestCase {
    func testSizes() throws {
        XCTAssertEqual(try ByteSize.parse("4096"), 4096)
        XCTAssertEqual(try ByteSize.parse("512B"), 512)
        XCTAssertEqual(try ByteSize.parse("4K"), 4096)
        XCTAssertEqual(try ByteSize.parse("1M"), 1 << 20)
        XCTAssertEqual(try ByteSize.parse("1MiB"), 1 << 20)
        XCTAssertEqual(try ByteSize.parse("1g"), 1 << 30)
        XCTAssertEqual(try ByteSize.parse("1.5G"), 3 << 29)
        XCTAssertEqual(try ByteSize.parse("2T"), 2 << 40)
        XCTAssertEqual(try ByteSize.parse("1MB"), 1_000_000)
        XCTAssertEqual(try ByteSize.parse("1GB"), 1_000_000_000)
        for bad in ["", "-1G", "1X", "G", "1.5B", "1e99G", "12 parsecs"] {
            XCTAssertThrowsError(try ByteSize.parse(bad), bad)
        }
        do { _ = try ByteSize.parse("1Q"); XCTFail() } catch { XCTAssertTrue(error.message.contains("unknown suffix 'Q'")) }
        XCTAssertEqual(ByteSize.format(1 << 30), "1 GiB")
        XCTAssertEqual(ByteSize.format(3 << 29), "1.5 GiB")
    }

    func testRates() throws {
        XCTAssertEqual(try ByteRate.parse("100M"), 100 << 20)
        XCTAssertEqual(try ByteRate.parse("100M/s"), 100 << 20)
        XCTAssertEqual(try ByteRate.parse("100MiB/s"), 100 << 20)
        XCTAssertEqual(try ByteRate.parse("100MB/s"), 100_000_000)
        XCTAssertEqual(try ByteRate.parse("1Gbit"), 125_000_000)
        XCTAssertEqual(try ByteRate.parse("800Mbit/s"), 100_000_000)
        XCTAssertEqual(try ByteRate.parse("1Gb/s"), 125_000_000)
        XCTAssertEqual(try ByteRate.parse("1Gbps"), 125_000_000)
        for bad in ["", "fast", "-5M", "5Q/s"] { XCTAssertThrowsError(try ByteRate.parse(bad), bad) }
    }

    func testDurations() throws {
        XCTAssertEqual(try DurationValue.parse("500ms"), 0.5)
        XCTAssertEqual(try DurationValue.parse("1s"), 1)
        XCTAssertEqual(try DurationValue.parse("1.5s"), 1.5)
        XCTAssertEqual(try DurationValue.parse("2m"), 120)
        do { _ = try DurationValue.parse("5"); XCTFail() } catch { XCTAssertTrue(error.message.contains("add a unit")) }
        for bad in ["", "1h", "s", "-1s"] { XCTAssertThrowsError(try DurationValue.parse(bad), bad) }
    }

    func testWorkloadSpecs() throws {
        let spec = try WorkloadSpec.parse("0:write,ws=512M,pattern=random,rate=100M")
        XCTAssertEqual(spec.vcpus, 0...0)
        XCTAssertEqual(spec.kind, .write)
        XCTAssertEqual(spec.workingSet, 512 << 20)
        XCTAssertEqual(spec.pattern, .random)
        XCTAssertEqual(spec.rate, 100 << 20)
        XCTAssertEqual(spec.rate / 4096, 25_600, "rate=100M is 25,600 pages/s")
        let mix = try WorkloadSpec.parse("1-3:mix,writes=30,pattern=hot:0.2,passes=2,offset=64M")
        XCTAssertEqual(mix.vcpus, 1...3)
        XCTAssertEqual(mix.writePercent, 30)
        XCTAssertEqual(mix.pattern, .hot)
        XCTAssertEqual(mix.hotFraction, 0.2)
        XCTAssertEqual(mix.passes, 2)
        XCTAssertEqual(mix.offset, 64 << 20)
        XCTAssertNil(try WorkloadSpec.parse("read").vcpus)
        for (bad, words) in [("0:wirte", "did you mean 'write'"), ("0:write,wss=1M", "did you mean 'ws'"),
                             ("0:write,writes=5", "only applies to mix"), ("3-1:read", "N or N-M"),
                             ("0:mix,writes=150", "0-100"), ("0:read,pattern=hot:2", "between 0 and 1"),
                             ("0:read,ws", "key=value"), ("0:read,ws=1Q", "unknown suffix")] {
            do { _ = try WorkloadSpec.parse(bad); XCTFail(bad) } catch {
                XCTAssertTrue(error.message.contains(words), "\(bad): \(error.message)")
            }
        }
    }

    /// content= (write only): parsed, resolved into the vCPU's workload, and carried in the
    /// config block's u16 beside the pattern (0, sparse, for everything written before it).
    func testPageContent() throws {
        XCTAssertEqual(try WorkloadSpec.parse("write").content, .sparse)
        XCTAssertEqual(try WorkloadSpec.parse("0:write,content=text").content, .text)
        XCTAssertEqual(try WorkloadSpec.parse("0:write,content=RANDOM,pattern=hot:0.1").content, .random)
        for (bad, words) in [("0:read,content=text", "only applies to write"), ("0:mix,content=text", "only applies to write"),
                             ("0:write,content=txt", "did you mean 'text'"), ("0:write,contents=text", "did you mean 'content'")] {
            do { _ = try WorkloadSpec.parse(bad); XCTFail(bad) } catch {
                XCTAssertTrue(error.message.contains(words), "\(bad): \(error.message)")
            }
        }
        let resolved = try WorkloadPlan.resolve(specs: [try WorkloadSpec.parse("0:write,ws=4M,pattern=random,content=text")],
                                                vcpuCount: 1, memorySize: 64 << 20)
        XCTAssertEqual(resolved[0].content, .text)
        let config = GuestConfig(tscHz: 2_000_000_000, memorySize: 64 << 20, vcpus: resolved)
        let bytes = config.encode()
        XCTAssertEqual(Array(bytes[64 + 4..<64 + 8]), [1, 0, 1, 0], "u16 pattern (random), u16 content (text)")
        XCTAssertEqual(try GuestConfig(decoding: bytes), config)
        var unknown = bytes
        unknown[64 + 6] = 3
        XCTAssertThrowsError(try GuestConfig(decoding: unknown)) { XCTAssertEqual("\($0)", "config block has an invalid page content") }
    }

    func testWorkloadPlan() throws {
        let specs = [try WorkloadSpec.parse("0:write,ws=512M"), try WorkloadSpec.parse("1:read,ws=256M")]
        let plan = try WorkloadPlan.resolve(specs: specs, vcpuCount: 3, memorySize: 1 << 30)
        XCTAssertEqual(plan[0].offset, 0)
        XCTAssertEqual(plan[1].offset, 512 << 20, "each vCPU gets its own region")
        XCTAssertEqual(plan[2].kind, .idle)
        XCTAssertThrowsError(try WorkloadPlan.resolve(specs: [try WorkloadSpec.parse("0:write,ws=2G")], vcpuCount: 1, memorySize: 1 << 30))
        XCTAssertThrowsError(try WorkloadPlan.resolve(specs: [try WorkloadSpec.parse("4:read")], vcpuCount: 2, memorySize: 1 << 30))
        XCTAssertThrowsError(try WorkloadPlan.resolve(specs: [try WorkloadSpec.parse("0:read,ws=5000")], vcpuCount: 1, memorySize: 1 << 30))
        let defaults = try WorkloadPlan.resolve(specs: WorkloadPlan.defaultSpecs(vcpuCount: 4, memorySize: 256 << 20),
                                                vcpuCount: 4, memorySize: 256 << 20)
        XCTAssertEqual(defaults[0].kind, .write)
        XCTAssertEqual(defaults[3].kind, .read)
    }

    func testConfigBlockLayout() throws {
        let config = GuestConfig(tscHz: 2_600_000_000, memorySize: 1 << 30,
                                 vcpus: [VCPUWorkload(kind: .mix, pattern: .hot, hotFraction: 0.25, writePercent: 30,
                                                      offset: 4096, size: 1 << 20, rateBytesPerSecond: 100 << 20, passes: 3, seed: 7)])
        let bytes = config.encode()
        XCTAssertEqual(bytes.count, 128)
        XCTAssertEqual(Array(bytes[0..<4]), Array("DMCF".utf8))
        XCTAssertEqual(bytes[64], 3, "kind mix")
        XCTAssertEqual(bytes[68], 2, "pattern hot")
        XCTAssertEqual(try GuestConfig(decoding: bytes), config)
        let image = GuestImage.workload
        XCTAssertEqual(image.loadAddress, GuestLayout.imageAddress)
        XCTAssertLessThan(image.loadEndAddress, GuestLayout.configAddress, "the image must not overlap the config block")
    }
}
