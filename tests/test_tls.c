/* TLS transport (patio_tls.h, mbedTLS): the whole TCP broker family of
 * tests/test_tcp.c run again over TLS with server verification and over
 * TLS with client certificates required, then the TLS cases: unknown CA,
 * expired certificate, name mismatch (and the ways to accept a name),
 * missing or foreign client certificate, a client and a server that
 * offer only TLS 1.1, bad configurations (corrupted PEM, missing file, key password),
 * key authentication inside TLS, a plain peer against a TLS one, and the
 * retry with backoff after a failed handshake.
 *
 * Certificates are made for each run by tests/tls/make_certs.sh (openssl
 * command line) in a temporary directory. */
#define PATIO_IMPLEMENTATION
#include "patio.h"
#define PATIO_TLS_IMPLEMENTATION
#include "patio_tls.h"

#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static char g_dir[256];                 /* the certificates */
static patio_tls *g_tls_srv, *g_tls_cli; /* row "tls" */
static patio_tls *g_mtls_srv, *g_mtls_cli; /* row "tls-client-cert" */

static void cfg_tls(patio_tcp_config *cfg, int server)
{
    patio_tls_use(cfg, server ? g_tls_srv : g_tls_cli);
}

static void cfg_mtls(patio_tcp_config *cfg, int server)
{
    patio_tls_use(cfg, server ? g_mtls_srv : g_mtls_cli);
}

#define TCP_TEST_SETUPS { "tls", cfg_tls, 0 }, { "tls-client-cert", cfg_mtls, 0 },
#define TCP_TEST_NO_MAIN
#include "test_tcp.c"

/* ---- helpers --------------------------------------------------------------- */

static const char *path_of(const char *name)
{
    static char buf[8][512];
    static int next;
    char *p = buf[next++ % 8];
    snprintf(p, 512, "%s/%s", g_dir, name);
    return p;
}

/* A patio_tls from files in g_dir (NULL names are left out). */
static patio_tls *tls_of(const char *ca, const char *cert, const char *key, int client_auth)
{
    patio_tls_config tc;
    patio_tls *t;
    char err[256];
    memset(&tc, 0, sizeof tc);
    if (ca) tc.ca_file = path_of(ca);
    if (cert) tc.cert_file = path_of(cert);
    if (key) tc.key_file = path_of(key);
    tc.client_auth = client_auth;
    t = patio_tls_new(&tc, err, sizeof err);
    if (!t) fprintf(stderr, "  patio_tls_new: %s\n", err);
    return t;
}

/* Log lines of every broker of a case, kept to search them. */
static pthread_mutex_t g_log_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_log[16384];
static size_t g_log_len;

static void log_hook(int level, const char *message, void *user)
{
    size_t n = strlen(message);
    const char *who = (const char *)user;
    (void)level;
    pthread_mutex_lock(&g_log_lock);
    if (g_log_len + n + strlen(who) + 4 < sizeof g_log) {
        g_log_len += (size_t)snprintf(g_log + g_log_len, sizeof g_log - g_log_len, "%s: %s\n", who, message);
    }
    pthread_mutex_unlock(&g_log_lock);
}

static void log_clear(void)
{
    pthread_mutex_lock(&g_log_lock);
    g_log_len = 0;
    g_log[0] = '\0';
    pthread_mutex_unlock(&g_log_lock);
}

static int log_has(const char *who, const char *text)
{
    char line[600];
    int found;
    snprintf(line, sizeof line, "%s: ", who);
    pthread_mutex_lock(&g_log_lock);
    {
        const char *p = g_log;
        found = 0;
        while (!found && (p = strstr(p, line)) != NULL) {
            const char *eol = strchr(p, '\n');
            const char *hit = strstr(p, text);
            if (hit && (!eol || hit < eol)) found = 1;
            p = eol ? eol + 1 : p + strlen(p);
        }
    }
    pthread_mutex_unlock(&g_log_lock);
    return found;
}

typedef struct log_wait {
    const char *who, *text;
} log_wait;

static int log_cond(void *arg)
{
    log_wait *w = (log_wait *)arg;
    return log_has(w->who, w->text);
}

