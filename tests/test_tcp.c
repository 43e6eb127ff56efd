/* TCP broker: calls both ways, mixed mode and a mesh with round robin,
 * errors, timeouts, routes that are missing or appear later, serial
 * wrap-around, discovery bytes, reconnect, lost peers, limits, and bad
 * input from raw sockets (a Python-like peer written here).
 *
 * Every case runs against each transport setup of `setups` (plain TCP
 * here; another transport adds a row). Cases that speak the wire format
 * through raw sockets only run where the bytes on the socket are the plain
 * protocol. Loopback only, ephemeral ports; every wait has a deadline.
 *
 * tests/test_tls.c includes this file with its own rows (TCP_TEST_SETUPS)
 * and its own main (TCP_TEST_NO_MAIN). */
#ifndef PATIO_H_INCLUDED
/* The broker resolves names through these (see fake_getaddrinfo). Where
 * patio.h was included before this file (tests/test_tls.c), it keeps the
 * system's, and the cases that need them are left out. */
#define TCP_TEST_FAKE_RESOLVER
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE 1 /* before any system header, as patio.h's implementation does */
#endif
#include <netdb.h>
static int fake_getaddrinfo(const char *host, const char *service, const struct addrinfo *hints,
                            struct addrinfo **res);
static void fake_freeaddrinfo(struct addrinfo *ai);
#define getaddrinfo fake_getaddrinfo
#define freeaddrinfo fake_freeaddrinfo
#endif
#define PATIO_IMPLEMENTATION
#include "patio.h"
#ifdef TCP_TEST_FAKE_RESOLVER
#undef getaddrinfo
#undef freeaddrinfo
#endif
#include "harness.h"
#include <stdlib.h>
#include <stddef.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#if defined(__linux__)
#include <sched.h>
#include <net/if.h>
#include <sys/ioctl.h>
#endif
#include "common.h"

/* ---- transport setups ---------------------------------------------------- */

typedef struct setup {
    const char *name;
    void (*configure)(patio_tcp_config *cfg, int server); /* NULL = plain TCP */
    int raw;                                              /* the wire is plain: raw-socket cases apply */
} setup;

static const setup setups[] = {
#ifdef TCP_TEST_SETUPS
    TCP_TEST_SETUPS
#else
    { "plain", NULL, 1 },
#endif
};

static const setup *g_setup;

#define KEY "secret-key"

/* A configuration for a broker of the current setup. */
static patio_tcp_config cfg_for(int server)
{
    patio_tcp_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.key = KEY;
    cfg.key_len = strlen(KEY);
    cfg.reconnect_delay = 0.05;
    cfg.reconnect_max_delay = 0.2;
    cfg.handshake_timeout = 3;
    if (g_setup->configure) g_setup->configure(&cfg, server);
    return cfg;
}

/* ---- functions served by test nodes -------------------------------------- */

static gate g_gate;

static int div_(patio_task *t)
{
    double a, b;
    if (patio_args(t, "dd", &a, &b) != PATIO_OK) return PATIO_ERR_TYPE;
    if (b == 0) return patio_fail(t, "ZeroDivisionError", "division by zero");
    return patio_return_double(t, a / b);
}

static int gated(patio_task *t)
{
    gate_pass(&g_gate);
    return patio_return_str(t, "late");
}

typedef struct node {
    patio_registry *rpc;
    patio_executor *ex;
    patio_broker *b;
    int port;
    const char *id;
    int hits;   /* atomic: whoami calls served */
} node;

