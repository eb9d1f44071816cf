import CTLS
import Glibc
import Synchronization

/// How a migration (or replication) connection is protected: in clear, or TLS 1.3 with a
/// pre-shared key or with certificates. The same value is given to the sending side (in
/// `MigrationOptions.security`) and to `MigrationReceiver`; `MigrationConnector` applies it.
public struct ChannelSecurity: Sendable {
    public enum Credentials: Sendable {
        /// No encryption, no authentication: loopback only, unless `insecure`.
        case none
        case psk(PreSharedKey)
        case certificates(CertificateFiles)
    }

    public let credentials: Credentials
    /// Plaintext across hosts was asked for (`--insecure`).
    public let insecure: Bool
    /// The name the peer's certificate must carry (`--tls-peer`); a sender without it checks the
    /// host of `--to`, a receiver without it accepts any certificate its CA signed.
    public let peerName: String?
    /// Ask OpenSSL to move the record layer into the kernel (kTLS) after the handshake.
    public let kernelTLS: Bool
    /// The OpenSSL contexts, made once per side on first use (loading certificates is not free).
    let contexts: TLSContextCache

    public init(credentials: Credentials, insecure: Bool = false, peerName: String? = nil,
                kernelTLS: Bool = ChannelSecurity.kernelTLSDefault) {
        self.credentials = credentials
        self.insecure = insecure
        self.peerName = peerName
        self.kernelTLS = kernelTLS
        contexts = TLSContextCache()
    }

    /// Plaintext, loopback only: what the embedded local migration and the tests use.
    public static var plain: ChannelSecurity { ChannelSecurity(credentials: .none) }

    /// kTLS is tried unless DIRTYMIG_KTLS=0 (it falls back to OpenSSL's record layer where the
    /// kernel has no "tls" ULP, as on the development machine; see docs/BENCHMARKS.md, "Encrypted migration").
    public static var kernelTLSDefault: Bool { getenv("DIRTYMIG_KTLS").map { String(cString: $0) != "0" } ?? true }

    public var isEncrypted: Bool {
        if case .none = credentials { return false }
        return true
    }

    /// What a peer must bring, in a word for status and `list`: "psk", "certificates",
    /// "plaintext" (loopback) or "insecure" (plaintext across hosts, `--insecure`).
    public var credentialsKind: String {
        switch credentials {
        case .none: return insecure ? "insecure" : "plaintext"
        case .psk: return "psk"
        case .certificates: return "certificates"
        }
    }

    /// The options that gave these credentials, for messages ("--psk-file K").
    public var optionsText: String {
        switch credentials {
        case .none: return insecure ? "--insecure" : "no credentials"
        case .psk(let key): return "--psk-file \(key.path)"
        case .certificates(let files): return "--tls-dir \(files.directory)"
        }
    }

    /// Loads what the options name: `--psk-file`, or `--tls-dir` (with `--tls-peer`), or neither
    /// (with `--insecure` or not). Key files others can read are refused, as ssh refuses them.
    public static func load(pskFile: String?, tlsDirectory: String?, peerName: String?, insecure: Bool) throws(ChannelError) -> ChannelSecurity {
        if pskFile != nil && tlsDirectory != nil {
            throw .credentials("--psk-file and --tls-dir exclude each other: give one kind of credentials")
        }
        if peerName != nil && tlsDirectory == nil {
            throw .credentials("--tls-peer applies to certificates: give --tls-dir DIR too")
        }
        if insecure && (pskFile != nil || tlsDirectory != nil) {
            throw .credentials("--insecure turns encryption off; it cannot go with --psk-file or --tls-dir")
        }
        let security: ChannelSecurity
        if let pskFile {
            security = ChannelSecurity(credentials: .psk(try PreSharedKey.load(path: pskFile)))
        } else if let tlsDirectory {
            security = ChannelSecurity(credentials: .certificates(try CertificateFiles.load(directory: tlsDirectory)), peerName: peerName)
        } else {
            return ChannelSecurity(credentials: .none, insecure: insecure)
        }
        // Both sides' OpenSSL contexts now: a bad certificate is reported before anything starts,
        // and OpenSSL's first-use cost (about 5 ms here) is not paid inside a migration's clock.
        // With a PSK the two contexts can also shake hands with each other in memory, which
        // readies what the first real handshake would fetch (with certificates they cannot: each
        // side's certificate is signed for its own name).
        let client = try security.contexts.context(for: security, server: false)
        let server = try security.contexts.context(for: security, server: true)
        if case .psk = security.credentials { _ = ctls_warm_up(client.context, server.context) }
        return security
    }

