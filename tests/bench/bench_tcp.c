/* bench_tcp: TCP broker, client -> server mul(1, 2, 3), with 1, 64 and 1024
 * calls in flight, with the async executor and with the thread pool. Each
 * figure is printed beside a raw TCP ping-pong measured in the same run:
 * two threads over a loopback connection, the same 9-byte framing and the
 * same request and response bytes, one write() per batch of frames, no
 * MessagePack decoding, no registry, no executor. Figures are medians of
 * ROUNDS runs, raw and patio runs alternating so that both see the same
 * machine state.
 *
 * Placement: the server broker and the client broker live in this process,
 * each with its own loop thread, like the baseline's two threads. On a
 * 2-core machine that gives each side a core; a forked server would be
 * scheduled the same way (two busy threads, two cores) but make the latency
 * bookkeeping cross a process boundary for no gain in honesty.
 *
 * The baseline's two threads are pinned to two different CPUs (Linux, when
 * the process may use two). Unpinned, the kernel's synchronous socket
 * wake-ups often pull both onto one core, and the baseline then jumps
 * between two levels from run to run (on a 2-vCPU VM about 13 us and
 * 50 us per round trip). patio's loop threads poll briefly before they
 * sleep and so run on two cores: the cross-core ping-pong is the one to
 * compare with, and the stable one.
 *
 * The window is kept full from the client's loop thread: each completion
 * callback starts the next call, so the main thread only waits for the end.
 *
 * The spread: each round gives a ratio of its own (the patio run against
 * the raw run beside it); the lowest and the highest of them are printed
 * after the medians, because at 1024 in flight the ratio of one round may
 * differ from the next by a third (see README, Performance).
 *
 * Latency: the baseline reads the clock once per batch of answers; timing
 * every patio call instead (two clock reads per call, on the loop thread
 * that also runs the client) cost patio about 8% of its calls/s. With more
 * than one call in flight, one call in LAT_SAMPLE is timed, a uniform sample
 * whose median is the p50; with one in flight every call is.
 *
 *   make bench      (or: cc -O2 -std=c99 -pthread -I. tests/bench/bench_tcp.c) */
#define PATIO_IMPLEMENTATION
#include "patio.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <sched.h>

#define ROUNDS 5
#define MAX_WINDOW 1024
#define LAT_SAMPLE 8

typedef struct window_spec {
    int window;
    long calls;
} window_spec;

static const window_spec WINDOWS[] = {{1, 4000}, {64, 100000}, {1024, 400000}};
#define NWINDOWS ((int)(sizeof WINDOWS / sizeof WINDOWS[0]))

/* The frames patio sends for mul(1, 2, 3) with a 10 s timeout, and the answer. */
static const uint8_t REQUEST_PAYLOAD[] = {
    0xc7, 0x13, 0x01, 0x94, 0xa3, 'm', 'u', 'l', 0x93, 0x01, 0x02, 0x03, 0x80,
    0xcb, 0x40, 0x24, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
#define REQUEST_SIZE (9 + sizeof REQUEST_PAYLOAD)
#define RESPONSE_SIZE 10

#include "bench_util.h"

static void die(const char *what)
{
    fprintf(stderr, "bench_tcp: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            die("send");
        }
        p += w;
        n -= (size_t)w;
    }
}

/* ---- raw baseline ------------------------------------------------------ */

/* The CPUs the raw threads run on: the first two this process may use, or
 * -1 (no pinning) where that is not known. */
static int raw_cpu[2] = {-1, -1};

static void find_raw_cpus(void)
{
#if defined(__linux__)
    cpu_set_t set;
    int cpu, n = 0;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return;
    for (cpu = 0; cpu < CPU_SETSIZE && n < 2; cpu++)
        if (CPU_ISSET(cpu, &set)) raw_cpu[n++] = cpu;
    if (n < 2) raw_cpu[0] = raw_cpu[1] = -1;
#endif
}

