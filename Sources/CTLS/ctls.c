#include "ctls.h"
#include <openssl/x509v3.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <string.h>
#include <time.h>

// The context's PSK (identity and key), and per connection what the handshake saw of identities.
struct ctls_psk {
    char identity[256];
    unsigned char key[64];
    size_t key_length;
};
struct ctls_connection {
    char unknown_identity[256];
    char used_identity[256];
};

static int psk_index = -1, connection_index = -1;
static pthread_once_t indexes_once = PTHREAD_ONCE_INIT;

static void free_psk(void *parent, void *pointer, CRYPTO_EX_DATA *data, int index, long argl, void *argp) {
    (void)parent; (void)data; (void)index; (void)argl; (void)argp;
    if (pointer) { OPENSSL_cleanse(pointer, sizeof(struct ctls_psk)); free(pointer); }
}

static void make_indexes(void) {
    psk_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, free_psk);
    connection_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

static const char ciphersuites[] = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

SSL_CTX *ctls_context_new(int server, int kernel_tls) {
    pthread_once(&indexes_once, make_indexes);
    SSL_CTX *context = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!context) return NULL;
    SSL_CTX_set_min_proto_version(context, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(context, TLS1_3_VERSION);
    SSL_CTX_set_ciphersuites(context, ciphersuites);
    // One connection per migration: no resumption tickets, no session cache.
    SSL_CTX_set_num_tickets(context, 0);
    SSL_CTX_set_session_cache_mode(context, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(context, SSL_OP_NO_TICKET | SSL_OP_CIPHER_SERVER_PREFERENCE);
    // Writes of any size go out whole (the socket blocks); the page stream writes megabytes.
    SSL_CTX_set_mode(context, SSL_MODE_AUTO_RETRY);
    // Read ahead into a buffer of two whole records (a record is at most 16 KiB of data plus 256
    // bytes of TLS 1.3 overhead and a 5-byte header): one recv brings two records, not one record
    // per two calls, and the buffer stays in cache until SSL_read has copied each record out.
    // Measured over loopback (1 GiB, a C harness with OpenSSL 3.0 as used here, perf): that copy
    // took 290-340 ms of the receiver's CPU with a 256 KiB buffer, 160-200 with 128 KiB, 90 with
    // 64 KiB, 53-62 with 34 KiB (and with the default, one record); recv's own copy is the same.
    SSL_CTX_set_default_read_buffer_len(context, 34 << 10);
    if (kernel_tls) SSL_CTX_set_options(context, SSL_OP_ENABLE_KTLS);
    return context;
}

static SSL_SESSION *psk_session(SSL *ssl, const struct ctls_psk *psk) {
    static const unsigned char aes128gcm[] = {0x13, 0x01};
    const SSL_CIPHER *cipher = SSL_CIPHER_find(ssl, aes128gcm);
    if (!cipher) return NULL;
    SSL_SESSION *session = SSL_SESSION_new();
    if (!session) return NULL;
    if (!SSL_SESSION_set1_master_key(session, psk->key, psk->key_length)
        || !SSL_SESSION_set_cipher(session, cipher)
        || !SSL_SESSION_set_protocol_version(session, TLS1_3_VERSION)) {
        SSL_SESSION_free(session);
        return NULL;
    }
    return session;
}

static struct ctls_connection *connection_of(SSL *ssl) { return SSL_get_ex_data(ssl, connection_index); }

static void copy_identity(char *destination, const unsigned char *identity, size_t length) {
    size_t n = length < 255 ? length : 255;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = identity[i];
        destination[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';   // printable in a log line
    }
    destination[n] = 0;
}

// Client: offer our identity with its session (the hash must be the cipher's: SHA-256).
static int use_psk(SSL *ssl, const EVP_MD *md, const unsigned char **id, size_t *id_length, SSL_SESSION **session) {
    const struct ctls_psk *psk = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), psk_index);
    *session = NULL;
    if (!psk) return 1;
    SSL_SESSION *made = psk_session(ssl, psk);
    if (!made) return 0;
    if (md && SSL_CIPHER_get_handshake_digest(SSL_SESSION_get0_cipher(made)) != md) {
        SSL_SESSION_free(made);
        return 1;
    }
    *id = (const unsigned char *)psk->identity;
    *id_length = strlen(psk->identity);
    *session = made;
    struct ctls_connection *connection = connection_of(ssl);
    if (connection) copy_identity(connection->used_identity, *id, *id_length);
    return 1;
}

