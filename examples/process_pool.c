/* The patio quickstart with a process pool: `mul` runs in 4 worker
 * processes, 100 calls go through the memory broker at once, and the 100
 * results are printed. Then `crash` kills the worker that runs it, on
 * purpose: its caller gets an error naming the signal, the pool starts a
 * new worker, and the next call works as before.
 *
 *   cc -std=c99 -Wall -Wextra -pthread examples/process_pool.c -o process_pool
 */
#define PATIO_IMPLEMENTATION
#include "../patio.h"

#include <stdio.h>
#include <signal.h>

/* mul(*args): the product of all its integer arguments. */
static int mul(patio_task *t)
{
    int64_t product = 1, x;
    while (patio_arg_next_int(t, &x)) product *= x;
    return patio_return_int(t, product);
}

/* Dies as a task with a bad pointer would. */
static int crash(patio_task *t)
{
    (void)t;
    raise(SIGSEGV);
    return PATIO_OK;
}

int main(void)
{
    patio_registry *rpc = patio_registry_new(NULL);
    patio_executor *pool;
    patio_broker *broker;
    patio_call *calls[100], *c;
    int i;

    /* Register everything first: the workers are forked with the registry
     * as it is when the pool is created. */
    patio_register(rpc, "mul", mul, NULL);
    patio_register(rpc, "crash", crash, NULL);
    pool = patio_process_pool_new(rpc, 4);
    broker = patio_memory_broker_new(pool);

    for (i = 0; i < 100; i++)
        calls[i] = patio_call_async(broker, "mul", "iii", 1, 2, 3);
    patio_wait_all(calls, 100, PATIO_NO_TIMEOUT);

    printf("[");
    for (i = 0; i < 100; i++) {
        if (patio_call_status(calls[i]) == PATIO_OK)
            printf("%s%lld", i ? ", " : "", (long long)patio_result_int(calls[i]));
        else
            printf("%s%s: %s", i ? ", " : "", patio_call_error_type(calls[i]),
                   patio_call_error_message(calls[i]));
        patio_call_free(calls[i]);
    }
    printf("]\n");

    c = patio_call_sync(broker, 10.0, "crash", "");
    printf("crash() -> %s (%s): %s\n", patio_strerror(patio_call_status(c)),
           patio_call_error_type(c), patio_call_error_message(c));
    patio_call_free(c);

    c = patio_call_sync(broker, 10.0, "mul", "iii", 1, 2, 3);
    printf("mul(1, 2, 3) after the crash -> %lld\n", (long long)patio_result_int(c));
    patio_call_free(c);

    patio_broker_free(broker);
    patio_executor_free(pool);
    patio_registry_free(rpc);
    return 0;
}
