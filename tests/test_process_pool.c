/* Process pool: Python patio's executor tests run in worker processes
 * (mul == 6, 100 concurrent calls), large arguments and results, workers
 * that crash, abort, exit, get killed or outlive a timeout (the caller gets
 * the right error, the pool replaces the worker and keeps serving), dispatch
 * that keeps short calls away from a busy worker, cancellation, shutdown
 * with calls queued, and hygiene: every child reaped, no fd leaked, the
 * parent's fds not held by workers. Calls go through the memory broker, and
 * through a TCP server when the TCP broker is built in. Every wait is
 * bounded; the only sleeps are the tasks under test, the poll in
 * wait_workers, and the quiet period whose CPU use one test measures. */
#define PATIO_IMPLEMENTATION
#include "patio.h"
#include "harness.h"
#include <stdlib.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <dirent.h>
#include <sys/wait.h>
#include "common.h"

/* ---- tasks (they run in the workers) ---------------------------------- */

/* A gate between processes: pipes made before the pool (inherit_fds = 1).
 * `gated` tells the test it started, then waits (at most 10 s) for a byte. */
static int g_started[2] = { -1, -1 }, g_release[2] = { -1, -1 };

static int gated(patio_task *t)
{
    struct pollfd pfd;
    char byte = 1;
    if (write(g_started[1], &byte, 1) != 1) return patio_fail(t, "OSError", "started pipe");
    pfd.fd = g_release[0];
    pfd.events = POLLIN;
    if (poll(&pfd, 1, 10000) != 1 || read(g_release[0], &byte, 1) != 1)
        return patio_fail(t, "TimeoutError", "never released");
    return patio_return_str(t, "released");
}

static int echo(patio_task *t)
{
    const void *p;
    size_t n;
    if (patio_args(t, "y", &p, &n) != PATIO_OK) return PATIO_ERR_TYPE;
    return patio_return_bin(t, p, n);
}

/* Returns a bin of the requested size (to overflow max_frame_size). */
static int blob(patio_task *t)
{
    int64_t n = 0;
    void *p;
    int rc;
    patio_arg_next_int(t, &n);
    p = calloc((size_t)n, 1);
    if (!p) return patio_fail(t, "MemoryError", "blob");
    rc = patio_return_bin(t, p, (size_t)n);
    free(p);
    return rc;
}

static int crash_segv(patio_task *t)
{
    /* Sanitizers catch SIGSEGV themselves and exit instead: restore the
     * default action so the worker dies by the signal in every build. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sigaction(SIGSEGV, &sa, NULL);
    raise(SIGSEGV);
    return patio_return_nil(t);
}

static int crash_abort(patio_task *t)
{
    PATIO__UNUSED(t);
    abort();
}

static int crash_exit(patio_task *t)
{
    PATIO__UNUSED(t);
    exit(3);
}

/* Sleeps for its argument in seconds: the slow task of the timeout tests. */
static int sleeper(patio_task *t)
{
    double s = 0;
    struct timespec ts;
    patio_arg_next_double(t, &s);
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
    return patio_return_nil(t);
}

static int pending(patio_task *t)
{
    PATIO__UNUSED(t);
    return PATIO_PENDING;
}

/* 1 if fd is open in the worker. */
static int fd_open(patio_task *t)
{
    int64_t fd = -1;
    patio_arg_next_int(t, &fd);
    return patio_return_bool(t, fcntl((int)fd, F_GETFD) != -1);
}

static int my_pid(patio_task *t) { return patio_return_int(t, (int64_t)getpid()); }

/* The worker's open fds (0 if /proc is missing). */
static int count_fds(void);
static int fd_count(patio_task *t) { return patio_return_int(t, count_fds()); }

/* ---- helpers ---------------------------------------------------------- */

typedef struct env {
    patio_registry *rpc;
    patio_executor *ex;
    patio_broker *broker;
} env;

static env env_new_cfg(const patio_process_pool_config *cfg, const patio_hooks *hooks)
{
    env e;
    patio_registry_config rc;
    memset(&rc, 0, sizeof rc);
    rc.hooks = hooks;
    e.rpc = patio_registry_new(&rc);
    patio_register(e.rpc, "mul", mul, NULL);
    patio_register(e.rpc, "gated", gated, NULL);
    patio_register(e.rpc, "echo", echo, NULL);
    patio_register(e.rpc, "blob", blob, NULL);
    patio_register(e.rpc, "crash_segv", crash_segv, NULL);
    patio_register(e.rpc, "crash_abort", crash_abort, NULL);
    patio_register(e.rpc, "crash_exit", crash_exit, NULL);
    patio_register(e.rpc, "sleeper", sleeper, NULL);
    patio_register(e.rpc, "pending", pending, NULL);
    patio_register(e.rpc, "fd_open", fd_open, NULL);
    patio_register(e.rpc, "my_pid", my_pid, NULL);
    patio_register(e.rpc, "fd_count", fd_count, NULL);
    e.ex = patio_process_pool_new_ex(e.rpc, cfg);
    e.broker = e.ex ? patio_memory_broker_new(e.ex) : NULL;
    return e;
}

static env env_new(int workers)
{
    patio_process_pool_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = workers;
    return env_new_cfg(&cfg, NULL);
}

static void env_free(env *e)
{
    patio_broker_free(e->broker);
    patio_executor_free(e->ex);
    patio_registry_free(e->rpc);
}

static void pause_ms(int ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    nanosleep(&ts, NULL);
}

/* Polls (at most 10 s) until the pool has n live workers. */
static int wait_workers(patio_executor *ex, int n)
{
    int i;
    for (i = 0; i < 10000; i++) {
        if (patio_process_pool_workers(ex) == n) return 1;
        pause_ms(1);
    }
    return 0;
}

/* Every pid of `pids` must be gone and reaped: waitpid says ECHILD. */
static int all_reaped(const long *pids, int n)
{
    int i, ok = 1;
    for (i = 0; i < n; i++) {
        errno = 0;
        if (waitpid((pid_t)pids[i], NULL, WNOHANG) != -1 || errno != ECHILD) ok = 0;
    }
    return ok;
}

/* How many of b's entries are not in a. */
static int count_new(const long *a, int na, const long *b, int nb)
{
    int i, j, fresh = 0;
    for (i = 0; i < nb; i++) {
        int seen = 0;
        for (j = 0; j < na; j++) seen |= a[j] == b[i];
        fresh += !seen;
    }
    return fresh;
}

/* Open fds, not counting the one that lists them. */
static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *de;
    int n = 0;
    if (!d) return 0;
    while ((de = readdir(d)) != NULL) n += de->d_name[0] != '.';
    closedir(d);
    return n - 1;
}

