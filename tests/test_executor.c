/* Executors: Python patio's executor tests in C (mul == 6, 100 concurrent
 * calls, null executor fails), plus back-pressure, shutdown, cancellation
 * and an executor written by the user. */
#define PATIO_IMPLEMENTATION
#include "patio.h"
#include "harness.h"
#include <stdlib.h>
#include "common.h"

static gate g_gate;

/* blocks its worker at the gate, then returns its argument */
static int gated(patio_task *t)
{
    int64_t x = 0;
    patio_arg_next_int(t, &x);
    gate_pass(&g_gate);
    return patio_return_int(t, x);
}

/* which worker thread ran it: its slot in g_threads, recorded on first sight */
static pthread_t g_threads[16];
static int g_nthreads;
static pthread_mutex_t g_threads_mu = PTHREAD_MUTEX_INITIALIZER;

static int which_thread(patio_task *t)
{
    pthread_t self = pthread_self();
    int i;
    pthread_mutex_lock(&g_threads_mu);
    for (i = 0; i < g_nthreads && !pthread_equal(g_threads[i], self); i++) {}
    if (i == g_nthreads && g_nthreads < 16) g_threads[g_nthreads++] = self;
    pthread_mutex_unlock(&g_threads_mu);
    return patio_return_int(t, i);
}

typedef struct env {
    patio_registry *rpc;
    patio_executor *ex;
    patio_broker *broker;
} env;

static env env_new_spin(const char *kind, int workers, size_t max_queue, int spin_us)
{
    env e;
    patio_thread_pool_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = workers;
    cfg.max_queue = max_queue;
    cfg.spin_us = spin_us;
    e.rpc = patio_registry_new(NULL);
    patio_register(e.rpc, "mul", mul, NULL);
    patio_register(e.rpc, "gated", gated, NULL);
    patio_register(e.rpc, "which_thread", which_thread, NULL);
    if (strcmp(kind, "thread") == 0) e.ex = patio_thread_pool_new_ex(e.rpc, &cfg);
    else if (strcmp(kind, "async") == 0) e.ex = patio_async_executor_new_ex(e.rpc, &cfg);
    else e.ex = patio_null_executor_new(e.rpc);
    e.broker = patio_memory_broker_new(e.ex);
    return e;
}

static env env_new(const char *kind, int workers, size_t max_queue)
{
    return env_new_spin(kind, workers, max_queue, 0);
}

static void env_free(env *e)
{
    patio_broker_free(e->broker);
    patio_executor_free(e->ex);
    patio_registry_free(e->rpc);
}

static void check_multiply(const char *kind)
{
    env e = env_new(kind, 0, 0);
    patio_call *c = patio_call_sync(e.broker, 5.0, "mul", "iii", 1, 2, 3);
    CHECK(e.ex != NULL && e.broker != NULL);
    CHECK_EQ_INT(patio_call_status(c), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(c), 6);
    patio_call_free(c);
    env_free(&e);
}

static void check_gather(const char *kind)
{
    env e = env_new(kind, 0, 0);
    patio_call *calls[100];
    int i, sixes = 0;
    for (i = 0; i < 100; i++) calls[i] = patio_call_async(e.broker, "mul", "iii", 1, 2, 3);
    CHECK_EQ_INT(patio_wait_all(calls, 100, 10.0), PATIO_OK);
    for (i = 0; i < 100; i++) {
        sixes += patio_call_status(calls[i]) == PATIO_OK && patio_result_int(calls[i]) == 6;
        patio_call_free(calls[i]);
    }
    CHECK_EQ_INT(sixes, 100);
    env_free(&e);
}

static void test_thread_pool_multiply(void) { check_multiply("thread"); }
static void test_thread_pool_gather(void) { check_gather("thread"); }
static void test_async_multiply(void) { check_multiply("async"); }
static void test_async_gather(void) { check_gather("async"); }

static void test_default_max_workers(void)
{
    env e = env_new("thread", 0, 0);
    CHECK_EQ_STR(patio_executor_kind(e.ex), "thread_pool");
    env_free(&e);
    e = env_new("async", 0, 0);
    CHECK_EQ_STR(patio_executor_kind(e.ex), "async");
    env_free(&e);
}