/* Waits up to 5 s for a log line of `who` containing text. */
static int wait_log(const char *who, const char *text)
{
    log_wait w;
    int ok;
    w.who = who;
    w.text = text;
    ok = wait_until(log_cond, &w, 5.0);
    if (!ok) {
        pthread_mutex_lock(&g_log_lock);
        fprintf(stderr, "  no \"%s\" from %s in the log:\n%s", text, who, g_log);
        pthread_mutex_unlock(&g_log_lock);
    }
    return ok;
}

/* Large frames both ways cross many TLS records. */
static char g_big[300000];

static int big_len(patio_task *t)
{
    const char *p = NULL;
    size_t n = 0;
    if (!patio_arg_next_str(t, &p, &n)) return patio_fail(t, "TypeError", "a string");
    return patio_return_int(t, n == sizeof g_big - 1 && memcmp(p, g_big, n) == 0 ? (int64_t)n : -1);
}

static int big_ret(patio_task *t)
{
    return patio_return_str(t, g_big);
}

/* A broker with a logging registry ("server" or "client" in the log). */
typedef struct lnode {
    patio_hooks hooks;
    patio_registry *rpc;
    patio_executor *ex;
    patio_broker *b;
    int port;
} lnode;

static int lnode_start(lnode *n, const char *who, patio_tls *tls, const char *key, int listen_port)
{
    patio_registry_config rc;
    patio_tcp_config cfg;
    memset(n, 0, sizeof *n);
    n->hooks.log = log_hook;
    n->hooks.log_user = (void *)who;
    n->hooks.log_level = PATIO_LOG_INFO;
    memset(&rc, 0, sizeof rc);
    rc.hooks = &n->hooks;
    n->rpc = patio_registry_new(&rc);
    patio_register(n->rpc, "mul", mul, NULL);
    patio_register(n->rpc, "big_len", big_len, NULL);
    patio_register(n->rpc, "big_ret", big_ret, NULL);
    n->ex = patio_thread_pool_new(n->rpc, 2);
    memset(&cfg, 0, sizeof cfg);
    cfg.key = key;
    cfg.key_len = key ? strlen(key) : 0;
    cfg.reconnect_delay = 0.05;
    cfg.reconnect_max_delay = 0.2;
    cfg.handshake_timeout = 2;
    if (tls) patio_tls_use(&cfg, tls);
    n->b = patio_tcp_broker_new(n->ex, &cfg);
    if (!n->b) return -1;
    if (listen_port >= 0 && patio_tcp_listen(n->b, "127.0.0.1", listen_port, &n->port) != PATIO_OK) return -1;
    return 0;
}

static void lnode_free(lnode *n)
{
    patio_broker_free(n->b);
    patio_executor_free(n->ex);
    patio_registry_free(n->rpc);
    memset(n, 0, sizeof *n);
}

/* A server with srv_tls, a client with cli_tls connecting to host; waits
 * for the server's log line srv_text and the client's cli_text (either
 * may be NULL), checks that no peer appeared, and that the client retried. */
static void refused_case(patio_tls *srv_tls, patio_tls *cli_tls, const char *host, const char *srv_text,
                         const char *cli_text)
{
    lnode s, c;
    log_clear();
    CHECK(srv_tls != NULL);
    CHECK(cli_tls != NULL);
    if (!srv_tls || !cli_tls) return;
    CHECK(lnode_start(&s, "server", srv_tls, KEY, 0) == 0);
    CHECK(lnode_start(&c, "client", cli_tls, KEY, -1) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, host, s.port), PATIO_OK);
    if (srv_text) CHECK(wait_log("server", srv_text));
    if (cli_text) CHECK(wait_log("client", cli_text));
    CHECK(wait_until(has_reconnected, c.b, 5.0)); /* a failed handshake is retried */
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 0.1), PATIO_ERR_TIMEOUT);
    CHECK(stats_of(c.b).auth_failures + stats_of(s.b).auth_failures >= 1);
    lnode_free(&c);
    lnode_free(&s);
}

