/* patio_tls.h - TLS for the TCP broker of patio.h, backed by mbedTLS.
 *
 * An optional second header in the same single-file style. Include it after
 * patio.h; in exactly one source file define PATIO_TLS_IMPLEMENTATION (next
 * to PATIO_IMPLEMENTATION) before including it, and link with
 *
 *     -lmbedtls -lmbedx509 -lmbedcrypto
 *
 *     #define PATIO_IMPLEMENTATION
 *     #include "patio.h"
 *     #define PATIO_TLS_IMPLEMENTATION
 *     #include "patio_tls.h"
 *
 *     patio_tls_config tc;
 *     memset(&tc, 0, sizeof tc);
 *     tc.ca_file = "CA.pem";                  // clients: whom to trust
 *     tc.cert_file = "server.pem";            // servers: who we are
 *     tc.key_file = "server.key";
 *     char err[256];
 *     patio_tls *tls = patio_tls_new(&tc, err, sizeof err);
 *     if (!tls) fprintf(stderr, "%s\n", err);
 *     patio_tcp_config cfg;
 *     memset(&cfg, 0, sizeof cfg);
 *     patio_tls_use(&cfg, tls);               // transport + transport_ctx
 *     ... patio_tcp_server_new(ex, &cfg, "0.0.0.0", port) ...
 *     patio_broker_free(b);                   // brokers first,
 *     patio_tls_free(tls);                    // then the TLS context
 *
 * The TLS layer plugs into the broker's transport seam (patio_transport in
 * patio.h): the handshake runs non-blocking on the broker's loop under the
 * broker's handshake_timeout, then the shared-key handshake of PROTOCOL.md
 * runs inside TLS as on a plain connection. A failed TLS handshake closes
 * that connection (the log says why: unknown CA, expired certificate, name
 * mismatch, missing client certificate, protocol version too low, ...) and
 * a client connection retries with its usual backoff.
 *
 * One patio_tls serves both directions: accepted connections use the
 * server side (own certificate required), outgoing ones the client side.
 * It may be shared by several brokers and threads; it must outlive them.
 *
 * mbedTLS versions: 2.28 and 3.x, the differences gated on
 * MBEDTLS_VERSION_NUMBER in one block below. Built and tested with Debian
 * 12's 2.28.3 and Debian 13's 3.6.6 (`make test-tls3`). TLS 1.2 is the
 * minimum; TLS 1.3 is used when the library has it (3.6 does by default).
 *
 * The header compiles as C99 and C++11 with -Wall -Wextra -Wpedantic -Werror;
 * pass a self-built mbedTLS's include directory with -isystem. */
#ifndef PATIO_TLS_H
#define PATIO_TLS_H

#ifndef PATIO_TCP_DEFAULT_PORT
#error "include patio.h before patio_tls.h"
#endif

#include <stddef.h>

#ifdef PATIO_STATIC
#define PATIO_TLS_API static
#else
#define PATIO_TLS_API extern
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Client certificates requested by a server. */
enum {
    PATIO_TLS_CLIENT_AUTH_NONE = 0,     /* not asked for (default) */
    PATIO_TLS_CLIENT_AUTH_OPTIONAL = 1, /* asked for; verified when sent, a missing one is accepted */
    PATIO_TLS_CLIENT_AUTH_REQUIRED = 2  /* a client without a valid certificate is refused */
};

/* Every field is optional; zero-initialise and set what you need. PEM
 * buffers are NUL-terminated strings; a *_pem field wins over its *_file
 * twin. Nothing is kept after patio_tls_new returns. */
typedef struct patio_tls_config {
    const char *ca_file;      /* trusted CA certificates (PEM or DER file) */
    const char *ca_pem;       /* ... or as a PEM string */
    const char *cert_file;    /* own certificate chain: required to accept connections,
                                 sent by clients when a server asks for one */
    const char *cert_pem;
    const char *key_file;     /* private key of cert_* */
    const char *key_pem;
    const char *key_password; /* for an encrypted key; NULL = none */
    int client_auth;          /* servers: PATIO_TLS_CLIENT_AUTH_* (default NONE) */
    const char *server_name;  /* clients: the name to check the server's certificate
                                 against and to send as SNI; NULL = the host given to
                                 patio_tcp_connect */
    int no_hostname_check;    /* clients: verify the chain but not the name */
    int insecure_skip_verify_DANGEROUS; /* clients: accept ANY server certificate.
                                 Encrypts without authenticating the server: anybody
                                 on the path can read and change the traffic. For
                                 development only. */
} patio_tls_config;

typedef struct patio_tls patio_tls;

/* Loads the certificates and keys and builds the TLS configuration. NULL
 * on error, with a message in err (errlen bytes, may be 0). */
PATIO_TLS_API patio_tls *patio_tls_new(const patio_tls_config *cfg, char *err, size_t errlen);

/* After every broker using it is freed. NULL is fine. */
PATIO_TLS_API void patio_tls_free(patio_tls *tls);

/* The transport table; patio_tcp_config.transport_ctx must be a patio_tls. */
PATIO_TLS_API const patio_transport *patio_tls_transport(void);

