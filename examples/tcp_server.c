/* tcp_server: a TCP server broker that executes tasks for its clients, the
 * "server executing tasks" example of patio's README.
 *
 *   cc -std=c99 -Wall -Wextra -pthread examples/tcp_server.c -o tcp_server
 *   ./tcp_server --key secret-key            # then, elsewhere:
 *   ./tcp_client --key secret-key mul 1 2 3  # prints 6
 *
 * Functions, in registration order (the order clients discover them):
 *   mul(*numbers)      product; ints stay ints (OverflowError past int64),
 *                      any float makes a float
 *   div(a, b)          a / b as a float (Python's true division);
 *                      ZeroDivisionError("division by zero")
 *   sleep(seconds)     sleeps (float seconds) on a worker thread, returns None
 *   echo(*args)        returns its argument list, values untouched
 *
 * Options: --host ADDR (127.0.0.1), --port N (15383), --key KEY (none),
 * --workers N (16), --handshake-timeout S (library default). Prints "ready"
 * on stdout once listening and runs until SIGINT or SIGTERM.
 *
 * Executor choice: a thread pool. `sleep` blocks the thread that runs it, so
 * it must not run on the broker's loop thread (the async executor runs tasks
 * there); on a pool it holds one worker while the loop keeps serving other
 * calls. 16 workers let 16 sleeps overlap; more queue (bounded). */
#define PATIO_IMPLEMENTATION
#include "../patio.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- tasks ----------------------------------------------------------- */

/* 1 if a * b does not fit int64_t (checked without overflowing). */
static int mul_overflows(int64_t a, int64_t b)
{
    if (a == 0 || b == 0) return 0;
    if (a > 0) return b > 0 ? a > INT64_MAX / b : b < INT64_MIN / a;
    return b > 0 ? a < INT64_MIN / b : a < INT64_MAX / b;
}

static int mul(patio_task *t)
{
    patio_reader *args = patio_task_args(t);
    uint32_t i, n = patio_task_argc(t);
    int64_t iprod = 1;
    double fprod = 1.0;
    int is_float = 0;

    for (i = 0; i < n; i++) {
        patio_value v;
        if (patio_read(args, &v) != PATIO_OK)
            return patio_fail(t, "TypeError", "mul() got a malformed argument");
        if (v.type == PATIO_INT && !is_float) {
            int64_t x = v.v.i;
            if (mul_overflows(iprod, x))
                return patio_fail(t, "OverflowError", "integer overflow in mul()");
            iprod *= x;
        } else if (v.type == PATIO_UINT) {
            return patio_fail(t, "OverflowError", "integer argument above the int64 range");
        } else if (v.type == PATIO_INT || v.type == PATIO_FLOAT) {
            double x = v.type == PATIO_INT ? (double)v.v.i : v.v.f;
            if (!is_float) fprod = (double)iprod;
            is_float = 1;
            fprod *= x;
        } else {
            return patio_fail(t, "TypeError", "mul() arguments must be numbers, not %s",
                              patio_type_name(v.type));
        }
    }
    return is_float ? patio_return_double(t, fprod) : patio_return_int(t, iprod);
}

static int div_(patio_task *t)
{
    double a, b;
    if (patio_args(t, "dd", &a, &b) != PATIO_OK) return PATIO_ERR_TYPE;
    if (b == 0) return patio_fail(t, "ZeroDivisionError", "division by zero");
    return patio_return_double(t, a / b);
}

static int sleep_(patio_task *t)
{
    double seconds;
    struct timespec ts;
    if (patio_args(t, "d", &seconds) != PATIO_OK) return PATIO_ERR_TYPE;
    if (!(seconds >= 0)) return patio_fail(t, "ValueError", "sleep length must be non-negative");
    if (seconds > 86400.0) return patio_fail(t, "OverflowError", "sleep length is too large");
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    return patio_return_nil(t);
}

static int echo(patio_task *t)
{
    patio_reader *args = patio_task_args(t);
    patio_writer *out = patio_task_result(t);
    patio_reader kwargs;
    uint32_t i, n = patio_task_argc(t), nkw = 0;

    if (patio_task_kwargs(t, &kwargs) == PATIO_OK && patio_read_map(&kwargs, &nkw) == PATIO_OK &&
        nkw > 0)
        return patio_fail(t, "TypeError", "echo() takes no keyword arguments");
    patio_write_array(out, n);
    for (i = 0; i < n; i++) {
        const void *raw;
        size_t len;
        if (patio_read_raw(args, &raw, &len) != PATIO_OK)
            return patio_fail(t, "TypeError", "echo() got a malformed argument");
        patio_write_raw(out, raw, len);
    }
    return out->err ? patio_fail(t, "OverflowError", "result too large") : PATIO_OK;
}

