/* Memory broker and the call API: results, errors, timeouts, callbacks,
 * host-pumped loop, tasks calling tasks, many calls without a leak. */
#define PATIO_IMPLEMENTATION
#include "patio.h"
#include "harness.h"
#include <stdlib.h>
#include "common.h"

static gate g_gate;

static int div_(patio_task *t)
{
    double a, b;
    if (patio_args(t, "dd", &a, &b) != PATIO_OK) return PATIO_ERR_TYPE;
    if (b == 0) return patio_fail(t, "ZeroDivisionError", "division by zero");
    return patio_return_double(t, a / b);
}

static int gated(patio_task *t)
{
    gate_pass(&g_gate);
    return patio_return_str(t, "late");
}

/* kw(x, scale=1): x * scale, scale read from the keyword arguments */
static int kw(patio_task *t)
{
    int64_t x, scale = 1;
    patio_reader v;
    if (patio_args(t, "I", &x) != PATIO_OK) return PATIO_ERR_TYPE;
    if (patio_kwarg(t, "scale", &v) == PATIO_OK && patio_read_int(&v, &scale) != PATIO_OK)
        return patio_fail(t, "TypeError", "scale must be an integer");
    return patio_return_int(t, x * scale);
}

/* echo(*args): returns its argument list as it is */
static int echo(patio_task *t)
{
    patio_reader *r = patio_task_args(t);
    uint32_t i, n = patio_task_argc(t);
    patio_writer *w = patio_task_result(t);
    patio_write_array(w, n);
    for (i = 0; i < n; i++) {
        const void *raw;
        size_t len;
        if (patio_read_raw(r, &raw, &len) != PATIO_OK) return PATIO_ERR_DECODE;
        patio_write_raw(w, raw, len);
    }
    return w->err;
}

/* square_via_broker(x): calls mul(x, x) through the broker, blocking (thread pool) */
static int square_via_broker(patio_task *t)
{
    int64_t x;
    patio_call *c;
    int rc;
    if (patio_args(t, "I", &x) != PATIO_OK) return PATIO_ERR_TYPE;
    c = patio_call_sync(patio_task_broker(t), 5.0, "mul", "II", x, x);
    if (patio_call_status(c) == PATIO_OK) rc = patio_return_int(t, patio_result_int(c));
    else rc = patio_fail(t, patio_call_error_type(c), "%s", patio_call_error_message(c));
    patio_call_free(c);
    return rc;
}

typedef struct env {
    patio_registry *rpc;
    patio_executor *ex;
    patio_broker *broker;
} env;

static env env_new_hooks(int async, const patio_hooks *hooks)
{
    env e;
    patio_registry_config rc;
    memset(&rc, 0, sizeof rc);
    rc.hooks = hooks;
    e.rpc = patio_registry_new(&rc);
    patio_register(e.rpc, "mul", mul, NULL);
    patio_register(e.rpc, "div", div_, NULL);
    patio_register(e.rpc, "gated", gated, NULL);
    patio_register(e.rpc, "kw", kw, NULL);
    patio_register(e.rpc, "echo", echo, NULL);
    patio_register(e.rpc, "square", square_via_broker, NULL);
    e.ex = async ? patio_async_executor_new(e.rpc, 4) : patio_thread_pool_new(e.rpc, 4);
    e.broker = patio_memory_broker_new(e.ex);
    return e;
}

static env env_new(int async) { return env_new_hooks(async, NULL); }

static void env_free(env *e)
{
    patio_broker_free(e->broker);
    patio_executor_free(e->ex);
    patio_registry_free(e->rpc);
}

static void test_mul(void)
{
    env e = env_new(0);
    patio_call *c = patio_call_sync(e.broker, 5.0, "mul", "iii", 1, 2, 3);
    CHECK_EQ_INT(patio_call_status(c), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(c), 6);
    CHECK_EQ_STR(patio_call_error_type(c), "");
    CHECK_EQ_STR(patio_call_name(c), "mul");
    CHECK(patio_registry_is_locked(e.rpc)); /* the broker locked it */
    patio_call_free(c);
    env_free(&e);
}

/* patio_result_int reads every int form (one byte or more, either sign),
 * and gives 0 for a result that is not an int and for a failed call. */