    /// Resolves where to listen, once, and checks it: plaintext is for loopback, so without
    /// credentials (and without `--insecure`) every address the name gives must be a loopback
    /// one. Returns those addresses, for `TCPSocket.listen(_:addresses:)`: checking one
    /// resolution and listening on another would let a name that changes in between (or a
    /// resolver that failed the first time, which once counted as "not non-loopback") put
    /// plaintext on another host's network.
    @discardableResult
    public func checkListening(on endpoint: HostPort, resolver: NameResolver = .system) throws(ChannelError) -> [SocketAddress] {
        let addresses = try Self.resolve(endpoint, passive: true, resolver: resolver) { error in
            ChannelError.listenUnresolved(error) ?? "cannot listen on \(endpoint): \(error)"
        }
        if plaintextAllowed(on: addresses) { return addresses }
        let shown = endpoint.host.isEmpty ? "all addresses (:\(endpoint.port))" : endpoint.description
        throw .plaintextAcrossHosts("refusing to listen on \(shown)\(Self.resolvedText(endpoint, addresses)) without credentials: anyone who reaches the port could push a VM into this host, and guest memory would cross the network in clear. Give --psk-file FILE (the same key as the source's; make one with: (umask 077 && openssl rand -hex 32 > FILE)) or --tls-dir DIR (ca.pem, cert.pem, key.pem), or --insecure to accept plaintext, or listen on 127.0.0.1")
    }

    /// The same for a sending side connecting to `endpoint`: returns the addresses to connect
    /// to (`TCPSocket.connect(_:addresses:)`).
    @discardableResult
    public func checkConnecting(to endpoint: HostPort, resolver: NameResolver = .system) throws(ChannelError) -> [SocketAddress] {
        let addresses = try Self.resolve(endpoint, passive: false, resolver: resolver) { error in
            ChannelError.connectUnresolved(error) ?? "cannot connect to \(endpoint): \(error)"
        }
        if plaintextAllowed(on: addresses) { return addresses }
        throw .plaintextAcrossHosts("refusing to migrate to \(endpoint)\(Self.resolvedText(endpoint, addresses)) without credentials: guest memory would cross the network in clear, unauthenticated. Give --psk-file FILE (the same key as the receiver's) or --tls-dir DIR (ca.pem, cert.pem, key.pem; --tls-peer NAME if the receiver's certificate is not for \(endpoint.host)), or --insecure to send in plaintext")
    }

    /// The addresses `endpoint` resolves to; a name that does not resolve is `.unresolved`,
    /// in the words `unresolved` gives (nothing is let through on a resolver's failure).
    private static func resolve(_ endpoint: HostPort, passive: Bool, resolver: NameResolver,
                                unresolved: (SystemError) -> String) throws(ChannelError) -> [SocketAddress] {
        do { return try resolver.addresses(endpoint, passive: passive) } catch { throw .unresolved(unresolved(error)) }
    }

    /// Whether these credentials may use `addresses`: TLS and --insecure anywhere, plaintext only
    /// if every address is a loopback one (none at all is not "no other host").
    private func plaintextAllowed(on addresses: [SocketAddress]) -> Bool {
        guard case .none = credentials, !insecure else { return true }
        return !addresses.isEmpty && addresses.allSatisfy(\.isLoopback)
    }

    /// " (which resolves to 10.0.0.7, 127.0.0.1)" for a name, "" for an address or all of them.
    private static func resolvedText(_ endpoint: HostPort, _ addresses: [SocketAddress]) -> String {
        let shown = addresses.map(\.description)
        guard !endpoint.host.isEmpty, shown != [endpoint.host] else { return "" }
        return " (which resolves to \(shown.joined(separator: ", ")))"
    }
}

