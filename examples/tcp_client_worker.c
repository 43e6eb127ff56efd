/* tcp_client_worker: the worker side of the "server is caller" pattern. It
 * connects to a server broker (tcp_server_caller, or a Python patio
 * TCPServerBroker) and executes the calls that the server sends it: here
 * `mul`. Who connects and who calls are independent choices: once a
 * connection is up, both ends may call whatever the other registered.
 *
 *   cc -std=c99 -Wall -Wextra -pthread examples/tcp_client_worker.c -o tcp_client_worker
 *   ./tcp_client_worker --key k          # start several, they share the load
 *
 * Options: --host ADDR (127.0.0.1), --port N (15383), --key KEY,
 * --workers N (4). Connects (and reconnects, with back-off, whenever the
 * connection is lost), prints "ready" the first time it is connected and runs
 * until SIGINT or SIGTERM. */
#define PATIO_IMPLEMENTATION
#include "../patio.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* mul(*ints): the product, as the Python example's reduce(lambda x, y: x * y). */
static int mul(patio_task *t)
{
    int64_t product = 1, x;
    while (patio_arg_next_int(t, &x)) product *= x;
    return patio_return_int(t, product);   /* a non-int argument: TypeError */
}

typedef struct options {
    const char *host, *key;
    int port, workers;
} options;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tcp_client_worker [--host ADDR] [--port N] [--key KEY] [--workers N]\n"
            "Connects to a server broker and executes its calls of mul.\n"
            "  --host ADDR   server address (default 127.0.0.1)\n"
            "  --port N      server port (default %d)\n"
            "  --key KEY     shared key, at most 32 bytes (default: none)\n"
            "  --workers N   thread pool size (default 4)\n",
            PATIO_TCP_DEFAULT_PORT);
}

static int parse_options(int argc, char **argv, options *o)
{
    int i;
    for (i = 1; i < argc; i += 2) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        long n = 0;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        }
        if (!val) break;
        if (!strcmp(a, "--port") || !strcmp(a, "--workers")) {
            n = strtol(val, &end, 10);
            if (end == val || *end || n < 1 || n > 65535) break;
        }
        if (!strcmp(a, "--host")) o->host = val;
        else if (!strcmp(a, "--key")) o->key = val;
        else if (!strcmp(a, "--port")) o->port = (int)n;
        else if (!strcmp(a, "--workers") && n <= 1024) o->workers = (int)n;
        else break;
    }
    if (i < argc) {
        fprintf(stderr, "tcp_client_worker: bad or incomplete option '%s'\n", argv[i]);
        usage(stderr);
        return -1;
    }
    if (strlen(o->key) > 32) {
        fprintf(stderr, "tcp_client_worker: the key is longer than 32 bytes\n");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    options o = {"127.0.0.1", "", PATIO_TCP_DEFAULT_PORT, 4};
    patio_tcp_config cfg;
    patio_registry *rpc;
    patio_executor *pool;
    patio_broker *broker;
    sigset_t stop_signals;
    struct timespec no_wait = {0, 0};
    int sig = -1;

    if (parse_options(argc, argv, &o)) return 2;

    /* SIGINT/SIGTERM stay blocked in every thread (library threads inherit
     * the mask); main takes them with sigtimedwait/sigwait. */
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);

    rpc = patio_registry_new(NULL);
    patio_register(rpc, "mul", mul, NULL);
    pool = patio_thread_pool_new(rpc, o.workers);
    memset(&cfg, 0, sizeof cfg);
    cfg.key = o.key;
    cfg.key_len = strlen(o.key);
    broker = patio_tcp_client_new(pool, &cfg, o.host, o.port);
    if (!broker) {
        fprintf(stderr, "tcp_client_worker: cannot create a client broker for %s:%d\n", o.host,
                o.port);
        patio_executor_free(pool);
        patio_registry_free(rpc);
        return 1;
    }

    /* Until the first connection is up, check for a stop signal every 100 ms. */
    while (patio_tcp_wait_peers(broker, 1, 0.1) != PATIO_OK) {
        sig = sigtimedwait(&stop_signals, NULL, &no_wait);
        if (sig == SIGINT || sig == SIGTERM) break;
    }
    if (sig != SIGINT && sig != SIGTERM) {
        printf("ready\n");
        fflush(stdout);
        while (sigwait(&stop_signals, &sig) != 0) {}
    }

    patio_broker_free(broker);
    patio_executor_free(pool);
    patio_registry_free(rpc);
    return 0;
}