/* Sets cfg->transport and cfg->transport_ctx to use tls. */
PATIO_TLS_API void patio_tls_use(patio_tcp_config *cfg, patio_tls *tls);

/* The mbedTLS version the implementation was built with, e.g. "2.28.3". */
PATIO_TLS_API const char *patio_tls_library_version(void);

#ifdef __cplusplus
}
#endif

#endif /* PATIO_TLS_H */

/* ======================================================================== */

#if defined(PATIO_TLS_IMPLEMENTATION) && !defined(PATIO_TLS__IMPLEMENTATION_DONE)
#define PATIO_TLS__IMPLEMENTATION_DONE

/* mbedTLS's headers come from the system include path (installed
 * packages), where compilers do not warn about them. With a mbedTLS built
 * elsewhere, pass its include directory with -isystem rather than -I. */
#include <mbedtls/version.h>
#if MBEDTLS_VERSION_NUMBER < 0x03000000
#include <mbedtls/config.h>
#else
#include <mbedtls/build_info.h>
#endif
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>
#include <mbedtls/pk.h>
#include <mbedtls/entropy.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/net_sockets.h>
#if defined(MBEDTLS_ERROR_C)
#include <mbedtls/error.h>
#endif
#if MBEDTLS_VERSION_NUMBER >= 0x03000000 && defined(MBEDTLS_PSA_CRYPTO_C)
#include <psa/crypto.h>
#endif

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#ifdef MSG_NOSIGNAL
#define PATIO_TLS__NOSIGNAL MSG_NOSIGNAL
#else
#define PATIO_TLS__NOSIGNAL 0
#endif

/* ---- the version-specific part -------------------------------------------
 * Everything that differs between mbedTLS 2.28 and 3.x is in this block. */

static int patio_tls__rng(void *p, unsigned char *out, size_t n);

/* PATIO_TLS__FIELD: a private field; PATIO_TLS__ERR_OLD_VERSION: the peer
 * offers or chose a version below our minimum (the same code, renamed). */
#if MBEDTLS_VERSION_NUMBER >= 0x03000000
#define PATIO_TLS__FIELD(x) MBEDTLS_PRIVATE(x)
#define PATIO_TLS__ERR_OLD_VERSION MBEDTLS_ERR_SSL_BAD_PROTOCOL_VERSION
#else
#define PATIO_TLS__FIELD(x) x
#define PATIO_TLS__ERR_OLD_VERSION MBEDTLS_ERR_SSL_BAD_HS_PROTOCOL_VERSION
#endif

/* Once per process before the first handshake (3.x with PSA: TLS 1.3 and
 * the PSA-based key handling need it); the first patio_tls_new does it,
 * under pthread_once since brokers on other threads may create theirs. */
#if MBEDTLS_VERSION_NUMBER >= 0x03000000 && defined(MBEDTLS_PSA_CRYPTO_C)
static int patio_tls__psa_status = -1;

static void patio_tls__psa_init(void)
{
    patio_tls__psa_status = psa_crypto_init() == PSA_SUCCESS ? 0 : -1;
}
#endif

static int patio_tls__crypto_init(void)
{
#if MBEDTLS_VERSION_NUMBER >= 0x03000000 && defined(MBEDTLS_PSA_CRYPTO_C)
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, patio_tls__psa_init);
    return patio_tls__psa_status;
#else
    return 0;
#endif
}

static int patio_tls__parse_key(mbedtls_pk_context *pk, const char *pem, const char *file, const char *pwd,
                                void *rng)
{
    const unsigned char *pw = (const unsigned char *)pwd;
    size_t pwlen = pwd ? strlen(pwd) : 0;
#if MBEDTLS_VERSION_NUMBER >= 0x03000000
    if (pem) return mbedtls_pk_parse_key(pk, (const unsigned char *)pem, strlen(pem) + 1, pw, pwlen, patio_tls__rng, rng);
    return mbedtls_pk_parse_keyfile(pk, file, pwd, patio_tls__rng, rng);
#else
    (void)rng;
    if (pem) return mbedtls_pk_parse_key(pk, (const unsigned char *)pem, strlen(pem) + 1, pw, pwlen);
    return mbedtls_pk_parse_keyfile(pk, file, pwd);
#endif
}

static int patio_tls__check_pair(mbedtls_x509_crt *crt, mbedtls_pk_context *key, void *rng)
{
#if MBEDTLS_VERSION_NUMBER >= 0x03000000
    return mbedtls_pk_check_pair(&crt->pk, key, patio_tls__rng, rng);
#else
    (void)rng;
    return mbedtls_pk_check_pair(&crt->pk, key);
#endif
}