/// A TLS 1.3 external pre-shared key and its identity, from a key file: one line, the key in hex
/// (16 to 64 bytes), optionally preceded by `IDENTITY:` (the format of QEMU's and GnuTLS's
/// keys.psk). Without one the identity is `dirtymig-` and the first 8 bytes of the key's SHA-256,
/// so two hosts with different keys tell each other so by name.
public struct PreSharedKey: Sendable {
    public let path: String
    public let identity: String
    let key: [UInt8]

    public static func load(path: String) throws(ChannelError) -> PreSharedKey {
        let text = try KeyFile.read(path, what: "--psk-file")
        let lines = text.split(whereSeparator: \.isNewline).map { $0.trimmingSpaces }.filter { !$0.isEmpty && !$0.hasPrefix("#") }
        guard lines.count == 1, let line = lines.first else {
            throw .credentials("--psk-file \(path): expected one line, the key in hex (make one with: (umask 077 && openssl rand -hex 32 > \(path)))")
        }
        var identity: String?
        var hex = Substring(line)
        if let colon = line.lastIndex(of: ":") {
            identity = String(line[..<colon])
            hex = line[line.index(after: colon)...]
        }
        guard let key = Self.bytes(hex: hex), (16...64).contains(key.count) else {
            throw .credentials("--psk-file \(path): the key must be 32 to 128 hex digits (16 to 64 bytes), optionally after IDENTITY:")
        }
        if let identity {
            guard !identity.isEmpty, identity.utf8.count < 256, identity.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f }) else {
                throw .credentials("--psk-file \(path): the identity before ':' must be 1 to 255 printable characters without spaces")
            }
        }
        return PreSharedKey(path: path, identity: identity ?? Self.defaultIdentity(key), key: key)
    }

    static func defaultIdentity(_ key: [UInt8]) -> String {
        var digest = [UInt8](repeating: 0, count: 32)
        _ = key.withUnsafeBytes { ctls_sha256($0.baseAddress, key.count, &digest) }
        return "dirtymig-" + digest.prefix(8).map { String(format2: $0) }.joined()
    }

    static func bytes(hex: Substring) -> [UInt8]? {
        let digits = Array(hex.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digits.count / 2)
        func value(_ digit: UInt8) -> UInt8? {
            switch digit {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return digit - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return digit - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): return digit - UInt8(ascii: "A") + 10
            default: return nil
            }
        }
        var index = 0
        while index < digits.count {
            guard let high = value(digits[index]), let low = value(digits[index + 1]) else { return nil }
            bytes.append(high << 4 | low)
            index += 2
        }
        return bytes
    }
}

/// `--tls-dir DIR`: `ca.pem` (the CA whose certificates this side accepts), `cert.pem` (this
/// side's certificate chain) and `key.pem` (its private key, readable by its owner only).
public struct CertificateFiles: Sendable {
    public let directory: String
    public var caFile: String { directory + "/ca.pem" }
    public var certificateFile: String { directory + "/cert.pem" }
    public var keyFile: String { directory + "/key.pem" }

    public static func load(directory: String) throws(ChannelError) -> CertificateFiles {
        var trimmed = directory
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed.removeLast() }
        let files = CertificateFiles(directory: trimmed)
        for (file, what) in [(files.caFile, "the CA certificate"), (files.certificateFile, "this host's certificate")] {
            guard access(file, R_OK) == 0 else {
                throw .credentials("--tls-dir \(trimmed): cannot read \(what) \(file) (\(String(cString: strerror(errno)))); the directory holds ca.pem, cert.pem and key.pem")
            }
        }
        _ = try KeyFile.read(files.keyFile, what: "--tls-dir")
        return files
    }
}

/// Reading a secret: a regular file, not readable or writable by group or others (as ssh insists).
enum KeyFile {
    static let maxBytes = 1 << 20