static void test_result_int_forms(void)
{
    static const int64_t values[] = { 0, 1, 127, 128, -1, -32, -33, -128, -129, 65536, -70000,
                                      (int64_t)1 << 40, -((int64_t)1 << 40) };
    env e = env_new(0);
    size_t i;
    patio_call *c;
    for (i = 0; i < sizeof values / sizeof values[0]; i++) {
        c = patio_call_sync(e.broker, 5.0, "mul", "II", values[i], (int64_t)1);
        CHECK_EQ_INT(patio_call_status(c), PATIO_OK);
        CHECK(patio_result_int(c) == values[i]);
        patio_call_free(c);
    }
    c = patio_call_sync(e.broker, 5.0, "echo", "i", 5);
    CHECK(patio_result_int(c) == 0); /* an array */
    patio_call_free(c);
    c = patio_call_sync(e.broker, 5.0, "div", "dd", 1.0, 4.0);
    CHECK(patio_result_int(c) == 0); /* a float */
    patio_call_free(c);
    c = patio_call_sync(e.broker, 5.0, "div", "ii", 1, 0);
    CHECK(patio_result_int(c) == 0); /* an error */
    patio_call_free(c);
    env_free(&e);
}

static void test_remote_error(void)
{
    env e = env_new(0);
    patio_call *c = patio_call_sync(e.broker, 5.0, "div", "ii", 1, 0);
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_REMOTE);
    CHECK_EQ_STR(patio_call_error_type(c), "ZeroDivisionError");
    CHECK_EQ_STR(patio_call_error_message(c), "division by zero");
    patio_call_free(c);
    c = patio_call_sync(e.broker, 5.0, "div", "dd", 1.0, 4.0);
    CHECK(patio_result_double(c) == 0.25);
    patio_call_free(c);
    env_free(&e);
}

static void test_type_errors(void)
{
    env e = env_new(0);
    patio_call *c = patio_call_sync(e.broker, 5.0, "div", "i", 1);
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_REMOTE);
    CHECK_EQ_STR(patio_call_error_type(c), "TypeError");
    CHECK(strstr(patio_call_error_message(c), "div") != NULL);
    patio_call_free(c);
    c = patio_call_sync(e.broker, 5.0, "mul", "is", 2, "x");
    CHECK_EQ_STR(patio_call_error_type(c), "TypeError");
    CHECK(strstr(patio_call_error_message(c), "argument 2") != NULL);
    patio_call_free(c);
    env_free(&e);
}

static void test_unknown_name(void)
{
    env e = env_new(0);
    patio_call *c = patio_call_sync(e.broker, 5.0, "nosuch", "");
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_NOT_FOUND);
    CHECK_EQ_STR(patio_call_error_type(c), "KeyError");
    CHECK_EQ_STR(patio_call_error_message(c), "nosuch");
    patio_call_free(c);
    env_free(&e);
}

static void test_invalid_calls(void)
{
    env e = env_new(0);
    patio_call_opts o;
    static const uint8_t not_array[] = { 0x01 };
    static const uint8_t truncated[] = { 0x92, 0x01 };
    patio_call *c = patio_call_async(e.broker, NULL, "");
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_INVALID);
    patio_call_free(c);
    c = patio_call_async(e.broker, "mul", "i?", 1);
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_INVALID);
    patio_call_free(c);
    memset(&o, 0, sizeof o);
    o.args = not_array;
    o.args_len = sizeof not_array;
    c = patio_call_start(e.broker, &o, "mul", NULL);
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_INVALID);
    patio_call_free(c);
    o.args = truncated;
    o.args_len = sizeof truncated;
    c = patio_call_start(e.broker, &o, "mul", NULL);
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_INVALID);
    patio_call_free(c);
    CHECK(patio_call_async(NULL, "mul", "") == NULL);
    CHECK_EQ_INT(patio_call_wait(NULL, 1.0), PATIO_ERR_INVALID);
    env_free(&e);
}

static void test_timeout(void)
{
    env e = env_new(0);
    patio_call *c, *ok;
    gate_init(&g_gate);
    c = patio_call_sync(e.broker, 0.05, "gated", "");
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_TIMEOUT);
    CHECK_EQ_STR(patio_call_error_type(c), "TimeoutError");
    /* other calls are not held up by the stuck one */
    ok = patio_call_sync(e.broker, 5.0, "mul", "ii", 3, 3);
    CHECK_EQ_INT(patio_result_int(ok), 9);
    gate_open(&g_gate);
    patio_call_free(c);
    patio_call_free(ok);
    env_free(&e);
    gate_destroy(&g_gate);
}

static void test_wait_timeout_leaves_call_running(void)
{
    env e = env_new(0);
    patio_call *c;
    gate_init(&g_gate);
    c = patio_call_async(e.broker, "gated", "");
    CHECK_EQ_INT(patio_call_wait(c, 0.02), PATIO_PENDING);
    CHECK_EQ_INT(patio_call_status(c), PATIO_PENDING);
    gate_open(&g_gate);
    CHECK_EQ_INT(patio_call_wait(c, 10.0), PATIO_OK);
    {
        const char *s;
        size_t n;
        CHECK_EQ_INT(patio_call_unpack(c, "s", &s, &n), PATIO_OK);
        CHECK_EQ_MEM(s, n, "late", 4);
    }
    patio_call_free(c);
    env_free(&e);
    gate_destroy(&g_gate);
}