static int whoami(patio_task *t)
{
    node *n = (node *)patio_task_user(t);
    if (!n) return patio_fail(t, "RuntimeError", "no node");
    __atomic_fetch_add(&n->hits, 1, __ATOMIC_SEQ_CST);
    return patio_return_str(t, n->id);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A node with mul, div, gated, whoami (and `extra`, if given, as "late"). */
static int node_start_ex(node *n, const char *id, const patio_tcp_config *cfg, int listen_port, int extra,
                         size_t max_queue, int workers)
{
    patio_thread_pool_config pc;
    memset(n, 0, sizeof *n);
    n->id = id;
    n->rpc = patio_registry_new(NULL);
    patio_register(n->rpc, "mul", mul, NULL);
    patio_register(n->rpc, "div", div_, NULL);
    patio_register(n->rpc, "gated", gated, NULL);
    patio_register(n->rpc, "whoami", whoami, n);
    if (extra) patio_register(n->rpc, "late", mul, NULL);
    memset(&pc, 0, sizeof pc);
    pc.max_workers = workers;
    pc.max_queue = max_queue;
    n->ex = patio_thread_pool_new_ex(n->rpc, &pc);
    n->b = patio_tcp_broker_new(n->ex, cfg);
    if (!n->b) return -1;
    if (listen_port >= 0 && patio_tcp_listen(n->b, "127.0.0.1", listen_port, &n->port) != PATIO_OK) return -1;
    return 0;
}

static int node_start(node *n, const char *id, int listen)
{
    patio_tcp_config cfg = cfg_for(listen);
    return node_start_ex(n, id, &cfg, listen ? 0 : -1, 0, 0, 4);
}

static void node_free(node *n)
{
    patio_broker_free(n->b);
    patio_executor_free(n->ex);
    patio_registry_free(n->rpc);
    memset(n, 0, sizeof *n);
}

static patio_tcp_stats stats_of(patio_broker *b)
{
    patio_tcp_stats s;
    memset(&s, 0, sizeof s);
    patio_tcp_stats_get(b, &s);
    return s;
}

/* mul(a, b) through b with a 5 s timeout; the product, or -1000 - status. */
static int64_t call_mul(patio_broker *b, int x, int y)
{
    patio_call *c = patio_call_sync(b, 5.0, "mul", "ii", x, y);
    int64_t r = patio_call_status(c) == PATIO_OK ? patio_result_int(c) : -1000 + patio_call_status(c);
    patio_call_free(c);
    return r;
}

/* Waits for: one of b's counters (at offset `field` of patio_tcp_stats)
 * to reach `target`. */
typedef struct stat_wait {
    patio_broker *b;
    size_t field;
    uint64_t target;
} stat_wait;

static stat_wait stat_wait_at(patio_broker *b, size_t field, uint64_t target)
{
    stat_wait w;
    w.b = b;
    w.field = field;
    w.target = target;
    return w;
}

static int stat_reached(void *arg)
{
    stat_wait *w = (stat_wait *)arg;
    patio_tcp_stats st = stats_of(w->b);
    uint64_t v;
    memcpy(&v, (const char *)&st + w->field, sizeof v);
    return v >= w->target;
}

/* ---- raw sockets: a peer written from PROTOCOL.md ------------------------- */

static int raw_connect_to(const char *ip, int port)
{
    struct sockaddr_in sa;
    struct timeval tv;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, ip, &sa.sin_addr);
    tv.tv_sec = 3;
    tv.tv_usec = 0;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int raw_write(int fd, const void *p, size_t n)
{
    const uint8_t *b = (const uint8_t *)p;
    while (n) {
        ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
        if (w <= 0) return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

static int raw_send(int fd, int type, uint32_t serial, const void *payload, size_t n)
{
    uint8_t h[9];
    patio__frame_header_put(h, type, (uint32_t)n, serial);
    if (raw_write(fd, h, 9) != 0) return -1;
    return n ? raw_write(fd, payload, n) : 0;
}

/* Reads exactly n bytes: 1, 0 on end of stream, -1 on error or timeout. */
static int raw_read_exact(int fd, uint8_t *p, size_t n)
{
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r == 0) return 0;
        if (r < 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 1;
}

typedef struct raw_frame {
    int type;
    uint32_t serial;
    size_t size;
    uint8_t payload[4096];
} raw_frame;

static int raw_recv(int fd, raw_frame *f)
{
    uint8_t h[9];
    int rc = raw_read_exact(fd, h, 9);
    if (rc != 1) return rc;
    f->type = (int)(int8_t)h[0];
    f->size = (size_t)patio__get_be(h + 1, 4);
    f->serial = (uint32_t)patio__get_be(h + 5, 4);
    if (f->size > sizeof f->payload) return -1;
    return f->size ? raw_read_exact(fd, f->payload, f->size) : 1;
}

/* 1 if the peer closes fd within 3 s (frames before the end are skipped). */
static int raw_closed(int fd)
{
    uint8_t buf[4096];
    double end = now_s() + 3;
    while (now_s() < end) {
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r == 0) return 1;
        if (r < 0) return errno == ECONNRESET;
    }
    return 0;
}

static void salt8_of(uint8_t s8[8], const uint8_t *salt)
{
    memcpy(s8, salt, 4);
    memset(s8 + 4, 0, 4);
}

/* The 61-byte AUTH_REQUEST payload answering P (18 bytes) with key. */
static void make_auth_request(uint8_t out[61], const uint8_t *p, const char *key)
{
    static const uint8_t salt[4] = { 0xde, 0xad, 0xbe, 0xef };
    uint8_t s8[8];
    salt8_of(s8, salt);
    out[0] = 0x93;
    out[1] = 0xc4;
    out[2] = 4;
    memcpy(out + 3, salt, 4);
    out[7] = 0xc4;
    out[8] = 32;
    patio__blake2s(out + 9, 32, key, strlen(key), s8, NULL, p, 18);
    out[41] = 0xc4;
    out[42] = 18;
    memcpy(out + 43, p, 18);
}

/* Client handshake of a Python-like peer offering `names`; the server's
 * DISCOVER_RESPONSE lands in *names_out. 0 on success. */
static int raw_handshake(int fd, const char *key, const uint8_t *names, size_t names_len, raw_frame *names_out)
{
    static const uint8_t nil = 0xc0;
    static const uint8_t person[8] = { 'p', 'a', 't', 'i', 'o', '-', 'o', 'k' };
    raw_frame f;
    uint8_t areq[61], s8[8], proof[32];
    uint32_t their_disc;
    if (raw_recv(fd, &f) != 1 || f.type != 0 || f.serial != 1 || f.size != 18) return -1;
    make_auth_request(areq, f.payload, key);
    if (raw_send(fd, 1, 1, areq, 61) != 0) return -2;
    if (raw_recv(fd, &f) != 1 || f.type != 3 || f.serial != 2 || f.size != 34) return -3;
    salt8_of(s8, areq + 3);
    patio__blake2s(proof, 32, key, strlen(key), s8, person, areq, 61);
    if (memcmp(f.payload + 2, proof, 32) != 0) return -4;
    if (raw_recv(fd, &f) != 1 || f.type != 5 || f.serial != 3) return -5;
    their_disc = f.serial;
    if (raw_send(fd, 5, 2, &nil, 1) != 0) return -6;
    if (raw_send(fd, 6, their_disc, names, names_len) != 0) return -7;
    if (raw_recv(fd, names_out) != 1 || names_out->type != 6 || names_out->serial != 2) return -8;
    return 0;
}

static const uint8_t no_names[1] = { 0x90 };

/* A raw client through the handshake against n; -1 on failure. */
static int raw_ready_client(node *n)
{
    raw_frame f;
    int fd = raw_connect_to("127.0.0.1", n->port);
    if (fd < 0) return -1;
    if (raw_handshake(fd, KEY, no_names, 1, &f) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* ---- a host with two addresses ------------------------------------------ */

#ifdef TCP_TEST_FAKE_RESOLVER
/* "two-addresses.test" resolves to 127.0.0.1 at g_two_ports[0], then at
 * g_two_ports[1] (whatever port is asked for); other names as usual. */
static const char g_two_name[] = "two-addresses.test";
static int g_two_ports[2];

typedef struct two_addrs {
    struct addrinfo ai[2];
    struct sockaddr_in sa[2];
} two_addrs;

static int fake_getaddrinfo(const char *host, const char *service, const struct addrinfo *hints,
                            struct addrinfo **res)
{
    two_addrs *t;
    int i;
    if (!host || strcmp(host, g_two_name) != 0) return getaddrinfo(host, service, hints, res);
    t = (two_addrs *)calloc(1, sizeof *t);
    if (!t) return EAI_MEMORY;
    for (i = 0; i < 2; i++) {
        t->sa[i].sin_family = AF_INET;
        t->sa[i].sin_port = htons((uint16_t)g_two_ports[i]);
        t->sa[i].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        t->ai[i].ai_family = AF_INET;
        t->ai[i].ai_socktype = SOCK_STREAM;
        t->ai[i].ai_addr = (struct sockaddr *)&t->sa[i];
        t->ai[i].ai_addrlen = sizeof t->sa[i];
        t->ai[i].ai_canonname = (char *)(uintptr_t)g_two_name; /* marks it as ours */
        t->ai[i].ai_next = i == 0 ? &t->ai[1] : NULL;
    }
    *res = t->ai;
    return 0;
}

static void fake_freeaddrinfo(struct addrinfo *ai)
{
    if (ai && ai->ai_canonname == g_two_name) free(ai); /* ai is the start of its two_addrs */
    else freeaddrinfo(ai);
}
#endif

/* ---- cases ---------------------------------------------------------------- */

static void test_client_calls_server(void)
{
    node s, c;
    patio_call *call;
    CHECK(node_start(&s, "server", 1) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    CHECK(patio_tcp_listen_port(s.b) == s.port);
    CHECK_EQ_INT(patio_tcp_listen_port(c.b), -1);
    CHECK_EQ_INT(patio_tcp_connect(c.b, "127.0.0.1", s.port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    call = patio_call_sync(c.b, 5.0, "mul", "iii", 1, 2, 3);
    CHECK_EQ_INT(patio_call_status(call), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(call), 6);
    patio_call_free(call);
    CHECK_EQ_INT(stats_of(c.b).calls_sent, 1);
    CHECK_EQ_INT(stats_of(s.b).calls_served, 1);
    CHECK_EQ_INT(stats_of(s.b).connections_accepted, 1);
    CHECK_EQ_INT(stats_of(s.b).connections_open, 1);
    CHECK(stats_of(c.b).bytes_out > 0 && stats_of(c.b).bytes_in > 0);
    node_free(&c);
    node_free(&s);
}

static void test_server_calls_client(void)
{
    node s, c;
    CHECK(node_start(&s, "server", 1) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, "127.0.0.1", s.port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(s.b, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(call_mul(s.b, 6, 7), 42);
    {
        patio_call *call = patio_call_sync(s.b, 5.0, "whoami", "");
        CHECK_EQ_STR(patio_call_error_type(call), "");
        patio_call_free(call);
    }
    CHECK_EQ_INT(__atomic_load_n(&c.hits, __ATOMIC_SEQ_CST), 1);
    CHECK_EQ_INT(__atomic_load_n(&s.hits, __ATOMIC_SEQ_CST), 0);
    node_free(&c);
    node_free(&s);
}

/* b listens and connects: a is its client, it is c's client. */
static void test_mixed_mode(void)
{
    node a, b, c;
    int i;
    CHECK(node_start(&a, "a", 0) == 0);
    CHECK(node_start(&b, "b", 1) == 0);
    CHECK(node_start(&c, "c", 1) == 0);
    CHECK_EQ_INT(patio_tcp_connect(a.b, "127.0.0.1", b.port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_connect(b.b, "127.0.0.1", c.port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(b.b, 2, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(a.b, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    for (i = 0; i < 4; i++) {
        patio_call *call = patio_call_sync(b.b, 5.0, "whoami", "");
        CHECK_EQ_INT(patio_call_status(call), PATIO_OK);
        patio_call_free(call);
    }
    CHECK_EQ_INT(__atomic_load_n(&a.hits, __ATOMIC_SEQ_CST), 2);
    CHECK_EQ_INT(__atomic_load_n(&c.hits, __ATOMIC_SEQ_CST), 2);
    CHECK_EQ_INT(call_mul(a.b, 2, 3), 6);
    CHECK_EQ_INT(call_mul(c.b, 3, 3), 9);
    node_free(&a);
    node_free(&b);
    node_free(&c);
}

static void test_mesh_round_robin(void)
{
    node n[3];
    int i, j;
    char prev[16] = "";
    for (i = 0; i < 3; i++) CHECK(node_start(&n[i], i == 0 ? "n0" : i == 1 ? "n1" : "n2", 1) == 0);
    for (i = 0; i < 3; i++)
        for (j = i + 1; j < 3; j++) CHECK_EQ_INT(patio_tcp_connect(n[i].b, "127.0.0.1", n[j].port), PATIO_OK);
    for (i = 0; i < 3; i++) CHECK_EQ_INT(patio_tcp_wait_peers(n[i].b, 2, 5.0), PATIO_OK);
    for (i = 0; i < 20; i++) {
        patio_call *call = patio_call_sync(n[0].b, 5.0, "whoami", "");
        const char *s = NULL;
        size_t len = 0;
        patio_reader r;
        CHECK_EQ_INT(patio_call_status(call), PATIO_OK);
        if (patio_call_reader(call, &r) == PATIO_OK && patio_read_str(&r, &s, &len) == PATIO_OK && len < sizeof prev) {
            CHECK(len != strlen(prev) || memcmp(prev, s, len) != 0); /* never the same peer twice in a row */
            memcpy(prev, s, len);
            prev[len] = 0;
        }
        patio_call_free(call);
    }
    CHECK_EQ_INT(__atomic_load_n(&n[0].hits, __ATOMIC_SEQ_CST), 0);
    CHECK_EQ_INT(__atomic_load_n(&n[1].hits, __ATOMIC_SEQ_CST), 10);
    CHECK_EQ_INT(__atomic_load_n(&n[2].hits, __ATOMIC_SEQ_CST), 10);
    for (i = 0; i < 3; i++) node_free(&n[i]);
}

static void test_remote_error(void)
{
    node s, c;
    patio_call *call;
    CHECK(node_start(&s, "server", 1) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    call = patio_call_sync(c.b, 5.0, "div", "ii", 1, 0);
    CHECK_EQ_INT(patio_call_status(call), PATIO_ERR_REMOTE);
    CHECK_EQ_STR(patio_call_error_type(call), "ZeroDivisionError");
    CHECK_EQ_STR(patio_call_error_message(call), "division by zero");
    patio_call_free(call);
    call = patio_call_sync(c.b, 5.0, "div", "i", 1);
    CHECK_EQ_STR(patio_call_error_type(call), "TypeError");
    patio_call_free(call);
    CHECK_EQ_INT(stats_of(c.b).call_errors, 2);
    node_free(&c);
    node_free(&s);
}

static void test_timeout(void)
{
    node s, c;
    patio_call *call;
    double t0;
    gate_init(&g_gate);
    CHECK(node_start(&s, "server", 1) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    t0 = now_s();
    call = patio_call_sync(c.b, 0.1, "gated", "");
    CHECK_EQ_INT(patio_call_status(call), PATIO_ERR_TIMEOUT);
    CHECK_EQ_STR(patio_call_error_type(call), "TimeoutError");
    CHECK(now_s() - t0 < 2.0);
    patio_call_free(call);
    CHECK(gate_wait_arrived(&g_gate, 1));
    /* the late answer (the callee's own TimeoutError, then nothing when the
     * task ends) is dropped; the connection stays up */
    gate_open(&g_gate);
    CHECK_EQ_INT(call_mul(c.b, 3, 5), 15);
    CHECK_EQ_INT(stats_of(c.b).protocol_errors, 0);
    CHECK_EQ_INT(stats_of(s.b).protocol_errors, 0);
    CHECK(stats_of(c.b).timeouts >= 1);
    CHECK_EQ_INT(stats_of(c.b).connections_open, 1);
    node_free(&c);
    node_free(&s);
    gate_destroy(&g_gate);
}

static int raw_listen(int *port);
static int raw_accept(int lfd);

/* Server side of the handshake, as a Python server does it (AUTH_OK nil),
 * offering the names in `names` (msgpack array). 0 on success. */
static int raw_server_handshake(int fd, const uint8_t *names, size_t names_len)
{
    raw_frame f;
    uint8_t p[18];
    int i, answered = 0, got = 0;
    p[0] = 0xc4;
    p[1] = 16;
    memset(p + 2, 0x22, 16);
    if (raw_send(fd, 0, 1, p, 18) != 0) return -1;
    if (raw_recv(fd, &f) != 1 || f.type != 1) return -2;
    if (raw_send(fd, 3, 2, "\xc0", 1) != 0 || raw_send(fd, 5, 3, "\xc0", 1) != 0) return -3;
    for (i = 0; i < 2; i++) {
        if (raw_recv(fd, &f) != 1) return -4;
        if (f.type == 5 && raw_send(fd, 6, f.serial, names, names_len) == 0) answered = 1;
        if (f.type == 6 && f.serial == 3) got = 1;
    }
    return answered && got ? 0 : -5;
}

/* A caller's abandoned serial stays reserved until its late answer comes:
 * a raw server holds the answer back. */
static void test_timeout_serial_reserved(void)
{
    static const uint8_t names[] = { 0x91, 0xa4, 's', 'l', 'o', 'w' };
    patio_tcp_config cfg = cfg_for(0);
    node c;
    raw_frame f;
    patio_call *call;
    uint32_t late;
    int lfd, fd, port = 0;
    if (!g_setup->raw) return;
    lfd = raw_listen(&port);
    CHECK(lfd >= 0);
    CHECK(node_start_ex(&c, "client", &cfg, -1, 0, 0, 1) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", port);
    fd = raw_accept(lfd);
    CHECK_EQ_INT(raw_server_handshake(fd, names, sizeof names), 0);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    call = patio_call_sync(c.b, 0.1, "slow", "");
    CHECK_EQ_INT(patio_call_status(call), PATIO_ERR_TIMEOUT);
    patio_call_free(call);
    CHECK_EQ_INT(raw_recv(fd, &f), 1);
    CHECK_EQ_INT(f.type, 10);
    late = f.serial;
    CHECK_EQ_INT(patio__tcp_test_serial(c.b, 0), late);
    patio__tcp_test_serial(c.b, late - 1); /* the next serial would be `late` */
    call = patio_call_async(c.b, "slow", "");
    CHECK_EQ_INT(raw_recv(fd, &f), 1);
    CHECK_EQ_INT(f.type, 10);
    CHECK_EQ_INT(f.serial, late + 1);
    raw_send(fd, 20, late, "\x01", 1);     /* the late answer: dropped */
    raw_send(fd, 20, late + 1, "\x02", 1);
    CHECK_EQ_INT(patio_call_wait(call, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(call), 2);
    patio_call_free(call);
    CHECK_EQ_INT(stats_of(c.b).protocol_errors, 0);
    /* now `late` is free again; a stray answer for it is a protocol error */
    raw_send(fd, 20, late, "\x01", 1);
    CHECK(raw_closed(fd));
    CHECK_EQ_INT(stats_of(c.b).protocol_errors, 1);
    close(fd);
    close(lfd);
    node_free(&c);
}

/* The callee applies the caller's timeout too. */
static void test_callee_timeout(void)
{
    node s;
    int fd;
    raw_frame f;
    patio_writer w;
    uint8_t buf[128];
    gate_init(&g_gate);
    if (!g_setup->raw) return;
    CHECK(node_start(&s, "server", 1) == 0);
    fd = raw_ready_client(&s);
    CHECK(fd >= 0);
    patio_writer_init_fixed(&w, buf, sizeof buf);
    patio__write_call_request(&w, "gated", 5, NULL, 0, NULL, 0, 1, 0.05);
    CHECK_EQ_INT(raw_send(fd, 10, 7, w.data, w.len), 0);
    CHECK_EQ_INT(raw_recv(fd, &f), 1);
    CHECK_EQ_INT(f.type, 30);
    CHECK_EQ_INT(f.serial, 7);
    {
        static const char want[] = "c7 0f 02 92 ac 54696d656f75744572726f72 a0";
        uint8_t wb[32];
        size_t wl = th_hex(want, wb, sizeof wb);
        CHECK_EQ_MEM(f.payload, f.size, wb, wl);
    }
    /* timeout 0: answered at once, nothing runs */
    patio_writer_reset(&w);
    patio__write_call_request(&w, "mul", 3, NULL, 0, NULL, 0, 1, 0.0);
    CHECK_EQ_INT(raw_send(fd, 10, 8, w.data, w.len), 0);
    CHECK_EQ_INT(raw_recv(fd, &f), 1);
    CHECK(f.type == 30 && f.serial == 8);
    /* unknown name: KeyError(name) */
    patio_writer_reset(&w);
    patio__write_call_request(&w, "nosuch", 6, NULL, 0, NULL, 0, 0, 0);
    CHECK_EQ_INT(raw_send(fd, 10, 9, w.data, w.len), 0);
    CHECK_EQ_INT(raw_recv(fd, &f), 1);
    {
        static const char want[] = "c7 11 02 92 a8 4b65794572726f72 a6 6e6f73756368";
        uint8_t wb[32];
        size_t wl = th_hex(want, wb, sizeof wb);
        CHECK_EQ_MEM(f.payload, f.size, wb, wl);
    }
    gate_open(&g_gate);
    close(fd);
    node_free(&s);
    gate_destroy(&g_gate);
}

/* The callee watches the caller's timeouts: requests that share one are
 * watched together in arrival order, the rest (more distinct timeouts than
 * the broker keeps groups for) one by one. Each gating request must get
 * TimeoutError at its own deadline and not before, also when the group's
 * oldest request (a mul sent just before it) was answered first. */
static void test_callee_timeout_groups(void)
{
    static const double timeouts[] = {0.08, 0.12, 0.16, 0.2, 0.24, 0.28, 1.0};
    enum { N = (int)(sizeof timeouts / sizeof timeouts[0]) };
    static const uint8_t args[] = {0x92, 0x06, 0x07};
    patio_tcp_config cfg = cfg_for(1);
    node s;
    int fd, i, products = 0, timed_out = 0;
    raw_frame f;
    patio_writer w;
    double sent;
    gate_init(&g_gate);
    if (!g_setup->raw) return;
    CHECK(node_start_ex(&s, "server", &cfg, 0, 0, 0, 2 * N) == 0);
    fd = raw_ready_client(&s);
    CHECK(fd >= 0);
    patio_writer_init(&w, NULL);
    for (i = 0; i < N; i++) {
        size_t mark = patio__frame_begin(&w);
        patio__write_call_request(&w, "mul", 3, args, sizeof args, NULL, 0, 1, timeouts[i]);
        patio__frame_end(&w, mark, PATIO__PKT_REQUEST, 100u + 2u * (uint32_t)i, UINT32_MAX);
        mark = patio__frame_begin(&w);
        patio__write_call_request(&w, "gated", 5, NULL, 0, NULL, 0, 1, timeouts[i]);
        patio__frame_end(&w, mark, PATIO__PKT_REQUEST, 101u + 2u * (uint32_t)i, UINT32_MAX);
    }
    sent = now_s();
    CHECK_EQ_INT(raw_write(fd, w.data, w.len), 0);
    for (i = 0; i < 2 * N && raw_recv(fd, &f) == 1; i++) {
        int k = (int)(f.serial - 100u) / 2;
        double waited = now_s() - sent;
        CHECK(f.serial >= 100u && k < N);
        if (!(f.serial >= 100u && k < N)) break;
        if (f.serial % 2 == 0) {
            CHECK_EQ_INT(f.type, PATIO__PKT_RESPONSE);
            CHECK(f.size == 1 && f.payload[0] == 42);
            products++;
        } else {
            CHECK_EQ_INT(f.type, PATIO__PKT_ERROR);
            CHECK(f.size > 14 && memcmp(f.payload + 5, "TimeoutError", 12) == 0);
            CHECK(waited >= timeouts[k]);
            CHECK(waited < timeouts[k] + 5.0);
            timed_out++;
        }
    }
    CHECK_EQ_INT(products, N);
    CHECK_EQ_INT(timed_out, N);
    CHECK_EQ_INT((int)stats_of(s.b).timeouts, N);
    gate_open(&g_gate);
    patio_writer_free(&w);
    close(fd);
    node_free(&s);
    gate_destroy(&g_gate);
}

static void test_no_route(void)
{
    node s, c;
    patio_call_opts o;
    patio_call *nosuch, *ok;
    CHECK(node_start(&s, "server", 1) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    memset(&o, 0, sizeof o);
    o.timeout = 0.3;
    nosuch = patio_call_start(c.b, &o, "nosuch", "i", 1);
    ok = patio_call_sync(c.b, 5.0, "mul", "ii", 4, 4);
    CHECK_EQ_INT(patio_result_int(ok), 16);
    CHECK_EQ_INT(patio_call_status(nosuch), PATIO_PENDING); /* still waiting for a route */
    CHECK_EQ_INT(patio_call_wait(nosuch, 5.0), PATIO_ERR_TIMEOUT);
    CHECK_EQ_INT(patio_call_status(nosuch), PATIO_ERR_TIMEOUT);
    patio_call_free(nosuch);
    patio_call_free(ok);
    node_free(&c);
    node_free(&s);
}

static void test_route_later(void)
{
    node s, c, later;
    patio_tcp_config cfg = cfg_for(1);
    patio_call_opts o;
    patio_call *call;
    CHECK(node_start(&s, "server", 1) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    memset(&o, 0, sizeof o);
    o.timeout = 5.0;
    call = patio_call_start(c.b, &o, "late", "ii", 3, 4);
    CHECK(node_start_ex(&later, "later", &cfg, 0, 1, 0, 2) == 0);
    CHECK_EQ_INT(patio_call_status(call), PATIO_PENDING);
    patio_tcp_connect(c.b, "127.0.0.1", later.port);
    CHECK_EQ_INT(patio_call_wait(call, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(call), 12);
    patio_call_free(call);
    node_free(&c);
    node_free(&later);
    node_free(&s);
}

static void test_serial_wrap(void)
{
    node s, c;
    patio_call *held;
    uint32_t held_serial;
    int i;
    gate_init(&g_gate);
    CHECK(node_start(&s, "server", 1) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    held = patio_call_async(c.b, "gated", "");
    CHECK(gate_wait_arrived(&g_gate, 1));
    held_serial = patio__tcp_test_serial(c.b, 0);
    CHECK(held_serial >= 1 && held_serial < 100);
    patio__tcp_test_serial(c.b, 0xfffffffdu);
    CHECK_EQ_INT(call_mul(c.b, 1, 2), 2);
    CHECK_EQ_INT(patio__tcp_test_serial(c.b, 0), 0xfffffffeu);
    for (i = 1; i < (int)held_serial + 1; i++) CHECK_EQ_INT(call_mul(c.b, i, 2), 2 * i);
    /* 1 .. held_serial - 1, then held_serial is skipped */
    CHECK_EQ_INT(patio__tcp_test_serial(c.b, 0), held_serial + 1);
    gate_open(&g_gate);
    CHECK_EQ_INT(patio_call_wait(held, 5.0), PATIO_OK);
    patio_call_free(held);
    CHECK_EQ_INT(stats_of(s.b).protocol_errors, 0);
    node_free(&c);
    node_free(&s);
    gate_destroy(&g_gate);
}

/* A Python-like client: exact handshake frames and the names in order. */
static void test_discover_contents(void)
{
    node s;
    raw_frame f;
    uint8_t want[64], req[64];
    size_t wl;
    patio_writer w;
    int fd;
    static const uint8_t client_names[] = { 0x91, 0xa3, 'a', 'd', 'd' };
    if (!g_setup->raw) return;
    CHECK(node_start(&s, "server", 1) == 0);
    fd = raw_connect_to("127.0.0.1", s.port);
    CHECK(fd >= 0);
    CHECK_EQ_INT(raw_handshake(fd, KEY, client_names, sizeof client_names, &f), 0);
    wl = th_hex("94 a36d756c a3646976 a56761746564 a677686f616d69", want, sizeof want);
    CHECK_EQ_MEM(f.payload, f.size, want, wl);
    /* then a call, as Python sends it (frame #08 of §10) */
    wl = th_hex("c7 0b 01 94 a36d756c 93010203 80 c0", req, sizeof req);
    CHECK_EQ_INT(raw_send(fd, 10, 3, req, wl), 0);
    CHECK_EQ_INT(raw_recv(fd, &f), 1);
    CHECK(f.type == 20 && f.serial == 3 && f.size == 1 && f.payload[0] == 6);
    /* a later DISCOVER_REQUEST is answered with the names again */
    CHECK_EQ_INT(raw_send(fd, 5, 4, "\xc0", 1), 0);
    CHECK_EQ_INT(raw_recv(fd, &f), 1);
    CHECK(f.type == 6 && f.serial == 4);
    wl = th_hex("94 a36d756c a3646976 a56761746564 a677686f616d69", want, sizeof want);
    CHECK_EQ_MEM(f.payload, f.size, want, wl);
    /* the server may call the raw client: it offered "add" */
    {
        patio_call *call = patio_call_async(s.b, "add", "ii", 1, 2);
        CHECK_EQ_INT(raw_recv(fd, &f), 1);
        CHECK_EQ_INT(f.type, 10);
        patio_writer_init_fixed(&w, req, sizeof req);
        patio__write_call_request(&w, "add", 3, "\x92\x01\x02", 3, NULL, 0, 1, PATIO_DEFAULT_TIMEOUT);
        CHECK_EQ_MEM(f.payload, f.size, w.data, w.len);
        CHECK(f.serial != 0);
        CHECK_EQ_INT(raw_send(fd, 20, f.serial, "\x03", 1), 0);
        CHECK_EQ_INT(patio_call_wait(call, 5.0), PATIO_OK);
        CHECK_EQ_INT(patio_result_int(call), 3);
        patio_call_free(call);
    }
    close(fd);
    node_free(&s);
}

static int has_reconnected(void *arg)
{
    return stats_of((patio_broker *)arg).reconnects >= 1;
}

static void test_reconnect(void)
{
    node s, c;
    patio_tcp_config cfg = cfg_for(1);
    int port;
    CHECK(node_start(&s, "server", 1) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    port = s.port;
    patio_tcp_connect(c.b, "127.0.0.1", port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(call_mul(c.b, 2, 2), 4);
    node_free(&s);
    CHECK(wait_until(has_reconnected, c.b, 5.0));
    CHECK(node_start_ex(&s, "server2", &cfg, port, 0, 0, 2) == 0);
    CHECK_EQ_INT(s.port, port);
    CHECK_EQ_INT(patio_tcp_wait_peers(s.b, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(call_mul(c.b, 3, 2), 6);
    CHECK(stats_of(c.b).reconnects >= 1);
    node_free(&c);
    node_free(&s);
}

#if defined(__linux__) && defined(TCP_TEST_FAKE_RESOLVER)
/* A listener that takes no connection: its backlog (of one, on Linux) is
 * full, so the kernel drops further SYNs and a connect to it hangs.
 * *filler holds the backlog's place; -1 on failure. */
static int silent_listener(int *port, int *filler)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 0) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
        if (fd >= 0) close(fd);
        return -1;
    }
    *port = ntohs(sa.sin_port);
    *filler = raw_connect_to("127.0.0.1", *port);
    return fd;
}

/* A host's first address drops SYNs, its second one serves: once the
 * handshake deadline ends the hanging connect, the client moves on to the
 * second address instead of trying the first one again and again. */
static void test_connect_moves_past_hanging_address(void)
{
    node s, c;
    patio_tcp_config cfg = cfg_for(0);
    int hole, filler = -1;
    if (!g_setup->raw) return;
    CHECK(node_start(&s, "server", 1) == 0);
    hole = silent_listener(&g_two_ports[0], &filler);
    CHECK(hole >= 0 && filler >= 0);
    g_two_ports[1] = s.port;
    cfg.handshake_timeout = 0.3;
    CHECK(node_start_ex(&c, "client", &cfg, -1, 0, 0, 1) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, g_two_name, 1), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(call_mul(c.b, 3, 4), 12);
    node_free(&c);
    node_free(&s);
    if (filler >= 0) close(filler);
    if (hole >= 0) close(hole);
}
#endif

static void test_peer_lost_mid_call(void)
{
    node s, c;
    patio_call *call;
    double t0;
    gate_init(&g_gate);
    CHECK(node_start(&s, "server", 1) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    call = patio_call_async(c.b, "gated", "");
    CHECK(gate_wait_arrived(&g_gate, 1));
    t0 = now_s();
    patio_broker_close(s.b); /* closes its connections; the task still runs */
    CHECK_EQ_INT(patio_call_wait(call, 2.0), PATIO_ERR_CONNECTION_LOST);
    CHECK(now_s() - t0 < 0.1);
    CHECK_EQ_STR(patio_call_error_type(call), "ConnectionError");
    patio_call_free(call);
    gate_open(&g_gate);
    node_free(&c);
    node_free(&s);
    gate_destroy(&g_gate);
}

static int g_lost_calls; /* atomic */

static void count_lost(patio_call *call, void *user)
{
    (void)user;
    if (patio_call_status(call) == PATIO_ERR_CONNECTION_LOST) __atomic_fetch_add(&g_lost_calls, 1, __ATOMIC_SEQ_CST);
}

static int lost_count_reached(void *arg)
{
    return __atomic_load_n(&g_lost_calls, __ATOMIC_SEQ_CST) >= *(const int *)arg;
}

typedef struct sent_wait {
    patio_broker *b;
    uint64_t calls;
} sent_wait;

static int all_sent(void *arg)
{
    sent_wait *w = (sent_wait *)arg;
    return stats_of(w->b).calls_sent >= w->calls;
}

/* Calls started on the client's loop thread, each from the completion of
 * the one before (the way an event-driven caller keeps a window full):
 * they take the loop thread's short path, and every one comes back right.
 * The server runs them on its async executor, so their tasks finish on its
 * loop thread too. A call there for a name nobody offers still times out. */
typedef struct chain {
    patio_broker *b;
    int window, total;
    int started, ok, bad, off_loop; /* the client's loop thread only */
    int lost_status;                /* the call for a name nobody offers */
    int done;                       /* atomic */
} chain;

static void chain_start(chain *ch);

static void chain_done(patio_call *c, void *user)
{
    chain *ch = (chain *)user;
    if (!patio_loop_in_loop_thread(patio_broker_loop(ch->b))) ch->off_loop++;
    if (patio_call_status(c) == PATIO_OK && patio_result_int(c) == 6) ch->ok++;
    else ch->bad++;
    patio_call_free(c);
    if (ch->started < ch->total) chain_start(ch);
    else if (ch->ok + ch->bad == ch->total && ch->lost_status) __atomic_store_n(&ch->done, 1, __ATOMIC_SEQ_CST);
}

static void chain_start(chain *ch)
{
    patio_call_opts o;
    memset(&o, 0, sizeof o);
    o.timeout = 10;
    o.on_done = chain_done;
    o.user = ch;
    ch->started++;
    patio_call_start(ch->b, &o, "mul", "iii", 1, 2, 3);
}

static void chain_lost_done(patio_call *c, void *user)
{
    chain *ch = (chain *)user;
    ch->lost_status = patio_call_status(c);
    patio_call_free(c);
    if (ch->ok + ch->bad == ch->total) __atomic_store_n(&ch->done, 1, __ATOMIC_SEQ_CST);
}

static void chain_kick(void *arg)
{
    chain *ch = (chain *)arg;
    patio_call_opts o;
    int i;
    memset(&o, 0, sizeof o);
    o.timeout = 0.2;
    o.on_done = chain_lost_done;
    o.user = ch;
    patio_call_start(ch->b, &o, "nowhere", "");
    for (i = 0; i < ch->window; i++) chain_start(ch);
}

static int chain_finished(void *arg)
{
    return __atomic_load_n(&((chain *)arg)->done, __ATOMIC_SEQ_CST) != 0;
}

static void test_calls_chained_on_loop_thread(void)
{
    patio_tcp_config scfg = cfg_for(1), ccfg = cfg_for(0);
    patio_registry *rpc = patio_registry_new(NULL);
    patio_executor *ex;
    patio_broker *server;
    node c;
    chain ch;
    int port = 0;
    patio_register(rpc, "mul", mul, NULL);
    ex = patio_async_executor_new(rpc, 8);
    server = patio_tcp_broker_new(ex, &scfg);
    CHECK(server != NULL);
    if (!server) return;
    CHECK_EQ_INT(patio_tcp_listen(server, "127.0.0.1", 0, &port), PATIO_OK);
    CHECK(node_start_ex(&c, "client", &ccfg, -1, 0, 0, 1) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, "127.0.0.1", port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    memset(&ch, 0, sizeof ch);
    ch.b = c.b;
    ch.window = 32;
    ch.total = 3000;
    CHECK_EQ_INT(patio_loop_post(patio_broker_loop(c.b), chain_kick, &ch), PATIO_OK);
    CHECK(wait_until(chain_finished, &ch, 20.0));
    if (chain_finished(&ch)) {
        CHECK_EQ_INT(ch.ok, ch.total);
        CHECK_EQ_INT(ch.bad, 0);
        CHECK_EQ_INT(ch.off_loop, 0);
        CHECK_EQ_INT(ch.lost_status, PATIO_ERR_TIMEOUT);
        CHECK(stats_of(c.b).calls_sent >= (uint64_t)ch.total);
        CHECK(stats_of(server).calls_served >= (uint64_t)ch.total);
    }
    node_free(&c); /* after the wait: the callbacks use ch */
    patio_broker_free(server);
    patio_executor_free(ex);
    patio_registry_free(rpc);
}

/* Thousands of calls wait on one connection when the peer goes: each one
 * fails with a lost connection, once, and its completion (run while the
 * broker fails the rest) sees a consistent broker. */
static void test_peer_lost_with_many_calls(void)
{
    enum { N = 5000 };
    static const uint8_t names[] = { 0x91, 0xa4, 's', 'i', 'n', 'k' };
    node s;
    raw_frame f;
    patio_call **calls;
    patio_call_opts o;
    sent_wait sent;
    int fd, i;
    if (!g_setup->raw) return;
    CHECK(node_start(&s, "server", 1) == 0);
    fd = raw_connect_to("127.0.0.1", s.port);
    CHECK(fd >= 0 && raw_handshake(fd, KEY, names, sizeof names, &f) == 0);
    CHECK_EQ_INT(patio_tcp_wait_peers(s.b, 1, 5.0), PATIO_OK);
    __atomic_store_n(&g_lost_calls, 0, __ATOMIC_SEQ_CST);
    calls = (patio_call **)calloc(N, sizeof *calls);
    memset(&o, 0, sizeof o);
    o.timeout = 30;
    o.on_done = count_lost;
    for (i = 0; i < N; i++) calls[i] = patio_call_start(s.b, &o, "sink", "i", i);
    sent.b = s.b;
    sent.calls = N;
    CHECK(wait_until(all_sent, &sent, 10.0));
    close(fd); /* their REQUESTs unread: a reset */
    CHECK_EQ_INT(patio_wait_all(calls, N, 10.0), PATIO_OK);
    for (i = 0; i < N; i++) {
        CHECK_EQ_INT(patio_call_status(calls[i]), PATIO_ERR_CONNECTION_LOST);
        patio_call_free(calls[i]);
    }
    /* the callbacks run on the loop thread after the calls are done */
    i = N;
    CHECK(wait_until(lost_count_reached, &i, 10.0));
    CHECK_EQ_INT(__atomic_load_n(&g_lost_calls, __ATOMIC_SEQ_CST), N);
    CHECK_EQ_INT(stats_of(s.b).call_errors, N);
    free(calls);
    fd = raw_ready_client(&s); /* the broker goes on */
    CHECK(fd >= 0);
    CHECK_EQ_INT(stats_of(s.b).connections_open, 1);
    close(fd);
    node_free(&s);
}

/* An inflight limit of 2: the third request is not read until one ends. */
static void test_inflight_limit(void)
{
    node s, c;
    patio_tcp_config cfg = cfg_for(1);
    patio_call *calls[4];
    int i;
    gate_init(&g_gate);
    cfg.max_inflight = 2;
    CHECK(node_start_ex(&s, "server", &cfg, 0, 0, 0, 4) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    for (i = 0; i < 4; i++) calls[i] = patio_call_async(c.b, "gated", "");
    CHECK(gate_wait_arrived(&g_gate, 2));
    CHECK_EQ_INT(stats_of(s.b).calls_served, 0);
    gate_open(&g_gate);
    CHECK_EQ_INT(patio_wait_all(calls, 4, 5.0), PATIO_OK);
    for (i = 0; i < 4; i++) {
        CHECK_EQ_INT(patio_call_status(calls[i]), PATIO_OK);
        patio_call_free(calls[i]);
    }
    CHECK_EQ_INT(__atomic_load_n(&g_gate.arrived, __ATOMIC_SEQ_CST), 4);
    node_free(&c);
    node_free(&s);
    gate_destroy(&g_gate);
}

static int gate_arrivals(void)
{
    int n;
    pthread_mutex_lock(&g_gate.mu);
    n = g_gate.arrived;
    pthread_mutex_unlock(&g_gate.mu);
    return n;
}

/* A limit on the bytes of received requests: with their tasks held at a
 * gate, the server reads requests until their payloads reach
 * max_inflight_bytes and then no more; the bytes come back as the requests
 * are answered (a second round goes the same way), and a request larger
 * than the whole limit is still served on its own. */
static void test_inflight_bytes_limit(void)
{
    enum { N = 8, BLOB = 10000 };
    patio_tcp_config cfg = cfg_for(1);
    node s, c;
    patio_call *calls[N], *big;
    uint8_t *blob = (uint8_t *)calloc(1, 4 * BLOB);
    stat_wait pauses;
    int round, i;
    CHECK(blob != NULL);
    if (!blob) return;
    cfg.max_inflight_bytes = 2 * BLOB + BLOB / 2; /* reached by the third request */
    CHECK(node_start_ex(&s, "server", &cfg, 0, 0, 0, N) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    for (round = 0; round < 2; round++) {
        gate_init(&g_gate);
        pauses = stat_wait_at(s.b, offsetof(patio_tcp_stats, read_pauses), stats_of(s.b).read_pauses + 1);
        for (i = 0; i < N; i++) calls[i] = patio_call_async(c.b, "gated", "y", blob, (size_t)BLOB);
        CHECK(gate_wait_arrived(&g_gate, 3));
        CHECK(wait_until(stat_reached, &pauses, 5.0));
        CHECK_EQ_INT(gate_arrivals(), 3); /* workers to spare: a fourth would have run */
        gate_open(&g_gate);
        CHECK_EQ_INT(patio_wait_all(calls, N, 10.0), PATIO_OK);
        for (i = 0; i < N; i++) {
            CHECK_EQ_INT(patio_call_status(calls[i]), PATIO_OK);
            patio_call_free(calls[i]);
        }
        CHECK_EQ_INT(gate_arrivals(), N);
        gate_destroy(&g_gate);
    }
    gate_init(&g_gate);
    gate_open(&g_gate);
    big = patio_call_sync(c.b, 5.0, "gated", "y", blob, (size_t)(4 * BLOB));
    CHECK_EQ_INT(patio_call_status(big), PATIO_OK);
    patio_call_free(big);
    gate_destroy(&g_gate);
    node_free(&c);
    node_free(&s);
    free(blob);
}

/* At its inflight limit the server reads no more from a peer; when that
 * peer then resets the connection, the server's call waiting on it fails
 * at once, not when a slot frees. */
static void test_paused_connection_notices_reset(void)
{
    static const uint8_t names[] = { 0x91, 0xa4, 's', 'i', 'n', 'k' };
    static const uint8_t req[] = { 0xc7, 0x0a, 0x01, 0x94, 0xa5, 'g', 'a', 't', 'e', 'd', 0x90, 0x80, 0xc0 };
    patio_tcp_config cfg = cfg_for(1);
    struct linger lg;
    node s;
    raw_frame f;
    patio_call *call;
    int fd;
    if (!g_setup->raw) return;
    gate_init(&g_gate);
    cfg.max_inflight = 2;
    CHECK(node_start_ex(&s, "server", &cfg, 0, 0, 0, 4) == 0);
    fd = raw_connect_to("127.0.0.1", s.port);
    CHECK(fd >= 0 && raw_handshake(fd, KEY, names, sizeof names, &f) == 0);
    CHECK_EQ_INT(patio_tcp_wait_peers(s.b, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(raw_send(fd, 10, 101, req, sizeof req), 0);
    CHECK_EQ_INT(raw_send(fd, 10, 102, req, sizeof req), 0);
    CHECK(gate_wait_arrived(&g_gate, 2)); /* both run: the server reads no more */
    call = patio_call_async(s.b, "sink", "i", 1);
    CHECK_EQ_INT(raw_recv(fd, &f), 1);
    CHECK_EQ_INT(f.type, PATIO__PKT_REQUEST);
    lg.l_onoff = 1;
    lg.l_linger = 0;
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd); /* a reset */
    CHECK_EQ_INT(patio_call_wait(call, 5.0), PATIO_ERR_CONNECTION_LOST);
    gate_open(&g_gate);
    patio_call_free(call);
    node_free(&s);
    gate_destroy(&g_gate);
}

/* An executor with one worker and a queue of one: requests beyond wait in
 * the socket until the executor has room, and all of them complete. */
static void test_executor_full(void)
{
    node s, c;
    patio_tcp_config cfg = cfg_for(1);
    patio_call *calls[6];
    int i;
    gate_init(&g_gate);
    CHECK(node_start_ex(&s, "server", &cfg, 0, 0, 1, 1) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    for (i = 0; i < 6; i++) calls[i] = patio_call_async(c.b, "gated", "");
    CHECK(gate_wait_arrived(&g_gate, 1));
    gate_open(&g_gate);
    CHECK_EQ_INT(patio_wait_all(calls, 6, 5.0), PATIO_OK);
    for (i = 0; i < 6; i++) {
        CHECK_EQ_INT(patio_call_status(calls[i]), PATIO_OK);
        patio_call_free(calls[i]);
    }
    node_free(&c);
    node_free(&s);
    gate_destroy(&g_gate);
}

static void *executor_shutdown_thread(void *arg)
{
    patio_executor_shutdown((patio_executor *)arg);
    return NULL;
}

/* Whether f answers a request for `gated`: a RESPONSE "late", or an ERROR
 * holding an exception. */
static int answers_gated(const raw_frame *f)
{
    const char *type, *msg;
    size_t type_len, msg_len;
    if (f->type == PATIO__PKT_RESPONSE) return f->size == 5 && memcmp(f->payload, "\xa4late", 5) == 0;
    return f->type == PATIO__PKT_ERROR &&
           patio__decode_exception(f->payload, f->size, &type, &type_len, &msg, &msg_len) == PATIO_OK;
}

/* Requests wait for room in a full executor, which then shuts down: their
 * retry fails, and each is answered with an ERROR (not an empty RESPONSE). */
static void test_executor_closed_while_request_waits(void)
{
    static const uint8_t req[] = { 0xc7, 0x0a, 0x01, 0x94, 0xa5, 'g', 'a', 't', 'e', 'd', 0x90, 0x80, 0xc0 };
    patio_tcp_config cfg = cfg_for(1);
    node s;
    raw_frame f;
    pthread_t th;
    stat_wait bw;
    int fd, i, answered = 0;
    if (!g_setup->raw) return;
    gate_init(&g_gate);
    CHECK(node_start_ex(&s, "server", &cfg, 0, 0, 1, 1) == 0); /* one worker, a queue of one */
    fd = raw_ready_client(&s);
    CHECK(fd >= 0);
    bw = stat_wait_at(s.b, offsetof(patio_tcp_stats, bytes_in), stats_of(s.b).bytes_in + 3 * (9 + sizeof req));
    for (i = 1; i <= 3; i++) CHECK_EQ_INT(raw_send(fd, 10, (uint32_t)i, req, sizeof req), 0);
    CHECK(gate_wait_arrived(&g_gate, 1)); /* 1 runs; the others are queued or wait for room */
    CHECK(wait_until(stat_reached, &bw, 5.0));
    CHECK(pthread_create(&th, NULL, executor_shutdown_thread, s.ex) == 0);
    /* a request that waited for room is answered while 1 still runs */
    CHECK_EQ_INT(raw_recv(fd, &f), 1);
    CHECK(f.serial == 2 || f.serial == 3);
    CHECK(answers_gated(&f));
    answered++;
    gate_open(&g_gate);
    for (; answered < 3 && raw_recv(fd, &f) == 1; answered++) CHECK(answers_gated(&f));
    CHECK_EQ_INT(answered, 3);
    pthread_join(th, NULL);
    close(fd);
    node_free(&s);
    gate_destroy(&g_gate);
}

static int closes_soon(int fd)
{
    int r = raw_closed(fd);
    close(fd);
    return r;
}

/* A new client gets past the handshake and sends one frame: 1 if the
 * server then closes the connection. */
static int ready_client_closed_after(node *n, int type, uint32_t serial, const void *payload, size_t len)
{
    int fd = raw_ready_client(n);
    if (fd < 0) return 0;
    raw_send(fd, type, serial, payload, len);
    return closes_soon(fd);
}

static void test_max_connections(void)
{
    node s, c;
    patio_tcp_config cfg = cfg_for(1);
    int fd;
    raw_frame f;
    if (!g_setup->raw) return;
    cfg.max_connections = 1;
    CHECK(node_start_ex(&s, "server", &cfg, 0, 0, 0, 2) == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    fd = raw_connect_to("127.0.0.1", s.port);
    CHECK(fd >= 0);
    CHECK(raw_recv(fd, &f) != 1); /* no AUTH_DIGEST: closed at once */
    close(fd);
    CHECK_EQ_INT(call_mul(c.b, 5, 5), 25);
    node_free(&c);
    node_free(&s);
}

/* Two peers connect and stay silent, filling max_connections = 2: a client
 * with the key still gets in, in the place of the oldest silent one. */
static void test_max_connections_evicts_silent_peers(void)
{
    node s, c;
    patio_tcp_config cfg = cfg_for(1);
    int fd1, fd2;
    raw_frame f;
    if (!g_setup->raw) return;
    cfg.max_connections = 2;
    cfg.handshake_timeout = 60; /* the silent ones are not closed for being late */
    CHECK(node_start_ex(&s, "server", &cfg, 0, 0, 0, 2) == 0);
    fd1 = raw_connect_to("127.0.0.1", s.port);
    CHECK(fd1 >= 0 && raw_recv(fd1, &f) == 1 && f.type == 0); /* AUTH_DIGEST: it is in */
    fd2 = raw_connect_to("127.0.0.1", s.port);
    CHECK(fd2 >= 0 && raw_recv(fd2, &f) == 1 && f.type == 0);
    CHECK(node_start(&c, "client", 0) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(call_mul(c.b, 4, 5), 20);
    CHECK(raw_closed(fd1));
    CHECK_EQ_INT(stats_of(s.b).connections_open, 2);
    close(fd1);
    close(fd2);
    node_free(&c);
    node_free(&s);
}

/* ---- TCP keep-alive ------------------------------------------------------ */

/* An fd of this process that is a connected IPv4 TCP socket with these
 * ports (0 = any), other than `skip`; -1 if none. */
static int tcp_socket_with(int local_port, int peer_port, int skip)
{
    int fd;
    for (fd = 3; fd < 4096; fd++) {
        struct sockaddr_in me, peer;
        socklen_t ml = sizeof me, pl = sizeof peer;
        if (fd == skip) continue;
        if (getsockname(fd, (struct sockaddr *)&me, &ml) != 0 || me.sin_family != AF_INET) continue;
        if (getpeername(fd, (struct sockaddr *)&peer, &pl) != 0) continue; /* a listener */
        if (local_port && ntohs(me.sin_port) != local_port) continue;
        if (peer_port && ntohs(peer.sin_port) != peer_port) continue;
        return fd;
    }
    return -1;
}

static int local_port_of(int fd)
{
    struct sockaddr_in me;
    socklen_t ml = sizeof me;
    if (getsockname(fd, (struct sockaddr *)&me, &ml) != 0) return -1;
    return ntohs(me.sin_port);
}

/* SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT and TCP_USER_TIMEOUT
 * of a socket. */
static void keepalive_of(int fd, int out[5])
{
    socklen_t l = sizeof out[0];
    memset(out, 0, 5 * sizeof out[0]);
    getsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &out[0], &l);
    l = sizeof out[0];
    getsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &out[1], &l);
    l = sizeof out[0];
    getsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &out[2], &l);
    l = sizeof out[0];
    getsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &out[3], &l);
    l = sizeof out[0];
    getsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &out[4], &l);
}

/* Whether a broker can be made with these keep-alive settings. */
/* Compares a socket's keep-alive settings with want (see keepalive_of;
 * want[0] is on/off, -1 skips an entry). */
static void check_keepalive(int fd, const int want[5])
{
    int got[5], i;
    keepalive_of(fd, got);
    got[0] = got[0] != 0;
    for (i = 0; i < 5; i++)
        if (want[i] >= 0) CHECK_EQ_INT(got[i], want[i]);
}

static int keepalive_accepted(double idle, double interval, int probes)
{
    patio_tcp_config cfg = cfg_for(0);
    patio_registry *rpc = patio_registry_new(NULL);
    patio_executor *ex = patio_null_executor_new(rpc);
    patio_broker *b;
    int ok;
    cfg.keepalive_idle = idle;
    cfg.keepalive_interval = interval;
    cfg.keepalive_probes = probes;
    b = patio_tcp_broker_new(ex, &cfg);
    ok = b != NULL;
    patio_broker_free(b);
    patio_executor_free(ex);
    patio_registry_free(rpc);
    return ok;
}

static void test_keepalive_config_checked(void)
{
    if (!g_setup->raw) return; /* configuration only: once is enough */
    CHECK(!keepalive_accepted(NAN, 0, 0));
    CHECK(!keepalive_accepted(40000, 0, 0));
    CHECK(!keepalive_accepted(0, -1, 0));
    CHECK(!keepalive_accepted(0, 40000, 0));
    CHECK(!keepalive_accepted(0, 0, 128));
    CHECK(!keepalive_accepted(0, 0, -2));
    CHECK(keepalive_accepted(0, 0, 0));
    CHECK(keepalive_accepted(-1, 0, 0)); /* off */
    CHECK(keepalive_accepted(32767, 0.2, 127));
}

/* Each end's sockets get its own settings: the server's (7.5 s rounds up to
 * 8), a default client's, and none for a client that turned keep-alive off. */
static void test_keepalive_settings(void)
{
    node s, dflt, off;
    patio_tcp_config scfg = cfg_for(1), ocfg = cfg_for(0);
    /* on, idle, interval, probes, user timeout in ms; -1 = not checked */
    static const int want_default[5] = { 1, 60, 10, 5, 110000 };
    static const int want_server[5] = { 1, 8, 3, 4, 20000 };
    static const int want_off[5] = { 0, -1, -1, -1, 0 };
    int cfd, sfd, cfd2;
    scfg.keepalive_idle = 7.5;
    scfg.keepalive_interval = 3;
    scfg.keepalive_probes = 4;
    ocfg.keepalive_idle = -1;
    CHECK(node_start_ex(&s, "server", &scfg, 0, 0, 0, 2) == 0);
    CHECK(node_start(&dflt, "default", 0) == 0);
    CHECK(node_start_ex(&off, "off", &ocfg, -1, 0, 0, 2) == 0);

    patio_tcp_connect(dflt.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(dflt.b, 1, 5.0), PATIO_OK);
    cfd = tcp_socket_with(0, s.port, -1);
    CHECK(cfd >= 0);
    check_keepalive(cfd, want_default);
    sfd = tcp_socket_with(s.port, local_port_of(cfd), -1);
    CHECK(sfd >= 0);
    check_keepalive(sfd, want_server);

    patio_tcp_connect(off.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(off.b, 1, 5.0), PATIO_OK);
    cfd2 = tcp_socket_with(0, s.port, cfd);
    CHECK(cfd2 >= 0);
    check_keepalive(cfd2, want_off);
    CHECK_EQ_INT(call_mul(off.b, 6, 7), 42);
    node_free(&off);
    node_free(&dflt);
    node_free(&s);
}

#if defined(__linux__)
/* Brings this network namespace's loopback link up or down; 0 on success. */
static int loopback_set(int up)
{
    struct ifreq ifr;
    int fd = socket(AF_INET, SOCK_DGRAM, 0), rc = -1;
    if (fd < 0) return -1;
    memset(&ifr, 0, sizeof ifr);
    memcpy(ifr.ifr_name, "lo", 3);
    if (ioctl(fd, SIOCGIFFLAGS, &ifr) == 0) {
        if (up) ifr.ifr_flags |= IFF_UP;
        else ifr.ifr_flags &= ~IFF_UP;
        rc = ioctl(fd, SIOCSIFFLAGS, &ifr);
    }
    close(fd);
    return rc;
}

/* Whether the client socket connected to port *arg has no data in flight. */
static int all_acknowledged(void *arg)
{
    struct tcp_info ti;
    socklen_t l = sizeof ti;
    int fd = tcp_socket_with(0, *(int *)arg, -1);
    memset(&ti, 0, sizeof ti);
    return fd >= 0 && getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &l) == 0 && ti.tcpi_unacked == 0;
}

/* On a thread of its own, in a network namespace of its own that the
 * brokers' threads (started from it) share: a client calls a server, both
 * with 1 s keep-alive and 2 probes; then the namespace's loopback goes
 * down, so the server vanishes without closing anything. The call must
 * fail with a lost connection after about 1 + 2 x 1 s, long before its own
 * 30 s timeout (the kernel's keep-alive defaults would wait two hours).
 * Stores 0, or the errno that kept it from making the namespace. */
static void *vanished_peer_thread(void *arg)
{
    int *unshare_errno = (int *)arg;
    node s, c;
    patio_tcp_config scfg = cfg_for(1), ccfg = cfg_for(0);
    patio_call_opts opts;
    patio_call *call;
    double t0;
    if (unshare(CLONE_NEWNET) != 0) {
        *unshare_errno = errno;
        return NULL;
    }
    *unshare_errno = 0;
    CHECK(loopback_set(1) == 0);
    scfg.keepalive_idle = ccfg.keepalive_idle = 1;
    scfg.keepalive_interval = ccfg.keepalive_interval = 1;
    scfg.keepalive_probes = ccfg.keepalive_probes = 2;
    gate_init(&g_gate);
    CHECK(node_start_ex(&s, "server", &scfg, 0, 0, 0, 2) == 0);
    CHECK(node_start_ex(&c, "client", &ccfg, -1, 0, 0, 2) == 0);
    patio_tcp_connect(c.b, "127.0.0.1", s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    memset(&opts, 0, sizeof opts);
    opts.timeout = 30;
    call = patio_call_start(c.b, &opts, "gated", "");
    CHECK(gate_wait_arrived(&g_gate, 1)); /* the server runs it */
    /* the request acknowledged, the line is idle: keep-alive's case (data
     * left unacknowledged would be TCP_USER_TIMEOUT's) */
    CHECK(wait_until(all_acknowledged, &s.port, 5.0));
    t0 = now_s();
    CHECK(loopback_set(0) == 0);
    patio_call_wait(call, 20.0);
    CHECK_EQ_INT(patio_call_status(call), PATIO_ERR_CONNECTION_LOST);
    CHECK(now_s() - t0 < 15.0);
    patio_call_free(call);
    gate_open(&g_gate);
    node_free(&c);
    node_free(&s);
    gate_destroy(&g_gate);
    return NULL;
}

static void test_keepalive_finds_vanished_peer(void)
{
    pthread_t th;
    int unshare_errno = -1;
    if (!g_setup->raw) return; /* the transport does not matter here */
    CHECK(pthread_create(&th, NULL, vanished_peer_thread, &unshare_errno) == 0);
    pthread_join(th, NULL);
    if (unshare_errno > 0)
        fprintf(stderr, "  note: keep-alive case not run: no network namespace (%s); it needs CAP_SYS_ADMIN\n",
                strerror(unshare_errno));
}
#endif

/* A server node whose registry uses `hooks` and offers one function. */
static void hooked_server_start(node *n, const patio_hooks *hooks, const char *name, patio_fn fn)
{
    patio_registry_config rc;
    patio_tcp_config cfg = cfg_for(1);
    memset(&rc, 0, sizeof rc);
    rc.hooks = hooks;
    memset(n, 0, sizeof *n);
    n->rpc = patio_registry_new(&rc);
    patio_register(n->rpc, name, fn, NULL);
    n->ex = patio_thread_pool_new(n->rpc, 2);
    n->b = patio_tcp_server_new(n->ex, &cfg, "127.0.0.1", 0);
    CHECK(n->b != NULL);
    n->port = patio_tcp_listen_port(n->b);
}

/* ---- a large frame's buffer grows with its bytes ------------------------ */

static size_t g_biggest_alloc; /* atomic: the largest block asked for */

static void note_size(size_t n)
{
    size_t seen = __atomic_load_n(&g_biggest_alloc, __ATOMIC_RELAXED);
    while (n > seen && !__atomic_compare_exchange_n(&g_biggest_alloc, &seen, n, 0, __ATOMIC_RELAXED,
                                                    __ATOMIC_RELAXED)) {}
}

static void *sized_alloc(size_t n, void *user)
{
    (void)user;
    note_size(n);
    return malloc(n);
}

static void *sized_realloc(void *p, size_t n, void *user)
{
    (void)user;
    note_size(n);
    return realloc(p, n);
}

static void sized_free(void *p, void *user)
{
    (void)user;
    free(p);
}

/* The length of its one bin argument. */
static int blob_len(patio_task *t)
{
    const void *p;
    size_t n;
    if (patio_args(t, "y", &p, &n) != PATIO_OK) return PATIO_ERR_TYPE;
    return patio_return_int(t, (int64_t)n);
}

/* A peer announces an 8 MiB request and sends 100 bytes of it: the server
 * holds memory for what came, not for what was announced; the rest then
 * arrives and the call is answered. */
static void test_large_frame_buffer_grows_with_its_bytes(void)
{
    enum { BLOB = 8 << 20 };
    patio_hooks hooks;
    patio_writer args, req;
    uint8_t *blob, head[9];
    raw_frame f;
    patio_reader r;
    int64_t got = 0;
    stat_wait wait;
    node n;
    int fd, fd2;
    if (!g_setup->raw) return; /* the plain transport's buffer is the one read into */
    memset(&hooks, 0, sizeof hooks);
    hooks.alloc = sized_alloc;
    hooks.realloc = sized_realloc;
    hooks.free = sized_free;
    hooked_server_start(&n, &hooks, "blob_len", blob_len);
    fd = raw_ready_client(&n);
    CHECK(fd >= 0);

    blob = (uint8_t *)calloc(1, BLOB);
    patio_writer_init(&args, NULL);
    patio_writer_init(&req, NULL);
    patio_write_array(&args, 1);
    patio_write_bin(&args, blob, BLOB);
    patio__write_call_request(&req, "blob_len", 8, args.data, args.len, NULL, 0, 1, 30.0);
    CHECK_EQ_INT(req.err, 0);
    patio__frame_header_put(head, PATIO__PKT_REQUEST, (uint32_t)req.len, 7);

    __atomic_store_n(&g_biggest_alloc, 0, __ATOMIC_RELAXED);
    wait = stat_wait_at(n.b, offsetof(patio_tcp_stats, bytes_in), stats_of(n.b).bytes_in + 9 + 100);
    CHECK(raw_write(fd, head, 9) == 0 && raw_write(fd, req.data, 100) == 0);
    CHECK(wait_until(stat_reached, &wait, 5.0));
    /* a handshake on a second connection: the loop is done with the first */
    fd2 = raw_ready_client(&n);
    CHECK(fd2 >= 0);
    CHECK(__atomic_load_n(&g_biggest_alloc, __ATOMIC_RELAXED) < (size_t)1 << 20);

    CHECK(raw_write(fd, req.data + 100, req.len - 100) == 0);
    CHECK_EQ_INT(raw_recv(fd, &f), 1);
    CHECK_EQ_INT(f.type, PATIO__PKT_RESPONSE);
    CHECK_EQ_INT(f.serial, 7);
    patio_reader_init(&r, f.payload, f.size);
    CHECK(patio_read_int(&r, &got) == PATIO_OK && got == BLOB);

    close(fd);
    if (fd2 >= 0) close(fd2);
    patio_writer_free(&args);
    patio_writer_free(&req);
    free(blob);
    node_free(&n);
}

/* ---- names learnt before discovery completes ---------------------------- */

/* An allocator that never hands out a block twice within a case: a freed
 * block is zeroed and kept until quarantine_release(), so memory used after
 * it was freed reads as zeros, never as the data of a later owner. */
typedef union qblock {
    struct {
        union qblock *next;
        size_t size;
    } h;
    long double align;
} qblock;

static pthread_mutex_t g_quarantine_mu = PTHREAD_MUTEX_INITIALIZER;
static qblock *g_quarantine;

static void *quarantine_alloc(size_t n, void *user)
{
    qblock *b = (qblock *)malloc(sizeof *b + n);
    (void)user;
    if (!b) return NULL;
    b->h.size = n;
    return b + 1;
}

static void quarantine_free(void *p, void *user)
{
    qblock *b = (qblock *)p - 1;
    (void)user;
    if (!p) return;
    memset(p, 0, b->h.size);
    pthread_mutex_lock(&g_quarantine_mu);
    b->h.next = g_quarantine;
    g_quarantine = b;
    pthread_mutex_unlock(&g_quarantine_mu);
}

static void *quarantine_realloc(void *p, size_t n, void *user)
{
    void *q = quarantine_alloc(n, user);
    if (q && p) {
        size_t old = ((qblock *)p - 1)->h.size;
        memcpy(q, p, old < n ? old : n);
        quarantine_free(p, user);
    }
    return q;
}

static void quarantine_release(void)
{
    qblock *b;
    pthread_mutex_lock(&g_quarantine_mu);
    while ((b = g_quarantine) != NULL) {
        g_quarantine = b->h.next;
        free(b);
    }
    pthread_mutex_unlock(&g_quarantine_mu);
}

/* A raw client that answers the server's DISCOVER_REQUEST with `names`
 * but has not sent its own yet (PROTOCOL.md §5.1 allows either order);
 * -1 on failure. */
static int raw_discovering_client(int port, const uint8_t *names, size_t names_len)
{
    raw_frame f;
    uint8_t areq[61];
    int fd = raw_connect_to("127.0.0.1", port);
    if (fd < 0) return -1;
    if (raw_recv(fd, &f) != 1 || f.type != 0 || f.size != 18) goto fail;
    make_auth_request(areq, f.payload, KEY);
    if (raw_send(fd, 1, 1, areq, 61) != 0) goto fail;
    if (raw_recv(fd, &f) != 1 || f.type != 3) goto fail;
    if (raw_recv(fd, &f) != 1 || f.type != 5) goto fail;
    if (raw_send(fd, 6, f.serial, names, names_len) != 0) goto fail;
    return fd;
fail:
    close(fd);
    return -1;
}

typedef struct open_count {
    patio_broker *b;
    uint64_t n;
} open_count;

static int has_open(void *arg)
{
    open_count *o = (open_count *)arg;
    return stats_of(o->b).connections_open == o->n;
}

/* Two peers offer "foo" while still in discovery; one leaves before it is
 * ready, the other then completes discovery: the route it learnt must still
 * be the broker's route for "foo", so a call reaches it. */
static void test_route_learnt_in_discovery(void)
{
    static const uint8_t names[] = { 0x91, 0xa3, 'f', 'o', 'o' };
    patio_hooks hooks;
    node s;
    raw_frame f;
    patio_call *call;
    open_count oc;
    stat_wait bw;
    int a, b;
    if (!g_setup->raw) return;
    memset(&hooks, 0, sizeof hooks);
    hooks.alloc = quarantine_alloc;
    hooks.realloc = quarantine_realloc;
    hooks.free = quarantine_free;
    hooked_server_start(&s, &hooks, "mul", mul);
    a = raw_discovering_client(s.port, names, sizeof names);
    b = raw_discovering_client(s.port, names, sizeof names);
    CHECK(a >= 0 && b >= 0);
    /* both names are in (each connection's bytes are handled in the
     * callback that counted them), then b leaves */
    bw = stat_wait_at(s.b, offsetof(patio_tcp_stats, bytes_in), 2 * (9 + 61 + 9 + sizeof names));
    CHECK(wait_until(stat_reached, &bw, 5.0));
    close(b);
    oc.b = s.b;
    oc.n = 1;
    CHECK(wait_until(has_open, &oc, 5.0));
    CHECK_EQ_INT(raw_send(a, 5, 2, "\xc0", 1), 0); /* a completes discovery */
    CHECK_EQ_INT(raw_recv(a, &f), 1);
    CHECK(f.type == 6 && f.serial == 2);
    CHECK_EQ_INT(patio_tcp_wait_peers(s.b, 1, 5.0), PATIO_OK);
    call = patio_call_async(s.b, "foo", "i", 7);
    CHECK_EQ_INT(raw_recv(a, &f), 1);
    CHECK_EQ_INT(f.type, PATIO__PKT_REQUEST);
    raw_send(a, 20, f.serial, "\x08", 1);
    CHECK_EQ_INT(patio_call_wait(call, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(call), 8);
    patio_call_free(call);
    close(a);
    node_free(&s);
    quarantine_release();
}

/* ---- both sides with more output than the peer reads at once ------------ */

enum { BULK_MAX_CALLS = 192, BULK_BLOB = 256 * 1024 }; /* 48 MiB: six times the backlog mark */

static uint8_t *g_bulk_blob;

/* Its one bin argument, back. */
static int blob_echo(patio_task *t)
{
    const void *p;
    size_t n;
    if (patio_args(t, "y", &p, &n) != PATIO_OK) return PATIO_ERR_TYPE;
    return patio_return(t, "y", p, n);
}

static int bulk_node_start_ex(node *n, const char *id, int listen, const patio_tcp_config *cfg)
{
    memset(n, 0, sizeof *n);
    n->id = id;
    n->rpc = patio_registry_new(NULL);
    patio_register(n->rpc, "blob_len", blob_len, NULL);
    patio_register(n->rpc, "blob_echo", blob_echo, NULL);
    n->ex = patio_thread_pool_new(n->rpc, 4);
    n->b = patio_tcp_broker_new(n->ex, cfg);
    if (!n->b) return -1;
    return listen ? patio_tcp_listen(n->b, "127.0.0.1", 0, &n->port) : 0;
}

static int bulk_node_start(node *n, const char *id, int listen)
{
    patio_tcp_config cfg = cfg_for(listen);
    return bulk_node_start_ex(n, id, listen, &cfg);
}

typedef struct bulk_caller {
    patio_broker *b;
    const char *fn;
    int n;         /* calls to make, at most BULK_MAX_CALLS */
    int ok;        /* calls answered as expected */
} bulk_caller;

/* n calls of fn with a BULK_BLOB-byte argument, all started at
 * once; counts the right answers. */
static void *bulk_calls(void *arg)
{
    bulk_caller *bc = (bulk_caller *)arg;
    patio_call *calls[BULK_MAX_CALLS];
    patio_call_opts o;
    int i;
    memset(&o, 0, sizeof o);
    o.timeout = 20;
    for (i = 0; i < bc->n; i++) calls[i] = patio_call_start(bc->b, &o, bc->fn, "y", g_bulk_blob, (size_t)BULK_BLOB);
    patio_wait_all(calls, (size_t)bc->n, 30);
    for (i = 0; i < bc->n; i++) {
        patio_reader r;
        const void *p;
        size_t n = 0;
        int64_t len = 0;
        if (patio_call_status(calls[i]) == PATIO_OK && patio_call_reader(calls[i], &r) == PATIO_OK &&
            (strcmp(bc->fn, "blob_len") == 0 ? patio_read_int(&r, &len) == PATIO_OK && len == BULK_BLOB
                                             : patio_read_bin(&r, &p, &n) == PATIO_OK && n == BULK_BLOB))
            bc->ok++;
        patio_call_free(calls[i]);
    }
    return NULL;
}

/* Each side calls the other with more argument bytes than the other reads
 * at once (a), or one side has large calls and the other large results (b):
 * both sides' output backs up, and every call must still complete, so
 * neither side may stop reading the answers it waits for. */
static void bulk_case(const char *fn, int n, int both)
{
    node s, c;
    bulk_caller a, b;
    pthread_t ta, tb;
    g_bulk_blob = (uint8_t *)calloc(1, BULK_BLOB);
    CHECK(bulk_node_start(&s, "server", 1) == 0);
    CHECK(bulk_node_start(&c, "client", 0) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, "127.0.0.1", s.port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(s.b, 1, 5.0), PATIO_OK);
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    a.b = c.b;
    a.fn = b.fn = fn;
    a.n = b.n = n;
    b.b = s.b;
    CHECK(pthread_create(&ta, NULL, bulk_calls, &a) == 0);
    if (both) CHECK(pthread_create(&tb, NULL, bulk_calls, &b) == 0);
    pthread_join(ta, NULL);
    if (both) pthread_join(tb, NULL);
    CHECK_EQ_INT(a.ok, n);
    if (both) CHECK_EQ_INT(b.ok, n);
    {
        patio_call *after = patio_call_sync(c.b, 5.0, "blob_len", "y", g_bulk_blob, (size_t)10);
        CHECK_EQ_INT(patio_call_status(after), PATIO_OK); /* and the line still works */
        patio_call_free(after);
    }
    node_free(&c);
    node_free(&s);
    free(g_bulk_blob);
}

static void test_output_backlog_both_directions(void) { bulk_case("blob_len", 96, 1); }
static void test_output_backlog_large_results(void) { bulk_case("blob_echo", BULK_MAX_CALLS, 0); }

/* One REQUEST frame for blob_echo with a BULK_BLOB-byte argument. */
static void bulk_request_frame(patio_writer *frame)
{
    patio_writer args;
    size_t mark;
    patio_writer_init(&args, NULL);
    patio_write_array(&args, 1);
    patio_write_bin(&args, g_bulk_blob, BULK_BLOB);
    mark = patio__frame_begin(frame);
    patio__write_call_request(frame, "blob_echo", 9, args.data, args.len, NULL, 0, 0, 0);
    patio__frame_end(frame, mark, PATIO__PKT_REQUEST, 1, UINT32_MAX);
    patio_writer_free(&args);
}

/* Sends the frame again and again, each time with the next serial (at
 * most max times, for at most 20 s) until the socket has taken nothing for
 * a second; the count sent. */
static int send_until_stalled(int fd, patio_writer *frame, int max)
{
    double give_up = now_s() + 20.0;
    size_t off = 0;
    int sent = 0;
    while (sent < max && now_s() < give_up) {
        ssize_t n;
        struct pollfd p;
        if (off == 0) patio__put_be32(frame->data + 5, (uint32_t)sent + 1);
        n = send(fd, frame->data + off, frame->len - off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            off += (size_t)n;
            if (off == frame->len) { off = 0; sent++; }
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
        p.fd = fd;
        p.events = POLLOUT;
        p.revents = 0;
        if (poll(&p, 1, 1000) == 0) break;
    }
    return sent;
}

/* A peer that sends requests and never reads the answers: the server keeps
 * at most its output mark of answers plus max_inflight requests for it,
 * then reads no more from it; other peers are served all along, and the
 * connection's memory goes when the peer goes. */
static void test_never_reading_peer_is_bounded(void)
{
    enum { MAX_FRAMES = 400, INFLIGHT = 4 }; /* 400 frames: 100 MiB, far above the bound */
    patio_tcp_config cfg = cfg_for(1);
    patio_writer frame;
    patio_tcp_stats st;
    node s, c;
    uint64_t bound, buffered;
    int fd, sent;
    if (!g_setup->raw) return;
    g_bulk_blob = (uint8_t *)calloc(1, BULK_BLOB);
    cfg.max_inflight = INFLIGHT;
    CHECK(bulk_node_start_ex(&s, "server", 1, &cfg) == 0);
    fd = raw_ready_client(&s);
    CHECK(fd >= 0);
    patio_writer_init(&frame, NULL);
    bulk_request_frame(&frame);
    sent = send_until_stalled(fd, &frame, MAX_FRAMES);
    CHECK(sent >= 0 && sent < MAX_FRAMES);
    st = stats_of(s.b);
    buffered = st.bytes_in - st.bytes_out;
    /* read and not yet written: up to the output mark of answers, plus
     * the answers of the requests that were running when it was reached,
     * plus requests running or held, plus a read buffer with a frame */
    bound = PATIO__TCP_OUT_HIGH + (uint64_t)(2 * INFLIGHT + 2) * frame.len + PATIO__TCP_RBUF_BIG;
    CHECK(buffered <= bound);
    CHECK(st.bytes_in > PATIO__TCP_OUT_HIGH); /* it did serve the peer until then */
    CHECK(bulk_node_start(&c, "client", 0) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, "127.0.0.1", s.port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    {
        patio_call *other = patio_call_sync(c.b, 5.0, "blob_len", "y", g_bulk_blob, (size_t)10);
        CHECK_EQ_INT(patio_call_status(other), PATIO_OK);
        CHECK_EQ_INT(patio_result_int(other), 10);
        patio_call_free(other);
    }
    close(fd);
    CHECK_EQ_INT(patio_tcp_wait_peers(s.b, 1, 5.0), PATIO_OK);
    {
        open_count oc;
        oc.b = s.b;
        oc.n = 1;
        CHECK(wait_until(has_open, &oc, 5.0)); /* the silent peer's connection is gone */
    }
    node_free(&c);
    node_free(&s);
    patio_writer_free(&frame);
    free(g_bulk_blob);
}

/* ---- out of file descriptors ------------------------------------------- */

static int g_accept_warnings; /* atomic */

static void count_accept_warnings(int level, const char *message, void *user)
{
    (void)level;
    (void)user;
    if (strstr(message, "accept")) __atomic_fetch_add(&g_accept_warnings, 1, __ATOMIC_SEQ_CST);
}

static int accept_failed(void *arg)
{
    (void)arg;
    return __atomic_load_n(&g_accept_warnings, __ATOMIC_SEQ_CST) > 0;
}

static int accepted_one(void *arg)
{
    return stats_of((patio_broker *)arg).connections_accepted >= 1;
}

/* The process runs out of descriptors while a client connects: the
 * server's accept fails, and the listener must not spin on it (one warning
 * per pause, not one per loop turn); once descriptors are back, the waiting
 * connection is accepted. */
static void test_accept_out_of_fds_pauses(void)
{
    enum { SPARE = 8, MAX_FILL = 64 };
    patio_hooks hooks;
    struct rlimit old_lim, lim;
    struct timespec ts;
    int fill[MAX_FILL], nfill = 0, cfd, probe, i;
    node n;
    struct sockaddr_in sa;
    if (!g_setup->raw) return;
    memset(&hooks, 0, sizeof hooks);
    hooks.log = count_accept_warnings;
    hooks.log_level = PATIO_LOG_WARN;
    hooked_server_start(&n, &hooks, "mul", mul);
    __atomic_store_n(&g_accept_warnings, 0, __ATOMIC_SEQ_CST);

    /* the client's socket first, then no descriptor left for the server */
    cfd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(cfd >= 0);
    probe = open("/dev/null", O_RDONLY);
    CHECK(probe >= 0);
    close(probe);
    CHECK(getrlimit(RLIMIT_NOFILE, &old_lim) == 0);
    lim = old_lim;
    lim.rlim_cur = (rlim_t)(probe + SPARE);
    CHECK(setrlimit(RLIMIT_NOFILE, &lim) == 0);
    while (nfill < MAX_FILL && (fill[nfill] = open("/dev/null", O_RDONLY)) >= 0) nfill++;
    CHECK(nfill < MAX_FILL); /* every descriptor below the limit is taken */

    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)n.port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(connect(cfd, (struct sockaddr *)&sa, sizeof sa) == 0); /* into the backlog */
    CHECK(wait_until(accept_failed, NULL, 5.0));
    /* a spinning listener would log on every loop turn: thousands by now */
    ts.tv_sec = 0;
    ts.tv_nsec = 300000000L;
    nanosleep(&ts, NULL);
    CHECK(__atomic_load_n(&g_accept_warnings, __ATOMIC_SEQ_CST) <= 2);
    CHECK_EQ_INT(stats_of(n.b).connections_accepted, 0);

    for (i = 0; i < nfill; i++) close(fill[i]);
    CHECK(setrlimit(RLIMIT_NOFILE, &old_lim) == 0);
    CHECK(wait_until(accepted_one, n.b, 5.0));
    close(cfd);
    node_free(&n);
}

/* ---- bad input: the connection closes, a good client keeps working ------- */

typedef struct bad_env {
    node s, good;
} bad_env;

static void bad_start(bad_env *e, double hs_timeout, uint32_t max_frame)
{
    patio_tcp_config cfg = cfg_for(1);
    cfg.handshake_timeout = hs_timeout;
    cfg.max_frame_size = max_frame;
    CHECK(node_start_ex(&e->s, "server", &cfg, 0, 0, 0, 2) == 0);
    CHECK(node_start(&e->good, "good", 0) == 0);
    patio_tcp_connect(e->good.b, "127.0.0.1", e->s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(e->good.b, 1, 5.0), PATIO_OK);
}

static void bad_end(bad_env *e)
{
    CHECK_EQ_INT(call_mul(e->good.b, 7, 6), 42);
    node_free(&e->good);
    node_free(&e->s);
}

static void test_bad_oversize(void)
{
    bad_env e;
    uint8_t big[5000];
    int fd;
    if (!g_setup->raw) return;
    bad_start(&e, 3, 4096);
    fd = raw_connect_to("127.0.0.1", e.s.port); /* before authentication: 1024 */
    memset(big, 0x90, sizeof big);
    raw_send(fd, 1, 1, big, 2000);
    CHECK(closes_soon(fd));
    CHECK(ready_client_closed_after(&e.s, 20, 1, big, 4097)); /* after: the configured 4096 */
    CHECK_EQ_INT(stats_of(e.s.b).protocol_errors, 2);
    bad_end(&e);
}

static void test_bad_unknown_type(void)
{
    bad_env e;
    if (!g_setup->raw) return;
    bad_start(&e, 3, 0);
    CHECK(ready_client_closed_after(&e.s, 7, 9, "\xc0", 1));
    CHECK(ready_client_closed_after(&e.s, -1, 9, "\xc0", 1)); /* 0xff */
    CHECK(ready_client_closed_after(&e.s, 2, 9, "\xc0", 1)); /* AUTH_RESPONSE is never valid */
    CHECK(ready_client_closed_after(&e.s, 3, 9, "\xc0", 1)); /* AUTH_OK after discovery */
    CHECK(ready_client_closed_after(&e.s, 10, 0, "\xc7\x0b\x01\x94\xa3mul\x93\x01\x02\x03\x80\xc0", 14)); /* serial 0 */
    CHECK_EQ_INT(stats_of(e.s.b).protocol_errors, 5);
    bad_end(&e);
}

static void test_bad_stray_response(void)
{
    bad_env e;
    if (!g_setup->raw) return;
    bad_start(&e, 3, 0);
    CHECK(ready_client_closed_after(&e.s, 20, 77, "\x06", 1));
    CHECK(ready_client_closed_after(&e.s, 30, 78, "\xd6\x02\x92\xa1\x45\xa0", 6));
    bad_end(&e);
}

static void test_bad_duplicate_serial(void)
{
    bad_env e;
    int fd;
    static const char req[] = "\xc7\x0a\x01\x94\xa5gated\x90\x80\xc0";
    gate_init(&g_gate);
    if (!g_setup->raw) return;
    bad_start(&e, 3, 0);
    fd = raw_ready_client(&e.s);
    raw_send(fd, 10, 5, req, 13);
    CHECK(gate_wait_arrived(&g_gate, 1));
    raw_send(fd, 10, 5, req, 13);
    CHECK(closes_soon(fd));
    gate_open(&g_gate);
    bad_end(&e);
    gate_destroy(&g_gate);
}

static void test_bad_garbage(void)
{
    bad_env e;
    int fd;
    static const char junk[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    if (!g_setup->raw) return;
    bad_start(&e, 3, 0);
    fd = raw_connect_to("127.0.0.1", e.s.port);
    raw_write(fd, junk, sizeof junk - 1);
    CHECK(closes_soon(fd));
    fd = raw_ready_client(&e.s); /* a REQUEST that is not a CallRequest: ERROR, not closed */
    {
        raw_frame f;
        raw_send(fd, 10, 4, "\x93\x01\x02\x03", 4);
        CHECK_EQ_INT(raw_recv(fd, &f), 1);
        CHECK(f.type == 30 && f.serial == 4);
        raw_send(fd, 10, 5, "\xc1", 1);
        CHECK_EQ_INT(raw_recv(fd, &f), 1);
        CHECK(f.type == 30 && f.serial == 5);
        raw_write(fd, "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 10);
        CHECK(closes_soon(fd));
    }
    bad_end(&e);
}

static void test_bad_silent_peer(void)
{
    bad_env e;
    int fd;
    double t0;
    if (!g_setup->raw) return;
    bad_start(&e, 0.3, 0);
    t0 = now_s();
    fd = raw_connect_to("127.0.0.1", e.s.port);
    CHECK(closes_soon(fd));
    CHECK(now_s() - t0 >= 0.25 && now_s() - t0 < 2.5);
    fd = raw_connect_to("127.0.0.1", e.s.port); /* authenticated, but never answers discovery */
    {
        raw_frame f;
        uint8_t areq[61];
        CHECK_EQ_INT(raw_recv(fd, &f), 1);
        make_auth_request(areq, f.payload, KEY);
        raw_send(fd, 1, 1, areq, 61);
    }
    CHECK(closes_soon(fd));
    bad_end(&e);
}

static int has_two_auth_failures(void *arg)
{
    return stats_of((patio_broker *)arg).auth_failures >= 2;
}

static void test_bad_wrong_key(void)
{
    bad_env e;
    node wrong;
    patio_tcp_config cfg = cfg_for(0);
    raw_frame f;
    uint8_t areq[61];
    int fd;
    bad_start(&e, 3, 0);
    if (g_setup->raw) {
        fd = raw_connect_to("127.0.0.1", e.s.port);
        CHECK_EQ_INT(raw_recv(fd, &f), 1);
        make_auth_request(areq, f.payload, "another-key");
        raw_send(fd, 1, 1, areq, 61);
        CHECK(closes_soon(fd));
        CHECK_EQ_INT(stats_of(e.s.b).auth_failures, 1);
    }
    cfg.key = "another-key";
    cfg.key_len = 11;
    CHECK(node_start_ex(&wrong, "wrong", &cfg, -1, 0, 0, 1) == 0);
    patio_tcp_connect(wrong.b, "127.0.0.1", e.s.port);
    CHECK_EQ_INT(patio_tcp_wait_peers(wrong.b, 1, 0.5), PATIO_ERR_TIMEOUT);
    /* a slow machine (or a sanitizer) may need longer than that for the
     * first refused handshake and the retry after it */
    CHECK(wait_until(has_two_auth_failures, e.s.b, 10.0));
    CHECK(wait_until(has_reconnected, wrong.b, 10.0)); /* it backs off and retries */
    node_free(&wrong);
    bad_end(&e);
}

static void test_bad_replay(void)
{
    bad_env e;
    raw_frame f1, f2;
    uint8_t areq[61];
    int fd1, fd2;
    if (!g_setup->raw) return;
    bad_start(&e, 3, 0);
    fd1 = raw_connect_to("127.0.0.1", e.s.port);
    fd2 = raw_connect_to("127.0.0.1", e.s.port);
    CHECK_EQ_INT(raw_recv(fd1, &f1), 1);
    CHECK_EQ_INT(raw_recv(fd2, &f2), 1);
    CHECK(memcmp(f1.payload, f2.payload, 18) != 0); /* fresh tokens */
    make_auth_request(areq, f1.payload, KEY);       /* valid for connection 1 only */
    raw_send(fd2, 1, 1, areq, 61);
    CHECK(closes_soon(fd2));
    raw_send(fd1, 1, 1, areq, 61);
    CHECK_EQ_INT(raw_recv(fd1, &f1), 1);
    CHECK_EQ_INT(f1.type, 3);
    close(fd1);
    CHECK_EQ_INT(stats_of(e.s.b).auth_failures, 1);
    bad_end(&e);
}

/* ---- a raw server against our client: the server proof ------------------- */

static int raw_listen(int *port)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 8) != 0) {
        close(fd);
        return -1;
    }
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    *port = ntohs(sa.sin_port);
    return fd;
}

static int raw_accept(int lfd)
{
    struct pollfd p;
    struct timeval tv;
    int fd;
    p.fd = lfd;
    p.events = POLLIN;
    if (poll(&p, 1, 3000) != 1) return -1;
    fd = accept(lfd, NULL, NULL);
    tv.tv_sec = 3;
    tv.tv_usec = 0;
    if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

enum { PROOF_NIL, PROOF_GOOD, PROOF_WRONG };

/* Our client connects to a raw server answering AUTH_OK with `proof`;
 * returns 1 if the client went on (DISCOVER_REQUEST), 0 if it closed. */
static int proof_case(int proof, int require)
{
    static const uint8_t person[8] = { 'p', 'a', 't', 'i', 'o', '-', 'o', 'k' };
    patio_tcp_config cfg = cfg_for(0);
    node c;
    raw_frame f;
    uint8_t p[18], ok[34], s8[8];
    int lfd, fd, port = 0, went_on = -1;
    cfg.require_server_proof = require;
    lfd = raw_listen(&port);
    if (lfd < 0 || node_start_ex(&c, "client", &cfg, -1, 0, 0, 1) != 0) return -1;
    patio_tcp_connect(c.b, "127.0.0.1", port);
    fd = raw_accept(lfd);
    p[0] = 0xc4;
    p[1] = 16;
    memset(p + 2, 0x11, 16);
    raw_send(fd, 0, 1, p, 18);
    if (raw_recv(fd, &f) == 1 && f.type == 1 && f.size == 61) {
        salt8_of(s8, f.payload + 3);
        ok[0] = 0xc4;
        ok[1] = 32;
        patio__blake2s(ok + 2, 32, proof == PROOF_WRONG ? "bad" : KEY, proof == PROOF_WRONG ? 3 : strlen(KEY),
                       s8, person, f.payload, 61);
        if (proof == PROOF_NIL) raw_send(fd, 3, 2, "\xc0", 1);
        else raw_send(fd, 3, 2, ok, 34);
        if (raw_recv(fd, &f) == 1) went_on = f.type == 5;
        else went_on = 0;
    }
    close(fd);
    close(lfd);
    node_free(&c);
    return went_on;
}

static void test_server_proof(void)
{
    if (!g_setup->raw) return;
    CHECK_EQ_INT(proof_case(PROOF_GOOD, 1), 1);
    CHECK_EQ_INT(proof_case(PROOF_NIL, 0), 1);  /* as Python servers send */
    CHECK_EQ_INT(proof_case(PROOF_NIL, 1), 0);  /* refused when a proof is required */
    CHECK_EQ_INT(proof_case(PROOF_WRONG, 0), 0);
}

static void test_ipv6(void)
{
    node s, c;
    patio_tcp_config cfg = cfg_for(1);
    struct sockaddr_in6 sa;
    int fd = socket(AF_INET6, SOCK_STREAM, 0), port = 0;
    memset(&sa, 0, sizeof sa);
    sa.sin6_family = AF_INET6;
    inet_pton(AF_INET6, "::1", &sa.sin6_addr);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        if (fd >= 0) close(fd);
        printf("  (skipped: no IPv6 loopback on this host)\n");
        return;
    }
    close(fd);
    CHECK(node_start_ex(&s, "server6", &cfg, -1, 0, 0, 2) == 0);
    CHECK_EQ_INT(patio_tcp_listen(s.b, "::1", 0, &port), PATIO_OK);
    CHECK(node_start(&c, "client6", 0) == 0);
    CHECK_EQ_INT(patio_tcp_connect(c.b, "::1", port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(c.b, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(call_mul(c.b, 8, 8), 64);
    node_free(&c);
    node_free(&s);
}

static void test_listen_any_and_config(void)
{
    node s;
    patio_tcp_config cfg = cfg_for(1);
    patio_executor *ex;
    patio_registry *rpc;
    int port = 0;
    CHECK(node_start_ex(&s, "server", &cfg, -1, 0, 0, 1) == 0);
    CHECK_EQ_INT(patio_tcp_listen(s.b, NULL, 0, &port), PATIO_OK); /* every address */
    CHECK(port > 0);
    CHECK_EQ_INT(patio_tcp_listen(s.b, "127.0.0.1", 70000, NULL), PATIO_ERR_INVALID);
    CHECK_EQ_INT(patio_tcp_connect(s.b, "127.0.0.1", -1), PATIO_ERR_INVALID);
    node_free(&s);
    rpc = patio_registry_new(NULL);
    ex = patio_thread_pool_new(rpc, 1);
    cfg.key = "0123456789abcdef0123456789abcdef!";
    cfg.key_len = 33;
    CHECK(patio_tcp_broker_new(ex, &cfg) == NULL);
    {
        patio_broker *mem = patio_memory_broker_new(ex);
        patio_tcp_stats st;
        CHECK_EQ_INT(patio_tcp_stats_get(mem, &st), PATIO_ERR_INVALID);
        CHECK_EQ_INT(patio_tcp_listen(mem, NULL, 0, NULL), PATIO_ERR_INVALID);
        patio_broker_free(mem);
    }
    patio_executor_free(ex);
    patio_registry_free(rpc);
}

/* Many calls both ways with a counting allocator: everything is returned. */
static void test_no_leak(void)
{
    alloc_count counts = { 0, 0 };
    patio_hooks hooks = counting_hooks(&counts);
    patio_registry_config rc;
    patio_registry *r1, *r2;
    patio_executor *e1, *e2;
    patio_broker *b1, *b2;
    patio_tcp_config cfg = cfg_for(1);
    int port = 0, i;
    memset(&rc, 0, sizeof rc);
    rc.hooks = &hooks;
    r1 = patio_registry_new(&rc);
    r2 = patio_registry_new(&rc);
    patio_register(r1, "mul", mul, NULL);
    patio_register(r2, "mul", mul, NULL);
    e1 = patio_thread_pool_new(r1, 2);
    e2 = patio_thread_pool_new(r2, 2);
    b1 = patio_tcp_broker_new(e1, &cfg);
    cfg = cfg_for(0);
    b2 = patio_tcp_broker_new(e2, &cfg);
    CHECK_EQ_INT(patio_tcp_listen(b1, "127.0.0.1", 0, &port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_connect(b2, "127.0.0.1", port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(b2, 1, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(b1, 1, 5.0), PATIO_OK);
    for (i = 0; i < 200; i++) {
        patio_call *a = patio_call_async(b1, "mul", "ii", i, 2);
        patio_call *b = patio_call_async(b2, "mul", "ii", i, 3);
        CHECK_EQ_INT(patio_call_wait(a, 5.0), PATIO_OK);
        CHECK_EQ_INT(patio_call_wait(b, 5.0), PATIO_OK);
        CHECK_EQ_INT(patio_result_int(a) + patio_result_int(b), 5 * i);
        patio_call_free(a);
        patio_call_free(b);
    }
    patio_broker_free(b2);
    patio_broker_free(b1);
    patio_executor_free(e1);
    patio_executor_free(e2);
    patio_registry_free(r1);
    patio_registry_free(r2);
    CHECK(counts.allocs > 0);
    CHECK_EQ_INT(counts.allocs, counts.frees);
}

/* A host-driven loop: the broker runs on a loop this thread pumps. */
static void test_host_loop(void)
{
    node s;
    patio_registry *rpc = patio_registry_new(NULL);
    patio_executor *ex;
    patio_broker *b;
    patio_loop *loop = patio_loop_new(NULL);
    patio_tcp_config cfg = cfg_for(0);
    patio_call *call;
    CHECK(node_start(&s, "server", 1) == 0);
    patio_register(rpc, "mul", mul, NULL);
    ex = patio_thread_pool_new(rpc, 1);
    cfg.base.loop = loop;
    b = patio_tcp_broker_new(ex, &cfg);
    CHECK(b != NULL);
    CHECK_EQ_INT(patio_tcp_connect(b, "127.0.0.1", s.port), PATIO_OK);
    CHECK_EQ_INT(patio_tcp_wait_peers(b, 1, 5.0), PATIO_OK);
    call = patio_call_sync(b, 5.0, "mul", "ii", 9, 9);
    CHECK_EQ_INT(patio_result_int(call), 81);
    patio_call_free(call);
    patio_broker_free(b);
    patio_executor_free(ex);
    patio_registry_free(rpc);
    patio_loop_free(loop);
    node_free(&s);
}

typedef struct tcase {
    const char *name;
    void (*fn)(void);
} tcase;

#define CASE(fn) { #fn, fn }

static const tcase cases[] = {
    CASE(test_client_calls_server),
    CASE(test_server_calls_client),
    CASE(test_mixed_mode),
    CASE(test_mesh_round_robin),
    CASE(test_remote_error),
    CASE(test_timeout),
    CASE(test_timeout_serial_reserved),
    CASE(test_callee_timeout),
    CASE(test_callee_timeout_groups),
    CASE(test_no_route),
    CASE(test_route_later),
    CASE(test_serial_wrap),
    CASE(test_discover_contents),
    CASE(test_reconnect),
#if defined(__linux__) && defined(TCP_TEST_FAKE_RESOLVER)
    CASE(test_connect_moves_past_hanging_address),
#endif
    CASE(test_peer_lost_mid_call),
    CASE(test_peer_lost_with_many_calls),
    CASE(test_calls_chained_on_loop_thread),
    CASE(test_inflight_limit),
    CASE(test_inflight_bytes_limit),
    CASE(test_paused_connection_notices_reset),
    CASE(test_executor_full),
    CASE(test_executor_closed_while_request_waits),
    CASE(test_max_connections),
    CASE(test_max_connections_evicts_silent_peers),
    CASE(test_keepalive_config_checked),
    CASE(test_keepalive_settings),
    CASE(test_large_frame_buffer_grows_with_its_bytes),
    CASE(test_output_backlog_both_directions),
    CASE(test_output_backlog_large_results),
    CASE(test_never_reading_peer_is_bounded),
    CASE(test_accept_out_of_fds_pauses),
    CASE(test_route_learnt_in_discovery),
#if defined(__linux__)
    CASE(test_keepalive_finds_vanished_peer),
#endif
    CASE(test_bad_oversize),
    CASE(test_bad_unknown_type),
    CASE(test_bad_stray_response),
    CASE(test_bad_duplicate_serial),
    CASE(test_bad_garbage),
    CASE(test_bad_silent_peer),
    CASE(test_bad_wrong_key),
    CASE(test_bad_replay),
    CASE(test_server_proof),
    CASE(test_ipv6),
    CASE(test_listen_any_and_config),
    CASE(test_no_leak),
    CASE(test_host_loop),
};

/* Runs every case against every setup (those whose name contains `only`,
 * if given), named "setup/case". test_tls.c runs the family this way too. */
static void run_tcp_family(const char *only)
{
    static char names[sizeof setups / sizeof setups[0]][sizeof cases / sizeof cases[0]][96];
    size_t s, i;
    for (s = 0; s < sizeof setups / sizeof setups[0]; s++) {
        g_setup = &setups[s];
        for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            if (only && !strstr(cases[i].name, only)) continue;
            snprintf(names[s][i], sizeof names[s][i], "%s/%s", setups[s].name, cases[i].name);
            th_run(names[s][i], cases[i].fn);
        }
    }
}

#ifndef TCP_TEST_NO_MAIN
int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    run_tcp_family(argc > 1 ? argv[1] : NULL);
    return th_summary("test_tcp");
}
#endif
