extension String {
    /// The text of a C buffer a call filled (OpenSSL's messages, getnameinfo's names), up to its
    /// terminating NUL.
    init(nulTerminated buffer: [CChar]) {
        self.init(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