static void test_null_executor_fails(void)
{
    env e = env_new("null", 0, 0);
    patio_call *c = patio_call_sync(e.broker, 5.0, "mul", "iii", 1, 2, 3);
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_REMOTE);
    CHECK_EQ_STR(patio_call_error_type(c), "RuntimeError");
    CHECK(strlen(patio_call_error_message(c)) > 0);
    patio_call_free(c);
    env_free(&e);
}

static void test_thread_pool_full_queue(void)
{
    env e;
    patio_call *running, *queued[2], *rejected;
    int i;
    gate_init(&g_gate);
    e = env_new("thread", 1, 2);
    running = patio_call_async(e.broker, "gated", "i", 1);
    CHECK(gate_wait_arrived(&g_gate, 1)); /* the only worker is busy */
    for (i = 0; i < 2; i++) queued[i] = patio_call_async(e.broker, "gated", "i", 2 + i);
    rejected = patio_call_async(e.broker, "mul", "ii", 2, 2);
    CHECK_EQ_INT(patio_call_status(rejected), PATIO_ERR_FULL);
    CHECK_EQ_STR(patio_call_error_message(rejected), patio_strerror(PATIO_ERR_FULL));
    gate_open(&g_gate);
    CHECK_EQ_INT(patio_call_wait(running, 10.0), PATIO_OK);
    for (i = 0; i < 2; i++) {
        CHECK_EQ_INT(patio_call_wait(queued[i], 10.0), PATIO_OK);
        CHECK_EQ_INT(patio_result_int(queued[i]), 2 + i);
        patio_call_free(queued[i]);
    }
    patio_call_free(running);
    patio_call_free(rejected);
    env_free(&e);
    gate_destroy(&g_gate);
}

/* Once the pool has seen that tasks are tiny, a submit no longer wakes a
 * second worker while one is busy; a task that then turns out long must
 * still not hold up the ones queued behind it: a standing-by worker takes
 * over a queue that stopped moving. */
static void test_thread_pool_long_task_does_not_stall_queue(void)
{
    env e;
    patio_call *burst[500], *running, *behind[10];
    int i, round, ok = 0;
    gate_init(&g_gate);
    e = env_new_spin("thread", 2, 0, -1); /* idle workers sleep at once: none polls the queue */
    /* bursts until the pool's average counts a task as tiny (4 do it on a
     * quiet machine; a sanitizer's slow moments can take a few more) */
    for (round = 0; round < 40 && (round < 4 || patio__load(&((patio__pool *)e.ex)->task_ns) >=
                                                     PATIO__POOL_HELP_NS / 10); round++) {
        for (i = 0; i < 500; i++) burst[i] = patio_call_async(e.broker, "mul", "ii", 2, 3);
        CHECK_EQ_INT(patio_wait_all(burst, 500, 10.0), PATIO_OK);
        for (i = 0; i < 500; i++) patio_call_free(burst[i]);
    }
    /* the premise: the pool now counts a task as far below what makes it wake a helper */
    CHECK(patio__load(&((patio__pool *)e.ex)->task_ns) < PATIO__POOL_HELP_NS / 10);
    running = patio_call_async(e.broker, "gated", "i", 1);
    CHECK(gate_wait_arrived(&g_gate, 1));
    for (i = 0; i < 10; i++) behind[i] = patio_call_async(e.broker, "mul", "ii", 2, 3);
    CHECK_EQ_INT(patio_wait_all(behind, 10, 10.0), PATIO_OK);
    for (i = 0; i < 10; i++) {
        ok += patio_call_status(behind[i]) == PATIO_OK && patio_result_int(behind[i]) == 6;
        patio_call_free(behind[i]);
    }
    CHECK_EQ_INT(ok, 10);
    CHECK_EQ_INT(patio_call_status(running), PATIO_PENDING);
    gate_open(&g_gate);
    CHECK_EQ_INT(patio_call_wait(running, 10.0), PATIO_OK);
    patio_call_free(running);
    env_free(&e);
    gate_destroy(&g_gate);
}

/* Work that arrives while every worker sleeps wakes the one that went to
 * sleep last, whose cache is warm, rather than the one that slept longest:
 * one call after another keeps running on the same thread, instead of
 * going round all the sleepers. */
