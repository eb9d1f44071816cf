import CTLS
import Synchronization

/// An OpenSSL context (SSL_CTX) for one side of one kind of credentials: TLS 1.3 only, AES-GCM
/// first. Immutable once made, so connections on any thread may be made from it.
final class TLSContext: @unchecked Sendable {
    // @unchecked: the SSL_CTX is only configured in init; SSL_new from it is thread-safe.
    let context: OpaquePointer

    init(credentials: ChannelSecurity.Credentials, server: Bool, kernelTLS: Bool) throws(ChannelError) {
        guard let context = ctls_context_new(server ? 1 : 0, kernelTLS ? 1 : 0) else {
            throw .credentials("OpenSSL could not make a TLS context: \(TLSContext.takeError())")
        }
        self.context = context
        switch credentials {
        case .none:
            break
        case .psk(let psk):
            let ok = psk.key.withUnsafeBufferPointer { ctls_context_use_psk(context, psk.identity, $0.baseAddress, $0.count) }
            guard ok == 1 else { throw .credentials("--psk-file \(psk.path): OpenSSL refused the key: \(TLSContext.takeError())") }
        case .certificates(let files):
            var message = [CChar](repeating: 0, count: 512)
            let ok = ctls_context_use_certificates(context, files.caFile, files.certificateFile, files.keyFile, &message, message.count)
            guard ok == 1 else { throw .credentials("--tls-dir \(files.directory): \(String(nulTerminated: message))") }
        }
    }

    deinit { SSL_CTX_free(context) }

    /// The oldest error on this thread's OpenSSL queue, in OpenSSL's words (the queue is emptied).
    static func takeError() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        _ = ctls_take_error(&buffer, buffer.count)
        let text = String(nulTerminated: buffer)
        return text.isEmpty ? "no reason given" : text
    }
}

/// One context per side, made on first use and kept with the `ChannelSecurity` that asked.
final class TLSContextCache: Sendable {
    private let contexts = Mutex<[Bool: TLSContext]>([:])

    func context(for security: ChannelSecurity, server: Bool) throws(ChannelError) -> TLSContext {
        if let made = contexts.withLock({ $0[server] }) { return made }
        let made = try TLSContext(credentials: security.credentials, server: server, kernelTLS: security.kernelTLS)
        return contexts.withLock { contexts in
            if let first = contexts[server] { return first }
            contexts[server] = made
            return made
        }
    }
}
