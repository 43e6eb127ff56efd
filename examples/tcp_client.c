/* tcp_client: connects to a TCP server broker, calls one function and prints
 * the result, the "client calling tasks remotely" example of patio's README.
 *
 *   cc -std=c99 -Wall -Wextra -pthread examples/tcp_client.c -o tcp_client
 *   ./tcp_client mul 1 2 3                 # 6
 *   ./tcp_client div 1 0                   # stderr: ZeroDivisionError: division by zero
 *   ./tcp_client echo 1 2.5 abc None True  # [1, 2.5, 'abc', None, True]
 *
 * Arguments after the function name: an integer ("42", "-7") becomes an
 * int, a decimal or exponent number ("2.5", "1e3") a float, None / True /
 * False nil and booleans, anything else a string.
 *
 * The result is printed the way Python's repr() would print the decoded
 * value: None, True, 6, 2.5, 'text', b'\x01', [1, 2], {'k': 'v'}, and an
 * exception value as KeyError('nosuch'). A failed call prints
 * "TypeName: message" on stderr and exits 1; bad usage exits 2.
 *
 * Options: --host ADDR (127.0.0.1), --port N (15383), --key KEY,
 * --timeout SECONDS (10: connecting and calling together),
 * --require-proof (refuse servers that do not prove they know the key). */
#define PATIO_IMPLEMENTATION
#include "../patio.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- printing values the way Python's repr() does --------------------- */

static void print_float(double x)
{
    char buf[64];
    int p, exp10;
    if (x != x) { fputs("nan", stdout); return; }
    if (x == HUGE_VAL || x == -HUGE_VAL) { fputs(x < 0 ? "-inf" : "inf", stdout); return; }
    /* the fewest significant digits that read back as the same double */
    for (p = 1; p < 17; p++) {
        snprintf(buf, sizeof buf, "%.*e", p - 1, x);
        if (strtod(buf, NULL) == x) break;
    }
    snprintf(buf, sizeof buf, "%.*e", p - 1, x);
    exp10 = atoi(strchr(buf, 'e') + 1);
    if (exp10 < -4 || exp10 >= 16) {        /* Python switches to 1e+16 here */
        fputs(buf, stdout);
        return;
    }
    snprintf(buf, sizeof buf, "%.*f", p - 1 - exp10 > 0 ? p - 1 - exp10 : 0, x);
    fputs(buf, stdout);
    if (!strchr(buf, '.')) fputs(".0", stdout);
}

static void print_quoted(const char *prefix, const unsigned char *s, size_t n, int is_text)
{
    size_t i;
    char quote = '\'';
    if (memchr(s, '\'', n) && !memchr(s, '"', n)) quote = '"';
    printf("%s%c", prefix, quote);
    for (i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '\\' || c == (unsigned char)quote) printf("\\%c", c);
        else if (c == '\n') fputs("\\n", stdout);
        else if (c == '\r') fputs("\\r", stdout);
        else if (c == '\t') fputs("\\t", stdout);
        else if (c < 0x20 || c == 0x7f || (c >= 0x80 && !is_text)) printf("\\x%02x", c);
        else putchar(c);   /* printable ASCII, or UTF-8 text as it is */
    }
    putchar(quote);
}

static int print_value(patio_reader *r, int depth);

/* An ext value: 2 = exception [name, message], 1 = CallRequest. */
static int print_ext(const patio_value *v, int depth)
{
    patio_reader body;
    patio_reader_init(&body, v->v.ext.ptr, v->v.ext.len);
    if (v->v.ext.type == 2) {
        const char *name, *msg;
        size_t nlen, mlen;
        if (patio_unpack(&body, "[ss]", &name, &nlen, &msg, &mlen) != PATIO_OK) return -1;
        printf("%.*s(", (int)nlen, name);
        if (mlen) print_quoted("", (const unsigned char *)msg, mlen, 1);
        putchar(')');
        return 0;
    }
    if (v->v.ext.type == 1) {
        uint32_t n;
        if (patio_read_array(&body, &n) != PATIO_OK || n != 4) return -1;
        fputs("CallRequest(func=", stdout);
        if (print_value(&body, depth + 1)) return -1;
        fputs(", args=", stdout);
        if (print_value(&body, depth + 1)) return -1;
        fputs(", kwargs=", stdout);
        if (print_value(&body, depth + 1)) return -1;
        fputs(", timeout=", stdout);
        if (print_value(&body, depth + 1)) return -1;
        putchar(')');
        return 0;
    }
    return -1;
}