static void test_thread_pool_wakes_the_last_sleeper(void)
{
    env e = env_new_spin("thread", 4, 0, -1); /* no polling: every call wakes a sleeper */
    int i, attempt, prev, switches = 0, ran = 0;
    g_nthreads = 0;
    /* the first call may go to a worker that then stands by, and a stall
     * of the test process (a loaded machine, a sanitizer) may hand the
     * standby's post on a few times: up to 3 runs of 40 calls, one of
     * which must stay on one thread nearly all along (going round the
     * sleepers would switch at every call, in every run) */
    for (attempt = 0; attempt < 3 && (attempt == 0 || switches > 5); attempt++) {
        switches = 0;
        prev = -1;
        for (i = 0; i < 40; i++) {
            patio_call *c = patio_call_sync(e.broker, 10.0, "which_thread", "");
            int slot = (int)patio_result_int(c);
            ran += patio_call_status(c) == PATIO_OK;
            if (prev >= 0 && slot != prev) switches++;
            prev = slot;
            patio_call_free(c);
        }
    }
    CHECK_EQ_INT(ran, 40 * attempt);
    CHECK(switches <= 5);
    env_free(&e);
}

typedef struct shutdown_arg { patio_executor *ex; int done; } shutdown_arg;

static void *shutdown_thread(void *p)
{
    shutdown_arg *a = (shutdown_arg *)p;
    patio_executor_shutdown(a->ex);
    __atomic_store_n(&a->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void test_thread_pool_shutdown_finishes_queue(void)
{
    env e;
    patio_call *calls[6], *late;
    pthread_t th;
    shutdown_arg arg;
    int i, ok = 0;
    gate_init(&g_gate);
    e = env_new("thread", 1, 0);
    calls[0] = patio_call_async(e.broker, "gated", "i", 0);
    CHECK(gate_wait_arrived(&g_gate, 1));
    for (i = 1; i < 6; i++) calls[i] = patio_call_async(e.broker, "mul", "ii", i, 10);
    arg.ex = e.ex;
    arg.done = 0;
    pthread_create(&th, NULL, shutdown_thread, &arg);
    /* shutdown waits for the queued work, which waits for the gate */
    CHECK_EQ_INT(patio_call_wait(calls[5], 0.05), PATIO_PENDING);
    CHECK(!__atomic_load_n(&arg.done, __ATOMIC_ACQUIRE));
    gate_open(&g_gate);
    pthread_join(th, NULL);
    for (i = 0; i < 6; i++) {
        ok += patio_call_wait(calls[i], 10.0) == PATIO_OK && patio_result_int(calls[i]) == i * 10;
        patio_call_free(calls[i]);
    }
    CHECK_EQ_INT(ok, 6);
    late = patio_call_sync(e.broker, 1.0, "mul", "ii", 1, 1);
    CHECK_EQ_INT(patio_call_status(late), PATIO_ERR_CLOSED);
    patio_call_free(late);
    env_free(&e);
    gate_destroy(&g_gate);
}

static void test_cancel_queued_only(void)
{
    env e;
    patio_call *running, *waiting;
    gate_init(&g_gate);
    e = env_new("thread", 1, 0);
    running = patio_call_async(e.broker, "gated", "i", 5);
    CHECK(gate_wait_arrived(&g_gate, 1));
    waiting = patio_call_async(e.broker, "gated", "i", 6);
    CHECK_EQ_INT(patio_call_cancel(waiting), PATIO_OK);
    CHECK_EQ_INT(patio_call_status(waiting), PATIO_ERR_CANCELLED);
    CHECK_EQ_STR(patio_call_error_type(waiting), "CancelledError");
    CHECK_EQ_INT(patio_call_cancel(running), PATIO_ERR_STARTED);
    CHECK_EQ_INT(patio_call_cancel(waiting), PATIO_ERR_INVALID); /* already finished */
    gate_open(&g_gate);
    CHECK_EQ_INT(patio_call_wait(running, 10.0), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(running), 5);
    CHECK_EQ_INT(g_gate.arrived, 1); /* the cancelled task never ran */
    patio_call_free(running);
    patio_call_free(waiting);
    env_free(&e);
    gate_destroy(&g_gate);
}

/* ---- async executor: max_workers counts tasks that finish later ---- */

static patio_task *g_parked[8];
static int g_nparked;

static int park(patio_task *t)
{
    g_parked[g_nparked++] = t; /* loop thread only */
    return PATIO_PENDING;
}

static void finish_parked(void *arg)
{
    int i;
    (void)arg;
    for (i = 0; i < g_nparked; i++) {
        patio_return_int(g_parked[i], 40 + i);
        patio_task_finish(g_parked[i]);
    }
    g_nparked = 0;
}

/* A task on the async executor's loop thread that frees its executor: an
 * error is logged and nothing is freed under the running task. */
static patio_executor *g_self_ex;
static int g_errors_logged;

static void count_errors(int level, const char *message, void *user)
{
    PATIO__UNUSED(user);
    if (level == PATIO_LOG_ERROR && strstr(message, "loop thread")) g_errors_logged++;
}

static int free_own_executor(patio_task *t)
{
    patio_executor_free(g_self_ex);
    return patio_return_int(t, 1);
}

static void test_async_free_from_its_task(void)
{
    patio_hooks h;
    patio_registry_config rc;
    patio_registry *rpc;
    patio_broker *b;
    patio_call *c;
    memset(&h, 0, sizeof h);
    h.log = count_errors;
    memset(&rc, 0, sizeof rc);
    rc.hooks = &h;
    rpc = patio_registry_new(&rc);
    patio_register(rpc, "free_own_executor", free_own_executor, NULL);
    patio_register(rpc, "mul", mul, NULL);
    g_self_ex = patio_async_executor_new(rpc, 2);
    b = patio_memory_broker_new(g_self_ex);
    g_errors_logged = 0;
    c = patio_call_sync(b, 5.0, "free_own_executor", "");
    CHECK_EQ_INT(patio_call_status(c), PATIO_OK);
    CHECK_EQ_INT(g_errors_logged, 1);
    patio_call_free(c);
    c = patio_call_sync(b, 5.0, "mul", "ii", 6, 7); /* still serving */
    CHECK_EQ_INT(patio_result_int(c), 42);
    patio_call_free(c);
    patio_broker_free(b);
    patio_executor_free(g_self_ex);
    patio_registry_free(rpc);
}

static void test_async_max_workers_and_later(void)
{
    patio_registry *rpc = patio_registry_new(NULL);
    patio_thread_pool_config cfg;
    patio_executor *ex;
    patio_broker *b;
    patio_loop *loop = patio_loop_new(NULL);
    patio_broker_config bc;
    patio_call *calls[4], *full;
    int i, spins;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 2;
    cfg.max_queue = 1;
    patio_register(rpc, "park", park, NULL);
    ex = patio_async_executor_new_ex(rpc, &cfg);
    memset(&bc, 0, sizeof bc);
    bc.loop = loop; /* host-pumped: this thread runs the loop */
    b = patio_memory_broker_new_ex(ex, &bc);
    g_nparked = 0;
    for (i = 0; i < 2; i++) {
        calls[i] = patio_call_async(b, "park", "");
        for (spins = 0; spins < 100 && g_nparked < i + 1; spins++) patio_loop_run_once(loop, 10);
    }
    CHECK_EQ_INT(g_nparked, 2);               /* both run and stay parked */
    calls[2] = patio_call_async(b, "park", "");
    for (spins = 0; spins < 5; spins++) patio_loop_run_once(loop, 0);
    CHECK_EQ_INT(g_nparked, 2);               /* no free slot: the third waits */
    full = patio_call_async(b, "park", "");   /* queue of 1 is taken */
    CHECK_EQ_INT(patio_call_status(full), PATIO_ERR_FULL);
    for (i = 0; i < 3; i++) CHECK_EQ_INT(patio_call_status(calls[i]), PATIO_PENDING);
    patio_loop_post(loop, finish_parked, NULL);
    for (spins = 0; spins < 100 && (patio_call_status(calls[1]) == PATIO_PENDING || g_nparked < 1); spins++)
        patio_loop_run_once(loop, 10);
    CHECK_EQ_INT(g_nparked, 1);               /* the third one started */
    CHECK_EQ_INT(patio_result_int(calls[0]) + patio_result_int(calls[1]), 81);
    patio_loop_post(loop, finish_parked, NULL);
    for (spins = 0; spins < 100 && patio_call_status(calls[2]) == PATIO_PENDING; spins++)
        patio_loop_run_once(loop, 10);
    CHECK_EQ_INT(patio_result_int(calls[2]), 40);
    for (i = 0; i < 3; i++) patio_call_free(calls[i]);
    patio_call_free(full);
    patio_broker_free(b);
    patio_executor_free(ex);
    patio_loop_free(loop);
    patio_registry_free(rpc);
}

/* ---- an executor written by the user: runs tasks inline ---- */

typedef struct inline_executor {
    patio_executor base;
    int submitted;
} inline_executor;

static int inline_submit(patio_executor *ex, patio_task *t)
{
    ((inline_executor *)ex)->submitted++;
    patio_task_run(t);
    return PATIO_OK;
}

static void inline_destroy(patio_executor *ex) { (void)ex; }

static const patio_executor_vtable inline_vt = {
    "inline", inline_submit, NULL, NULL, NULL, NULL, inline_destroy
};

/* Submitters come and go with pauses of different lengths, so workers keep
 * going from running to polling, standing by and sleeping while tasks
 * arrive: submitting takes no lock when a worker is sure to look at the
 * queue, and a task pushed at the moment a worker decides to sleep must
 * still run. A stranded task would end its call with a timeout. The pauses
 * make the idle gaps; nothing here waits for a result by sleeping. */
typedef struct come_and_go {
    patio_broker *broker;
    int seed;
    int right;
} come_and_go;

static void *come_and_go_main(void *arg)
{
    static const long pauses_ns[] = { 0, 2000, 20000, 200000, 0, 500 };
    come_and_go *s = (come_and_go *)arg;
    int i;
    for (i = 0; i < 400; i++) {
        struct timespec ts;
        patio_call *c = patio_call_sync(s->broker, 10.0, "mul", "ii", s->seed, i);
        s->right += patio_call_status(c) == PATIO_OK && patio_result_int(c) == (int64_t)s->seed * i;
        patio_call_free(c);
        ts.tv_sec = 0;
        ts.tv_nsec = pauses_ns[(i + s->seed) % 6];
        if (ts.tv_nsec) nanosleep(&ts, NULL);
    }
    return NULL;
}

static void check_come_and_go(const char *kind, int spin_us)
{
    env e = env_new_spin(kind, 3, 0, spin_us);
    pthread_t th[4];
    come_and_go s[4];
    int i;
    for (i = 0; i < 4; i++) {
        s[i].broker = e.broker;
        s[i].seed = i + 1;
        s[i].right = 0;
        CHECK(pthread_create(&th[i], NULL, come_and_go_main, &s[i]) == 0);
    }
    for (i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ_INT(s[i].right, 400);
    }
    env_free(&e);
}

static void test_submitters_that_come_and_go(void)
{
    check_come_and_go("thread", 0);
    check_come_and_go("thread", -1); /* workers never poll: every idle one sleeps */
    check_come_and_go("async", 0);
}

static void test_user_executor(void)
{
    patio_registry *rpc = patio_registry_new(NULL);
    inline_executor ex;
    patio_broker *b;
    patio_call *c;
    patio_register(rpc, "mul", mul, NULL);
    CHECK_EQ_INT(patio_executor_init(&ex.base, &inline_vt, rpc), PATIO_OK);
    ex.submitted = 0;
    b = patio_memory_broker_new(&ex.base);
    c = patio_call_sync(b, 5.0, "mul", "ii", 6, 7);
    CHECK_EQ_INT(patio_result_int(c), 42);
    CHECK_EQ_INT(ex.submitted, 1);
    CHECK_EQ_STR(patio_executor_kind(&ex.base), "inline");
    patio_call_free(c);
    patio_broker_free(b);
    patio_executor_free(&ex.base);
    patio_registry_free(rpc);
}

int main(void)
{
    RUN(test_thread_pool_multiply);
    RUN(test_thread_pool_gather);
    RUN(test_async_multiply);
    RUN(test_async_gather);
    RUN(test_default_max_workers);
    RUN(test_null_executor_fails);
    RUN(test_thread_pool_full_queue);
    RUN(test_thread_pool_long_task_does_not_stall_queue);
    RUN(test_thread_pool_wakes_the_last_sleeper);
    RUN(test_thread_pool_shutdown_finishes_queue);
    RUN(test_cancel_queued_only);
    RUN(test_async_max_workers_and_later);
    RUN(test_async_free_from_its_task);
    RUN(test_user_executor);
    RUN(test_submitters_that_come_and_go);
    return th_summary("test_executor");
}