static void patio_tls__min_tls12(mbedtls_ssl_config *conf)
{
#if MBEDTLS_VERSION_NUMBER >= 0x03020000
    mbedtls_ssl_conf_min_tls_version(conf, MBEDTLS_SSL_VERSION_TLS1_2);
#else
    mbedtls_ssl_conf_min_version(conf, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
#endif
}

/* Whether the connection runs TLS 1.3 (3.x: on by default since 3.6). */
static int patio_tls__is_tls13(const mbedtls_ssl_context *ssl)
{
#if MBEDTLS_VERSION_NUMBER >= 0x03020000 && defined(MBEDTLS_SSL_PROTO_TLS1_3)
    return mbedtls_ssl_get_version_number(ssl) == MBEDTLS_SSL_VERSION_TLS1_3;
#else
    (void)ssl;
    return 0;
#endif
}

/* The description byte of the last alert received (mbedTLS keeps the
 * record in its input buffer after reporting a fatal alert; no accessor
 * for it in 2.28 or 3.x, so 3.x needs MBEDTLS_PRIVATE). */
static int patio_tls__last_alert(const mbedtls_ssl_context *ssl)
{
    const unsigned char *m = ssl->PATIO_TLS__FIELD(in_msg);
    return m ? m[1] : -1;
}

/* Results that only mean "call again" (3.x: TLS 1.3 session tickets and
 * asynchronous operations). */
static int patio_tls__again(int ret)
{
#if defined(MBEDTLS_ERR_SSL_RECEIVED_NEW_SESSION_TICKET)
    if (ret == MBEDTLS_ERR_SSL_RECEIVED_NEW_SESSION_TICKET) return 1;
#endif
#if defined(MBEDTLS_ERR_SSL_RECEIVED_EARLY_DATA)
    if (ret == MBEDTLS_ERR_SSL_RECEIVED_EARLY_DATA) return 1;
#endif
    (void)ret;
    return 0;
}

/* ---- context ------------------------------------------------------------- */

struct patio_tls {
    mbedtls_entropy_context entropy;
    mbedtls_ctr_drbg_context drbg;
    pthread_mutex_t rng_lock;
    mbedtls_x509_crt ca, cert;
    mbedtls_pk_context key;
    mbedtls_ssl_config srv, cli;
    int has_ca, has_cert, verify_server, no_hostname_check, client_auth;
    char *server_name;
};

typedef struct patio_tls__conn {
    mbedtls_ssl_context ssl;
    patio_tls *tls;
    int fd, is_server, sock_errno, sock_eof, hs_done;
    int first_wait;      /* TLS 1.3 client: handshake over, the server's first record not yet in */
    int has_held;        /* `held` is the first byte of that record, not read by the broker yet */
    unsigned char held;
    const char *name;    /* checked name (client), points into `names` */
    char names[256];
    char err[320];
} patio_tls__conn;

static void patio_tls__msg(char *out, size_t cap, const char *fmt, const char *a, const char *b)
{
    if (out && cap) snprintf(out, cap, fmt, a ? a : "", b ? b : "");
}

/* mbedTLS's text for an error code, when it was built with it. */
static const char *patio_tls__strerror(int ret, char *buf, size_t cap)
{
#if defined(MBEDTLS_ERROR_C)
    mbedtls_strerror(ret, buf, cap);
#else
    snprintf(buf, cap, "mbedTLS error -0x%04x", (unsigned)-ret);
#endif
    return buf;
}

/* Serialises the shared random generator (several loops may handshake at
 * the same time, and ctr_drbg is not thread-safe without MBEDTLS_THREADING_C). */
static int patio_tls__rng(void *p, unsigned char *out, size_t n)
{
    patio_tls *tls = (patio_tls *)p;
    int r;
    pthread_mutex_lock(&tls->rng_lock);
    r = mbedtls_ctr_drbg_random(&tls->drbg, out, n);
    pthread_mutex_unlock(&tls->rng_lock);
    return r;
}

/* Client side: lets a name mismatch through when only the chain matters. */
static int patio_tls__verify_cb(void *p, mbedtls_x509_crt *crt, int depth, uint32_t *flags)
{
    patio_tls *tls = (patio_tls *)p;
    (void)crt;
    if (depth == 0 && tls->no_hostname_check) *flags &= ~(uint32_t)MBEDTLS_X509_BADCERT_CN_MISMATCH;
    return 0;
}

static int patio_tls__load_crt(mbedtls_x509_crt *crt, const char *pem, const char *file, const char *what, char *err,
                               size_t errlen)
{
    char e[160];
    int r = pem ? mbedtls_x509_crt_parse(crt, (const unsigned char *)pem, strlen(pem) + 1)
                : mbedtls_x509_crt_parse_file(crt, file);
    if (r == 0) return 0;
    if (r > 0) { /* some certificates of a bundle parsed, others did not */
        snprintf(e, sizeof e, "%d certificate(s) could not be parsed", r);
    } else if (!pem && (r == MBEDTLS_ERR_X509_FILE_IO_ERROR || r == MBEDTLS_ERR_PK_FILE_IO_ERROR)) {
        snprintf(e, sizeof e, "cannot read the file");
    } else {
        patio_tls__strerror(r, e, sizeof e);
    }
    if (err && errlen)
        snprintf(err, errlen, "patio_tls: %s %s%s%s: not a valid certificate (%s)", what, pem ? "PEM" : "file",
                 pem ? "" : " ", pem ? "" : file, e);
    return -1;
}

PATIO_TLS_API void patio_tls_free(patio_tls *tls)
{
    if (!tls) return;
    mbedtls_ssl_config_free(&tls->srv);
    mbedtls_ssl_config_free(&tls->cli);
    mbedtls_x509_crt_free(&tls->ca);
    mbedtls_x509_crt_free(&tls->cert);
    mbedtls_pk_free(&tls->key);
    mbedtls_ctr_drbg_free(&tls->drbg);
    mbedtls_entropy_free(&tls->entropy);
    pthread_mutex_destroy(&tls->rng_lock);
    free(tls->server_name);
    free(tls);
}

PATIO_TLS_API patio_tls *patio_tls_new(const patio_tls_config *cfg, char *err, size_t errlen)
{
    static const char pers[] = "patio_tls";
    patio_tls_config zero;
    patio_tls *tls;
    char e[160];
    int r;
    if (err && errlen) err[0] = '\0';
    if (!cfg) {
        memset(&zero, 0, sizeof zero);
        cfg = &zero;
    }
    if (cfg->client_auth < PATIO_TLS_CLIENT_AUTH_NONE || cfg->client_auth > PATIO_TLS_CLIENT_AUTH_REQUIRED) {
        patio_tls__msg(err, errlen, "patio_tls: client_auth must be PATIO_TLS_CLIENT_AUTH_NONE, _OPTIONAL or _REQUIRED%s%s",
                       NULL, NULL);
        return NULL;
    }
    if (!(cfg->cert_pem || cfg->cert_file) != !(cfg->key_pem || cfg->key_file)) {
        patio_tls__msg(err, errlen, "patio_tls: a certificate needs its key and a key its certificate%s%s", NULL, NULL);
        return NULL;
    }
    if (cfg->client_auth != PATIO_TLS_CLIENT_AUTH_NONE && !(cfg->ca_pem || cfg->ca_file)) {
        patio_tls__msg(err, errlen, "patio_tls: client_auth needs a CA (ca_file or ca_pem) to check clients against%s%s",
                       NULL, NULL);
        return NULL;
    }
    if (patio_tls__crypto_init() != 0) {
        patio_tls__msg(err, errlen, "patio_tls: psa_crypto_init failed%s%s", NULL, NULL);
        return NULL;
    }
    tls = (patio_tls *)calloc(1, sizeof *tls);
    if (!tls) {
        patio_tls__msg(err, errlen, "patio_tls: out of memory%s%s", NULL, NULL);
        return NULL;
    }
    pthread_mutex_init(&tls->rng_lock, NULL);
    mbedtls_entropy_init(&tls->entropy);
    mbedtls_ctr_drbg_init(&tls->drbg);
    mbedtls_x509_crt_init(&tls->ca);
    mbedtls_x509_crt_init(&tls->cert);
    mbedtls_pk_init(&tls->key);
    mbedtls_ssl_config_init(&tls->srv);
    mbedtls_ssl_config_init(&tls->cli);

    r = mbedtls_ctr_drbg_seed(&tls->drbg, mbedtls_entropy_func, &tls->entropy, (const unsigned char *)pers,
                              sizeof pers - 1);
    if (r != 0) {
        patio_tls__msg(err, errlen, "patio_tls: seeding the random generator failed: %s%s",
                       patio_tls__strerror(r, e, sizeof e), NULL);
        goto fail;
    }
    if (cfg->ca_pem || cfg->ca_file) {
        if (patio_tls__load_crt(&tls->ca, cfg->ca_pem, cfg->ca_file, "CA", err, errlen) != 0) goto fail;
        tls->has_ca = 1;
    }
    if (cfg->cert_pem || cfg->cert_file) {
        if (patio_tls__load_crt(&tls->cert, cfg->cert_pem, cfg->cert_file, "certificate", err, errlen) != 0) goto fail;
        r = patio_tls__parse_key(&tls->key, cfg->key_pem, cfg->key_file, cfg->key_password, tls);
        if (r != 0) {
            const char *why = patio_tls__strerror(r, e, sizeof e);
            char guess[sizeof e + 48];
            if (r == MBEDTLS_ERR_PK_PASSWORD_REQUIRED) {
                why = "the key is encrypted: set key_password";
            } else if (r == MBEDTLS_ERR_PK_PASSWORD_MISMATCH) {
                why = "wrong key_password";
            } else if (r == MBEDTLS_ERR_PK_FILE_IO_ERROR) {
                why = "cannot read the file";
            } else if (cfg->key_password) {
                /* a wrong password decrypts to garbage, which now and then
                 * passes the padding check and fails as a malformed key */
                snprintf(guess, sizeof guess, "wrong key_password, or a damaged key (%s)", why);
                why = guess;
            }
            if (err && errlen)
                snprintf(err, errlen, "patio_tls: private key %s%s: %s", cfg->key_pem ? "PEM" : "file ",
                         cfg->key_pem ? "" : cfg->key_file, why);
            goto fail;
        }
        if (patio_tls__check_pair(&tls->cert, &tls->key, tls) != 0) {
            patio_tls__msg(err, errlen, "patio_tls: the certificate does not go with the key%s%s", NULL, NULL);
            goto fail;
        }
        tls->has_cert = 1;
    }

    /* server side */
    r = mbedtls_ssl_config_defaults(&tls->srv, MBEDTLS_SSL_IS_SERVER, MBEDTLS_SSL_TRANSPORT_STREAM,
                                    MBEDTLS_SSL_PRESET_DEFAULT);
    if (r == 0) r = mbedtls_ssl_config_defaults(&tls->cli, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_STREAM,
                                                MBEDTLS_SSL_PRESET_DEFAULT);
    if (r != 0) {
        patio_tls__msg(err, errlen, "patio_tls: mbedtls_ssl_config_defaults failed: %s%s",
                       patio_tls__strerror(r, e, sizeof e), NULL);
        goto fail;
    }
    patio_tls__min_tls12(&tls->srv);
    patio_tls__min_tls12(&tls->cli);
    mbedtls_ssl_conf_rng(&tls->srv, patio_tls__rng, tls);
    mbedtls_ssl_conf_rng(&tls->cli, patio_tls__rng, tls);
    if (tls->has_ca) {
        mbedtls_ssl_conf_ca_chain(&tls->srv, &tls->ca, NULL);
        mbedtls_ssl_conf_ca_chain(&tls->cli, &tls->ca, NULL);
    }
    if (tls->has_cert) {
        if ((r = mbedtls_ssl_conf_own_cert(&tls->srv, &tls->cert, &tls->key)) != 0 ||
            (r = mbedtls_ssl_conf_own_cert(&tls->cli, &tls->cert, &tls->key)) != 0) {
            patio_tls__msg(err, errlen, "patio_tls: the certificate does not go with the key: %s%s",
                           patio_tls__strerror(r, e, sizeof e), NULL);
            goto fail;
        }
    }
    mbedtls_ssl_conf_authmode(&tls->srv, cfg->client_auth == PATIO_TLS_CLIENT_AUTH_REQUIRED   ? MBEDTLS_SSL_VERIFY_REQUIRED
                                         : cfg->client_auth == PATIO_TLS_CLIENT_AUTH_OPTIONAL ? MBEDTLS_SSL_VERIFY_OPTIONAL
                                                                                              : MBEDTLS_SSL_VERIFY_NONE);
    tls->client_auth = cfg->client_auth;
    tls->verify_server = !cfg->insecure_skip_verify_DANGEROUS;
    tls->no_hostname_check = cfg->no_hostname_check;
    mbedtls_ssl_conf_authmode(&tls->cli, tls->verify_server ? MBEDTLS_SSL_VERIFY_REQUIRED : MBEDTLS_SSL_VERIFY_NONE);
    mbedtls_ssl_conf_verify(&tls->cli, patio_tls__verify_cb, tls);
    if (cfg->server_name) {
        size_t n = strlen(cfg->server_name);
        tls->server_name = (char *)malloc(n + 1);
        if (!tls->server_name) {
            patio_tls__msg(err, errlen, "patio_tls: out of memory%s%s", NULL, NULL);
            goto fail;
        }
        memcpy(tls->server_name, cfg->server_name, n + 1);
    }
    return tls;
fail:
    patio_tls_free(tls);
    return NULL;
}

/* ---- socket I/O for mbedTLS (the socket is non-blocking) ----------------- */

static int patio_tls__send(void *p, const unsigned char *buf, size_t n)
{
    patio_tls__conn *c = (patio_tls__conn *)p;
    ssize_t r;
    do r = send(c->fd, buf, n, PATIO_TLS__NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r >= 0) return (int)r;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return MBEDTLS_ERR_SSL_WANT_WRITE;
    c->sock_errno = errno;
    return errno == EPIPE || errno == ECONNRESET ? MBEDTLS_ERR_NET_CONN_RESET : MBEDTLS_ERR_NET_SEND_FAILED;
}

static int patio_tls__recv(void *p, unsigned char *buf, size_t n)
{
    patio_tls__conn *c = (patio_tls__conn *)p;
    ssize_t r;
    do r = recv(c->fd, buf, n, 0);
    while (r < 0 && errno == EINTR);
    if (r > 0) return (int)r;
    if (r == 0) {
        c->sock_eof = 1;
        return 0;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) return MBEDTLS_ERR_SSL_WANT_READ;
    c->sock_errno = errno;
    return errno == ECONNRESET ? MBEDTLS_ERR_NET_CONN_RESET : MBEDTLS_ERR_NET_RECV_FAILED;
}

/* ---- error messages -------------------------------------------------------- */

static const char *patio_tls__alert_text(int alert)
{
    switch (alert) {
    case MBEDTLS_SSL_ALERT_MSG_UNKNOWN_CA: return "unknown CA: the peer does not trust our certificate's issuer";
    case MBEDTLS_SSL_ALERT_MSG_CERT_EXPIRED: return "certificate expired: the peer found our certificate expired";
    case MBEDTLS_SSL_ALERT_MSG_BAD_CERT: return "bad certificate: the peer rejected our certificate";
    case MBEDTLS_SSL_ALERT_MSG_CERT_UNKNOWN: return "certificate unknown: the peer rejected our certificate";
    case MBEDTLS_SSL_ALERT_MSG_UNSUPPORTED_CERT: return "unsupported certificate";
    case MBEDTLS_SSL_ALERT_MSG_NO_CERT: return "client certificate missing: the server requires one";
    case 116: return "client certificate missing: the server requires one"; /* certificate_required (TLS 1.3) */
    case MBEDTLS_SSL_ALERT_MSG_PROTOCOL_VERSION: return "protocol version not accepted by the peer";
    case MBEDTLS_SSL_ALERT_MSG_HANDSHAKE_FAILURE:
        return "handshake failure: no common parameters, or the server requires a client certificate";
    case MBEDTLS_SSL_ALERT_MSG_UNRECOGNIZED_NAME: return "the server does not know the name we asked for (SNI)";
    case MBEDTLS_SSL_ALERT_MSG_ACCESS_DENIED: return "access denied";
    case MBEDTLS_SSL_ALERT_MSG_DECRYPT_ERROR: return "decrypt error";
    case MBEDTLS_SSL_ALERT_MSG_INSUFFICIENT_SECURITY: return "insufficient security";
    default: return NULL;
    }
}

static void patio_tls__verify_text(patio_tls__conn *c, uint32_t flags)
{
    const char *who = c->is_server ? "client certificate" : "server certificate";
    const char *why;
    char info[200];
    if (flags & MBEDTLS_X509_BADCERT_NOT_TRUSTED) why = "unknown CA (not signed by a trusted CA)";
    else if (flags & MBEDTLS_X509_BADCERT_EXPIRED) why = "expired";
    else if (flags & MBEDTLS_X509_BADCERT_FUTURE) why = "not valid yet";
    else if (flags & MBEDTLS_X509_BADCERT_REVOKED) why = "revoked";
    else if (flags & MBEDTLS_X509_BADCERT_MISSING) why = "missing";
    else if (flags & MBEDTLS_X509_BADCERT_CN_MISMATCH) {
        snprintf(c->err, sizeof c->err, "%s rejected: name mismatch (the certificate is not for \"%s\")", who,
                 c->name ? c->name : "");
        return;
    } else {
        info[0] = '\0';
        mbedtls_x509_crt_verify_info(info, sizeof info, "", flags);
        info[strcspn(info, "\n")] = '\0';
        snprintf(c->err, sizeof c->err, "%s rejected: %s", who, info[0] ? info : "verification failed");
        return;
    }
    snprintf(c->err, sizeof c->err, "%s rejected: %s", who, why);
}

/* After a socket error during the handshake: the peer often sent an alert
 * saying why before it closed. Handshake alerts are plaintext records:
 * type 21, version 3.x, length 2, level, description. */
static int patio_tls__peek_alert(patio_tls__conn *c)
{
    unsigned char rec[7];
    ssize_t n = recv(c->fd, rec, sizeof rec, MSG_PEEK | MSG_DONTWAIT);
    if (n == (ssize_t)sizeof rec && rec[0] == 21 && rec[1] == 3 && rec[3] == 0 && rec[4] == 2 && rec[5] == 2)
        return rec[6];
    return -1;
}

/* Describes a received fatal alert in c->err. */
static void patio_tls__alert_fail(patio_tls__conn *c, int alert, const char *during)
{
    const char *t = patio_tls__alert_text(alert);
    if (alert == MBEDTLS_SSL_ALERT_MSG_PROTOCOL_VERSION && !c->is_server && !c->hs_done)
        snprintf(c->err, sizeof c->err,
                 "protocol version too low: no TLS version in common with the server (this client requires "
                 "TLS 1.2 or later)");
    else if (t) snprintf(c->err, sizeof c->err, "the peer refused the %s: %s", during, t);
    else snprintf(c->err, sizeof c->err, "the peer sent fatal alert %d during the %s", alert, during);
}

/* The peer hung up during the handshake (reason: how it looked here). A
 * TLS 1.3 client waiting for the server's first record (first_wait) was
 * most likely refused for its certificate: mbedTLS servers seal that
 * alert with a key the client has already dropped, and others may hang
 * up first. */
static void patio_tls__hung_up(patio_tls__conn *c, const char *reason)
{
    if (c->first_wait)
        snprintf(c->err, sizeof c->err,
                 "the server closed the connection right after the TLS 1.3 handshake (%s); its log says why "
                 "(it may require a client certificate, or refuse ours)", reason);
    else
        snprintf(c->err, sizeof c->err,
                 "the %s closed the connection during the TLS handshake (%s); its log says why (%s)",
                 c->is_server ? "client" : "server", reason,
                 c->is_server ? "it may not trust our certificate"
                              : "it may require a client certificate, or refuse ours");
}

/* Describes a failed mbedTLS call in c->err. */
static void patio_tls__fail(patio_tls__conn *c, int ret, const char *during)
{
    char e[160];
    int net, closed;
    switch (ret) {
    case MBEDTLS_ERR_SSL_FATAL_ALERT_MESSAGE:
        patio_tls__alert_fail(c, patio_tls__last_alert(&c->ssl), during);
        return;
    case MBEDTLS_ERR_X509_CERT_VERIFY_FAILED:
        patio_tls__verify_text(c, mbedtls_ssl_get_verify_result(&c->ssl));
        return;
#if defined(MBEDTLS_ERR_SSL_NO_CLIENT_CERTIFICATE)
    case MBEDTLS_ERR_SSL_NO_CLIENT_CERTIFICATE:
        snprintf(c->err, sizeof c->err, "client certificate missing: this server requires one");
        return;
#endif
    case PATIO_TLS__ERR_OLD_VERSION:
        snprintf(c->err, sizeof c->err, "protocol version too low: the peer does not offer TLS 1.2 or later");
        return;
    default:
        break;
    }
    net = c->sock_errno != 0 || ret == MBEDTLS_ERR_NET_CONN_RESET || ret == MBEDTLS_ERR_NET_SEND_FAILED ||
          ret == MBEDTLS_ERR_NET_RECV_FAILED;
    closed = c->sock_eof || ret == 0 || ret == MBEDTLS_ERR_SSL_CONN_EOF || ret == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY;
    if (!c->hs_done) {
        /* a peer that hangs up often said why first, in a plaintext alert */
        int alert = net && !c->first_wait ? patio_tls__peek_alert(c) : -1;
        if (alert >= 0) patio_tls__alert_fail(c, alert, during);
        else if (net) patio_tls__hung_up(c, strerror(c->sock_errno ? c->sock_errno : ECONNRESET));
        else if (closed) patio_tls__hung_up(c, "end of stream");
        else if (ret == MBEDTLS_ERR_SSL_INVALID_MAC && patio_tls__is_tls13(&c->ssl))
            patio_tls__hung_up(c, "a record we could not decrypt, likely its alert");
        if (c->err[0]) return;
    } else if (net) {
        snprintf(c->err, sizeof c->err, "%s: socket error: %s", during, strerror(c->sock_errno ? c->sock_errno : EIO));
        return;
    } else if (closed) {
        snprintf(c->err, sizeof c->err, "connection closed by the peer during the %s", during);
        return;
    }
    snprintf(c->err, sizeof c->err, "%s failed: %s (-0x%04x)", during, patio_tls__strerror(ret, e, sizeof e),
             (unsigned)-ret);
}

/* ---- the transport ----------------------------------------------------- */

static int patio_tls__create(void *ctx, int fd, int is_server, const char *server_name, void **handle)
{
    patio_tls *tls = (patio_tls *)ctx;
    patio_tls__conn *c;
    int r;
    *handle = NULL;
    if (!tls) return PATIO_ERR_INVALID;
    c = (patio_tls__conn *)calloc(1, sizeof *c);
    if (!c) return PATIO_ERR_NOMEM;
    c->tls = tls;
    c->fd = fd;
    c->is_server = is_server;
    mbedtls_ssl_init(&c->ssl);
    *handle = c;
    /* configuration problems surface as a failed handshake with a message */
    if (is_server && !tls->has_cert) {
        snprintf(c->err, sizeof c->err, "no certificate configured to accept TLS connections (cert_file/key_file)");
        return PATIO_OK;
    }
    if (!is_server && tls->verify_server && !tls->has_ca) {
        snprintf(c->err, sizeof c->err,
                 "no CA configured to verify the server (ca_file / ca_pem, or insecure_skip_verify_DANGEROUS)");
        return PATIO_OK;
    }
    r = mbedtls_ssl_setup(&c->ssl, is_server ? &tls->srv : &tls->cli);
    if (r == 0 && !is_server) {
        const char *name = tls->server_name ? tls->server_name : server_name;
        if (name && strlen(name) >= sizeof c->names) { /* never checking it is no way out */
            snprintf(c->err, sizeof c->err, "server name too long (%u bytes at most)", (unsigned)sizeof c->names - 1);
            return PATIO_OK;
        }
        if (name) {
            memcpy(c->names, name, strlen(name) + 1);
            c->name = c->names;
            r = mbedtls_ssl_set_hostname(&c->ssl, c->name);
        }
    }
    if (r != 0) {
        patio_tls__fail(c, r, "TLS setup");
        return PATIO_OK;
    }
    mbedtls_ssl_set_bio(&c->ssl, c, patio_tls__send, patio_tls__recv, NULL);
    return PATIO_OK;
}

static int patio_tls__map(patio_tls__conn *c, int ret, const char *during)
{
    if (ret == MBEDTLS_ERR_SSL_WANT_READ) return PATIO_TRANSPORT_WANT_READ;
    if (ret == MBEDTLS_ERR_SSL_WANT_WRITE) return PATIO_TRANSPORT_WANT_WRITE;
    patio_tls__fail(c, ret, during);
    return PATIO_TRANSPORT_ERROR;
}

static int patio_tls__handshake(void *handle)
{
    patio_tls__conn *c = (patio_tls__conn *)handle;
    int r;
    if (!c || c->err[0]) return PATIO_TRANSPORT_ERROR; /* from create */
    if (!c->first_wait) {
        do r = mbedtls_ssl_handshake(&c->ssl);
        while (patio_tls__again(r));
        if (r != 0) return patio_tls__map(c, r, "TLS handshake");
        /* OPTIONAL lets a client without a certificate in; one that sent a
         * certificate that does not verify is refused all the same */
        if (c->is_server && c->tls->client_auth == PATIO_TLS_CLIENT_AUTH_OPTIONAL) {
            uint32_t flags = mbedtls_ssl_get_verify_result(&c->ssl);
            if (flags != 0 && flags != (uint32_t)-1 && flags != (uint32_t)MBEDTLS_X509_BADCERT_MISSING) {
                patio_tls__verify_text(c, flags);
                (void)mbedtls_ssl_send_alert_message(&c->ssl, MBEDTLS_SSL_ALERT_LEVEL_FATAL,
                                                     MBEDTLS_SSL_ALERT_MSG_BAD_CERT);
                return PATIO_TRANSPORT_ERROR;
            }
        }
        /* In TLS 1.3 the server judges the client's certificate after the
         * client's handshake is over, and a refusal arrives as the next
         * record. The broker's server always speaks first (PROTOCOL.md),
         * so a client's handshake ends with the first byte of that record:
         * a refusal stays a handshake failure, as in TLS 1.2. */
        if (c->is_server || !patio_tls__is_tls13(&c->ssl)) {
            c->hs_done = 1;
            return PATIO_OK;
        }
        c->first_wait = 1;
    }
    do r = mbedtls_ssl_read(&c->ssl, &c->held, 1);
    while (patio_tls__again(r));
    if (r == 1) {
        c->has_held = 1;
        c->hs_done = 1;
        return PATIO_OK;
    }
    return patio_tls__map(c, r, "TLS handshake");
}

static ptrdiff_t patio_tls__read(void *handle, void *buf, size_t n)
{
    patio_tls__conn *c = (patio_tls__conn *)handle;
    unsigned char *out = (unsigned char *)buf;
    size_t k = 0;
    int r;
    if (!c) return PATIO_TRANSPORT_ERROR;
    if (n > 0x40000000u) n = 0x40000000u;
    if (c->has_held && n > 0) { /* the byte that ended a TLS 1.3 client's handshake */
        out[k++] = c->held;
        c->has_held = 0;
        if (mbedtls_ssl_get_bytes_avail(&c->ssl) == 0) return 1;
    }
    do r = mbedtls_ssl_read(&c->ssl, out + k, n - k);
    while (patio_tls__again(r));
    if (r > 0) return (ptrdiff_t)k + r;
    if (k) return (ptrdiff_t)k; /* whatever ended the read comes again next time */
    if (r == 0 || r == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY || r == MBEDTLS_ERR_SSL_CONN_EOF) return 0;
    return patio_tls__map(c, r, "TLS read");
}

static ptrdiff_t patio_tls__write(void *handle, const void *buf, size_t n)
{
    patio_tls__conn *c = (patio_tls__conn *)handle;
    int r;
    if (!c) return PATIO_TRANSPORT_ERROR;
    if (n > 0x40000000u) n = 0x40000000u;
    do r = mbedtls_ssl_write(&c->ssl, (const unsigned char *)buf, n);
    while (patio_tls__again(r));
    if (r >= 0) return r;
    return patio_tls__map(c, r, "TLS write");
}

static size_t patio_tls__pending(void *handle)
{
    patio_tls__conn *c = (patio_tls__conn *)handle;
    size_t n;
    if (!c) return 0; /* asked after the connection was closed */
    n = mbedtls_ssl_get_bytes_avail(&c->ssl) + (size_t)c->has_held;
    /* a record already read from the socket but not yet decrypted also
     * counts: the socket will not signal it again */
    if (n == 0 && mbedtls_ssl_check_pending(&c->ssl)) n = 1;
    return n;
}

static void patio_tls__close(void *handle)
{
    patio_tls__conn *c = (patio_tls__conn *)handle;
    if (!c) return;
    if (!c->err[0] && !c->sock_errno && !c->sock_eof) (void)mbedtls_ssl_close_notify(&c->ssl); /* best effort */
    mbedtls_ssl_free(&c->ssl);
    free(c);
}

static const char *patio_tls__error(void *handle)
{
    patio_tls__conn *c = (patio_tls__conn *)handle;
    if (!c) return "TLS transport error";
    return c->err[0] ? c->err : "TLS error";
}

static const patio_transport patio_tls__transport = {
    "tls", patio_tls__create, patio_tls__handshake, patio_tls__read, patio_tls__write, patio_tls__pending,
    patio_tls__close, patio_tls__error
};

PATIO_TLS_API const patio_transport *patio_tls_transport(void) { return &patio_tls__transport; }

PATIO_TLS_API void patio_tls_use(patio_tcp_config *cfg, patio_tls *tls)
{
    cfg->transport = &patio_tls__transport;
    cfg->transport_ctx = tls;
}

PATIO_TLS_API const char *patio_tls_library_version(void) { return MBEDTLS_VERSION_STRING; }

#endif /* PATIO_TLS_IMPLEMENTATION */