static int print_value(patio_reader *r, int depth)
{
    patio_value v;
    uint32_t i;
    if (depth > PATIO_MAX_DEPTH || patio_read(r, &v) != PATIO_OK) return -1;
    switch (v.type) {
    case PATIO_NIL: fputs("None", stdout); return 0;
    case PATIO_BOOL: fputs(v.v.boolean ? "True" : "False", stdout); return 0;
    case PATIO_INT: printf("%lld", (long long)v.v.i); return 0;
    case PATIO_UINT: printf("%llu", (unsigned long long)v.v.u); return 0;
    case PATIO_FLOAT: print_float(v.v.f); return 0;
    case PATIO_STR: print_quoted("", (const unsigned char *)v.v.str.ptr, v.v.str.len, 1); return 0;
    case PATIO_BIN: print_quoted("b", v.v.bin.ptr, v.v.bin.len, 0); return 0;
    case PATIO_ARRAY:
        putchar('[');
        for (i = 0; i < v.v.count; i++) {
            if (i) fputs(", ", stdout);
            if (print_value(r, depth + 1)) return -1;
        }
        putchar(']');
        return 0;
    case PATIO_MAP:
        putchar('{');
        for (i = 0; i < v.v.count; i++) {
            if (i) fputs(", ", stdout);
            if (print_value(r, depth + 1)) return -1;
            fputs(": ", stdout);
            if (print_value(r, depth + 1)) return -1;
        }
        putchar('}');
        return 0;
    case PATIO_EXT: return print_ext(&v, depth);
    }
    return -1;
}

/* ---- arguments: int, float, None/True/False or string ------------------ */

static int all_digits(const char *s)
{
    if (*s == '+' || *s == '-') s++;
    if (!*s) return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9') return 0;
    return 1;
}

static int looks_like_float(const char *s, double *out)
{
    char *end;
    if (!strpbrk(s, "0123456789") || strpbrk(s, "xX")) return 0; /* no inf/nan/hex */
    errno = 0;
    *out = strtod(s, &end);
    return end != s && *end == '\0';
}

static void write_argument(patio_writer *w, const char *s)
{
    double d;
    if (all_digits(s)) {
        char *end;
        long long v;
        errno = 0;
        v = strtoll(s, &end, 10);
        if (!errno) { patio_write_int(w, v); return; }
        if (s[0] != '-') {
            unsigned long long u;
            errno = 0;
            u = strtoull(s, &end, 10);
            if (!errno) { patio_write_uint(w, u); return; }
        }
        patio_write_double(w, strtod(s, NULL)); /* beyond 64 bits: a float */
    } else if (looks_like_float(s, &d)) {
        patio_write_double(w, d);
    } else if (!strcmp(s, "None")) {
        patio_write_nil(w);
    } else if (!strcmp(s, "True") || !strcmp(s, "False")) {
        patio_write_bool(w, s[0] == 'T');
    } else {
        patio_write_str(w, s);
    }
}

/* ---- command line ------------------------------------------------------ */

typedef struct options {
    const char *host, *key;
    int port, require_proof;
    double timeout;
    int first_arg; /* index of the function name in argv */
} options;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: tcp_client [--host ADDR] [--port N] [--key KEY] [--timeout SECONDS]\n"
            "                  [--require-proof] FUNCTION [ARG...]\n"
            "Calls FUNCTION(ARG...) on a TCP server broker and prints the result.\n"
            "ARGs: integers -> int, 2.5 / 1e3 -> float, None/True/False, else str.\n"
            "  --host ADDR       server address (default 127.0.0.1)\n"
            "  --port N          server port (default %d)\n"
            "  --key KEY         shared key, at most 32 bytes (default: none)\n"
            "  --timeout S       seconds for connecting and the call (default 10)\n"
            "  --require-proof   accept only servers that prove they know the key\n"
            "Errors print \"TypeName: message\" on stderr and exit 1.\n",
            PATIO_TCP_DEFAULT_PORT);
}