static int mul_ok(patio_broker *b)
{
    patio_call *c = patio_call_sync(b, 10.0, "mul", "iii", 1, 2, 3);
    int ok = patio_call_status(c) == PATIO_OK && patio_result_int(c) == 6;
    patio_call_free(c);
    return ok;
}

static void open_gate_pipes(void)
{
    CHECK(pipe(g_started) == 0);
    CHECK(pipe(g_release) == 0);
}

static void close_gate_pipes(void)
{
    int i;
    for (i = 0; i < 2; i++) {
        close(g_started[i]);
        close(g_release[i]);
        g_started[i] = g_release[i] = -1;
    }
}

/* Waits (at most 10 s) until a gated task signalled that it runs. */
static int gate_started(void)
{
    struct pollfd pfd;
    char byte;
    pfd.fd = g_started[0];
    pfd.events = POLLIN;
    return poll(&pfd, 1, 10000) == 1 && read(g_started[0], &byte, 1) == 1;
}

static void gate_release(void)
{
    char byte = 1;
    CHECK(write(g_release[1], &byte, 1) == 1);
}

/* ---- tests ------------------------------------------------------------ */

static void test_multiply(void)
{
    alloc_count count = { 0, 0 };
    patio_hooks hooks = counting_hooks(&count);
    patio_process_pool_config cfg;
    patio_call *c;
    env e;
    memset(&cfg, 0, sizeof cfg);
    e = env_new_cfg(&cfg, &hooks);
    CHECK(e.ex != NULL && e.broker != NULL);
    CHECK_EQ_STR(patio_executor_kind(e.ex), "process_pool");
    CHECK_EQ_INT(patio_process_pool_workers(e.ex), PATIO_DEFAULT_MAX_WORKERS);
    CHECK(patio_registry_is_locked(e.rpc));
    c = patio_call_sync(e.broker, 10.0, "mul", "iii", 1, 2, 3);
    CHECK_EQ_INT(patio_call_status(c), PATIO_OK);
    CHECK_EQ_INT(patio_result_int(c), 6);
    patio_call_free(c);
    /* the call ran in another process */
    c = patio_call_sync(e.broker, 10.0, "my_pid", "");
    CHECK_EQ_INT(patio_call_status(c), PATIO_OK);
    CHECK(patio_result_int(c) != (int64_t)getpid());
    patio_call_free(c);
    env_free(&e);
    CHECK_EQ_INT(count.allocs, count.frees);
}