    static func read(_ path: String, what: String) throws(ChannelError) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .credentials("\(what): cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFREG else {
            throw .credentials("\(what): \(path) is not a regular file")
        }
        let mode = info.st_mode & 0o777
        guard mode & 0o077 == 0 else {
            throw .credentials("\(what): \(path) is readable by others (mode \(String(mode, radix: 8, uppercase: false).leftPadded(to: 4))): a key must be private to its owner; run: chmod 600 \(path)")
        }
        guard info.st_size <= maxBytes else { throw .credentials("\(what): \(path) is larger than a key file can be") }
        var bytes = [UInt8](repeating: 0, count: Int(info.st_size))
        var done = 0
        while done < bytes.count {
            let got = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + done, $0.count - done) }
            if got < 0 && errno == EINTR { continue }
            guard got > 0 else { throw .credentials("\(what): cannot read \(path)") }
            done += got
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Why a channel could not be set up or was refused, in words that say what to do.
public enum ChannelError: Error, CustomStringConvertible, Equatable {
    /// The options or files given are unusable.
    case credentials(String)
    /// Plaintext to or from another host without `--insecure`.
    case plaintextAcrossHosts(String)
    /// The peer or this side refused the handshake, and why.
    case handshake(String)
    /// The name to listen on or connect to does not resolve (nothing was checked, nothing opened).
    case unresolved(String)

    public var description: String {
        switch self {
        case .credentials(let why): return why
        case .plaintextAcrossHosts(let why): return why
        case .handshake(let why): return why
        case .unresolved(let why): return why
        }
    }

    /// What to say when a name to listen on does not resolve (nil: `error` is not that).
    static func listenUnresolved(_ error: SystemError) -> String? {
        guard let host = TCPSocket.unresolvedHost(error) else { return nil }
        return "cannot listen on '\(host)': the name does not resolve (\(TCPSocket.resolverReason(error))); use one of this host's names or addresses, or :PORT for all"
    }

    /// What to say when the destination's name does not resolve (nil: `error` is not that).
    static func connectUnresolved(_ error: SystemError) -> String? {
        guard let host = TCPSocket.unresolvedHost(error) else { return nil }
        return "the destination's name '\(host)' does not resolve (\(TCPSocket.resolverReason(error))); check --to"
    }
}

/// What the channel turned out to be, for the report and the log.
public struct ChannelDescription: Sendable, Equatable {
    public var encrypted = false
    /// "TLSv1.3".
    public var protocolName: String?
    /// The IANA name, "TLS_AES_128_GCM_SHA256".
    public var cipher: String?
    /// "PSK identity dirtymig-..." or the peer certificate's subject.
    public var peerIdentity: String?
    /// Whether the kernel carries the records (kTLS) for sending and for receiving.
    public var kernelSend = false
    public var kernelReceive = false
    /// From the first handshake byte to the channel's being ready.
    public var handshakeSeconds: Double = 0

    public init() {}

    public static let plaintext = ChannelDescription()

    /// One line: "TLSv1.3 TLS_AES_128_GCM_SHA256 (userspace), peer PSK identity dirtymig-…".
    public var summary: String {
        guard encrypted else { return "plaintext (not encrypted, not authenticated)" }
        let offload = kernelSend && kernelReceive ? "kernel TLS" : kernelSend ? "kernel TLS sending" : kernelReceive ? "kernel TLS receiving" : "userspace TLS"
        return "\(protocolName ?? "TLS") \(cipher ?? "?") (\(offload)), peer \(peerIdentity ?? "?")"
    }

    public var json: JSONValue {
        [
            "encrypted": .bool(encrypted), "protocol": protocolName.map { .string($0) } ?? .null,
            "cipher": cipher.map { .string($0) } ?? .null, "peer_identity": peerIdentity.map { .string($0) } ?? .null,
            "kernel_tls": .bool(kernelSend), "handshake_ms": .number(handshakeSeconds * 1000),
        ]
    }
}

extension Substring {
    var trimmingSpaces: String {
        String(drop(while: { $0 == " " || $0 == "\t" || $0 == "\r" }).reversed().drop(while: { $0 == " " || $0 == "\t" || $0 == "\r" }).reversed())
    }
}

extension String {
    init(format2 byte: UInt8) {
        let digits = Array("0123456789abcdef")
        self.init([digits[Int(byte >> 4)], digits[Int(byte & 15)]])
    }

    func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}
