#ifndef CULVERT_CCULVERTTLS_H
#define CULVERT_CCULVERTTLS_H

// OpenSSL set-up that needs C callbacks (TLS 1.3 external PSK) or is clearer in C.
// Every context is TLS 1.3 only.

#include <stddef.h>
#include <openssl/ssl.h>

/// Server context authenticating clients by an external PSK (identity `culvert/1`),
/// with (EC)DHE key exchange so past sessions stay secret if the key leaks.
SSL_CTX *culvert_tls_server_psk(const unsigned char *key, size_t key_len);
/// Client context offering the same external PSK.
SSL_CTX *culvert_tls_client_psk(const unsigned char *key, size_t key_len);
/// Server context with an X.509 certificate chain and key (PEM files).
SSL_CTX *culvert_tls_server_cert(const char *cert_file, const char *key_file);
/// Client context verifying the server against `ca_file`, or verifying nothing when
/// `ca_file` is NULL (the caller then pins the fingerprint after the handshake).
SSL_CTX *culvert_tls_client_cert(const char *ca_file);
/// SHA-256 of the peer certificate's DER encoding; 0 on success.
int culvert_tls_peer_fingerprint(SSL *ssl, unsigned char out[32]);
/// SHA-256 of the first certificate in a PEM file; 0 on success.
int culvert_tls_file_fingerprint(const char *cert_file, unsigned char out[32]);
/// The oldest queued OpenSSL error as text (queue cleared); empty when none.
/// `*refused` is set to 1 when the error means the peer refused us (a TLS alert from
/// it, or its certificate failing verification), 0 when the connection merely broke.
void culvert_tls_last_error(char *buf, size_t len, int *refused, int *peer_closed);
/// HMAC-SHA256 of the concatenation of `count` parts. Uses the low-level SHA-256
/// functions: the EVP_MAC route looks up providers on every call, which costs more than
/// the hashing itself for the tunnel's short messages.
void culvert_hmac_sha256(const unsigned char *key, size_t key_len,
                         const unsigned char *const *parts, const size_t *lengths, int count,
                         unsigned char out[32]);

/// 1 when the handshake authenticated with the external PSK (not a certificate).
int culvert_tls_used_psk(SSL *ssl);

/// Makes `ssl` write its records into a memory buffer (after SSL_set_fd) that
/// `culvert_tls_flush` sends, so one send(2) carries several records. 0 on success.
int culvert_tls_use_write_buffer(SSL *ssl);
/// Bytes of records written by OpenSSL and not yet sent.
size_t culvert_tls_pending_output(SSL *ssl);
/// Sends the buffered records: 1 all sent (the buffer is freed), 0 the socket would
/// block, -1 failed (errno set).
int culvert_tls_flush(SSL *ssl, int fd);
/// The buffered records not yet sent, for an owner that sends them over another stream
/// instead of a socket; their count, `*data` pointing at the first byte.
size_t culvert_tls_output(SSL *ssl, const unsigned char **data);
/// Drops `count` bytes from the front of the buffered records (they were sent).
void culvert_tls_consume(SSL *ssl, size_t count);
/// Makes `ssl` read records from a memory BIO that `culvert_tls_feed` fills. 0 on success.
int culvert_tls_use_read_buffer(SSL *ssl);
/// Appends `count` received bytes to the read BIO. 0 on success.
int culvert_tls_feed(SSL *ssl, const void *bytes, size_t count);

#endif