/* Starts n calls of mul(1, 2, 3), waits for all (at most `timeout` s),
 * frees them; returns how many gave 6, and the wait's result in *waited. */
static int gather_mul(patio_broker *b, patio_call **calls, int n, double timeout, int *waited)
{
    int i, sixes = 0;
    for (i = 0; i < n; i++) calls[i] = patio_call_async(b, "mul", "iii", 1, 2, 3);
    *waited = patio_wait_all(calls, (size_t)n, timeout);
    for (i = 0; i < n; i++) {
        sixes += patio_call_status(calls[i]) == PATIO_OK && patio_result_int(calls[i]) == 6;
        patio_call_free(calls[i]);
    }
    return sixes;
}

static void check_gather(int spin_us)
{
    patio_process_pool_config cfg;
    patio_call *calls[100];
    int waited;
    env e;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 4;
    cfg.spin_us = spin_us;
    e = env_new_cfg(&cfg, NULL);
    CHECK_EQ_INT(gather_mul(e.broker, calls, 100, 20.0, &waited), 100);
    CHECK_EQ_INT(waited, PATIO_OK);
    env_free(&e);
}

static void test_gather(void) { check_gather(0); }          /* polls before sleeping */
static void test_gather_without_polling(void) { check_gather(-1); }

/* Bursts of every size, one after another, so that calls keep arriving
 * just as the I/O thread goes to sleep or wakes: each burst must finish
 * (a missed wake-up leaves one waiting until its timeout). */
static void check_bursts(int spin_us)
{
    enum { ROUNDS = 400, MAX_BURST = 256 };
    patio_process_pool_config cfg;
    static patio_call *calls[MAX_BURST];
    int r, stalled = 0, wrong = 0;
    env e;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 4;
    cfg.spin_us = spin_us;
    e = env_new_cfg(&cfg, NULL);
    for (r = 0; r < ROUNDS && !stalled; r++) {
        int n = 1 + (r * 37) % MAX_BURST, waited;
        wrong += n - gather_mul(e.broker, calls, n, 10.0, &waited);
        stalled += waited != PATIO_OK;
    }
    CHECK_EQ_INT(stalled, 0);
    CHECK_EQ_INT(wrong, 0);
    env_free(&e);
}

static void test_bursts_never_stall(void) { check_bursts(0); }
static void test_bursts_never_stall_without_polling(void) { check_bursts(-1); }

/* CPU time (user + system) a process used so far, in clock ticks; -1 if
 * /proc cannot tell. */
static long cpu_ticks(long pid)
{
    char path[64], buf[1024], *p;
    unsigned long utime = 0, stime = 0;
    FILE *f;
    size_t n;
    int field;
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    if (!(f = fopen(path, "r"))) return -1;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    p = strrchr(buf, ')'); /* the name may hold spaces; fields follow it */
    if (!p) return -1;
    for (field = 2; field < 13 && p; field++) p = strchr(p + 1, ' ');
    if (!p || sscanf(p + 1, "%lu %lu", &utime, &stime) != 2) return -1;
    return (long)(utime + stime);
}

static long self_cpu_ticks(void)
{
    return cpu_ticks((long)getpid());
}

/* Polling is for work that comes back soon: once calls stop, the workers
 * and the I/O thread go to sleep instead of polling on. Over 600 ms of
 * quiet after a burst, the pool may use a little CPU (the polls that end
 * each burst), not the CPUs that polling on would burn. */
static void test_idle_pool_stops_polling(void)
{
    patio_process_pool_config cfg;
    patio_call *calls[200];
    long pids[2], before[3], after[3], used = 0, clk = sysconf(_SC_CLK_TCK);
    struct timespec quiet = { 0, 600000000L };
    int i, k, waited, sixes = 0;
    env e;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 2;
    cfg.spin_us = 1000; /* long polls, so that a pool that kept polling would show */
    e = env_new_cfg(&cfg, NULL);
    for (k = 0; k < 5; k++) { /* bursts teach the pool that work comes back at once */
        sixes += gather_mul(e.broker, calls, 200, 20.0, &waited);
        CHECK_EQ_INT(waited, PATIO_OK);
    }
    CHECK_EQ_INT(sixes, 1000);
    CHECK_EQ_INT(patio_process_pool_pids(e.ex, pids, 2), 2);
    before[0] = cpu_ticks(pids[0]);
    before[1] = cpu_ticks(pids[1]);
    before[2] = self_cpu_ticks();
    while (nanosleep(&quiet, &quiet) != 0 && errno == EINTR) {}
    after[0] = cpu_ticks(pids[0]);
    after[1] = cpu_ticks(pids[1]);
    after[2] = self_cpu_ticks();
    for (i = 0; i < 3; i++) {
        CHECK(before[i] >= 0 && after[i] >= before[i]);
        used += after[i] - before[i];
    }
    /* three pollers that went on would use about 3 x 600 ms */
    CHECK(used * 1000 / clk < 150);
    env_free(&e);
}