static void test_kwargs_and_echo(void)
{
    env e = env_new(0);
    patio_writer kwargs;
    patio_call_opts o;
    patio_call *c;
    patio_reader r;
    uint32_t n;
    int64_t i;
    const char *s = NULL;
    size_t sl = 0;
    double d = 0;
    patio_writer_init(&kwargs, NULL);
    patio_pack(&kwargs, "{si}", "scale", 10);
    memset(&o, 0, sizeof o);
    o.kwargs = kwargs.data;
    o.kwargs_len = kwargs.len;
    c = patio_call_start(e.broker, &o, "kw", "i", 7);
    CHECK_EQ_INT(patio_call_wait(c, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(c), 70);
    patio_call_free(c);
    c = patio_call_sync(e.broker, 5.0, "kw", "i", 7); /* no kwargs: scale 1 */
    CHECK_EQ_INT(patio_result_int(c), 7);
    patio_call_free(c);

    /* the key found after others of every kind, including a str value
     * that spells the key, and an int key as Python may send */
    patio_writer_reset(&kwargs);
    CHECK_EQ_INT(patio_pack(&kwargs, "{sss[ii]iss{si}si}", "k", "scale", "a", 1, 2, 5, "b", "c", "d", 1,
                            "scale", 4), PATIO_OK);
    o.kwargs = kwargs.data;
    o.kwargs_len = kwargs.len;
    c = patio_call_start(e.broker, &o, "kw", "i", 7);
    CHECK_EQ_INT(patio_call_wait(c, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(c), 28);
    patio_call_free(c);
    patio_writer_reset(&kwargs); /* the key second */
    patio_pack(&kwargs, "{sisi}", "a", 1, "scale", 4);
    o.kwargs = kwargs.data;
    o.kwargs_len = kwargs.len;
    c = patio_call_start(e.broker, &o, "kw", "i", 7);
    CHECK_EQ_INT(patio_call_wait(c, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(c), 28);
    patio_call_free(c);
    patio_writer_reset(&kwargs); /* other keys only: the default */
    patio_pack(&kwargs, "{sisi}", "a", 2, "scal", 3);
    o.kwargs = kwargs.data;
    o.kwargs_len = kwargs.len;
    c = patio_call_start(e.broker, &o, "kw", "i", 7);
    CHECK_EQ_INT(patio_call_wait(c, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(c), 7);
    patio_call_free(c);
    patio_writer_free(&kwargs);

    c = patio_call_sync(e.broker, 5.0, "echo", "nbIsd[ii]", 1, (int64_t)-5, "é", 1.5, 1, 2);
    CHECK_EQ_INT(patio_call_reader(c, &r), PATIO_OK);
    CHECK_EQ_INT(patio_read_array(&r, &n), PATIO_OK);
    CHECK_EQ_INT(n, 6);
    CHECK_EQ_INT(patio_read_nil(&r), PATIO_OK);
    {
        int b = 0;
        CHECK_EQ_INT(patio_read_bool(&r, &b), PATIO_OK);
        CHECK(b == 1);
    }
    CHECK_EQ_INT(patio_read_int(&r, &i), PATIO_OK);
    CHECK_EQ_INT(i, -5);
    CHECK_EQ_INT(patio_read_str(&r, &s, &sl), PATIO_OK);
    CHECK_EQ_MEM(s, sl, "é", strlen("é"));
    CHECK_EQ_INT(patio_read_double(&r, &d), PATIO_OK);
    CHECK(d == 1.5);
    CHECK_EQ_INT(patio_read_array(&r, &n), PATIO_OK);
    CHECK_EQ_INT(n, 2);
    patio_call_free(c);
    env_free(&e);
}

static void test_call_by_function(void)
{
    patio_registry_config rc;
    patio_registry *rpc;
    patio_executor *ex;
    patio_broker *b;
    patio_call *c;
    memset(&rc, 0, sizeof rc);
    rc.project = "test";
    rpc = patio_registry_new(&rc);
    PATIO_REGISTER(rpc, mul, NULL);
    ex = patio_thread_pool_new(rpc, 2);
    b = patio_memory_broker_new(ex);
    c = patio_call_fn(b, mul, "ii", 4, 5);
    CHECK_EQ_INT(patio_call_wait(c, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(c), 20);
    CHECK_EQ_STR(patio_call_name(c), "test.mul");
    patio_call_free(c);
    c = patio_call_fn(b, div_, "ii", 4, 5); /* not registered */
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_NOT_FOUND);
    patio_call_free(c);
    patio_broker_free(b);
    patio_executor_free(ex);
    patio_registry_free(rpc);
}

/* ---- callbacks ---- */

typedef struct cb_state {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int count;
    int64_t sum;
    int on_loop_thread;
    patio_loop *loop;
} cb_state;

static void cb_state_init(cb_state *s, patio_loop *loop)
{
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->loop = loop;
}

static void cb_state_destroy(cb_state *s)
{
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
}

static void count_cb(patio_call *c, void *user)
{
    cb_state *s = (cb_state *)user;
    pthread_mutex_lock(&s->mu);
    s->count++;
    s->sum += patio_result_int(c);
    s->on_loop_thread += patio_loop_in_loop_thread(s->loop);
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    patio_call_free(c); /* freeing inside the callback is allowed */
}

static void test_callbacks_on_loop_thread(void)
{
    env e = env_new(0);
    cb_state s;
    patio_call_opts o;
    struct timespec ts;
    int i;
    cb_state_init(&s, patio_broker_loop(e.broker));
    memset(&o, 0, sizeof o);
    o.on_done = count_cb;
    o.user = &s;
    for (i = 0; i < 50; i++) patio_call_start(e.broker, &o, "mul", "ii", i, 2);
    deadline_in(&ts, 10.0);
    pthread_mutex_lock(&s.mu);
    while (s.count < 50 && pthread_cond_timedwait(&s.cv, &s.mu, &ts) == 0) {}
    pthread_mutex_unlock(&s.mu);
    CHECK_EQ_INT(s.count, 50);
    CHECK_EQ_INT(s.sum, 2 * (49 * 50 / 2));
    CHECK_EQ_INT(s.on_loop_thread, 50);
    env_free(&e);
    cb_state_destroy(&s);
}

/* Calls started and freed on the loop thread (each callback frees its call
 * and starts the next) are recycled there, while another thread starts and
 * frees calls of the same broker through the shared path: every answer is
 * right, an unknown name among the chained calls still fails, and nothing
 * leaks (ASan checks) when the broker goes with calls of both kinds retired. */
typedef struct chain_state {
    cb_state cb;
    patio_broker *b;
    int left;          /* loop thread only */
    int wrong;         /* loop thread only */
    int not_found;     /* loop thread only */
} chain_state;

static void chain_next(patio_call *c, void *user)
{
    chain_state *s = (chain_state *)user;
    int i = s->left;
    patio_call_opts o;
    if (patio_call_status(c) == PATIO_ERR_NOT_FOUND) s->not_found++;
    else if (patio_result_int(c) != (int64_t)(i + 1) * 3) s->wrong++;
    patio_call_free(c);
    if (--s->left < 0) {
        pthread_mutex_lock(&s->cb.mu);
        s->cb.count = 1;
        pthread_cond_signal(&s->cb.cv);
        pthread_mutex_unlock(&s->cb.mu);
        return;
    }
    memset(&o, 0, sizeof o);
    o.on_done = chain_next;
    o.user = s;
    o.timeout = i % 2 ? 5.0 : 7.0; /* two lanes */
    patio_call_start(s->b, &o, i == 1000 ? "nosuch" : "mul", "ii", s->left + 1, 3);
}

static void test_calls_chained_on_loop_thread(void)
{
    env e = env_new(1);
    chain_state s;
    patio_call_opts o;
    struct timespec ts;
    int i, outside_wrong = 0;
    memset(&s, 0, sizeof s);
    cb_state_init(&s.cb, NULL);
    s.b = e.broker;
    s.left = 3000;
    memset(&o, 0, sizeof o);
    o.on_done = chain_next;
    o.user = &s;
    patio_call_start(e.broker, &o, "mul", "ii", s.left + 1, 3);
    for (i = 0; i < 300; i++) {
        patio_call *c = patio_call_sync(e.broker, 5.0, "mul", "ii", i, 2);
        outside_wrong += patio_result_int(c) != 2 * i;
        patio_call_free(c);
    }
    deadline_in(&ts, 20.0);
    pthread_mutex_lock(&s.cb.mu);
    while (!s.cb.count && pthread_cond_timedwait(&s.cb.cv, &s.cb.mu, &ts) == 0) {}
    pthread_mutex_unlock(&s.cb.mu);
    CHECK_EQ_INT(s.cb.count, 1);
    CHECK_EQ_INT(outside_wrong, 0);
    /* the chain is over: its counters are no longer written */
    CHECK_EQ_INT(s.wrong, 0);
    CHECK_EQ_INT(s.not_found, 1);
    env_free(&e);
    cb_state_destroy(&s.cb);
}

/* References taken and dropped inside on_done count: a callback that
 * keeps the call (patio_call_ref) and drops the start's reference leaves
 * it readable until the keeper frees it (ASan catches a free too early). */
typedef struct keep_state {
    cb_state cb;
    patio_call *kept;
} keep_state;

static void keep_and_free(patio_call *c, void *user)
{
    keep_state *s = (keep_state *)user;
    patio_call_ref(c);
    patio_call_free(c);
    patio_call_free(c); /* the ref just taken... */
    patio_call_ref(c);  /* ...and one to keep */
    pthread_mutex_lock(&s->cb.mu);
    s->kept = c;
    pthread_cond_signal(&s->cb.cv);
    pthread_mutex_unlock(&s->cb.mu);
}

static void test_callback_keeps_call(void)
{
    env e = env_new(1);
    keep_state s;
    patio_call_opts o;
    struct timespec ts;
    int round;
    memset(&s, 0, sizeof s);
    cb_state_init(&s.cb, NULL);
    memset(&o, 0, sizeof o);
    o.on_done = keep_and_free;
    o.user = &s;
    for (round = 0; round < 20; round++) {
        patio_call *kept;
        patio_call_start(e.broker, &o, "mul", "ii", round, 3);
        deadline_in(&ts, 10.0);
        pthread_mutex_lock(&s.cb.mu);
        while (!s.kept && pthread_cond_timedwait(&s.cb.cv, &s.cb.mu, &ts) == 0) {}
        kept = s.kept;
        s.kept = NULL;
        pthread_mutex_unlock(&s.cb.mu);
        CHECK(kept != NULL);
        if (!kept) break;
        /* the callback has returned once the loop answers the next call */
        patio_call_free(patio_call_sync(e.broker, 5.0, "mul", "ii", 1, 1));
        CHECK_EQ_INT(patio_call_status(kept), PATIO_OK);
        CHECK_EQ_INT(patio_result_int(kept), 3 * round);
        patio_call_free(kept);
    }
    env_free(&e);
    cb_state_destroy(&s.cb);
}

/* A call that times out while patio_call_start is still handing it to the
 * broker: its callback, which frees it, runs on the loop thread meanwhile,
 * and the start must not touch the call after that. */

static int g_expired, g_finished;

static void count_expired_and_free(patio_call *c, void *user)
{
    (void)user;
    if (patio_call_status(c) == PATIO_ERR_TIMEOUT) __atomic_add_fetch(&g_expired, 1, __ATOMIC_SEQ_CST);
    patio_call_free(c);
    __atomic_add_fetch(&g_finished, 1, __ATOMIC_SEQ_CST);
}

static int finished_all(void *n) { return __atomic_load_n(&g_finished, __ATOMIC_SEQ_CST) >= *(int *)n; }

static int expired_some(void *arg)
{
    (void)arg;
    return __atomic_load_n(&g_expired, __ATOMIC_SEQ_CST) > 0;
}

/* Keeps the pool's only worker until some call has timed out (10 s at
 * most), so that calls behind it expire whatever the scheduling. */
static int hold_until_expired(patio_task *t)
{
    wait_until(expired_some, NULL, 10.0);
    return patio_return_nil(t);
}

static void test_callback_frees_call_that_expires_at_once(void)
{
    patio_registry *rpc = patio_registry_new(NULL);
    patio_executor *ex;
    patio_broker *b;
    patio_call_opts o;
    int i, n = 100000;
    patio_register(rpc, "mul", mul, NULL);
    patio_register(rpc, "hold", hold_until_expired, NULL);
    ex = patio_thread_pool_new(rpc, 1);
    b = patio_memory_broker_new(ex);
    g_expired = g_finished = 0;
    memset(&o, 0, sizeof o);
    o.on_done = count_expired_and_free;
    o.timeout = 1e-9;
    for (i = 0; i < n; i++) {
        if (i == 0) patio_call_start(b, &o, "hold", "");
        else patio_call_start(b, &o, "mul", "ii", 1, 1);
    }
    CHECK(wait_until(finished_all, &n, 20.0));
    CHECK(__atomic_load_n(&g_expired, __ATOMIC_SEQ_CST) > 0);
    patio_broker_free(b);
    patio_executor_free(ex);
    patio_registry_free(rpc);
}

/* ---- a broker of the user's own ---- */

/* Carries calls and answers them later, as a remote peer would: it holds a
 * reference on each, so a late answer to a call that timed out and was
 * freed by its owner cannot land in freed memory or in a later call. */
typedef struct later_broker {
    patio_broker base;
    patio_call *carried[4];
    int64_t arg[4];
    int n;
} later_broker;

static void later_send(patio_broker *b, patio_call *c)
{
    later_broker *lb = (later_broker *)b;
    const void *args = NULL;
    size_t len = 0;
    patio_reader r;
    uint32_t n;
    patio_call_args(c, &args, &len, NULL, NULL);
    patio_reader_init(&r, args, len);
    if (lb->n >= 4 || patio_read_array(&r, &n) != PATIO_OK || n != 1 ||
        patio_read_int(&r, &lb->arg[lb->n]) != PATIO_OK) {
        patio_call_fail_with(c, PATIO_ERR_INVALID, "ValueError", "one int, please");
        return;
    }
    patio_call_ref(c);
    lb->carried[lb->n++] = c;
}

static int later_answer(later_broker *lb, int i)
{
    uint8_t buf[16];
    patio_writer w;
    int rc;
    patio_writer_init_fixed(&w, buf, sizeof buf);
    patio_write_int(&w, lb->arg[i] * 100);
    rc = patio_call_succeed(lb->carried[i], w.data, w.len);
    patio_call_unref(lb->carried[i]);
    return rc;
}

static void later_destroy(patio_broker *b) { free(b); }

static const patio_broker_vtable later_vt = { "later", later_send, NULL, NULL, later_destroy };

/* A cancel during which the call's timeout finishes it first. */
static int cancel_after_timeout(patio_broker *b, patio_call *c)
{
    (void)b;
    patio_call_fail_with(c, PATIO_ERR_TIMEOUT, "TimeoutError", "");
    return PATIO_OK;
}

static const patio_broker_vtable racing_vt = { "racing", later_send, cancel_after_timeout, NULL, later_destroy };

/* A registry with "f", a null executor (the broker runs nothing) and a
 * later_broker with the given vtable. */
typedef struct own_env {
    patio_registry *rpc;
    patio_executor *ex;
    later_broker *lb;
} own_env;

static own_env own_env_new(const patio_broker_vtable *vt)
{
    own_env e;
    e.rpc = patio_registry_new(NULL);
    patio_register(e.rpc, "f", mul, NULL);
    e.ex = patio_null_executor_new(e.rpc);
    e.lb = (later_broker *)calloc(1, sizeof *e.lb);
    CHECK_EQ_INT(patio_broker_init(&e.lb->base, vt, e.ex, NULL), PATIO_OK);
    return e;
}

static void own_env_free(own_env *e)
{
    patio_broker_free(&e->lb->base);
    patio_executor_free(e->ex);
    patio_registry_free(e->rpc);
}

static void test_cancel_loses_to_timeout(void)
{
    own_env e = own_env_new(&racing_vt);
    later_broker *lb = e.lb;
    patio_call *c = patio_call_async(&lb->base, "f", "i", 1);
    CHECK_EQ_INT(patio_call_cancel(c), PATIO_ERR_INVALID);
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_TIMEOUT);
    CHECK_EQ_STR(patio_call_error_type(c), "TimeoutError");
    patio_call_unref(lb->carried[0]);
    patio_call_free(c);
    own_env_free(&e);
}

static void test_own_broker_late_answer(void)
{
    own_env e = own_env_new(&later_vt);
    later_broker *lb = e.lb;
    patio_call *c1, *c2;
    patio_call_opts o;
    memset(&o, 0, sizeof o);
    o.timeout = 0.02;
    c1 = patio_call_start(&lb->base, &o, "f", "i", 1);
    CHECK_EQ_INT(patio_call_wait(c1, 5.0), PATIO_ERR_TIMEOUT);
    patio_call_free(c1); /* its owner is done with it; the broker is not */
    o.timeout = 10.0;
    c2 = patio_call_start(&lb->base, &o, "f", "i", 2);
    CHECK_EQ_INT(lb->n, 2);
    CHECK_EQ_INT(later_answer(lb, 0), PATIO_ERR_INVALID); /* too late */
    CHECK_EQ_INT(patio_call_status(c2), PATIO_PENDING);
    CHECK_EQ_INT(later_answer(lb, 1), PATIO_OK);
    CHECK_EQ_INT(patio_call_wait(c2, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(c2), 200);
    patio_call_free(c2);
    own_env_free(&e);
}

/* ---- host-pumped loop: no library thread at all ---- */

static void test_host_pumped_loop(void)
{
    patio_registry *rpc = patio_registry_new(NULL);
    patio_loop *loop = patio_loop_new(NULL);
    patio_executor *ex;
    patio_broker *b;
    patio_broker_config bc;
    patio_call_opts o;
    cb_state s;
    patio_call *c;
    int i;
    patio_register(rpc, "mul", mul, NULL);
    ex = patio_async_executor_new(rpc, 4);
    memset(&bc, 0, sizeof bc);
    bc.loop = loop;
    b = patio_memory_broker_new_ex(ex, &bc);
    cb_state_init(&s, loop);
    memset(&o, 0, sizeof o);
    o.on_done = count_cb;
    o.user = &s;
    patio_call_start(b, &o, "mul", "ii", 3, 4);
    CHECK_EQ_INT(s.count, 0); /* nothing runs until the host pumps */
    CHECK_EQ_INT(patio_loop_next_timeout_ms(loop), 0);
    for (i = 0; i < 100 && s.count == 0; i++) patio_loop_run_once(loop, 10);
    CHECK_EQ_INT(s.count, 1);
    CHECK_EQ_INT(s.sum, 12);
    CHECK_EQ_INT(s.on_loop_thread, 1); /* ran on this (the pumping) thread */
    /* a blocking wait pumps the loop itself */
    c = patio_call_async(b, "mul", "ii", 5, 5);
    CHECK_EQ_INT(patio_call_wait(c, 5.0), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(c), 25);
    patio_call_free(c);
    patio_broker_free(b);
    patio_executor_free(ex);
    patio_loop_free(loop);
    patio_registry_free(rpc);
    cb_state_destroy(&s);
}

/* ---- a task that calls another task ---- */

static void test_task_calls_task_thread_pool(void)
{
    env e = env_new(0);
    patio_call *c = patio_call_sync(e.broker, 5.0, "square", "i", 9);
    CHECK_EQ_INT(patio_call_status(c), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(c), 81);
    patio_call_free(c);
    env_free(&e);
}

static void chained_done(patio_call *inner, void *user)
{
    patio_task *t = (patio_task *)user;
    if (patio_call_status(inner) == PATIO_OK) patio_return_int(t, patio_result_int(inner) + 1);
    else patio_fail(t, patio_call_error_type(inner), "%s", patio_call_error_message(inner));
    patio_call_free(inner);
    patio_task_finish(t);
}

/* chained(x): mul(x, x) + 1, finishing when the inner call answers */
static int chained(patio_task *t)
{
    patio_call_opts o;
    int64_t x;
    if (patio_args(t, "I", &x) != PATIO_OK) return PATIO_ERR_TYPE;
    memset(&o, 0, sizeof o);
    o.on_done = chained_done;
    o.user = t;
    patio_call_start(patio_task_broker(t), &o, "mul", "II", x, x);
    return PATIO_PENDING;
}

static void test_task_calls_task_async(void)
{
    patio_registry *rpc = patio_registry_new(NULL);
    patio_executor *ex;
    patio_broker *b;
    patio_call *calls[3];
    int i;
    patio_register(rpc, "mul", mul, NULL);
    patio_register(rpc, "chained", chained, NULL);
    ex = patio_async_executor_new(rpc, 4);
    b = patio_memory_broker_new(ex);
    for (i = 0; i < 3; i++) calls[i] = patio_call_async(b, "chained", "i", i + 2);
    CHECK_EQ_INT(patio_wait_all(calls, 3, 10.0), PATIO_OK);
    for (i = 0; i < 3; i++) {
        CHECK_EQ_INT(patio_result_int(calls[i]), (i + 2) * (i + 2) + 1);
        patio_call_free(calls[i]);
    }
    patio_broker_free(b);
    patio_executor_free(ex);
    patio_registry_free(rpc);
}

/* A wait for all of them ends when the last to finish does, whichever
 * call that is: here the first one, started before the others finished. */
static void test_wait_all_last_to_finish_is_first(void)
{
    env e = env_new(0);
    patio_call *calls[3];
    int i;
    gate_init(&g_gate);
    calls[0] = patio_call_async(e.broker, "gated", "");
    calls[1] = patio_call_async(e.broker, "mul", "ii", 2, 21);
    calls[2] = patio_call_async(e.broker, "mul", "ii", 3, 5);
    CHECK_EQ_INT(patio_call_wait(calls[2], 10.0), PATIO_OK);
    CHECK_EQ_INT(patio_wait_all(calls, 3, 0.01), PATIO_ERR_TIMEOUT);
    CHECK_EQ_INT(patio_call_status(calls[0]), PATIO_PENDING);
    gate_open(&g_gate);
    CHECK_EQ_INT(patio_wait_all(calls, 3, 10.0), PATIO_OK);
    CHECK_EQ_INT(patio_call_status(calls[0]), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(calls[1]), 42);
    CHECK_EQ_INT(patio_result_int(calls[2]), 15);
    for (i = 0; i < 3; i++) patio_call_free(calls[i]);
    env_free(&e);
}

static void test_wait_any(void)
{
    env e = env_new(0);
    patio_call *calls[2];
    size_t index = 99;
    gate_init(&g_gate);
    calls[0] = patio_call_async(e.broker, "gated", "");
    calls[1] = patio_call_async(e.broker, "mul", "ii", 2, 21);
    CHECK_EQ_INT(patio_wait_any(calls, 2, 10.0, &index), PATIO_OK);
    CHECK_EQ_INT(index, 1);
    CHECK_EQ_INT(patio_call_status(calls[0]), PATIO_PENDING);
    CHECK_EQ_INT(patio_result_int(calls[1]), 42);
    CHECK_EQ_INT(patio_wait_all(calls, 2, 0.01), PATIO_ERR_TIMEOUT);
    gate_open(&g_gate);
    CHECK_EQ_INT(patio_wait_all(calls, 2, 10.0), PATIO_OK);
    patio_call_free(calls[0]);
    patio_call_free(calls[1]);
    env_free(&e);
    gate_destroy(&g_gate);
}

static void test_close_fails_pending(void)
{
    env e = env_new(0);
    patio_call *stuck, *after;
    gate_init(&g_gate);
    stuck = patio_call_async(e.broker, "gated", "");
    CHECK(gate_wait_arrived(&g_gate, 1));
    patio_broker_close(e.broker);
    CHECK_EQ_INT(patio_call_status(stuck), PATIO_ERR_CLOSED);
    after = patio_call_async(e.broker, "mul", "ii", 1, 1);
    CHECK_EQ_INT(patio_call_status(after), PATIO_ERR_CLOSED);
    gate_open(&g_gate);
    patio_call_free(stuck);
    patio_call_free(after);
    env_free(&e);
    gate_destroy(&g_gate);
}

typedef struct closer_arg { patio_broker *b; gate *g; } closer_arg;

static void *close_after_gate(void *p)
{
    closer_arg *a = (closer_arg *)p;
    gate_pass(a->g);
    patio_broker_close(a->b);
    return NULL;
}

static void test_join_waits_for_close(void)
{
    env e = env_new(0);
    gate g;
    closer_arg arg;
    pthread_t th;
    gate_init(&g);
    arg.b = e.broker;
    arg.g = &g;
    CHECK_EQ_INT(patio_broker_join(e.broker, 0.02), PATIO_ERR_TIMEOUT);
    pthread_create(&th, NULL, close_after_gate, &arg);
    CHECK(gate_wait_arrived(&g, 1));
    gate_open(&g);
    CHECK_EQ_INT(patio_broker_join(e.broker, 10.0), PATIO_OK);
    pthread_join(th, NULL);
    CHECK_EQ_INT(patio_broker_join(e.broker, 0), PATIO_OK); /* already closed */
    env_free(&e);
    gate_destroy(&g);
}

/* ---- volume: one million calls, every allocation given back ---- */

static void many_calls(int async, long total)
{
    alloc_count counts = { 0, 0 };
    patio_hooks h = counting_hooks(&counts);
    env e = env_new_hooks(async, &h);
    patio_call *calls[1000];
    long done = 0, right = 0;
    while (done < total) {
        int i, n = 1000;
        for (i = 0; i < n; i++) calls[i] = patio_call_async(e.broker, "mul", "ii", i, 3);
        if (patio_wait_all(calls, (size_t)n, 60.0) != PATIO_OK) break;
        for (i = 0; i < n; i++) {
            right += patio_result_int(calls[i]) == (int64_t)i * 3;
            patio_call_free(calls[i]);
        }
        done += n;
    }
    env_free(&e);
    CHECK_EQ_INT(right, total);
    CHECK_EQ_INT(counts.allocs, counts.frees);
}

static void test_million_calls_thread_pool(void) { many_calls(0, 1000000); }
static void test_100k_calls_async(void) { many_calls(1, 100000); }

int main(void)
{
    RUN(test_mul);
    RUN(test_result_int_forms);
    RUN(test_remote_error);
    RUN(test_type_errors);
    RUN(test_unknown_name);
    RUN(test_invalid_calls);
    RUN(test_timeout);
    RUN(test_wait_timeout_leaves_call_running);
    RUN(test_kwargs_and_echo);
    RUN(test_call_by_function);
    RUN(test_callbacks_on_loop_thread);
    RUN(test_calls_chained_on_loop_thread);
    RUN(test_callback_keeps_call);
    RUN(test_callback_frees_call_that_expires_at_once);
    RUN(test_own_broker_late_answer);
    RUN(test_cancel_loses_to_timeout);
    RUN(test_host_pumped_loop);
    RUN(test_task_calls_task_thread_pool);
    RUN(test_task_calls_task_async);
    RUN(test_wait_all_last_to_finish_is_first);
    RUN(test_wait_any);
    RUN(test_close_fails_pending);
    RUN(test_join_waits_for_close);
    RUN(test_million_calls_thread_pool);
    RUN(test_100k_calls_async);
    return th_summary("test_broker");
}