/* A server with srv_tls and a client with cli_tls make calls. */
static void accepted_case(patio_tls *srv_tls, patio_tls *cli_tls, const char *host)
{
    lnode s, c;
    log_clear();
    CHECK(srv_tls != NULL);
    CHECK(cli_tls != NULL);
    if (!srv_tls || !cli_tls) return;
    CHECK(lnode_start(&s, "server", srv_tls, KEY, 0) == 0);
    CHECK(lnode_start(&c, "client", cli_tls, KEY, -1) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, host, s.port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(call_mul(c.b, 6, 7), 42);
    lnode_free(&c);
    lnode_free(&s);
}

/* ---- failure cases ------------------------------------------------------- */

static void test_tls_unknown_ca(void)
{
    patio_tls *srv = tls_of(NULL, "other_server.pem", "other_server.key", 0);
    refused_case(srv, g_tls_cli, "127.0.0.1", NULL, "server certificate rejected: unknown CA");
    patio_tls_free(srv);
}

static void test_tls_expired(void)
{
    patio_tls *srv = tls_of(NULL, "expired.pem", "expired.key", 0);
    refused_case(srv, g_tls_cli, "127.0.0.1", NULL, "server certificate rejected: expired");
    patio_tls_free(srv);
}

static void test_tls_name_mismatch(void)
{
    patio_tls *srv = tls_of(NULL, "wrongname.pem", "wrongname.key", 0);
    refused_case(srv, g_tls_cli, "127.0.0.1", NULL, "name mismatch (the certificate is not for \"127.0.0.1\")");
    patio_tls_free(srv);
}

/* The right name by server_name, or no name check: accepted. */
static void test_tls_name_override(void)
{
    patio_tls *srv = tls_of(NULL, "wrongname.pem", "wrongname.key", 0);
    patio_tls_config tc;
    patio_tls *cli;
    memset(&tc, 0, sizeof tc);
    tc.ca_file = path_of("ca.pem");
    tc.server_name = "wrong.example";
    cli = patio_tls_new(&tc, NULL, 0);
    accepted_case(srv, cli, "127.0.0.1");
    patio_tls_free(cli);
    tc.server_name = NULL;
    tc.no_hostname_check = 1;
    cli = patio_tls_new(&tc, NULL, 0);
    accepted_case(srv, cli, "127.0.0.1");
    patio_tls_free(cli);
    patio_tls_free(srv);
}

/* A name too long to be checked is refused, not left unchecked. */
static void test_tls_name_too_long(void)
{
    char name[300];
    patio_tls_config tc;
    patio_tls *cli;
    memset(name, 'a', sizeof name - 1);
    name[sizeof name - 1] = '\0';
    memset(&tc, 0, sizeof tc);
    tc.ca_file = path_of("ca.pem");
    tc.server_name = name;
    cli = patio_tls_new(&tc, NULL, 0);
    refused_case(g_tls_srv, cli, "127.0.0.1", NULL, "tls handshake failed: server name too long");
    patio_tls_free(cli);
}

/* "localhost" resolves and matches the certificate's DNS name. */
static void test_tls_localhost(void)
{
    accepted_case(g_tls_srv, g_tls_cli, "localhost");
}

static void test_tls_insecure_skip_verify(void)
{
    patio_tls *srv = tls_of(NULL, "other_server.pem", "other_server.key", 0);
    patio_tls_config tc;
    patio_tls *cli;
    memset(&tc, 0, sizeof tc);
    tc.insecure_skip_verify_DANGEROUS = 1;
    cli = patio_tls_new(&tc, NULL, 0);
    accepted_case(srv, cli, "127.0.0.1");
    patio_tls_free(cli);
    patio_tls_free(srv);
}

static void test_tls_client_cert_missing(void)
{
    refused_case(g_mtls_srv, g_tls_cli, "127.0.0.1", "client certificate missing", "tls handshake failed");
}

static void test_tls_client_cert_unknown_ca(void)
{
    patio_tls *cli = tls_of("ca.pem", "other_client.pem", "other_client.key", 0);
    refused_case(g_mtls_srv, cli, "127.0.0.1", "client certificate rejected: unknown CA", "tls handshake failed");
    patio_tls_free(cli);
}

/* OPTIONAL: no certificate is fine, a foreign one is not. */
static void test_tls_client_cert_optional(void)
{
    patio_tls *srv = tls_of("ca.pem", "server.pem", "server.key", PATIO_TLS_CLIENT_AUTH_OPTIONAL);
    patio_tls *foreign = tls_of("ca.pem", "other_client.pem", "other_client.key", 0);
    accepted_case(srv, g_tls_cli, "127.0.0.1");
    accepted_case(srv, g_mtls_cli, "127.0.0.1");
    refused_case(srv, foreign, "127.0.0.1", "client certificate rejected: unknown CA", NULL);
    patio_tls_free(foreign);
    patio_tls_free(srv);
}

/* ---- peers that offer TLS 1.1 at most --------------------------------------
 * tests/tls/old_tls_peer.py (Python's ssl module, loopback only) runs as a
 * child process; its output comes through a pipe: "port N" for the server
 * modes, then one "result: ..." line. It bounds its own waits (15 s in
 * all); here every read waits 10 s at most, and the child is killed if it
 * has not ended 5 s after that. */
typedef struct old_peer {
    pid_t pid;
    int fd;
    char buf[512];
    size_t len;
} old_peer;

static int old_peer_start(old_peer *o, const char *mode, int port)
{
    char script[512], portbuf[16];
    const char *src = __FILE__, *slash = strrchr(src, '/');
    int p[2];
    o->pid = -1;
    o->fd = -1;
    o->len = 0;
    snprintf(script, sizeof script, "%.*s/tls/old_tls_peer.py", slash ? (int)(slash - src) : 1, slash ? src : ".");
    snprintf(portbuf, sizeof portbuf, "%d", port);
    if (pipe(p) != 0) return -1;
    o->pid = fork();
    if (o->pid == 0) {
        dup2(p[1], 1);
        close(p[0]);
        close(p[1]);
        execlp("python3", "python3", script, mode, g_dir, portbuf, (char *)NULL);
        if (write(1, "result: cannot run python3\n", 27) < 0) _exit(126); /* only async-signal-safe calls here */
        _exit(127);
    }
    close(p[1]);
    if (o->pid < 0) {
        close(p[0]);
        return -1;
    }
    o->fd = p[0];
    return 0;
}

/* The next output line of the peer starting with prefix (the rest of it),
 * or NULL when none came within 10 s. */
static const char *old_peer_line(old_peer *o, const char *prefix)
{
    static char line[512];
    double end = now_s() + 10.0;
    for (;;) {
        char *nl = (char *)memchr(o->buf, '\n', o->len);
        struct pollfd pfd;
        ssize_t n;
        int left_ms = (int)((end - now_s()) * 1000);
        if (nl) {
            size_t k = (size_t)(nl - o->buf);
            memcpy(line, o->buf, k);
            line[k] = '\0';
            o->len -= k + 1;
            memmove(o->buf, nl + 1, o->len);
            if (strncmp(line, prefix, strlen(prefix)) == 0) return line + strlen(prefix);
            fprintf(stderr, "  old_tls_peer: %s\n", line);
            continue;
        }
        if (left_ms <= 0 || o->len == sizeof o->buf - 1) break;
        pfd.fd = o->fd;
        pfd.events = POLLIN;
        if (poll(&pfd, 1, left_ms) <= 0) break;
        n = read(o->fd, o->buf + o->len, sizeof o->buf - 1 - o->len);
        if (n <= 0) break;
        o->len += (size_t)n;
    }
    fprintf(stderr, "  old_tls_peer: no \"%s\" line within 10 s\n", prefix);
    return NULL;
}

static void old_peer_end(old_peer *o)
{
    double end = now_s() + 5.0;
    int status;
    struct timespec ts;
    ts.tv_sec = 0;
    ts.tv_nsec = 5000000;
    if (o->fd >= 0) close(o->fd);
    if (o->pid <= 0) return;
    while (waitpid(o->pid, &status, WNOHANG) == 0) {
        if (now_s() > end) {
            fprintf(stderr, "  old_tls_peer did not end: killed\n");
            kill(o->pid, SIGKILL);
            waitpid(o->pid, &status, 0);
            break;
        }
        nanosleep(&ts, NULL);
    }
}

/* A TLS 1.1 client against our server: the server refuses it. */
static void test_tls_version_too_low(void)
{
    lnode s;
    old_peer o;
    const char *res;
    log_clear();
    CHECK(lnode_start(&s, "server", g_tls_srv, KEY, 0) == 0);
    CHECK(old_peer_start(&o, "client", s.port) == 0);
    res = old_peer_line(&o, "result: ");
    CHECK(res != NULL);
    if (res && strncmp(res, "unsupported", 11) == 0) {
        printf("  (skipped: Python's ssl module cannot offer TLS 1.1 here: %s)\n", res);
    } else if (res) {
        if (strncmp(res, "refused", 7) != 0) fprintf(stderr, "  old client: %s\n", res);
        CHECK(strncmp(res, "refused", 7) == 0);
        CHECK(wait_log("server", "tls handshake failed: protocol version too low"));
        CHECK(stats_of(s.b).auth_failures >= 1);
    }
    old_peer_end(&o);
    lnode_free(&s);
}

/* Our client against a server that offers TLS 1.1 at most: a real one
 * (Python's ssl), then a hand-made TLS 1.1 ServerHello. The client
 * refuses with a protocol_version alert (70) and says why. */
static void server_too_old(const char *mode)
{
    lnode c;
    old_peer o;
    const char *res;
    int port;
    log_clear();
    CHECK(old_peer_start(&o, mode, 0) == 0);
    res = old_peer_line(&o, "port ");
    port = res ? atoi(res) : 0;
    CHECK(port > 0);
    if (port > 0) {
        CHECK(lnode_start(&c, "client", g_tls_cli, KEY, -1) == 0);
        CHECK_EQ_INT(patio_tcp_connect(c.b, "127.0.0.1", port), PATIO_OK);
        res = old_peer_line(&o, "result: ");
        CHECK(res != NULL);
        if (res && strncmp(res, "unsupported", 11) == 0) {
            printf("  (skipped a real TLS 1.1 server: %s)\n", res);
        } else if (res) {
            const char *want = strcmp(mode, "hello") == 0 ? "alert 2 70" : "refused";
            if (strncmp(res, want, strlen(want)) != 0) fprintf(stderr, "  old server: %s\n", res);
            CHECK(strncmp(res, want, strlen(want)) == 0);
            CHECK(wait_log("client", "tls handshake failed: protocol version too low"));
        }
        CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 0.1), PATIO_ERR_TIMEOUT);
        lnode_free(&c);
    }
    old_peer_end(&o);
}

