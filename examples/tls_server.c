/* tls_server: examples/tcp_server.c over TLS (patio_tls.h, mbedTLS), the
 * SSL server of patio's README.
 *
 *   cc -std=c99 -Wall -Wextra -pthread examples/tls_server.c -o tls_server \
 *       -lmbedtls -lmbedx509 -lmbedcrypto
 *   ./tls_server --cert server.pem --key-file server.key --key secret-key
 *   ./tls_client --ca CA.pem --server-name server.example.net --key secret-key mul 1 2 3
 *
 * (README.md, "TLS", shows the openssl commands that make CA.pem,
 * server.pem and server.key.)
 *
 * Options: every option of tcp_server (--host, --port, --key, --workers,
 * --handshake-timeout), plus
 *   --cert FILE           the server's certificate chain (PEM), required
 *   --key-file FILE       its private key (PEM)
 *   --ca FILE             CA to verify client certificates with
 *   --client-cert MODE    none (default), optional or required (needs --ca)
 *
 * The TLS options are taken out of the command line, the rest goes to
 * tcp_server's own main, whose broker gets the TLS transport: the broker
 * and the functions it serves are exactly tcp_server's. */
#define PATIO_IMPLEMENTATION
#include "../patio.h"
#define PATIO_TLS_IMPLEMENTATION
#include "../patio_tls.h"

static patio_tls *example_tls;

/* tcp_server's broker, with TLS. */
static patio_broker *tls_broker_new(patio_executor *ex, const patio_tcp_config *cfg)
{
    patio_tcp_config c = *cfg;
    patio_tls_use(&c, example_tls);
    return patio_tcp_broker_new(ex, &c);
}

#define main tcp_server_main
#define patio_tcp_broker_new tls_broker_new
#include "tcp_server.c"
#undef patio_tcp_broker_new
#undef main

int main(int argc, char **argv)
{
    patio_tls_config tc;
    char err[300];
    char **rest = (char **)calloc((size_t)argc + 1, sizeof *rest);
    int i, n = 0, rc;
    if (!rest) return 1;
    memset(&tc, 0, sizeof tc);
    rest[n++] = argv[0];
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(a, "--cert") && has) tc.cert_file = argv[++i];
        else if (!strcmp(a, "--key-file") && has) tc.key_file = argv[++i];
        else if (!strcmp(a, "--ca") && has) tc.ca_file = argv[++i];
        else if (!strcmp(a, "--client-cert") && has) {
            const char *m = argv[++i];
            if (!strcmp(m, "none")) tc.client_auth = PATIO_TLS_CLIENT_AUTH_NONE;
            else if (!strcmp(m, "optional")) tc.client_auth = PATIO_TLS_CLIENT_AUTH_OPTIONAL;
            else if (!strcmp(m, "required")) tc.client_auth = PATIO_TLS_CLIENT_AUTH_REQUIRED;
            else {
                fprintf(stderr, "tls_server: --client-cert takes none, optional or required\n");
                free(rest);
                return 2;
            }
        } else {
            if (!strcmp(a, "--help") || !strcmp(a, "-h"))
                printf("tls_server: tcp_server over TLS; TLS options: --cert FILE --key-file FILE "
                       "[--ca FILE] [--client-cert none|optional|required]\n");
            rest[n++] = argv[i];
        }
    }
    if (!tc.cert_file && !(n == 2 && (!strcmp(rest[1], "--help") || !strcmp(rest[1], "-h")))) {
        fprintf(stderr, "tls_server: --cert and --key-file are required\n");
        free(rest);
        return 2;
    }
    if (tc.cert_file) {
        example_tls = patio_tls_new(&tc, err, sizeof err);
        if (!example_tls) {
            fprintf(stderr, "tls_server: %s\n", err);
            free(rest);
            return 1;
        }
    }
    rc = tcp_server_main(n, rest);
    patio_tls_free(example_tls);
    free(rest);
    return rc;
}
