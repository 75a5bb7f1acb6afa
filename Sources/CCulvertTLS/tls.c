#define OPENSSL_SUPPRESS_DEPRECATED
#include <string.h>
#include <openssl/sha.h>
#include <stdlib.h>
#include <errno.h>
#include <pthread.h>
#include <sys/socket.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include "CCulvertTLS.h"

static const unsigned char psk_identity[] = "culvert/1";
static const unsigned char tls13_aes128gcmsha256_id[] = {0x13, 0x01};
static int key_index = -1;

struct psk_key {
    size_t len;
    unsigned char bytes[64];
};

static void free_key(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp) {
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    if (ptr) { OPENSSL_cleanse(ptr, sizeof(struct psk_key)); free(ptr); }
}

static SSL_SESSION *session_for(SSL *ssl) {
    SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
    struct psk_key *key = SSL_CTX_get_ex_data(ctx, key_index);
    const SSL_CIPHER *cipher = SSL_CIPHER_find(ssl, tls13_aes128gcmsha256_id);
    if (key == NULL || cipher == NULL) return NULL;
    SSL_SESSION *sess = SSL_SESSION_new();
    if (sess == NULL) return NULL;
    if (!SSL_SESSION_set1_master_key(sess, key->bytes, key->len)
        || !SSL_SESSION_set_cipher(sess, cipher)
        || !SSL_SESSION_set_protocol_version(sess, TLS1_3_VERSION)) {
        SSL_SESSION_free(sess);
        return NULL;
    }
    return sess;
}

static int find_session(SSL *ssl, const unsigned char *identity, size_t identity_len, SSL_SESSION **sess) {
    if (identity_len != sizeof(psk_identity) - 1 || memcmp(identity, psk_identity, identity_len) != 0) {
        *sess = NULL;  /* unknown identity: no PSK, the handshake fails for lack of a certificate */
        return 1;
    }
    *sess = session_for(ssl);
    return *sess != NULL;
}

static int use_session(SSL *ssl, const EVP_MD *md, const unsigned char **id, size_t *idlen, SSL_SESSION **sess) {
    (void)md;
    *sess = session_for(ssl);
    if (*sess == NULL) return 0;
    *id = psk_identity;
    *idlen = sizeof(psk_identity) - 1;
    return 1;
}

static SSL_CTX *new_ctx(const SSL_METHOD *method) {
    SSL_CTX *ctx = SSL_CTX_new(method);
    if (ctx == NULL) return NULL;
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
    /* No session tickets: every connection authenticates afresh. */
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    /* Read ahead: one read(2) fetches several records instead of a header and a body
       per 16 KiB record. */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, 64 * 1024);
    return ctx;
}

static SSL_CTX *with_key(SSL_CTX *ctx, const unsigned char *key, size_t key_len) {
    if (ctx == NULL) return NULL;
    if (key_index < 0) key_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, free_key);
    struct psk_key *k = calloc(1, sizeof *k);
    if (k == NULL || key_len > sizeof k->bytes) { free(k); SSL_CTX_free(ctx); return NULL; }
    memcpy(k->bytes, key, key_len);
    k->len = key_len;
    SSL_CTX_set_ex_data(ctx, key_index, k);
    /* The PSK is bound to SHA-256: a SHA-384 suite chosen first would make the server
       ignore the PSK and look for a certificate it does not have. */
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256");
    return ctx;
}

SSL_CTX *culvert_tls_server_psk(const unsigned char *key, size_t key_len) {
    SSL_CTX *ctx = with_key(new_ctx(TLS_server_method()), key, key_len);
    if (ctx) SSL_CTX_set_psk_find_session_callback(ctx, find_session);
    return ctx;
}

SSL_CTX *culvert_tls_client_psk(const unsigned char *key, size_t key_len) {
    SSL_CTX *ctx = with_key(new_ctx(TLS_client_method()), key, key_len);
    if (ctx) {
        SSL_CTX_set_psk_use_session_callback(ctx, use_session);
        /* The PSK authenticates the server; there is no certificate to check. */
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    }
    return ctx;
}

SSL_CTX *culvert_tls_server_cert(const char *cert_file, const char *key_file) {
    SSL_CTX *ctx = new_ctx(TLS_server_method());
    if (ctx == NULL) return NULL;
    if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1
        || SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1
        || SSL_CTX_check_private_key(ctx) != 1) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

SSL_CTX *culvert_tls_client_cert(const char *ca_file) {
    SSL_CTX *ctx = new_ctx(TLS_client_method());
    if (ctx == NULL) return NULL;
    if (ca_file != NULL) {
        if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
            SSL_CTX_free(ctx);
            return NULL;
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    } else {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    }
    return ctx;
}

static int digest_cert(X509 *cert, unsigned char out[32]) {
    unsigned int len = 0;
    int ok = cert != NULL && X509_digest(cert, EVP_sha256(), out, &len) == 1 && len == 32;
    return ok ? 0 : -1;
}

