// CTLS: the system's OpenSSL (libssl, libcrypto) for Swift. Glue only: TLS 1.3 contexts with an
// external pre-shared key or certificates, the handshake's outcome in words, the negotiated
// channel's description. No cryptography is done here; OpenSSL does all of it. Macros Swift
// cannot import (SSL_CTX_set_min_proto_version, BIO_get_ktls_send ...) are wrapped here once.
#ifndef CTLS_H
#define CTLS_H

#include <openssl/ssl.h>
#include <openssl/err.h>
#include <signal.h>
#include <stddef.h>

/// A TLS 1.3-only context for one side (server != 0: the receiver). `kernel_tls` asks OpenSSL to
/// hand the record layer to the kernel (TCP_ULP "tls") after the handshake where it can.
SSL_CTX *ctls_context_new(int server, int kernel_tls);

/// External PSK (RFC 8446 section 4.2.11) with `identity`, cipher TLS_AES_128_GCM_SHA256, key
/// exchange psk_dhe_ke. The identity and key are copied. Returns 1, or 0 with OpenSSL's error queued.
int ctls_context_use_psk(SSL_CTX *context, const char *identity, const unsigned char *key, size_t key_length);

/// Certificates: our chain and key, and the CA that must have signed the peer's (verified both
/// ways). Returns 1, or 0 with a message in `error`.
int ctls_context_use_certificates(SSL_CTX *context, const char *ca_file, const char *cert_file,
                                  const char *key_file, char *error, size_t error_length);

/// One handshake and one record between two contexts of the same credentials, in memory: the
/// algorithms OpenSSL fetches and caches on first use are ready before a real peer is waiting
/// (the first handshake in a process otherwise costs a few ms more). Returns 1 if it completed.
int ctls_warm_up(SSL_CTX *client_context, SSL_CTX *server_context);

/// A connection over the connected socket `fd`. `peer_name` (nullable): the name (or IP address)
/// the peer's certificate must carry; on a client it is also sent as SNI when it is a name.
SSL *ctls_new(SSL_CTX *context, int fd, const char *peer_name);
void ctls_free(SSL *ssl);

/// Until ctls_release_reads, the connection reads from an empty memory BIO instead of the socket
/// (a read wants more, SSL_ERROR_WANT_READ) while it still writes to the socket: a client's
/// first handshake step sends its ClientHello and leaves the answer in the socket, so the caller
/// can look at its first byte before OpenSSL consumes it. Returns 1, or 0 if out of memory.
int ctls_hold_reads(SSL *ssl);
/// Reads come from the socket again (the BIO the connection writes to).
void ctls_release_reads(SSL *ssl);

/// The PSK identity a client offered that this server did not know ("" if none was offered or it
/// matched), for the refusal's message.
const char *ctls_unknown_identity(SSL *ssl);
/// The identity of the PSK the handshake used ("" if none).
const char *ctls_used_identity(SSL *ssl);

/// The peer certificate's subject (RFC 2253), or "" without one.
void ctls_peer_subject(SSL *ssl, char *buffer, size_t length);
/// The verification error of the peer's certificate (X509_V_OK = 0 if it passed or was not
/// checked), and its words.
long ctls_verify_result(SSL *ssl);
const char *ctls_verify_string(long result);

/// Whether the kernel carries the records now (kTLS) for sending / receiving.
int ctls_kernel_send(SSL *ssl);
int ctls_kernel_receive(SSL *ssl);

/// The oldest error on this thread's OpenSSL queue: its code and its reason in words ("sslv3 alert
/// handshake failure"); the queue is emptied. 0 / "" if empty.
unsigned long ctls_take_error(char *buffer, size_t length);
int ctls_error_reason(unsigned long error);
void ctls_clear_errors(void);

/// SSL_R_SSLV3_ALERT_... / SSL_R_TLSV1_ALERT_... codes are SSL_AD_REASON_OFFSET + the alert:
/// the alert a peer sent, or -1.
int ctls_received_alert(unsigned long error);

/// SHA-256 of `length` bytes into `digest` (32 bytes), by OpenSSL (names a key without showing it).
int ctls_sha256(const void *data, size_t length, unsigned char *digest);

/// OpenSSL writes to the socket with write(2), which raises SIGPIPE on a peer that hung up. Around
/// each call into it, SIGPIPE is blocked on the calling thread; `ctls_sigpipe_end` discards one
/// it raised and restores the mask (curl does the same). `state` holds the previous mask.
typedef struct { sigset_t old; int blocked; } ctls_sigpipe_state;
void ctls_sigpipe_begin(ctls_sigpipe_state *state);
void ctls_sigpipe_end(ctls_sigpipe_state *state);

/// Handshake, read, write and close on a blocking socket. Each returns OpenSSL's SSL_get_error
/// code (SSL_ERROR_NONE = 0 on success) and the errno the failing system call left in
/// `saved_errno`. The handshake and close keep SIGPIPE away themselves; reads and writes (which
/// come in loops, a record at a time) must be called between ctls_sigpipe_begin and _end.
int ctls_handshake(SSL *ssl, int *saved_errno);
int ctls_read(SSL *ssl, void *buffer, size_t length, size_t *got, int *saved_errno);
int ctls_write(SSL *ssl, const void *buffer, size_t length, int *saved_errno);
/// Sends what the write buffer holds (see ctls_tune): SSL_ERROR_NONE, or SSL_ERROR_WANT_WRITE
/// (the send timeout) or SSL_ERROR_SYSCALL with *saved_errno. Every send ends with it.
int ctls_flush(SSL *ssl, int *saved_errno);

/// Tunes a connection after its handshake: OpenSSL reads ahead into its read buffer (two
/// records, see ctls_context_new), so one recv brings two records, not one record per two calls;
/// records to send gather in a 256 KiB buffer until ctls_flush (one write per batch, not per
/// record).
void ctls_tune(SSL *ssl);

/// SSL_get_version / the cipher's IANA name.
const char *ctls_protocol(SSL *ssl);
const char *ctls_cipher(SSL *ssl);

#endif
