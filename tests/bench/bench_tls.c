/* bench_tls: the TCP broker over TLS (patio_tls.h, mbedTLS) beside plain
 * TCP in the same run: client -> server mul(1, 2, 3) calls per second with
 * 1 and 1024 calls in flight (median of ROUNDS, TLS and plain alternating),
 * then TLS handshakes per second (new client brokers connecting one after
 * another: TCP connect + TLS handshake + the key handshake + discovery).
 * Server and client brokers live in this process, each with its own loop
 * thread; async executor on the server, ECDSA P-256 certificates made by
 * tests/tls/make_certs.sh.
 *
 *   make bench   (or: cc -O2 -std=c99 -pthread -I. tests/bench/bench_tls.c
 *                 -lmbedtls -lmbedx509 -lmbedcrypto) */
#define PATIO_IMPLEMENTATION
#include "patio.h"
#define PATIO_TLS_IMPLEMENTATION
#include "patio_tls.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 5
#define MAX_WINDOW 1024

#include "bench_util.h"

static void die(const char *what)
{
    fprintf(stderr, "bench_tls: %s\n", what);
    exit(1);
}

static int mul(patio_task *t)
{
    int64_t product = 1, x;
    while (patio_arg_next_int(t, &x)) product *= x;
    return patio_return_int(t, product);
}

/* ---- a window of calls kept full from the client's loop thread ---------- */

typedef struct run_state {
    patio_broker *client;
    long calls, started, done, errors;
    int window;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int finished;
} run_state;

static void start_call(run_state *run);

static void on_done(patio_call *call, void *user)
{
    run_state *run = (run_state *)user;
    if (patio_call_status(call) != PATIO_OK || patio_result_int(call) != 6) run->errors++;
    patio_call_free(call);
    run->done++;
    if (run->started < run->calls) {
        start_call(run);
    } else if (run->done == run->calls) {
        pthread_mutex_lock(&run->mu);
        run->finished = 1;
        pthread_cond_signal(&run->cv);
        pthread_mutex_unlock(&run->mu);
    }
}

static void start_call(run_state *run)
{
    patio_call_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.timeout = 30.0;
    opts.on_done = on_done;
    opts.user = run;
    run->started++;
    patio_call_start(run->client, &opts, "mul", "iii", 1, 2, 3);
}

static void kick(void *arg)
{
    run_state *run = (run_state *)arg;
    int i;
    for (i = 0; i < run->window && run->started < run->calls; i++) start_call(run);
}

static double calls_per_s(patio_broker *client, int window, long calls)
{
    run_state run;
    double t0, rate;
    memset(&run, 0, sizeof run);
    run.client = client;
    run.calls = calls;
    run.window = window;
    pthread_mutex_init(&run.mu, NULL);
    pthread_cond_init(&run.cv, NULL);
    t0 = now_s();
    patio_loop_post(patio_broker_loop(client), kick, &run);
    pthread_mutex_lock(&run.mu);
    while (!run.finished) pthread_cond_wait(&run.cv, &run.mu);
    pthread_mutex_unlock(&run.mu);
    rate = (double)calls / (now_s() - t0);
    if (run.errors) fprintf(stderr, "bench_tls: %ld calls failed\n", run.errors);
    pthread_mutex_destroy(&run.mu);
    pthread_cond_destroy(&run.cv);
    return rate;
}

/* ---- brokers ------------------------------------------------------------- */

static const char KEY[] = "bench-key";

static patio_tcp_config cfg_of(patio_tls *tls)
{
    patio_tcp_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.key = KEY;
    cfg.key_len = sizeof KEY - 1;
    cfg.reconnect_delay = 0.01;
    if (tls) patio_tls_use(&cfg, tls);
    return cfg;
}

typedef struct side {
    patio_registry *rpc;
    patio_executor *ex;
    patio_broker *b;
} side;

static void server_open(side *s, patio_tls *tls, int *port)
{
    patio_tcp_config cfg = cfg_of(tls);
    s->rpc = patio_registry_new(NULL);
    patio_register(s->rpc, "mul", mul, NULL);
    s->ex = patio_async_executor_new(s->rpc, 4);
    s->b = patio_tcp_broker_new(s->ex, &cfg);
    if (!s->b || patio_tcp_listen(s->b, "127.0.0.1", 0, port) != PATIO_OK) die("server broker");
}