/* A 4 MiB binary goes to a worker and comes back intact. */
static void test_large_arguments_and_results(void)
{
    env e = env_new(2);
    size_t n = 4u << 20, i, got_len = 0;
    unsigned char *buf = (unsigned char *)malloc(n);
    const void *got = NULL;
    patio_call *c;
    uint32_t x = 12345;
    for (i = 0; i < n; i++) { x = x * 1103515245u + 12345u; buf[i] = (unsigned char)(x >> 16); }
    c = patio_call_sync(e.broker, 30.0, "echo", "y", buf, n);
    CHECK_EQ_INT(patio_call_status(c), PATIO_OK);
    CHECK_EQ_INT(patio_call_unpack(c, "y", &got, &got_len), PATIO_OK);
    CHECK_EQ_INT(got_len, n);
    CHECK(got && got_len == n && memcmp(got, buf, n) == 0);
    patio_call_free(c);
    /* several at once, on both workers */
    {
        patio_call *calls[4];
        int k, ok = 0;
        for (k = 0; k < 4; k++) calls[k] = patio_call_async(e.broker, "echo", "y", buf, n);
        CHECK_EQ_INT(patio_wait_all(calls, 4, 30.0), PATIO_OK);
        for (k = 0; k < 4; k++) {
            ok += patio_call_unpack(calls[k], "y", &got, &got_len) == PATIO_OK && got_len == n &&
                  memcmp(got, buf, n) == 0;
            patio_call_free(calls[k]);
        }
        CHECK_EQ_INT(ok, 4);
    }
    CHECK(mul_ok(e.broker));
    free(buf);
    env_free(&e);
}

/* Above max_frame_size: arguments fail in the parent, results in the worker. */
static void test_frame_limit(void)
{
    patio_process_pool_config cfg;
    unsigned char *buf = (unsigned char *)calloc(1, 200000);
    patio_call *c;
    env e;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 1;
    cfg.max_frame_size = 100000;
    e = env_new_cfg(&cfg, NULL);
    c = patio_call_sync(e.broker, 10.0, "echo", "y", buf, (size_t)200000);
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_OVERFLOW);
    CHECK_EQ_STR(patio_call_error_type(c), "OverflowError");
    patio_call_free(c);
    c = patio_call_sync(e.broker, 10.0, "blob", "i", 200000);
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_REMOTE);
    CHECK_EQ_STR(patio_call_error_type(c), "OverflowError");
    patio_call_free(c);
    c = patio_call_sync(e.broker, 10.0, "blob", "i", 50000);
    CHECK_EQ_INT(patio_call_status(c), PATIO_OK);
    patio_call_free(c);
    CHECK(mul_ok(e.broker));
    CHECK_EQ_INT(patio_process_pool_workers(e.ex), 1);
    free(buf);
    env_free(&e);
}

/* A worker killed by `task`: its caller gets PATIO_ERR_WORKER_DIED with a
 * message containing `expect`, one worker is replaced, the pool serves. */
static void check_crash(const char *task, const char *expect)
{
    env e = env_new(2);
    long before[2], after[2], all[4];
    int nb, na, i;
    patio_call *c;
    nb = patio_process_pool_pids(e.ex, before, 2);
    CHECK_EQ_INT(nb, 2);
    c = patio_call_sync(e.broker, 20.0, task, "");
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_WORKER_DIED);
    CHECK_EQ_STR(patio_call_error_type(c), "RuntimeError");
    if (!strstr(patio_call_error_message(c), expect)) {
        fprintf(stderr, "    message: %s (expected \"%s\")\n", patio_call_error_message(c), expect);
        CHECK(!"the message names the cause");
    }
    patio_call_free(c);
    for (i = 0; i < 5; i++) CHECK(mul_ok(e.broker));
    CHECK(wait_workers(e.ex, 2));
    na = patio_process_pool_pids(e.ex, after, 2);
    CHECK_EQ_INT(na, 2);
    CHECK_EQ_INT(count_new(before, nb, after, na), 1);
    memcpy(all, before, sizeof before);
    memcpy(all + 2, after, sizeof after);
    env_free(&e);
    CHECK(all_reaped(all, 4));
}

