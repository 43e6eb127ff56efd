/* tls_client: examples/tcp_client.c over TLS (patio_tls.h, mbedTLS), the
 * SSL client of patio's README: it verifies the server's certificate.
 *
 *   cc -std=c99 -Wall -Wextra -pthread examples/tls_client.c -o tls_client \
 *       -lmbedtls -lmbedx509 -lmbedcrypto
 *   ./tls_client --ca CA.pem --server-name server.example.net --key secret-key mul 1 2 3
 *
 * Options: every option of tcp_client (--host, --port, --key, --timeout,
 * --require-proof), plus
 *   --ca FILE             CA that signed the server's certificate (required
 *                         unless --insecure-skip-verify)
 *   --server-name NAME    name the server's certificate must carry (and
 *                         SNI); default: the --host value
 *   --cert FILE --key-file FILE
 *                         a client certificate, for servers that ask
 *   --insecure-skip-verify
 *                         accept any server certificate (development only:
 *                         the connection is encrypted but not authenticated)
 *
 * A failed TLS handshake is retried like any failed connection until
 * --timeout; run with a wrong --server-name to see the error. The TLS
 * options are taken out of the command line, the rest goes to tcp_client's
 * own main, whose broker gets the TLS transport. */
#define PATIO_IMPLEMENTATION
#include "../patio.h"
#define PATIO_TLS_IMPLEMENTATION
#include "../patio_tls.h"

static patio_tls *example_tls;

/* tcp_client's broker, with TLS. */
static patio_broker *tls_client_new(patio_executor *ex, const patio_tcp_config *cfg, const char *host, int port)
{
    patio_tcp_config c = *cfg;
    patio_tls_use(&c, example_tls);
    return patio_tcp_client_new(ex, &c, host, port);
}

#define main tcp_client_main
#define patio_tcp_client_new tls_client_new
#include "tcp_client.c"
#undef patio_tcp_client_new
#undef main

int main(int argc, char **argv)
{
    patio_tls_config tc;
    char err[300];
    char **rest = (char **)calloc((size_t)argc + 1, sizeof *rest);
    int i, n = 0, rc, help = 0;
    if (!rest) return 1;
    memset(&tc, 0, sizeof tc);
    rest[n++] = argv[0];
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has = i + 1 < argc;
        if (!strcmp(a, "--ca") && has) tc.ca_file = argv[++i];
        else if (!strcmp(a, "--server-name") && has) tc.server_name = argv[++i];
        else if (!strcmp(a, "--cert") && has) tc.cert_file = argv[++i];
        else if (!strcmp(a, "--key-file") && has) tc.key_file = argv[++i];
        else if (!strcmp(a, "--insecure-skip-verify")) tc.insecure_skip_verify_DANGEROUS = 1;
        else {
            if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
                help = 1;
                printf("tls_client: tcp_client over TLS; TLS options: --ca FILE [--server-name NAME] "
                       "[--cert FILE --key-file FILE] [--insecure-skip-verify]\n");
            }
            rest[n++] = argv[i];
        }
    }
    if (!help) {
        if (!tc.ca_file && !tc.insecure_skip_verify_DANGEROUS) {
            fprintf(stderr, "tls_client: --ca FILE is required (or --insecure-skip-verify)\n");
            free(rest);
            return 2;
        }
        example_tls = patio_tls_new(&tc, err, sizeof err);
        if (!example_tls) {
            fprintf(stderr, "tls_client: %s\n", err);
            free(rest);
            return 1;
        }
    }
    rc = tcp_client_main(n, rest);
    patio_tls_free(example_tls);
    free(rest);
    return rc;
}