int culvert_tls_peer_fingerprint(SSL *ssl, unsigned char out[32]) {
    X509 *cert = SSL_get1_peer_certificate(ssl);
    int rc = digest_cert(cert, out);
    X509_free(cert);
    return rc;
}

int culvert_tls_file_fingerprint(const char *cert_file, unsigned char out[32]) {
    FILE *f = fopen(cert_file, "r");
    if (f == NULL) return -1;
    X509 *cert = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    int rc = digest_cert(cert, out);
    X509_free(cert);
    return rc;
}

void culvert_tls_last_error(char *buf, size_t len, int *refused, int *peer_closed) {
    unsigned long e = ERR_get_error();
    int reason = ERR_GET_REASON(e);
    if (refused) *refused = e != 0 && (reason >= SSL_AD_REASON_OFFSET || reason == SSL_R_CERTIFICATE_VERIFY_FAILED);
    if (peer_closed) *peer_closed = e != 0 && reason == SSL_R_UNEXPECTED_EOF_WHILE_READING;
    if (e == 0) { if (len) buf[0] = 0; }
    else ERR_error_string_n(e, buf, len);
    ERR_clear_error();
}

int culvert_tls_used_psk(SSL *ssl) {
    return SSL_session_reused(ssl) == 1;
}

void culvert_hmac_sha256(const unsigned char *key, size_t key_len,
                         const unsigned char *const *parts, const size_t *lengths, int count,
                         unsigned char out[32]) {
    unsigned char block[64] = {0};
    if (key_len > 64) SHA256(key, key_len, block);
    else memcpy(block, key, key_len);
    unsigned char pad[64];
    unsigned char inner[32];
    SHA256_CTX ctx;
    for (int i = 0; i < 64; i++) pad[i] = block[i] ^ 0x36;
    SHA256_Init(&ctx);
    SHA256_Update(&ctx, pad, 64);
    for (int i = 0; i < count; i++) SHA256_Update(&ctx, parts[i], lengths[i]);
    SHA256_Final(inner, &ctx);
    for (int i = 0; i < 64; i++) pad[i] = block[i] ^ 0x5c;
    SHA256_Init(&ctx);
    SHA256_Update(&ctx, pad, 64);
    SHA256_Update(&ctx, inner, 32);
    SHA256_Final(out, &ctx);
    OPENSSL_cleanse(block, sizeof block);
    OPENSSL_cleanse(pad, sizeof pad);
    OPENSSL_cleanse(&ctx, sizeof ctx);
}

/* ---- Write buffer: records collect in memory, one send(2) carries several ---- */

struct write_buffer {
    unsigned char *data;
    size_t start, end, capacity;
};

static BIO_METHOD *write_buffer_method;

/* Each thread keeps a couple of drained buffers for its next writer. A busy connection
   empties its buffer on nearly every send; handing the memory back to malloc each time
   made the allocator trim and fault the pages in again (tens of page faults per MiB
   through a wss tunnel). Idle connections still hold no buffer; a thread holds at most
   SPARE_COUNT buffers of at most SPARE_MAX_CAPACITY bytes, freed when it exits. */
#define SPARE_COUNT 2
#define SPARE_MAX_CAPACITY (512 * 1024)

struct spare_buffers {
    int count;
    unsigned char *data[SPARE_COUNT];
    size_t capacity[SPARE_COUNT];
};

static pthread_key_t spares_key;
static int spares_key_made;
static pthread_once_t spares_once = PTHREAD_ONCE_INIT;

static void free_spares(void *ptr) {
    struct spare_buffers *s = ptr;
    for (int i = 0; i < s->count; i++) free(s->data[i]);
    free(s);
}

static void make_spares_key(void) {
    spares_key_made = pthread_key_create(&spares_key, free_spares) == 0;
}

static struct spare_buffers *thread_spares(void) {
    pthread_once(&spares_once, make_spares_key);
    if (!spares_key_made) return NULL;
    struct spare_buffers *s = pthread_getspecific(spares_key);
    if (s == NULL) {
        s = calloc(1, sizeof *s);
        if (s == NULL) return NULL;
        if (pthread_setspecific(spares_key, s) != 0) { free(s); return NULL; }
    }
    return s;
}

/* A spare of at least `need` bytes, or NULL; its size goes to *capacity. */
static unsigned char *take_spare(size_t need, size_t *capacity) {
    struct spare_buffers *s = thread_spares();
    if (s == NULL) return NULL;
    for (int i = 0; i < s->count; i++) {
        if (s->capacity[i] < need) continue;
        unsigned char *data = s->data[i];
        *capacity = s->capacity[i];
        s->count -= 1;
        s->data[i] = s->data[s->count];
        s->capacity[i] = s->capacity[s->count];
        return data;
    }
    return NULL;
}

static void give_back(unsigned char *data, size_t capacity) {
    if (data == NULL) return;
    struct spare_buffers *s = capacity <= SPARE_MAX_CAPACITY ? thread_spares() : NULL;
    if (s != NULL && s->count < SPARE_COUNT) {
        s->data[s->count] = data;
        s->capacity[s->count] = capacity;
        s->count += 1;
        return;
    }
    free(data);
}