static void client_open(side *s, patio_tls *tls, int port)
{
    patio_tcp_config cfg = cfg_of(tls);
    s->rpc = patio_registry_new(NULL);
    s->ex = patio_null_executor_new(s->rpc);
    s->b = patio_tcp_client_new(s->ex, &cfg, "127.0.0.1", port);
    if (!s->b || patio_tcp_wait_peers(s->b, 1, 10.0) != PATIO_OK) die("client broker");
}

static void side_close(side *s)
{
    patio_broker_free(s->b);
    patio_executor_free(s->ex);
    patio_registry_free(s->rpc);
}

static patio_tls *tls_from(const char *dir, const char *ca, const char *cert, const char *key)
{
    char a[600], b[600], c[600], err[300];
    patio_tls_config tc;
    patio_tls *t;
    memset(&tc, 0, sizeof tc);
    snprintf(a, sizeof a, "%s/%s", dir, ca);
    tc.ca_file = a;
    if (cert) {
        snprintf(b, sizeof b, "%s/%s", dir, cert);
        snprintf(c, sizeof c, "%s/%s", dir, key);
        tc.cert_file = b;
        tc.key_file = c;
    }
    t = patio_tls_new(&tc, err, sizeof err);
    if (!t) die(err);
    return t;
}

int main(void)
{
    static const struct { int window; long calls; } W[] = { { 1, 3000 }, { 1024, 200000 } };
    char dir[256], cmd[800];
    const char *src = __FILE__, *slash = strrchr(src, '/');
    int dl = slash ? (int)(slash - src) : 1, port_tls = 0, port_plain = 0;
    patio_tls *srv_tls, *cli_tls;
    side ts, tc, ps, pc;
    size_t w;
    int r, i, n;
    double t0, el;

    snprintf(dir, sizeof dir, "/tmp/patio-bench-tls.XXXXXX");
    if (!mkdtemp(dir)) die("mkdtemp");
    snprintf(cmd, sizeof cmd, "sh '%.*s/../tls/make_certs.sh' '%s' > /dev/null 2>&1", dl, slash ? src : ".", dir);
    if (system(cmd) != 0) die("tests/tls/make_certs.sh failed (openssl missing?)");
    srv_tls = tls_from(dir, "ca.pem", "server.pem", "server.key");
    cli_tls = tls_from(dir, "ca.pem", NULL, NULL);
    printf("mbedTLS %s, ECDSA P-256 certificates, %d rounds (median)\n", patio_tls_library_version(), ROUNDS);

    server_open(&ts, srv_tls, &port_tls);
    client_open(&tc, cli_tls, port_tls);
    server_open(&ps, NULL, &port_plain);
    client_open(&pc, NULL, port_plain);
    for (w = 0; w < sizeof W / sizeof W[0]; w++) {
        double tls_r[ROUNDS], plain_r[ROUNDS];
        calls_per_s(tc.b, W[w].window, W[w].calls / 10); /* warm-up */
        calls_per_s(pc.b, W[w].window, W[w].calls / 10);
        for (r = 0; r < ROUNDS; r++) {
            tls_r[r] = calls_per_s(tc.b, W[w].window, W[w].calls);
            plain_r[r] = calls_per_s(pc.b, W[w].window, W[w].calls);
        }
        printf("%4d in flight: TLS %9.0f calls/s   plain TCP %9.0f calls/s   (TLS/plain %.2f)\n", W[w].window,
               median(tls_r, ROUNDS), median(plain_r, ROUNDS), median(tls_r, ROUNDS) / median(plain_r, ROUNDS));
    }
    side_close(&tc);
    side_close(&pc);

    /* handshakes: client brokers connect one after another */
    n = 100;
    t0 = now_s();
    for (i = 0; i < n; i++) {
        side c;
        client_open(&c, cli_tls, port_tls);
        side_close(&c);
    }
    el = now_s() - t0;
    printf("TLS connections: %.0f per second (connect + TLS + key handshake + discovery, %d in a row)\n",
           n / el, n);
    t0 = now_s();
    for (i = 0; i < n; i++) {
        side c;
        client_open(&c, NULL, port_plain);
        side_close(&c);
    }
    printf("plain connections: %.0f per second (same, without TLS)\n", n / (now_s() - t0));

    side_close(&ts);
    side_close(&ps);
    patio_tls_free(srv_tls);
    patio_tls_free(cli_tls);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "bench_tls: could not remove %s\n", dir);
    return 0;
}