static int parse_options(int argc, char **argv, options *o)
{
    int i = 1;
    while (i < argc) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        char *end;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        }
        if (!strcmp(a, "--")) { i++; break; }
        if (strncmp(a, "--", 2) != 0) break;          /* the function name */
        if (!strcmp(a, "--require-proof")) {
            o->require_proof = 1;
            i += 1;
            continue;
        }
        if (!val) goto bad;
        if (!strcmp(a, "--host")) o->host = val;
        else if (!strcmp(a, "--key")) o->key = val;
        else if (!strcmp(a, "--port")) {
            long p = strtol(val, &end, 10);
            if (end == val || *end || p < 1 || p > 65535) goto bad;
            o->port = (int)p;
        } else if (!strcmp(a, "--timeout")) {
            o->timeout = strtod(val, &end);
            if (end == val || *end || !(o->timeout > 0)) goto bad;
        } else goto bad;
        i += 2;
    }
    if (i >= argc) {
        fprintf(stderr, "tcp_client: no function name given\n");
        usage(stderr);
        return -1;
    }
    if (strlen(o->key) > 32) {
        fprintf(stderr, "tcp_client: the key is longer than 32 bytes\n");
        return -1;
    }
    o->first_arg = i;
    return 0;
bad:
    fprintf(stderr, "tcp_client: bad or incomplete option '%s'\n", argv[i]);
    usage(stderr);
    return -1;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    options o = {"127.0.0.1", "", PATIO_TCP_DEFAULT_PORT, 0, 10.0, 0};
    patio_tcp_config cfg;
    patio_registry *rpc;
    patio_executor *none;
    patio_broker *broker;
    patio_call_opts opts;
    patio_writer args;
    patio_call *call;
    patio_reader result;
    double start = now_s(), left;
    int i, status, exit_code = 0;

    if (parse_options(argc, argv, &o)) return 2;

    patio_writer_init(&args, NULL);
    patio_write_array(&args, (uint32_t)(argc - o.first_arg - 1));
    for (i = o.first_arg + 1; i < argc; i++) write_argument(&args, argv[i]);
    if (args.err) {
        fprintf(stderr, "tcp_client: cannot encode the arguments: %s\n", patio_strerror(args.err));
        return 2;
    }

    /* This side only calls: an empty registry and the null executor. */
    rpc = patio_registry_new(NULL);
    none = patio_null_executor_new(rpc);
    memset(&cfg, 0, sizeof cfg);
    cfg.key = o.key;
    cfg.key_len = strlen(o.key);
    cfg.require_server_proof = o.require_proof;
    broker = patio_tcp_client_new(none, &cfg, o.host, o.port);
    if (!broker) {
        fprintf(stderr, "ValueError: cannot create a client broker for %s:%d\n", o.host, o.port);
        return 1;
    }

    if (patio_tcp_wait_peers(broker, 1, o.timeout) != PATIO_OK) {
        fprintf(stderr, "ConnectionError: no connection to %s:%d within %g s\n", o.host, o.port,
                o.timeout);
        exit_code = 1;
    } else {
        left = o.timeout - (now_s() - start);
        memset(&opts, 0, sizeof opts);
        opts.timeout = left > 0.001 ? left : 0.001;
        opts.args = args.data;
        opts.args_len = args.len;
        call = patio_call_start(broker, &opts, argv[o.first_arg], NULL);
        status = call ? patio_call_wait(call, PATIO_NO_TIMEOUT) : PATIO_ERR_NOMEM;
        if (status == PATIO_OK && patio_call_reader(call, &result) == PATIO_OK &&
            print_value(&result, 0) == 0) {
            putchar('\n');
        } else if (status == PATIO_OK) {
            fprintf(stderr, "ValueError: the result could not be printed\n");
            exit_code = 1;
        } else {
            fprintf(stderr, "%s: %s\n", call ? patio_call_error_type(call) : "MemoryError",
                    call ? patio_call_error_message(call) : "out of memory");
            exit_code = 1;
        }
        patio_call_free(call);
    }

    patio_broker_free(broker);
    patio_executor_free(none);
    patio_registry_free(rpc);
    patio_writer_free(&args);
    return exit_code;
}