static void release_drained(struct write_buffer *w) {
    give_back(w->data, w->capacity);
    w->data = NULL;
    w->start = w->end = w->capacity = 0;
}

static int write_buffer_write(BIO *bio, const char *in, int count) {
    struct write_buffer *w = BIO_get_data(bio);
    if (w == NULL || count < 0) return -1;
    size_t n = (size_t)count;
    if (w->end + n > w->capacity) {
        size_t live = w->end - w->start;
        if (w->start > 0 && live + n <= w->capacity) {
            memmove(w->data, w->data + w->start, live);
        } else {
            /* Room for one write call's records (64 KiB of plaintext, see TLSStream) at once:
               growing while a batch is encrypted would copy what is already there. */
            size_t capacity = w->capacity ? w->capacity : 80 * 1024;
            while (capacity < live + n) capacity *= 2;
            unsigned char *bigger = take_spare(capacity, &capacity);
            if (bigger == NULL) bigger = malloc(capacity);
            if (bigger == NULL) return -1;
            if (live) memcpy(bigger, w->data + w->start, live);
            give_back(w->data, w->capacity);
            w->data = bigger;
            w->capacity = capacity;
        }
        w->start = 0;
        w->end = live;
    }
    memcpy(w->data + w->end, in, n);
    w->end += n;
    return count;
}

static long write_buffer_ctrl(BIO *bio, int cmd, long num, void *ptr) {
    (void)num; (void)ptr;
    struct write_buffer *w = BIO_get_data(bio);
    switch (cmd) {
    case BIO_CTRL_FLUSH: return 1;  /* the owner sends, see culvert_tls_flush */
    case BIO_CTRL_PENDING:
    case BIO_CTRL_WPENDING: return w ? (long)(w->end - w->start) : 0;
    default: return 0;
    }
}

static int write_buffer_create(BIO *bio) {
    struct write_buffer *w = calloc(1, sizeof *w);
    if (w == NULL) return 0;
    BIO_set_data(bio, w);
    BIO_set_init(bio, 1);
    return 1;
}

static int write_buffer_destroy(BIO *bio) {
    struct write_buffer *w = BIO_get_data(bio);
    if (w) { give_back(w->data, w->capacity); free(w); }
    BIO_set_data(bio, NULL);
    return 1;
}

static pthread_once_t write_buffer_once = PTHREAD_ONCE_INIT;

static void make_write_buffer_method(void) {
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "culvert write buffer");
    if (m == NULL) return;
    BIO_meth_set_write(m, write_buffer_write);
    BIO_meth_set_ctrl(m, write_buffer_ctrl);
    BIO_meth_set_create(m, write_buffer_create);
    BIO_meth_set_destroy(m, write_buffer_destroy);
    write_buffer_method = m;
}

int culvert_tls_use_write_buffer(SSL *ssl) {
    pthread_once(&write_buffer_once, make_write_buffer_method);
    if (write_buffer_method == NULL) return -1;
    BIO *bio = BIO_new(write_buffer_method);
    if (bio == NULL) return -1;
    SSL_set0_wbio(ssl, bio);
    return 0;
}

size_t culvert_tls_pending_output(SSL *ssl) {
    struct write_buffer *w = BIO_get_data(SSL_get_wbio(ssl));
    return w ? w->end - w->start : 0;
}

int culvert_tls_flush(SSL *ssl, int fd) {
    struct write_buffer *w = BIO_get_data(SSL_get_wbio(ssl));
    if (w == NULL) return 1;
    while (w->start < w->end) {
        ssize_t n = send(fd, w->data + w->start, w->end - w->start, MSG_NOSIGNAL);
        if (n > 0) { w->start += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        return -1;
    }
    /* Drained: an idle connection keeps no buffer. */
    release_drained(w);
    return 1;
}

size_t culvert_tls_output(SSL *ssl, const unsigned char **data) {
    struct write_buffer *w = BIO_get_data(SSL_get_wbio(ssl));
    if (w == NULL || w->start == w->end) { *data = NULL; return 0; }
    *data = w->data + w->start;
    return w->end - w->start;
}

void culvert_tls_consume(SSL *ssl, size_t count) {
    struct write_buffer *w = BIO_get_data(SSL_get_wbio(ssl));
    if (w == NULL) return;
    w->start += count < w->end - w->start ? count : w->end - w->start;
    if (w->start == w->end) release_drained(w);
}

int culvert_tls_use_read_buffer(SSL *ssl) {
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio == NULL) return -1;
    /* Empty means "no bytes yet", not end of stream: the owner reports the end itself. */
    BIO_set_mem_eof_return(bio, -1);
    SSL_set0_rbio(ssl, bio);
    return 0;
}

int culvert_tls_feed(SSL *ssl, const void *bytes, size_t count) {
    return BIO_write(SSL_get_rbio(ssl), bytes, (int)count) == (int)count ? 0 : -1;
}