/* ---- command line ------------------------------------------------------ */

typedef struct options {
    const char *host, *key;
    int port, workers;
    double handshake_timeout;
} options;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tcp_server [--host ADDR] [--port N] [--key KEY] [--workers N]\n"
            "                  [--handshake-timeout SECONDS]\n"
            "Serves mul, div, sleep and echo over TCP; prints \"ready\" once listening\n"
            "and runs until SIGINT or SIGTERM.\n"
            "  --host ADDR               address to listen on (default 127.0.0.1)\n"
            "  --port N                  port (default %d; 0 = any free port)\n"
            "  --key KEY                 shared key, at most 32 bytes (default: none)\n"
            "  --workers N               thread pool size (default 16)\n"
            "  --handshake-timeout S     seconds a new connection has to authenticate\n",
            PATIO_TCP_DEFAULT_PORT);
}

static int parse_int(const char *s, int lo, int hi, int *out)
{
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

static int parse_options(int argc, char **argv, options *o)
{
    int i;
    for (i = 1; i < argc; i += 2) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        }
        if (!val) break;
        if (!strcmp(a, "--host")) o->host = val;
        else if (!strcmp(a, "--key")) o->key = val;
        else if (!strcmp(a, "--port")) {
            if (parse_int(val, 0, 65535, &o->port)) break;
        } else if (!strcmp(a, "--workers")) {
            if (parse_int(val, 1, 1024, &o->workers)) break;
        } else if (!strcmp(a, "--handshake-timeout")) {
            char *end;
            o->handshake_timeout = strtod(val, &end);
            if (end == val || *end || !(o->handshake_timeout > 0)) break;
        } else break;
    }
    if (i < argc) {
        fprintf(stderr, "tcp_server: bad or incomplete option '%s'\n", argv[i]);
        usage(stderr);
        return -1;
    }
    if (strlen(o->key) > 32) {
        fprintf(stderr, "tcp_server: the key is longer than 32 bytes\n");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    options o = {"127.0.0.1", "", PATIO_TCP_DEFAULT_PORT, 16, 0};
    patio_tcp_config cfg;
    patio_registry *rpc;
    patio_executor *pool;
    patio_broker *broker;
    patio_tcp_stats stats;
    sigset_t stop_signals;
    int sig = 0, rc, bound = 0;

    if (parse_options(argc, argv, &o)) return 2;

    /* Block SIGINT and SIGTERM before any thread starts, so that every thread
     * (the library's included) inherits the mask and only sigwait() below
     * receives them: no handler, no async-signal-safety concerns. */
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);

    rpc = patio_registry_new(NULL);
    patio_register(rpc, "mul", mul, NULL);
    patio_register(rpc, "div", div_, NULL);
    patio_register(rpc, "sleep", sleep_, NULL);
    patio_register(rpc, "echo", echo, NULL);
    pool = patio_thread_pool_new(rpc, o.workers);

    memset(&cfg, 0, sizeof cfg);
    cfg.key = o.key;
    cfg.key_len = strlen(o.key);
    cfg.handshake_timeout = o.handshake_timeout;
    broker = patio_tcp_broker_new(pool, &cfg);
    if (!broker) {
        fprintf(stderr, "tcp_server: cannot create the broker\n");
        return 1;
    }
    rc = patio_tcp_listen(broker, o.host, o.port, &bound);
    if (rc != PATIO_OK) {
        fprintf(stderr, "tcp_server: cannot listen on %s:%d: %s\n", o.host, o.port,
                patio_strerror(rc));
        patio_broker_free(broker);
        patio_executor_free(pool);
        patio_registry_free(rpc);
        return 1;
    }
    if (o.port == 0) fprintf(stderr, "tcp_server: listening on %s:%d\n", o.host, bound);
    printf("ready\n");
    fflush(stdout);

    while (sigwait(&stop_signals, &sig) != 0) {}
    fprintf(stderr, "tcp_server: %s, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    if (patio_tcp_stats_get(broker, &stats) == PATIO_OK)
        fprintf(stderr,
                "tcp_server: %llu calls served, %llu connections accepted, "
                "%llu protocol errors, %llu failed authentications\n",
                (unsigned long long)stats.calls_served,
                (unsigned long long)stats.connections_accepted,
                (unsigned long long)stats.protocol_errors,
                (unsigned long long)stats.auth_failures);

    patio_broker_free(broker);   /* closes every connection; clients see EOF */
    patio_executor_free(pool);   /* a running sleep finishes first */
    patio_registry_free(rpc);
    return 0;
}
