/* The patio quickstart in C: `mul` runs on a pool of 4 threads, 100 calls
 * go through the memory broker at once, and the 100 results are printed.
 *
 *   cc -std=c99 -Wall -Wextra -pthread examples/quickstart.c -o quickstart
 */
#define PATIO_IMPLEMENTATION
#include "../patio.h"

#include <stdio.h>

/* mul(*args): the product of all its integer arguments. */
static int mul(patio_task *t)
{
    int64_t product = 1, x;
    while (patio_arg_next_int(t, &x)) product *= x;
    return patio_return_int(t, product);
}

int main(void)
{
    patio_registry *rpc = patio_registry_new(NULL);
    patio_executor *pool;
    patio_broker *broker;
    patio_call *calls[100];
    int i;

    patio_register(rpc, "mul", mul, NULL);
    pool = patio_thread_pool_new(rpc, 4);
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

    patio_broker_free(broker);
    patio_executor_free(pool);
    patio_registry_free(rpc);
    return 0;
}