static void test_tls_server_version_too_low(void)
{
    server_too_old("server");
    server_too_old("hello");
}

/* ---- configuration errors -------------------------------------------------- */

static void expect_config_error(const patio_tls_config *tc, const char *text)
{
    char err[256];
    patio_tls *t;
    err[0] = 'x';
    err[1] = '\0';
    t = patio_tls_new(tc, err, sizeof err);
    CHECK(t == NULL);
    if (!strstr(err, text)) {
        fprintf(stderr, "  error \"%s\" lacks \"%s\"\n", err, text);
        CHECK(!"the error message");
    }
    patio_tls_free(t);
}

static void test_tls_config_errors(void)
{
    patio_tls_config tc;
    char err[256];
    patio_tls *t;

    memset(&tc, 0, sizeof tc);
    tc.ca_file = path_of("corrupt.pem");
    expect_config_error(&tc, "CA file");
    expect_config_error(&tc, "not a valid certificate");

    memset(&tc, 0, sizeof tc);
    tc.cert_file = path_of("corrupt.pem");
    tc.key_file = path_of("server.key");
    expect_config_error(&tc, "certificate file");

    memset(&tc, 0, sizeof tc);
    tc.ca_pem = "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n";
    expect_config_error(&tc, "CA PEM: not a valid certificate");

    memset(&tc, 0, sizeof tc);
    tc.ca_file = path_of("no-such-file.pem");
    expect_config_error(&tc, "cannot read the file");

    memset(&tc, 0, sizeof tc);
    tc.cert_file = path_of("server.pem");
    expect_config_error(&tc, "a certificate needs its key");

    memset(&tc, 0, sizeof tc);
    tc.cert_file = path_of("server.pem");
    tc.key_file = path_of("client.key");
    expect_config_error(&tc, "does not go with the key");

    memset(&tc, 0, sizeof tc);
    tc.cert_file = path_of("server.pem");
    tc.key_file = path_of("server_enc.key");
    expect_config_error(&tc, "set key_password");
    tc.key_password = "wrong";
    expect_config_error(&tc, "wrong key_password");
    tc.key_password = "hunter2";
    t = patio_tls_new(&tc, err, sizeof err);
    CHECK(t != NULL);
    patio_tls_free(t);

    memset(&tc, 0, sizeof tc);
    tc.client_auth = PATIO_TLS_CLIENT_AUTH_REQUIRED;
    expect_config_error(&tc, "client_auth needs a CA");
    tc.client_auth = 7;
    expect_config_error(&tc, "client_auth must be");

    /* PEM buffers work like files */
    {
        static char ca[8192], cert[8192], key[8192];
        FILE *f;
        size_t n;
        f = fopen(path_of("ca.pem"), "rb");
        n = f ? fread(ca, 1, sizeof ca - 1, f) : 0;
        ca[n] = '\0';
        if (f) fclose(f);
        f = fopen(path_of("server.pem"), "rb");
        n = f ? fread(cert, 1, sizeof cert - 1, f) : 0;
        cert[n] = '\0';
        if (f) fclose(f);
        f = fopen(path_of("server.key"), "rb");
        n = f ? fread(key, 1, sizeof key - 1, f) : 0;
        key[n] = '\0';
        if (f) fclose(f);
        memset(&tc, 0, sizeof tc);
        tc.ca_pem = ca;
        tc.cert_pem = cert;
        tc.key_pem = key;
        t = patio_tls_new(&tc, err, sizeof err);
        CHECK(t != NULL);
        accepted_case(t, t, "127.0.0.1");
        patio_tls_free(t);
    }
}