static void test_segfault(void) { check_crash("crash_segv", "SIGSEGV"); }
static void test_abort(void) { check_crash("crash_abort", "SIGABRT"); }
static void test_exit_3(void) { check_crash("crash_exit", "exit status 3"); }

/* Calls held by a dying worker fail, the others succeed: none hangs. */
static void test_crash_among_many(void)
{
    patio_process_pool_config cfg;
    patio_call *calls[41];
    int i, ok = 0, died = 0;
    env e;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 2;
    cfg.max_calls_per_worker = 8;
    e = env_new_cfg(&cfg, NULL);
    for (i = 0; i < 41; i++)
        calls[i] = i == 20 ? patio_call_async(e.broker, "crash_abort", "")
                           : patio_call_async(e.broker, "mul", "iii", 1, 2, 3);
    CHECK_EQ_INT(patio_wait_all(calls, 41, 30.0), PATIO_OK);
    for (i = 0; i < 41; i++) {
        int st = patio_call_status(calls[i]);
        ok += st == PATIO_OK && patio_result_int(calls[i]) == 6;
        died += st == PATIO_ERR_WORKER_DIED;
        patio_call_free(calls[i]);
    }
    CHECK_EQ_INT(ok + died, 41);
    CHECK(died >= 1);
    CHECK(wait_workers(e.ex, 2));
    CHECK(mul_ok(e.broker));
    env_free(&e);
}

/* A worker killed from outside fails the call it ran; calls it had not
 * received yet run on its replacement. */
static void test_killed_worker_fails_only_its_calls(void)
{
    patio_process_pool_config cfg;
    patio_call *slow, *calls[5];
    long pid = 0;
    int i, ok = 0;
    env e;
    open_gate_pipes();
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 1;
    cfg.max_calls_per_worker = 8;
    cfg.inherit_fds = 1;
    e = env_new_cfg(&cfg, NULL);
    CHECK_EQ_INT(patio_process_pool_pids(e.ex, &pid, 1), 1);
    slow = patio_call_async(e.broker, "gated", "");
    CHECK(gate_started());
    for (i = 0; i < 5; i++) calls[i] = patio_call_async(e.broker, "mul", "iii", 1, 2, 3);
    CHECK(kill((pid_t)pid, SIGKILL) == 0);
    CHECK_EQ_INT(patio_call_wait(slow, 10.0), PATIO_ERR_WORKER_DIED);
    if (!strstr(patio_call_error_message(slow), "signal 9 (SIGKILL)")) {
        fprintf(stderr, "    message: %s\n", patio_call_error_message(slow));
        CHECK(!"the message names SIGKILL");
    }
    CHECK_EQ_INT(patio_wait_all(calls, 5, 10.0), PATIO_OK);
    for (i = 0; i < 5; i++) {
        ok += patio_call_status(calls[i]) == PATIO_OK && patio_result_int(calls[i]) == 6;
        patio_call_free(calls[i]);
    }
    CHECK_EQ_INT(ok, 5);
    patio_call_free(slow);
    CHECK(wait_workers(e.ex, 1));
    env_free(&e);
    close_gate_pipes();
    CHECK(all_reaped(&pid, 1));
}

/* A call that outlives its timeout: TimeoutError for the caller, and its
 * worker is killed and replaced (or left alone with kill_on_timeout = -1). */
static void test_timeout_kills_worker(void)
{
    patio_process_pool_config cfg;
    long before = 0, after = 0;
    patio_call *c;
    env e;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 1;
    e = env_new_cfg(&cfg, NULL);
    CHECK_EQ_INT(patio_process_pool_pids(e.ex, &before, 1), 1);
    c = patio_call_sync(e.broker, 0.2, "sleeper", "d", 30.0);
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_TIMEOUT);
    CHECK_EQ_STR(patio_call_error_type(c), "TimeoutError");
    patio_call_free(c);
    /* the only worker was busy for 30 s: this succeeds only if it was replaced */
    CHECK(mul_ok(e.broker));
    CHECK(wait_workers(e.ex, 1));
    CHECK_EQ_INT(patio_process_pool_pids(e.ex, &after, 1), 1);
    CHECK(before != after);
    env_free(&e);
    CHECK(all_reaped(&before, 1));
    CHECK(all_reaped(&after, 1));
}