// Server: only our identity finds the key; any other is noted for the refusal's message.
static int find_psk(SSL *ssl, const unsigned char *identity, size_t length, SSL_SESSION **session) {
    const struct ctls_psk *psk = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), psk_index);
    struct ctls_connection *connection = connection_of(ssl);
    *session = NULL;
    if (!psk) return 1;
    if (length != strlen(psk->identity) || memcmp(identity, psk->identity, length) != 0) {
        if (connection) copy_identity(connection->unknown_identity, identity, length);
        return 1;
    }
    *session = psk_session(ssl, psk);
    if (connection && *session) copy_identity(connection->used_identity, identity, length);
    return *session != NULL;
}

int ctls_context_use_psk(SSL_CTX *context, const char *identity, const unsigned char *key, size_t key_length) {
    if (strlen(identity) >= sizeof(((struct ctls_psk *)0)->identity) || key_length == 0 || key_length > 64) return 0;
    struct ctls_psk *psk = calloc(1, sizeof *psk);
    if (!psk) return 0;
    strcpy(psk->identity, identity);
    memcpy(psk->key, key, key_length);
    psk->key_length = key_length;
    if (!SSL_CTX_set_ex_data(context, psk_index, psk)) { free_psk(NULL, psk, NULL, 0, 0, NULL); return 0; }
    SSL_CTX_set_psk_use_session_callback(context, use_psk);
    SSL_CTX_set_psk_find_session_callback(context, find_psk);
    // Both suites with SHA-256, the PSK's hash.
    SSL_CTX_set_ciphersuites(context, "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256");
    return 1;
}

static void describe_error(char *error, size_t length, const char *what, const char *file) {
    char reason[256] = "";
    unsigned long code = ERR_get_error();
    if (code) ERR_error_string_n(code, reason, sizeof reason);
    ERR_clear_error();
    snprintf(error, length, "%s %s%s%s", what, file, *reason ? ": " : "", reason);
}

int ctls_context_use_certificates(SSL_CTX *context, const char *ca_file, const char *cert_file,
                                  const char *key_file, char *error, size_t error_length) {
    ERR_clear_error();
    if (SSL_CTX_use_certificate_chain_file(context, cert_file) != 1) {
        describe_error(error, error_length, "cannot load the certificate", cert_file);
        return 0;
    }
    if (SSL_CTX_use_PrivateKey_file(context, key_file, SSL_FILETYPE_PEM) != 1) {
        describe_error(error, error_length, "cannot load the private key", key_file);
        return 0;
    }
    if (SSL_CTX_check_private_key(context) != 1) {
        describe_error(error, error_length, "the private key does not match the certificate in", cert_file);
        return 0;
    }
    if (SSL_CTX_load_verify_locations(context, ca_file, NULL) != 1) {
        describe_error(error, error_length, "cannot load the CA certificate", ca_file);
        return 0;
    }
    SSL_CTX_set_verify(context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    return 1;
}

SSL *ctls_new(SSL_CTX *context, int fd, const char *peer_name) {
    SSL *ssl = SSL_new(context);
    if (!ssl) return NULL;
    struct ctls_connection *connection = calloc(1, sizeof *connection);
    if (!connection || !SSL_set_ex_data(ssl, connection_index, connection) || !SSL_set_fd(ssl, fd)) {
        free(connection);
        SSL_free(ssl);
        return NULL;
    }
    if (peer_name && *peer_name) {
        // SSL_set1_host takes a DNS name or (OpenSSL 3) an IP address.
        if (!SSL_set1_host(ssl, peer_name)) { ctls_free(ssl); return NULL; }
        unsigned char address[16];
        int is_address = inet_pton(AF_INET, peer_name, address) == 1 || inet_pton(AF_INET6, peer_name, address) == 1;
        if (!SSL_is_server(ssl) && !is_address) SSL_set_tlsext_host_name(ssl, peer_name);
    }
    return ssl;
}

void ctls_free(SSL *ssl) {
    if (!ssl) return;
    free(SSL_get_ex_data(ssl, connection_index));
    SSL_set_ex_data(ssl, connection_index, NULL);
    SSL_free(ssl);
}

int ctls_hold_reads(SSL *ssl) {
    BIO *empty = BIO_new(BIO_s_mem());
    if (!empty) return 0;
    BIO_set_mem_eof_return(empty, -1);   // empty: "retry", not end of stream
    // SSL_set_fd gave the read and write sides one socket BIO with a reference each: this drops
    // the read side's, the write side keeps the socket.
    SSL_set0_rbio(ssl, empty);
    return 1;
}

void ctls_release_reads(SSL *ssl) {
    BIO *socket = SSL_get_wbio(ssl);
    if (!socket || !BIO_up_ref(socket)) return;
    SSL_set0_rbio(ssl, socket);   // frees the memory BIO
}

const char *ctls_unknown_identity(SSL *ssl) {
    struct ctls_connection *connection = connection_of(ssl);
    return connection ? connection->unknown_identity : "";
}

const char *ctls_used_identity(SSL *ssl) {
    struct ctls_connection *connection = connection_of(ssl);
    return connection ? connection->used_identity : "";
}

void ctls_peer_subject(SSL *ssl, char *buffer, size_t length) {
    if (length == 0) return;
    buffer[0] = 0;
    X509 *peer = SSL_get1_peer_certificate(ssl);
    if (!peer) return;
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio) {
        X509_NAME_print_ex(bio, X509_get_subject_name(peer), 0, XN_FLAG_RFC2253);
        int got = BIO_read(bio, buffer, (int)length - 1);
        buffer[got > 0 ? got : 0] = 0;
        BIO_free(bio);
    }
    X509_free(peer);
}