/* A client without a CA (and not insecure) and a server without a
 * certificate: each connection fails with a message saying so. */
static void test_tls_missing_material(void)
{
    patio_tls *bare = patio_tls_new(NULL, NULL, 0);
    CHECK(bare != NULL);
    refused_case(g_tls_srv, bare, "127.0.0.1", NULL, "no CA configured");
    refused_case(bare, g_tls_cli, "127.0.0.1", "no certificate configured", NULL);
    patio_tls_free(bare);
}

/* ---- key authentication inside TLS, plain against TLS ------------------- */

static void test_tls_key_auth_inside(void)
{
    lnode s, c;
    log_clear();
    CHECK(lnode_start(&s, "server", g_tls_srv, KEY, 0) == 0);
    CHECK(lnode_start(&c, "client", g_tls_cli, "another key", -1) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, "127.0.0.1", s.port), PATIO_OK);
    CHECK(wait_log("server", "authentication failed"));
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 0.2), PATIO_ERR_TIMEOUT);
    CHECK(stats_of(s.b).auth_failures >= 1);
    CHECK(!log_has("server", "TLS handshake"));
    CHECK(!log_has("client", "TLS handshake"));
    lnode_free(&c);
    lnode_free(&s);
}

/* Either side's handshake deadline may end a connection nobody finishes:
 * the first one to expire closes it, and the other sees the peer close. */