static void test_timeout_without_kill(void)
{
    patio_process_pool_config cfg;
    long before = 0, after = 0;
    patio_call *c;
    env e;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 1;
    cfg.kill_on_timeout = -1;
    e = env_new_cfg(&cfg, NULL);
    CHECK_EQ_INT(patio_process_pool_pids(e.ex, &before, 1), 1);
    c = patio_call_sync(e.broker, 0.1, "sleeper", "d", 0.5);
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_TIMEOUT);
    patio_call_free(c);
    CHECK(mul_ok(e.broker)); /* runs after the sleeper, on the same worker */
    CHECK_EQ_INT(patio_process_pool_pids(e.ex, &after, 1), 1);
    CHECK_EQ_INT(before, after);
    env_free(&e);
}

/* While one worker runs a long call, the others serve everything else. */
static void test_long_call_does_not_hold_up_others(void)
{
    patio_process_pool_config cfg;
    patio_call *slow, *calls[100];
    int i, ok = 0;
    env e;
    open_gate_pipes();
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 2;
    cfg.inherit_fds = 1; /* the gate pipes */
    e = env_new_cfg(&cfg, NULL);
    slow = patio_call_async(e.broker, "gated", "");
    CHECK(gate_started());
    /* one at a time: each finds the other worker idle */
    for (i = 0; i < 20; i++) ok += mul_ok(e.broker);
    CHECK_EQ_INT(ok, 20);
    /* a burst: none of it waits for the busy worker */
    for (i = 0; i < 100; i++) calls[i] = patio_call_async(e.broker, "mul", "iii", 1, 2, 3);
    CHECK_EQ_INT(patio_wait_all(calls, 100, 10.0), PATIO_OK);
    for (ok = 0, i = 0; i < 100; i++) {
        ok += patio_call_status(calls[i]) == PATIO_OK;
        patio_call_free(calls[i]);
    }
    CHECK_EQ_INT(ok, 100);
    CHECK_EQ_INT(patio_call_status(slow), PATIO_PENDING);
    gate_release();
    CHECK_EQ_INT(patio_call_wait(slow, 10.0), PATIO_OK);
    patio_call_free(slow);
    env_free(&e);
    close_gate_pipes();
}

static void test_cancel(void)
{
    patio_process_pool_config cfg;
    patio_call *slow, *queued;
    env e;
    open_gate_pipes();
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 1;
    cfg.max_calls_per_worker = 1;
    cfg.inherit_fds = 1;
    e = env_new_cfg(&cfg, NULL);
    slow = patio_call_async(e.broker, "gated", "");
    CHECK(gate_started());
    queued = patio_call_async(e.broker, "mul", "iii", 1, 2, 3);
    CHECK_EQ_INT(patio_call_cancel(queued), PATIO_OK);
    CHECK_EQ_INT(patio_call_status(queued), PATIO_ERR_CANCELLED);
    CHECK_EQ_INT(patio_call_cancel(slow), PATIO_ERR_STARTED);
    gate_release();
    CHECK_EQ_INT(patio_call_wait(slow, 10.0), PATIO_OK);
    CHECK(mul_ok(e.broker));
    patio_call_free(slow);
    patio_call_free(queued);
    env_free(&e);
    close_gate_pipes();
}

/* Shutdown runs what is queued, then refuses new work. */
static void test_shutdown_finishes_queued(void)
{
    patio_process_pool_config cfg;
    patio_call *calls[200], *late;
    int i, ok = 0, done = 0;
    env e;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 2;
    cfg.max_calls_per_worker = 1;
    e = env_new_cfg(&cfg, NULL);
    for (i = 0; i < 200; i++) calls[i] = patio_call_async(e.broker, "mul", "iii", 1, 2, i);
    patio_executor_shutdown(e.ex);
    for (i = 0; i < 200; i++) {
        done += patio_call_status(calls[i]) != PATIO_PENDING;
        ok += patio_call_status(calls[i]) == PATIO_OK && patio_result_int(calls[i]) == 2 * i;
    }
    CHECK_EQ_INT(done, 200);
    CHECK_EQ_INT(ok, 200);
    CHECK_EQ_INT(patio_process_pool_workers(e.ex), 0);
    late = patio_call_sync(e.broker, 5.0, "mul", "iii", 1, 2, 3);
    CHECK_EQ_INT(patio_call_status(late), PATIO_ERR_CLOSED);
    patio_call_free(late);
    for (i = 0; i < 200; i++) patio_call_free(calls[i]);
    env_free(&e);
}

