/* mesh: the "full mesh" scheme of patio's README, in one process. Three
 * brokers each listen on a port of their own and connect to the ones after
 * them (a -> b, a -> c, b -> c), so every pair shares one connection and any
 * broker can call any other. A TCP broker that both listens and connects is
 * the mixed mode: after the handshake it does not matter who connected.
 *
 * Each node registers `whoami` (returns the node's name) and `mul`. Calls
 * never go to the caller itself but round robin over the connections whose
 * peer offers the name, so node-a's calls alternate between node-b and
 * node-c. Prints, e.g.:
 *
 *   node-a: whoami -> node-b, node-c, node-b, node-c
 *   node-b: whoami -> node-a, node-c, node-a, node-c
 *   node-c: whoami -> node-a, node-b, node-a, node-b
 *   node-a: 100 x mul(i, 2) -> sum 9900 (node-b ran 50, node-c ran 50)
 *
 *   cc -std=c99 -Wall -Wextra -pthread examples/mesh.c -o mesh && ./mesh
 */
#define PATIO_IMPLEMENTATION
#include "../patio.h"

#include <stdio.h>
#include <string.h>

#define NODES 3
#define MUL_CALLS 100

typedef struct node {
    const char *name;
    patio_registry *rpc;
    patio_executor *ex;
    patio_broker *broker;
    int port;
    int mul_count; /* calls of mul this node ran (only its loop thread writes) */
} node;

static int whoami(patio_task *t)
{
    return patio_return_str(t, ((node *)patio_task_user(t))->name);
}

static int mul(patio_task *t)
{
    node *self = (node *)patio_task_user(t);
    int64_t product = 1, x;
    while (patio_arg_next_int(t, &x)) product *= x;
    self->mul_count++; /* the async executor runs tasks on this node's loop thread */
    return patio_return_int(t, product);
}

static int start_node(node *n, const char *name)
{
    patio_tcp_config cfg;
    static const char key[] = "mesh-example-key";
    int rc;

    memset(n, 0, sizeof *n);
    n->name = name;
    n->rpc = patio_registry_new(NULL);
    patio_register(n->rpc, "whoami", whoami, n);
    patio_register(n->rpc, "mul", mul, n);
    n->ex = patio_async_executor_new(n->rpc, 4);
    memset(&cfg, 0, sizeof cfg);
    cfg.key = key;
    cfg.key_len = sizeof key - 1;
    n->broker = patio_tcp_broker_new(n->ex, &cfg);
    if (!n->broker) return PATIO_ERR_NOMEM;
    rc = patio_tcp_listen(n->broker, "127.0.0.1", 0, &n->port); /* any free port */
    if (rc != PATIO_OK) fprintf(stderr, "%s: cannot listen: %s\n", name, patio_strerror(rc));
    return rc;
}

static void stop_node(node *n)
{
    if (n->broker) patio_broker_free(n->broker);
    if (n->ex) patio_executor_free(n->ex);
    if (n->rpc) patio_registry_free(n->rpc);
}

/* Four calls of whoami, one after the other: the round robin shows. */
static int show_round_robin(node *n)
{
    int i;
    printf("%s: whoami ->", n->name);
    for (i = 0; i < 4; i++) {
        patio_call *c = patio_call_sync(n->broker, 5.0, "whoami", NULL);
        const char *s;
        size_t len;
        if (patio_call_status(c) != PATIO_OK || patio_call_unpack(c, "s", &s, &len) != PATIO_OK) {
            printf("\n%s: whoami failed: %s: %s\n", n->name, patio_call_error_type(c),
                   patio_call_error_message(c));
            patio_call_free(c);
            return 1;
        }
        printf("%s %.*s", i ? "," : "", (int)len, s);
        patio_call_free(c);
    }
    printf("\n");
    return 0;
}

/* Many calls at once from one node: the others share them. */
static int spread_calls(node *from, long long *sum)
{
    patio_call *calls[MUL_CALLS];
    int i, failed = 0;
    for (i = 0; i < MUL_CALLS; i++)
        calls[i] = patio_call_async(from->broker, "mul", "ii", i, 2);
    patio_wait_all(calls, MUL_CALLS, 10.0);
    for (i = 0; i < MUL_CALLS; i++) {
        if (patio_call_status(calls[i]) == PATIO_OK) *sum += patio_result_int(calls[i]);
        else failed++;
        patio_call_free(calls[i]);
    }
    return failed ? 1 : 0;
}

int main(void)
{
    static const char *names[NODES] = {"node-a", "node-b", "node-c"};
    node nodes[NODES];
    int i, j, failed = 0, spread = 0;
    long long sum = 0;

    memset(nodes, 0, sizeof nodes);
    for (i = 0; i < NODES && !failed; i++)
        failed = start_node(&nodes[i], names[i]) != PATIO_OK;

    /* each node connects to every node after it: one connection per pair */
    for (i = 0; i < NODES && !failed; i++)
        for (j = i + 1; j < NODES; j++)
            if (patio_tcp_connect(nodes[i].broker, "127.0.0.1", nodes[j].port) != PATIO_OK)
                failed = 1;

    for (i = 0; i < NODES && !failed; i++)
        if (patio_tcp_wait_peers(nodes[i].broker, NODES - 1, 10.0) != PATIO_OK) {
            fprintf(stderr, "%s: the mesh did not come up\n", nodes[i].name);
            failed = 1;
        }

    for (i = 0; i < NODES && !failed; i++) failed = show_round_robin(&nodes[i]);
    if (!failed) {
        failed = spread_calls(&nodes[0], &sum);
        spread = 1;
    }

    for (i = 0; i < NODES; i++) stop_node(&nodes[i]);
    /* the loop threads have stopped: their counters can be read now */
    if (spread)
        printf("%s: %d x mul(i, 2) -> sum %lld (%s ran %d, %s ran %d)\n", nodes[0].name,
               MUL_CALLS, sum, nodes[1].name, nodes[1].mul_count, nodes[2].name,
               nodes[2].mul_count);
    return failed;
}
