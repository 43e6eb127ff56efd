/* tests/fuzz/fuzz_frame.c - libFuzzer target for the TCP broker's input
 * path: framing, the handshake and discovery state machine, requests,
 * responses and errors, as bytes arriving on one connection.
 *
 * The first input byte picks where the connection starts:
 *   0  server, AUTH_DIGEST sent, expecting AUTH_REQUEST
 *   1  client, expecting AUTH_DIGEST (then AUTH_OK, discovery, ...)
 *   2  server, handshake done (REQUEST, RESPONSE, ERROR, DISCOVER_REQUEST)
 *   3  server in discovery (own DISCOVER_REQUEST has serial 2), with three
 *      calls of "f" waiting for a route: once the peer offers "f" they go
 *      out with serials 3, 4, 5 and the input may answer them
 * The rest is written into the other end of a socket pair while the
 * broker's loop (host-driven, on this thread) runs. Besides "never crash,
 * never touch freed memory", every frame the broker sends back is checked:
 * a known type, a serial other than 0 (and other than 0xffffffff unless it
 * answers a peer's frame), a payload of exactly
 * one valid MessagePack object within the frame limit. */
#define PATIO_IMPLEMENTATION
#include "patio.h"

#include <stdlib.h>

static patio_registry *g_rpc;
static patio_executor *g_ex;
static patio_loop *g_loop;
static patio_broker *g_b;

static int mul(patio_task *t)
{
    int64_t product = 1, x;
    while (patio_arg_next_int(t, &x)) product *= x;
    return patio_return_int(t, product);
}

static int echo(patio_task *t)
{
    patio_reader *r = patio_task_args(t);
    uint32_t i, n = patio_task_argc(t);
    patio_writer *w = patio_task_result(t);
    patio_write_array(w, n);
    for (i = 0; i < n; i++) {
        const void *raw;
        size_t len;
        if (patio_read_raw(r, &raw, &len) != PATIO_OK) return PATIO_ERR_DECODE;
        patio_write_raw(w, raw, len);
    }
    return w->err;
}

static void setup(void)
{
    patio_tcp_config cfg;
    if (g_b) return;
    g_rpc = patio_registry_new(NULL);
    patio_register(g_rpc, "mul", mul, NULL);
    patio_register(g_rpc, "echo", echo, NULL);
    g_loop = patio_loop_new(NULL);
    g_ex = patio_async_executor_new(g_rpc, 4);
    memset(&cfg, 0, sizeof cfg);
    cfg.base.loop = g_loop;
    cfg.key = "k";
    cfg.key_len = 1;
    cfg.max_frame_size = 4096;
    cfg.max_inflight = 4;
    g_b = patio_tcp_broker_new(g_ex, &cfg);
    if (!g_b) abort();
}

typedef struct job {
    int fd, mode;
    patio__tcp_conn *c;
} job;

static void start_conn(void *arg)
{
    job *j = (job *)arg;
    patio__tcp_broker *tb = (patio__tcp_broker *)g_b;
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    j->c = patio__tcp_conn_new(tb, j->fd, j->mode != 1, (struct sockaddr *)&sa);
    if (!j->c) {
        close(j->fd);
        return;
    }
    patio__tcp_conn_up(j->c, j->mode == 1 ? "peer" : NULL);
    if (j->mode == 2 && j->c->state == PATIO__TC_WAIT_AREQ) {
        j->c->state = PATIO__TC_DISCOVERY;
        patio__tcp_ready(j->c);
    } else if (j->mode == 3 && j->c->state == PATIO__TC_WAIT_AREQ) {
        patio__tcp_discovery_start(j->c);
    }
    patio__tcp_tail(tb);
}

static void stop_conn(void *arg)
{
    job *j = (job *)arg;
    patio__tcp_broker *tb = (patio__tcp_broker *)g_b;
    patio__tcp_conn *c;
    for (c = tb->conns; c; c = c->next)
        if (c == j->c) patio__tcp_conn_close(c, PATIO_LOG_DEBUG, "end of input");
    patio__tcp_tail(tb);
}