/* No child left, no fd left, and workers hold none of the parent's fds. */
static void test_hygiene(void)
{
    patio_process_pool_config cfg;
    int fds_before = count_fds(), p[2], i, n;
    long pids[8];
    patio_call *c;
    env e;
    CHECK(pipe(p) == 0);
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 3;
    e = env_new_cfg(&cfg, NULL);
    n = patio_process_pool_pids(e.ex, pids, 8);
    CHECK_EQ_INT(n, 3);
    for (i = 0; i < n; i++) CHECK(kill((pid_t)pids[i], 0) == 0);
    c = patio_call_sync(e.broker, 10.0, "fd_open", "i", p[1]);
    CHECK_EQ_INT(patio_call_status(c), PATIO_OK);
    {   /* the worker's answer: not open */
        int b = -1;
        CHECK_EQ_INT(patio_call_unpack(c, "b", &b), PATIO_OK);
        CHECK_EQ_INT(b, 0);
    }
    patio_call_free(c);
    /* all a worker holds: 0, 1, 2 (if the parent has them) and its socket */
    c = patio_call_sync(e.broker, 10.0, "fd_count", "");
    if (fds_before > 0)
        CHECK_EQ_INT(patio_result_int(c), 1 + (fcntl(0, F_GETFD) != -1) + (fcntl(1, F_GETFD) != -1) +
                                              (fcntl(2, F_GETFD) != -1));
    patio_call_free(c);
    env_free(&e);
    CHECK(all_reaped(pids, n));
    errno = 0;
    CHECK(waitpid(-1, NULL, WNOHANG) == -1 && errno == ECHILD); /* no child at all */
    close(p[0]);
    close(p[1]);
    CHECK_EQ_INT(count_fds(), fds_before);
    /* with inherit_fds the worker keeps them */
    CHECK(pipe(p) == 0);
    cfg.inherit_fds = 1;
    e = env_new_cfg(&cfg, NULL);
    c = patio_call_sync(e.broker, 10.0, "fd_open", "i", p[1]);
    {
        int b = -1;
        CHECK_EQ_INT(patio_call_unpack(c, "b", &b), PATIO_OK);
        CHECK_EQ_INT(b, 1);
    }
    patio_call_free(c);
    env_free(&e);
    close(p[0]);
    close(p[1]);
    CHECK_EQ_INT(count_fds(), fds_before);
}

#ifdef PATIO_TCP_DEFAULT_PORT
/* The pool behind a TCP server: calls, a crash (the client gets the error
 * and the pool goes on), large arguments; a worker started while the
 * server has sockets open holds none of them. */
static void test_tcp_broker(void)
{
    patio_process_pool_config cfg;
    patio_tcp_config tcfg;
    patio_registry *client_rpc = patio_registry_new(NULL);
    patio_executor *null_ex = patio_null_executor_new(client_rpc);
    patio_broker *server, *client;
    size_t n = 1u << 20, got_len = 0;
    unsigned char *buf = (unsigned char *)malloc(n);
    const void *got = NULL;
    patio_call *c;
    int port, i, fds_before = count_fds();
    env e;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = 2;
    memset(&tcfg, 0, sizeof tcfg);
    tcfg.key = "process pool";
    tcfg.key_len = 12;
    e = env_new_cfg(&cfg, NULL);
    patio_broker_free(e.broker); /* this test uses a TCP server instead */
    e.broker = NULL;
    server = patio_tcp_server_new(e.ex, &tcfg, "127.0.0.1", 0);
    CHECK(server != NULL);
    port = patio_tcp_listen_port(server);
    client = patio_tcp_client_new(null_ex, &tcfg, "127.0.0.1", port);
    CHECK(client != NULL);
    CHECK_EQ_INT(patio_tcp_wait_peers(client, 1, 10.0), PATIO_OK);
    CHECK(mul_ok(client));
    c = patio_call_sync(client, 20.0, "crash_segv", "");
    CHECK(patio_call_status(c) < 0);
    CHECK_EQ_STR(patio_call_error_type(c), "RuntimeError");
    CHECK(strstr(patio_call_error_message(c), "SIGSEGV") != NULL);
    patio_call_free(c);
    CHECK(wait_workers(e.ex, 2));
    for (i = 0; i < (int)n; i++) buf[i] = (unsigned char)(i * 7);
    c = patio_call_sync(client, 30.0, "echo", "y", buf, n);
    CHECK_EQ_INT(patio_call_status(c), PATIO_OK);
    CHECK(patio_call_unpack(c, "y", &got, &got_len) == PATIO_OK && got_len == n && memcmp(got, buf, n) == 0);
    patio_call_free(c);
    /* the replacement was forked while the server's sockets were open */
    for (i = 0; i < 4; i++) {
        c = patio_call_sync(client, 10.0, "fd_count", "");
        if (fds_before > 0)
            CHECK_EQ_INT(patio_result_int(c), 1 + (fcntl(0, F_GETFD) != -1) + (fcntl(1, F_GETFD) != -1) +
                                                  (fcntl(2, F_GETFD) != -1));
        patio_call_free(c);
    }
    patio_broker_free(client);
    patio_broker_free(server);
    env_free(&e);
    patio_executor_free(null_ex);
    patio_registry_free(client_rpc);
    free(buf);
    CHECK_EQ_INT(count_fds(), fds_before);
}
#endif