static void pin_self(int which)
{
#if defined(__linux__)
    cpu_set_t set;
    if (raw_cpu[which] < 0) return;
    CPU_ZERO(&set);
    CPU_SET(raw_cpu[which], &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
#else
    (void)which;
#endif
}

/* Server: reads whatever arrived, answers every complete frame, one write. */
static void *raw_server(void *arg)
{
    int fd = *(int *)arg;
    size_t cap = 1 << 20, have = 0;
    pin_self(1);
    uint8_t *in = (uint8_t *)malloc(cap);
    uint8_t *out = (uint8_t *)malloc(cap);
    if (!in || !out) die("malloc");
    for (;;) {
        size_t pos = 0, olen = 0;
        ssize_t r = recv(fd, in + have, cap - have, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        have += (size_t)r;
        while (have - pos >= 9) {
            uint32_t size = get_be32(in + pos + 1);
            if (have - pos < 9 + (size_t)size) break;
            out[olen] = 20;                      /* RESPONSE */
            put_be32(out + olen + 1, 1);
            memcpy(out + olen + 5, in + pos + 5, 4); /* echo the serial */
            out[olen + 9] = 0x06;                /* 6 */
            olen += RESPONSE_SIZE;
            pos += 9 + size;
        }
        memmove(in, in + pos, have - pos);
        have -= pos;
        if (olen) write_all(fd, out, olen);
    }
    free(in);
    free(out);
    close(fd);
    return NULL;
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void append_request(uint8_t *buf, size_t *len, uint32_t serial)
{
    uint8_t *p = buf + *len;
    p[0] = 10; /* REQUEST */
    put_be32(p + 1, (uint32_t)sizeof REQUEST_PAYLOAD);
    put_be32(p + 5, serial);
    memcpy(p + 9, REQUEST_PAYLOAD, sizeof REQUEST_PAYLOAD);
    *len += REQUEST_SIZE;
}

/* Runs `calls` round trips with `window` in flight on the current thread.
 * Returns calls/s; the
 * latency of each call (from the write that carried it to the read that
 * brought its answer) goes to lat[]. The server answers in order, so the
 * i-th answer belongs to the i-th request. */
static double raw_client(int window, long calls, double *lat)
{
    struct sockaddr_in addr;
    socklen_t alen = sizeof addr;
    int lfd, cfd, sfd;
    pthread_t th;
    uint8_t *out = (uint8_t *)malloc((size_t)MAX_WINDOW * REQUEST_SIZE);
    uint8_t *in = (uint8_t *)malloc(1 << 20);
    size_t olen = 0, have = 0;
    long sent = 0, done = 0, i;
    double t0, t_now;
    double *t_sent = (double *)malloc((size_t)calls * sizeof(double));
    uint32_t serial = 0;

    if (!out || !in || !t_sent) die("malloc");
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 1) ||
        getsockname(lfd, (struct sockaddr *)&addr, &alen))
        die("listen");
    cfd = socket(AF_INET, SOCK_STREAM, 0);
    if (cfd < 0 || connect(cfd, (struct sockaddr *)&addr, sizeof addr)) die("connect");
    sfd = accept(lfd, NULL, NULL);
    if (sfd < 0) die("accept");
    close(lfd);
    set_nodelay(cfd);
    set_nodelay(sfd);
    if (pthread_create(&th, NULL, raw_server, &sfd)) die("pthread_create");

    t0 = now_s();
    while (sent < window && sent < calls) {
        append_request(out, &olen, ++serial);
        t_sent[sent++] = t0;
    }
    write_all(cfd, out, olen);
    while (done < calls) {
        size_t pos = 0;
        long completed = 0;
        ssize_t r = recv(cfd, in + have, (1 << 20) - have, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) die("recv");
        have += (size_t)r;
        while (have - pos >= RESPONSE_SIZE) {
            pos += RESPONSE_SIZE;
            completed++;
        }
        memmove(in, in + pos, have - pos);
        have -= pos;
        t_now = now_s();
        for (i = 0; i < completed; i++) lat[done + i] = t_now - t_sent[done + i];
        done += completed;
        olen = 0;
        while (completed-- > 0 && sent < calls) {
            append_request(out, &olen, ++serial);
            t_sent[sent++] = t_now;
        }
        if (olen) write_all(cfd, out, olen);
    }
    t0 = now_s() - t0;
    free(t_sent);
    shutdown(cfd, SHUT_WR);
    pthread_join(th, NULL);
    close(cfd);
    free(out);
    free(in);
    return (double)calls / t0;
}

typedef struct raw_args {
    int window;
    long calls;
    double *lat;
    double rate;
} raw_args;

static void *raw_client_thread(void *arg)
{
    raw_args *a = (raw_args *)arg;
    pin_self(0);
    a->rate = raw_client(a->window, a->calls, a->lat);
    return NULL;
}

/* The baseline's client runs on a thread of its own, so that pinning it
 * leaves the main thread (and the brokers' threads) alone. */
static double raw_run(int window, long calls, double *lat)
{
    raw_args a;
    pthread_t th;
    a.window = window;
    a.calls = calls;
    a.lat = lat;
    a.rate = 0;
    if (pthread_create(&th, NULL, raw_client_thread, &a)) die("pthread_create");
    pthread_join(th, NULL);
    return a.rate;
}

/* ---- patio ------------------------------------------------------------- */

static int mul(patio_task *t)
{
    int64_t product = 1, x;
    while (patio_arg_next_int(t, &x)) product *= x;
    return patio_return_int(t, product);
}

typedef struct run_state run_state;
typedef struct slot {
    run_state *run;
    double start;         /* 0 = not timed */
} slot;

struct run_state {
    patio_broker *client;
    long calls, started, done, errors;
    int window;
    double *lat;          /* latencies of the timed calls */
    long nlat;
    slot slots[MAX_WINDOW];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int finished;
};

static void start_call(run_state *run, slot *s);

/* Runs on the client's loop thread. */
static void on_done(patio_call *call, void *user)
{
    slot *s = (slot *)user;
    run_state *run = s->run;
    if (patio_call_status(call) != PATIO_OK || patio_result_int(call) != 6) run->errors++;
    if (s->start > 0) run->lat[run->nlat++] = now_s() - s->start;
    patio_call_free(call);
    run->done++;
    if (run->started < run->calls) {
        start_call(run, s);
    } else if (run->done == run->calls) {
        pthread_mutex_lock(&run->mu);
        run->finished = 1;
        pthread_cond_signal(&run->cv);
        pthread_mutex_unlock(&run->mu);
    }
}

static void start_call(run_state *run, slot *s)
{
    patio_call_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.timeout = 10.0;
    opts.on_done = on_done;
    opts.user = s;
    s->start = run->window == 1 || run->started % LAT_SAMPLE == 0 ? now_s() : 0;
    run->started++;
    patio_call_start(run->client, &opts, "mul", "iii", 1, 2, 3);
}

/* Fills the window from the loop thread, so that every counter has one thread. */
static void kick(void *arg)
{
    run_state *run = (run_state *)arg;
    int i;
    for (i = 0; i < run->window && run->started < run->calls; i++) start_call(run, &run->slots[i]);
}

/* Runs `calls` calls; *nlat latencies are stored in lat. */
static double patio_run(patio_broker *client, int window, long calls, double *lat, long *nlat)
{
    run_state *run = (run_state *)calloc(1, sizeof *run);
    double t0, rate;
    int i;
    if (!run) die("calloc");
    run->client = client;
    run->calls = calls;
    run->window = window;
    run->lat = lat;
    for (i = 0; i < MAX_WINDOW; i++) run->slots[i].run = run;
    pthread_mutex_init(&run->mu, NULL);
    pthread_cond_init(&run->cv, NULL);

    t0 = now_s();
    patio_loop_post(patio_broker_loop(client), kick, run);
    pthread_mutex_lock(&run->mu);
    while (!run->finished) pthread_cond_wait(&run->cv, &run->mu);
    pthread_mutex_unlock(&run->mu);
    rate = (double)calls / (now_s() - t0);
    *nlat = run->nlat;
    if (run->errors) fprintf(stderr, "bench_tcp: %ld calls failed\n", run->errors);
    pthread_mutex_destroy(&run->mu);
    pthread_cond_destroy(&run->cv);
    free(run);
    return rate;
}

typedef struct pair {
    patio_registry *server_rpc, *client_rpc;
    patio_executor *server_ex, *client_ex;
    patio_broker *server, *client;
} pair;

static void pair_open(pair *p, int use_pool)
{
    patio_tcp_config cfg;
    static const char key[] = "bench-key";
    int port = 0;

    memset(p, 0, sizeof *p);
    memset(&cfg, 0, sizeof cfg);
    cfg.key = key;
    cfg.key_len = sizeof key - 1;
    p->server_rpc = patio_registry_new(NULL);
    patio_register(p->server_rpc, "mul", mul, NULL);
    p->server_ex = use_pool ? patio_thread_pool_new(p->server_rpc, 4)
                            : patio_async_executor_new(p->server_rpc, 4);
    p->server = patio_tcp_broker_new(p->server_ex, &cfg);
    if (!p->server || patio_tcp_listen(p->server, "127.0.0.1", 0, &port) != PATIO_OK)
        die("server broker");
    p->client_rpc = patio_registry_new(NULL);
    p->client_ex = patio_null_executor_new(p->client_rpc);
    p->client = patio_tcp_client_new(p->client_ex, &cfg, "127.0.0.1", port);
    if (!p->client || patio_tcp_wait_peers(p->client, 1, 10.0) != PATIO_OK) die("client broker");
}

static void pair_close(pair *p)
{
    patio_broker_free(p->client);
    patio_executor_free(p->client_ex);
    patio_registry_free(p->client_rpc);
    patio_broker_free(p->server);
    patio_executor_free(p->server_ex);
    patio_registry_free(p->server_rpc);
}

/* ---- report ------------------------------------------------------------ */

static void bench_executor(int use_pool)
{
    const char *kind = use_pool ? "thread pool" : "async";
    pair p;
    int w, r;

    pair_open(&p, use_pool);
    {   /* warm-up: connection, allocator, caches */
        double *warm = (double *)malloc(20000 * sizeof(double));
        long nwarm;
        if (!warm) die("malloc");
        patio_run(p.client, 64, 20000, warm, &nwarm);
        free(warm);
    }
    for (w = 0; w < NWINDOWS; w++) {
        int window = WINDOWS[w].window;
        long calls = WINDOWS[w].calls;
        double raw_rate[ROUNDS], pat_rate[ROUNDS], raw_p50[ROUNDS], pat_p50[ROUNDS];
        double round_ratio[ROUNDS];
        double rr, pr, rl, pl, ratio;
        long nlat;
        double *lat = (double *)malloc((size_t)calls * sizeof(double));
        char verdict[64];
        if (!lat) die("malloc");
        for (r = 0; r < ROUNDS; r++) {
            raw_rate[r] = raw_run(window, calls, lat);
            raw_p50[r] = median(lat, (int)calls);
            pat_rate[r] = patio_run(p.client, window, calls, lat, &nlat);
            pat_p50[r] = median(lat, (int)nlat);
            round_ratio[r] = window == 1 ? pat_p50[r] / raw_p50[r] : pat_rate[r] / raw_rate[r];
        }
        free(lat);
        rr = median(raw_rate, ROUNDS);
        pr = median(pat_rate, ROUNDS);
        rl = median(raw_p50, ROUNDS);
        pl = median(pat_p50, ROUNDS);
        if (window == 1) {
            double target = use_pool ? 1.5 : 1.2;
            ratio = pl / rl;
            snprintf(verdict, sizeof verdict, "p50 <= %.1f x raw: %s", target,
                     ratio <= target ? "met" : "MISSED");
        } else {
            double target = window >= 1024 ? 0.5 : 0.8;
            ratio = pr / rr;
            snprintf(verdict, sizeof verdict, "calls/s >= %.1f x raw: %s", target,
                     ratio >= target ? "met" : "MISSED");
        }
        median(round_ratio, ROUNDS); /* sorts: the lowest first, the highest last */
        printf("%-11s %5d %10.0f %10.0f %5.2f %9.1f %9.1f %5.2f %5.2f-%-5.2f %s\n", kind, window, pr, rr,
               pr / rr, pl * 1e6, rl * 1e6, pl / rl, round_ratio[0], round_ratio[ROUNDS - 1], verdict);
        fflush(stdout);
    }
    pair_close(&p);
}

int main(void)
{
    double t0 = now_s();
    find_raw_cpus();
    printf("bench_tcp: client -> server mul(1, 2, 3) over loopback TCP, medians of %d runs,\n"
           "each beside a raw ping-pong (same framing, batched writes%s) run in alternation;\n"
           "per round: the lowest and the highest ratio of a single round (the target's measure)\n\n"
           "%-11s %5s %10s %10s %5s %9s %9s %5s %-11s %s\n",
           ROUNDS, raw_cpu[0] >= 0 ? ", threads on two CPUs" : "", "executor", "inflt", "calls/s", "raw", "ratio", "p50 us", "raw us", "ratio",
           "per round", "target");
    bench_executor(0);
    bench_executor(1);
    printf("bench_tcp: %.1f s\n", now_s() - t0);
    return 0;
}
