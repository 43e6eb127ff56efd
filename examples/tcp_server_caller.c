/* tcp_server_caller: the "server is caller" pattern of patio's README. The
 * server executes nothing: it listens, and every interval calls mul(i, i) for
 * i = 0..9 on whichever workers (tcp_client_worker) are connected, spread
 * over them round robin, and prints the ten results the way Python's
 * asyncio.gather(..., return_exceptions=True) would be printed:
 *
 *   [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]
 *
 * A call that failed shows as TypeName('message'). Until a worker connects,
 * the calls wait for one (up to --timeout).
 *
 *   cc -std=c99 -Wall -Wextra -pthread examples/tcp_server_caller.c -o tcp_server_caller
 *   cc -std=c99 -Wall -Wextra -pthread examples/tcp_client_worker.c -o tcp_client_worker
 *   ./tcp_server_caller --key k &  ./tcp_client_worker --key k &  ./tcp_client_worker --key k
 *
 * Options: --host ADDR (127.0.0.1), --port N (15383), --key KEY,
 * --interval SECONDS (1), --rounds N (0 = until SIGINT/SIGTERM),
 * --timeout SECONDS (5, per call). Prints "ready" once listening. */
#define PATIO_IMPLEMENTATION
#include "../patio.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CALLS_PER_ROUND 10

typedef struct options {
    const char *host, *key;
    int port, rounds;
    double interval, timeout;
} options;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tcp_server_caller [--host ADDR] [--port N] [--key KEY]\n"
            "                         [--interval S] [--rounds N] [--timeout S]\n"
            "Listens for workers and calls mul(i, i), i = 0..9, on them every interval.\n"
            "  --host ADDR     address to listen on (default 127.0.0.1)\n"
            "  --port N        port (default %d)\n"
            "  --key KEY       shared key, at most 32 bytes (default: none)\n"
            "  --interval S    seconds between rounds (default 1)\n"
            "  --rounds N      stop after N rounds (default 0: until SIGINT/SIGTERM)\n"
            "  --timeout S     timeout of each call, seconds (default 5)\n",
            PATIO_TCP_DEFAULT_PORT);
}

static int parse_options(int argc, char **argv, options *o)
{
    int i;
    for (i = 1; i < argc; i += 2) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        double d = 0;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        }
        if (!val) break;
        if (strcmp(a, "--host") && strcmp(a, "--key")) {
            d = strtod(val, &end);
            if (end == val || *end || d < 0) break;
        }
        if (!strcmp(a, "--host")) o->host = val;
        else if (!strcmp(a, "--key")) o->key = val;
        else if (!strcmp(a, "--port") && d <= 65535 && d == (int)d) o->port = (int)d;
        else if (!strcmp(a, "--rounds") && d == (int)d) o->rounds = (int)d;
        else if (!strcmp(a, "--interval")) o->interval = d;
        else if (!strcmp(a, "--timeout") && d > 0) o->timeout = d;
        else break;
    }
    if (i < argc) {
        fprintf(stderr, "tcp_server_caller: bad or incomplete option '%s'\n", argv[i]);
        usage(stderr);
        return -1;
    }
    if (strlen(o->key) > 32) {
        fprintf(stderr, "tcp_server_caller: the key is longer than 32 bytes\n");
        return -1;
    }
    return 0;
}

/* 1 if SIGINT or SIGTERM is pending (they are blocked; nothing consumes them
 * but the sigtimedwait in main). */
static int stop_requested(void)
{
    sigset_t pending;
    sigpending(&pending);
    return sigismember(&pending, SIGINT) || sigismember(&pending, SIGTERM);
}

/* One round: ten calls in flight at once, then print their outcomes. */
static int run_round(patio_broker *broker, double timeout)
{
    patio_call *calls[CALLS_PER_ROUND];
    patio_call_opts opts;
    int i, rc;

    memset(&opts, 0, sizeof opts);
    opts.timeout = timeout;
    for (i = 0; i < CALLS_PER_ROUND; i++)
        calls[i] = patio_call_start(broker, &opts, "mul", "ii", i, i);
    /* wait in short slices so that a stop signal is not held up by a round */
    while ((rc = patio_wait_all(calls, CALLS_PER_ROUND, 0.1)) == PATIO_ERR_TIMEOUT)
        if (stop_requested()) break;

    if (rc == PATIO_OK) {
        printf("[");
        for (i = 0; i < CALLS_PER_ROUND; i++) {
            if (i) printf(", ");
            if (patio_call_status(calls[i]) == PATIO_OK)
                printf("%lld", (long long)patio_result_int(calls[i]));
            else if (*patio_call_error_message(calls[i]))
                printf("%s('%s')", patio_call_error_type(calls[i]),
                       patio_call_error_message(calls[i]));
            else
                printf("%s()", patio_call_error_type(calls[i]));
        }
        printf("]\n");
        fflush(stdout);
    }
    for (i = 0; i < CALLS_PER_ROUND; i++) patio_call_free(calls[i]);
    return rc;
}

int main(int argc, char **argv)
{
    options o = {"127.0.0.1", "", PATIO_TCP_DEFAULT_PORT, 0, 1.0, 5.0};
    patio_tcp_config cfg;
    patio_registry *rpc;
    patio_executor *none;
    patio_broker *broker;
    sigset_t stop_signals;
    struct timespec pause;
    int round, stopped = 0;

    if (parse_options(argc, argv, &o)) return 2;

    /* SIGINT/SIGTERM stay blocked in every thread; main polls for them. */
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);

    rpc = patio_registry_new(NULL);
    none = patio_null_executor_new(rpc);          /* this side runs nothing */
    memset(&cfg, 0, sizeof cfg);
    cfg.key = o.key;
    cfg.key_len = strlen(o.key);
    broker = patio_tcp_server_new(none, &cfg, o.host, o.port);
    if (!broker) {
        fprintf(stderr, "tcp_server_caller: cannot listen on %s:%d\n", o.host, o.port);
        patio_executor_free(none);
        patio_registry_free(rpc);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);

    pause.tv_sec = (time_t)o.interval;
    pause.tv_nsec = (long)((o.interval - (double)pause.tv_sec) * 1e9);
    for (round = 0; !stopped && (o.rounds == 0 || round < o.rounds); round++) {
        if (round > 0) {
            /* sleeps for the interval, or returns at once on a stop signal */
            int sig = sigtimedwait(&stop_signals, NULL, &pause);
            if (sig == SIGINT || sig == SIGTERM) break;
        }
        run_round(broker, o.timeout);
        stopped = stop_requested();
    }

    patio_broker_free(broker);
    patio_executor_free(none);
    patio_registry_free(rpc);
    return 0;
}