static void test_pending_task_fails(void)
{
    env e = env_new(1);
    patio_call *c = patio_call_sync(e.broker, 10.0, "pending", "");
    CHECK_EQ_INT(patio_call_status(c), PATIO_ERR_REMOTE);
    CHECK_EQ_STR(patio_call_error_type(c), "RuntimeError");
    patio_call_free(c);
    CHECK(mul_ok(e.broker));
    env_free(&e);
}

/* How many calls the parent lets a worker hold follows the pace of its
 * answers: 16 before any answer, about 1 ms of work after, at least 2,
 * at most max_calls_per_worker. */
static void test_depth_follows_pace(void)
{
    patio__ppool p;
    patio__pp_worker w;
    int i;
    memset(&p, 0, sizeof p);
    memset(&w, 0, sizeof w);
    p.max_calls = 256;
    w.call_ns = PATIO__PP_BUSY_NS / PATIO__PP_START_DEPTH;
    CHECK_EQ_INT((int)patio__pp_depth(&p, &w), 16);
    /* tiny calls (1 us each, answered in batches of 50: one sample brings
     * the batch's time, the others none) earn deep batches, up to the cap */
    for (i = 0; i < 2000; i++) patio__pp_learn_pace(&w, i % 50 == 0 ? 50000u : 0u);
    CHECK_EQ_INT((int)patio__pp_depth(&p, &w), 256);
    /* one slow call (5 ms) brings it down to the floor at once */
    patio__pp_learn_pace(&w, 5000000u);
    CHECK_EQ_INT((int)patio__pp_depth(&p, &w), 2);
    /* 100 us calls: about 10 of them make 1 ms */
    for (i = 0; i < 200; i++) patio__pp_learn_pace(&w, 100000u);
    CHECK(patio__pp_depth(&p, &w) >= 9 && patio__pp_depth(&p, &w) <= 11);
    /* a configured cap below the floor wins */
    p.max_calls = 1;
    CHECK_EQ_INT((int)patio__pp_depth(&p, &w), 1);
}

static void test_bad_config_and_api(void)
{
    patio_registry *r = patio_registry_new(NULL);
    patio_process_pool_config cfg;
    patio_executor *other;
    long pid;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = -1;
    CHECK(patio_process_pool_new_ex(r, &cfg) == NULL);
    cfg.max_workers = 1;
    cfg.max_calls_per_worker = -3;
    CHECK(patio_process_pool_new_ex(r, &cfg) == NULL);
    CHECK(patio_process_pool_new(NULL, 1) == NULL);
    other = patio_null_executor_new(r);
    CHECK_EQ_INT(patio_process_pool_workers(other), -1);
    CHECK_EQ_INT(patio_process_pool_pids(other, &pid, 1), -1);
    CHECK_EQ_INT(patio_process_pool_workers(NULL), -1);
    patio_executor_free(other);
    patio_registry_free(r);
    errno = 0;
    CHECK(waitpid(-1, NULL, WNOHANG) == -1 && errno == ECHILD);
}

int main(void)
{
    RUN(test_multiply);
    RUN(test_gather);
    RUN(test_gather_without_polling);
    RUN(test_bursts_never_stall);
    RUN(test_bursts_never_stall_without_polling);
#if defined(__linux__)
    RUN(test_idle_pool_stops_polling);
#endif
    RUN(test_large_arguments_and_results);
    RUN(test_frame_limit);
    RUN(test_segfault);
    RUN(test_abort);
    RUN(test_exit_3);
    RUN(test_crash_among_many);
    RUN(test_killed_worker_fails_only_its_calls);
    RUN(test_timeout_kills_worker);
    RUN(test_timeout_without_kill);
    RUN(test_long_call_does_not_hold_up_others);
    RUN(test_cancel);
    RUN(test_shutdown_finishes_queued);
    RUN(test_hygiene);
    RUN(test_pending_task_fails);
#ifdef PATIO_TCP_DEFAULT_PORT
    RUN(test_tcp_broker);
#endif
    RUN(test_depth_follows_pace);
    RUN(test_bad_config_and_api);
    return th_summary("test_process_pool");
}