long ctls_verify_result(SSL *ssl) { return SSL_get_verify_result(ssl); }
const char *ctls_verify_string(long result) { return X509_verify_cert_error_string(result); }

int ctls_kernel_send(SSL *ssl) { return BIO_get_ktls_send(SSL_get_wbio(ssl)) ? 1 : 0; }
int ctls_kernel_receive(SSL *ssl) { return BIO_get_ktls_recv(SSL_get_rbio(ssl)) ? 1 : 0; }

unsigned long ctls_take_error(char *buffer, size_t length) {
    unsigned long code = ERR_get_error();
    if (length) buffer[0] = 0;
    const char *reason = code ? ERR_reason_error_string(code) : NULL;
    if (reason && length) snprintf(buffer, length, "%s", reason);
    else if (code && length) ERR_error_string_n(code, buffer, length);
    ERR_clear_error();
    return code;
}

int ctls_error_reason(unsigned long error) { return ERR_GET_REASON(error); }
void ctls_clear_errors(void) { ERR_clear_error(); }

int ctls_received_alert(unsigned long error) {
    int reason = ERR_GET_REASON(error);
    if (ERR_GET_LIB(error) == ERR_LIB_SSL && reason >= SSL_AD_REASON_OFFSET && reason < SSL_AD_REASON_OFFSET + 256) {
        return reason - SSL_AD_REASON_OFFSET;
    }
    return -1;
}

int ctls_sha256(const void *data, size_t length, unsigned char *digest) {
    return EVP_Digest(data, length, digest, NULL, EVP_sha256(), NULL);
}

void ctls_sigpipe_begin(ctls_sigpipe_state *state) {
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, &state->old);
    state->blocked = !sigismember(&state->old, SIGPIPE);
}

void ctls_sigpipe_end(ctls_sigpipe_state *state) {
    if (!state->blocked) return;
    sigset_t pending;
    sigpending(&pending);
    if (sigismember(&pending, SIGPIPE)) {
        sigset_t pipe;
        sigemptyset(&pipe);
        sigaddset(&pipe, SIGPIPE);
        struct timespec zero = {0, 0};
        while (sigtimedwait(&pipe, NULL, &zero) < 0 && errno == EINTR) {}
    }
    pthread_sigmask(SIG_SETMASK, &state->old, NULL);
}

static int outcome(SSL *ssl, int result, int *saved_errno) {
    *saved_errno = errno;
    return result > 0 ? SSL_ERROR_NONE : SSL_get_error(ssl, result);
}

int ctls_handshake(SSL *ssl, int *saved_errno) {
    ctls_sigpipe_state state;
    ctls_sigpipe_begin(&state);
    ERR_clear_error();
    errno = 0;
    int code = outcome(ssl, SSL_do_handshake(ssl), saved_errno);
    ctls_sigpipe_end(&state);
    return code;
}

int ctls_read(SSL *ssl, void *buffer, size_t length, size_t *got, int *saved_errno) {
    ERR_clear_error();
    errno = 0;
    *got = 0;
    int code = outcome(ssl, SSL_read_ex(ssl, buffer, length, got), saved_errno);
    // A failed read may have queued an alert for the peer (bad record mac ...): send it now, the
    // write buffer (see ctls_tune) would otherwise keep it.
    if (code != SSL_ERROR_NONE) {
        int errno_before = errno;
        (void)BIO_flush(SSL_get_wbio(ssl));
        errno = errno_before;
    }
    return code;
}

