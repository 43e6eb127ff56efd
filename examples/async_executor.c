/* The quickstart with the async executor: tasks run on the broker's loop
 * thread, at most 4 at once. `mul` answers at once. `offload_mul` starts a
 * call of `mul` on a second broker backed by a thread pool and returns
 * PATIO_PENDING; it finishes later, when that call answers, so the loop
 * never blocks (a task that awaits another task).
 *
 *   cc -std=c99 -Wall -Wextra -pthread examples/async_executor.c -o async_executor
 */
#define PATIO_IMPLEMENTATION
#include "../patio.h"

#include <stdio.h>

static int mul(patio_task *t)
{
    int64_t product = 1, x;
    while (patio_arg_next_int(t, &x)) product *= x;
    return patio_return_int(t, product);
}

/* Runs when the offloaded call finished: completes the waiting task. */
static void offload_done(patio_call *call, void *user)
{
    patio_task *t = (patio_task *)user;
    if (patio_call_status(call) == PATIO_OK)
        patio_return_int(t, patio_result_int(call));
    else
        patio_fail(t, patio_call_error_type(call), "%s", patio_call_error_message(call));
    patio_call_free(call);
    patio_task_finish(t);
}

/* offload_mul(a, b, c): mul(a, b, c) computed on the thread pool. */
static int offload_mul(patio_task *t)
{
    /* registered with the address of main's pool_broker variable */
    patio_broker *pool_broker = *(patio_broker **)patio_task_user(t);
    patio_call_opts opts = {0};
    int64_t a, b, c;
    if (patio_args(t, "III", &a, &b, &c) != PATIO_OK) return PATIO_ERR_TYPE;
    opts.on_done = offload_done;
    opts.user = t;
    patio_call_start(pool_broker, &opts, "mul", "III", a, b, c);
    return PATIO_PENDING;
}

static void print_results(patio_call **calls, int n)
{
    int i;
    printf("[");
    for (i = 0; i < n; i++) {
        if (patio_call_status(calls[i]) == PATIO_OK)
            printf("%s%lld", i ? ", " : "", (long long)patio_result_int(calls[i]));
        else
            printf("%s%s: %s", i ? ", " : "", patio_call_error_type(calls[i]),
                   patio_call_error_message(calls[i]));
    }
    printf("]\n");
}

int main(void)
{
    patio_registry *rpc = patio_registry_new(NULL);
    patio_executor *pool, *async_ex;
    patio_broker *pool_broker = NULL, *broker;
    patio_call *calls[100];
    int i;

    patio_register(rpc, "mul", mul, NULL);
    patio_register(rpc, "offload_mul", offload_mul, &pool_broker);
    pool = patio_thread_pool_new(rpc, 4);
    async_ex = patio_async_executor_new(rpc, 4);
    pool_broker = patio_memory_broker_new(pool);
    broker = patio_memory_broker_new(async_ex);

    for (i = 0; i < 100; i++)
        calls[i] = patio_call_async(broker, i % 2 ? "mul" : "offload_mul", "iii", 1, 2, 3);
    patio_wait_all(calls, 100, 10.0);
    print_results(calls, 100);
    for (i = 0; i < 100; i++) patio_call_free(calls[i]);

    patio_broker_free(broker);
    patio_executor_free(async_ex);
    patio_broker_free(pool_broker);
    patio_executor_free(pool);
    patio_registry_free(rpc);
    return 0;
}