/* Output checks: every frame the broker sends must be valid. */
static uint8_t g_out[1 << 16];
static size_t g_out_len;
static int g_out_overflow;

static void check_output(void)
{
    size_t pos = 0;
    for (;;) {
        patio__frame f;
        int rc = patio__frame_parse(g_out + pos, g_out_len - pos, 4096, &f);
        if (rc < 0) abort(); /* above our own limit */
        if (rc == 0) break;
        switch (f.type) {
        case PATIO__PKT_AUTH_DIGEST: case PATIO__PKT_AUTH_REQUEST: case PATIO__PKT_AUTH_OK:
        case PATIO__PKT_DISCOVER_REQUEST: case PATIO__PKT_DISCOVER_RESPONSE:
        case PATIO__PKT_REQUEST: case PATIO__PKT_RESPONSE: case PATIO__PKT_ERROR:
            break;
        default:
            abort();
        }
        if (f.serial == 0) abort();
        /* fresh serials are never 0xffffffff; answers echo the peer's */
        if (f.serial == 0xffffffffu && f.type != PATIO__PKT_DISCOVER_RESPONSE && f.type != PATIO__PKT_RESPONSE &&
            f.type != PATIO__PKT_ERROR)
            abort();
        if (patio_msgpack_check_all(f.payload, f.size, 0) != PATIO_OK) abort();
        if (f.type == PATIO__PKT_ERROR) {
            const char *t, *m;
            size_t tl, ml;
            if (patio__decode_exception(f.payload, f.size, &t, &tl, &m, &ml) != PATIO_OK) abort();
        }
        pos += PATIO__FRAME_HEADER + f.size;
    }
    memmove(g_out, g_out + pos, g_out_len - pos);
    g_out_len -= pos;
}

static void drain(int fd)
{
    for (;;) {
        uint8_t tmp[4096];
        ssize_t n = recv(fd, tmp, sizeof tmp, 0);
        if (n <= 0) break;
        if (g_out_overflow || g_out_len + (size_t)n > sizeof g_out) {
            g_out_overflow = 1;
            continue;
        }
        memcpy(g_out + g_out_len, tmp, (size_t)n);
        g_out_len += (size_t)n;
        check_output();
    }
}

static void pump(int fd)
{
    int idle = 0, i;
    patio__broker_core *core = patio__core(g_b);
    for (i = 0; i < 10000 && idle < 3; i++) {
        size_t running;
        int ran = patio_loop_run_once(g_loop, 0);
        if (fd >= 0) drain(fd);
        running = patio__broker_tasks_running(core);
        idle = ran == 0 && running == 0 ? idle + 1 : 0;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int sv[2];
    job j;
    patio_call *calls[3];
    size_t pos = 1, i, ncalls = 0;
    if (size < 1) return 0;
    setup();
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return 0;
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL, 0) | O_NONBLOCK);
    fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL, 0) | O_NONBLOCK);
    g_out_len = 0;
    g_out_overflow = 0;
    memset(&j, 0, sizeof j);
    j.fd = sv[0];
    j.mode = data[0] % 4;
    if (j.mode == 3) {
        patio_call_opts o;
        memset(&o, 0, sizeof o);
        o.timeout = 0.001;
        for (ncalls = 0; ncalls < 3; ncalls++) calls[ncalls] = patio_call_start(g_b, &o, "f", "i", (int)ncalls);
    }
    patio_loop_post(g_loop, start_conn, &j);
    pump(sv[1]);
    while (pos < size) {
        ssize_t n = send(sv[1], data + pos, size - pos, MSG_NOSIGNAL);
        if (n <= 0) break;
        pos += (size_t)n;
        pump(sv[1]);
    }
    pump(sv[1]);
    patio_loop_post(g_loop, stop_conn, &j);
    pump(sv[1]);
    for (i = 0; i < ncalls; i++) {
        patio_call_wait(calls[i], 1.0);
        patio_call_free(calls[i]);
    }
    pump(-1);
    close(sv[1]);
    return 0;
}