int ctls_flush(SSL *ssl, int *saved_errno) {
    errno = 0;
    BIO *bio = SSL_get_wbio(ssl);
    if (BIO_flush(bio) > 0) { *saved_errno = 0; return SSL_ERROR_NONE; }
    *saved_errno = errno;
    // SO_SNDTIMEO fired (EAGAIN on a blocking socket): as SSL_write reports it.
    return BIO_should_retry(bio) ? SSL_ERROR_WANT_WRITE : SSL_ERROR_SYSCALL;
}

int ctls_write(SSL *ssl, const void *buffer, size_t length, int *saved_errno) {
    ERR_clear_error();
    errno = 0;
    size_t written = 0;
    return outcome(ssl, SSL_write_ex(ssl, buffer, length, &written), saved_errno);
}

void ctls_tune(SSL *ssl) {
    SSL_set_read_ahead(ssl, 1);
    // Records go out in batches: a buffer of 256 KiB between the record layer and the socket,
    // flushed at the end of every send (ctls_flush). One write(2) per 16 KiB record cost more
    // in the kernel than the encryption itself. Measured over loopback (a C harness with this
    // OpenSSL, 4 GiB per run, 4 runs each, alternated): 2.46-2.77 CPU-s per GiB and 646-740
    // MiB/s with a write per record; 64 KiB batches 2.02-2.22 and 807-889; 256 KiB 1.78-1.91
    // and 945-1,002. With kTLS the kernel takes whole records itself: no buffer then.
    BIO *socket = SSL_get_wbio(ssl);
    if (!socket || BIO_get_ktls_send(socket)) return;
    BIO *buffer = BIO_new(BIO_f_buffer());
    if (!buffer) return;
    if (BIO_set_write_buffer_size(buffer, 256 << 10) <= 0 || !BIO_up_ref(socket)) { BIO_free(buffer); return; }
    // The buffer holds its own reference to the socket BIO; SSL_set0_wbio drops the one the
    // connection held as its write side (the read side keeps its own).
    BIO_push(buffer, socket);
    SSL_set0_wbio(ssl, buffer);
}

const char *ctls_protocol(SSL *ssl) { return SSL_get_version(ssl); }
const char *ctls_cipher(SSL *ssl) {
    const SSL_CIPHER *cipher = SSL_get_current_cipher(ssl);
    return cipher ? SSL_CIPHER_standard_name(cipher) : "";
}

int ctls_warm_up(SSL_CTX *client_context, SSL_CTX *server_context) {
    SSL *client = SSL_new(client_context), *server = SSL_new(server_context);
    BIO *client_bio = NULL, *server_bio = NULL;
    int done = 0;
    struct ctls_connection client_state = {{0}, {0}}, server_state = {{0}, {0}};
    if (!client || !server || !BIO_new_bio_pair(&client_bio, 1 << 16, &server_bio, 1 << 16)) goto out;
    SSL_set_ex_data(client, connection_index, &client_state);
    SSL_set_ex_data(server, connection_index, &server_state);
    SSL_set_bio(client, client_bio, client_bio);
    SSL_set_bio(server, server_bio, server_bio);
    client_bio = server_bio = NULL;
    SSL_set_connect_state(client);
    SSL_set_accept_state(server);
    int client_done = 0, server_done = 0;
    for (int round = 0; round < 32 && !(client_done && server_done); round++) {
        if (!client_done) {
            int result = SSL_do_handshake(client);
            if (result == 1) client_done = 1;
            else if (SSL_get_error(client, result) != SSL_ERROR_WANT_READ) break;
        }
        if (!server_done) {
            int result = SSL_do_handshake(server);
            if (result == 1) server_done = 1;
            else if (SSL_get_error(server, result) != SSL_ERROR_WANT_READ) break;
        }
    }
    if (client_done && server_done) {
        unsigned char byte = 0;
        size_t count = 0;
        done = SSL_write_ex(client, &byte, 1, &count) == 1 && SSL_read_ex(server, &byte, 1, &count) == 1;
    }
out:
    if (client) SSL_set_ex_data(client, connection_index, NULL);
    if (server) SSL_set_ex_data(server, connection_index, NULL);
    SSL_free(client);
    SSL_free(server);
    BIO_free(client_bio);
    BIO_free(server_bio);
    ERR_clear_error();
    return done;
}