static int deadline_cond(void *arg)
{
    const char *text = (const char *)arg;
    return log_has("client", text) || log_has("server", text);
}

static void test_tls_plain_peer(void)
{
    lnode s, c;
    /* TLS client, plain server */
    log_clear();
    CHECK(lnode_start(&s, "server", NULL, KEY, 0) == 0);
    CHECK(lnode_start(&c, "client", g_tls_cli, KEY, -1) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, "127.0.0.1", s.port), PATIO_OK);
    CHECK(wait_log("client", "tls handshake failed"));
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 0.1), PATIO_ERR_TIMEOUT);
    lnode_free(&c);
    lnode_free(&s);
    /* plain client, TLS server */
    log_clear();
    CHECK(lnode_start(&s, "server", g_tls_srv, KEY, 0) == 0);
    CHECK(lnode_start(&c, "client", NULL, KEY, -1) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, "127.0.0.1", s.port), PATIO_OK);
    /* each waits for the other to speak first: a handshake deadline ends it */
    CHECK(wait_until(deadline_cond, (void *)"handshake not finished within", 5.0));
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 0.1), PATIO_ERR_TIMEOUT);
    lnode_free(&c);
    lnode_free(&s);
}

static void test_tls_large_payload(void)
{
    lnode s, c;
    patio_call *call;
    size_t i;
    for (i = 0; i < sizeof g_big - 1; i++) g_big[i] = (char)('a' + i % 26);
    g_big[sizeof g_big - 1] = '\0';
    CHECK(lnode_start(&s, "server", g_tls_srv, KEY, 0) == 0);
    CHECK(lnode_start(&c, "client", g_tls_cli, KEY, -1) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, "127.0.0.1", s.port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    for (i = 0; i < 3; i++) {
        call = patio_call_sync(c.b, 10.0, "big_len", "s", g_big);
        CHECK_EQ_INT(patio_call_status(call), PATIO_OK);
        CHECK_EQ_INT(patio_result_int(call), sizeof g_big - 1);
        patio_call_free(call);
        call = patio_call_sync(c.b, 10.0, "big_ret", "");
        CHECK_EQ_INT(patio_call_status(call), PATIO_OK);
        patio_call_free(call);
    }
    CHECK(stats_of(c.b).bytes_in >= 3 * (sizeof g_big - 1));
    lnode_free(&c);
    lnode_free(&s);
}

static const tcase tls_cases[] = {
    CASE(test_tls_unknown_ca),
    CASE(test_tls_expired),
    CASE(test_tls_name_mismatch),
    CASE(test_tls_name_override),
    CASE(test_tls_name_too_long),
    CASE(test_tls_localhost),
    CASE(test_tls_insecure_skip_verify),
    CASE(test_tls_client_cert_missing),
    CASE(test_tls_client_cert_unknown_ca),
    CASE(test_tls_client_cert_optional),
    CASE(test_tls_version_too_low),
    CASE(test_tls_server_version_too_low),
    CASE(test_tls_config_errors),
    CASE(test_tls_missing_material),
    CASE(test_tls_key_auth_inside),
    CASE(test_tls_plain_peer),
    CASE(test_tls_large_payload),
};

/* Makes the certificates with tests/tls/make_certs.sh (found next to this
 * source file) in a fresh temporary directory. */
static int make_certs(void)
{
    char script[512], cmd[1200];
    const char *src = __FILE__, *slash = strrchr(src, '/');
    const char *tmp = getenv("TMPDIR");
    int dl = slash ? (int)(slash - src) : 1;
    snprintf(g_dir, sizeof g_dir, "%s/patio-tls.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return -1;
    }
    snprintf(script, sizeof script, "%.*s/tls/make_certs.sh", dl, slash ? src : ".");
    snprintf(cmd, sizeof cmd, "sh '%s' '%s' > '%s/make_certs.log' 2>&1", script, g_dir, g_dir);
    if (system(cmd) != 0) {
        snprintf(cmd, sizeof cmd, "cat '%s/make_certs.log' >&2", g_dir);
        if (system(cmd) != 0) { /* nothing more to say */
        }
        fprintf(stderr, "test_tls: %s failed (openssl missing?)\n", script);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    size_t i;
    const char *only = argc > 1 ? argv[1] : NULL;
    char cmd[600];
    signal(SIGPIPE, SIG_IGN);
    if (make_certs() != 0) {
        th_failed++;
        return th_summary("test_tls");
    }
    printf("# mbedTLS %s, certificates in %s\n", patio_tls_library_version(), g_dir);
    g_tls_srv = tls_of("ca.pem", "server.pem", "server.key", PATIO_TLS_CLIENT_AUTH_NONE);
    g_tls_cli = tls_of("ca.pem", NULL, NULL, 0);
    g_mtls_srv = tls_of("ca.pem", "server.pem", "server.key", PATIO_TLS_CLIENT_AUTH_REQUIRED);
    g_mtls_cli = tls_of("ca.pem", "client.pem", "client.key", 0);
    if (!g_tls_srv || !g_tls_cli || !g_mtls_srv || !g_mtls_cli) {
        th_failed++;
        return th_summary("test_tls");
    }
    run_tcp_family(only);
    g_setup = &setups[0];
    for (i = 0; i < sizeof tls_cases / sizeof tls_cases[0]; i++) {
        if (only && !strstr(tls_cases[i].name, only)) continue;
        th_run(tls_cases[i].name, tls_cases[i].fn);
    }
    patio_tls_free(g_tls_srv);
    patio_tls_free(g_tls_cli);
    patio_tls_free(g_mtls_srv);
    patio_tls_free(g_mtls_cli);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "test_tls: could not remove %s\n", g_dir);
    return th_summary("test_tls");
}
