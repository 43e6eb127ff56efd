/* bench_process: the process pool, 1 and 1024 calls in flight, beside a
 * raw socketpair ping-pong between two processes measured in the same run
 * (the same 9-byte frames carrying the same CallRequest, writes batched
 * per round, answers batched by the child per read). The pool is measured
 * through the executor interface (what a broker sees: submit a task, get
 * on_done) and, for reference, end to end through the memory broker.
 * Figures are medians of ROUNDS runs; the whole run stays well under 30 s. */
#define PATIO_IMPLEMENTATION
#include "patio.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define ROUNDS 5
#define WINDOW 1024
#define LAT_CALLS 3000
#define BATCHES 200

#include "bench_util.h"

static int mul(patio_task *t)
{
    int64_t product = 1, x;
    while (patio_arg_next_int(t, &x)) product *= x;
    return patio_return_int(t, product);
}

/* The encoded arguments [1, 2, 3] and a CallRequest for mul(1, 2, 3). */
static const uint8_t g_args[4] = { 0x93, 0x01, 0x02, 0x03 };

/* ---- raw baseline: socketpair ping-pong -------------------------------- */

/* The child: reads what is there, answers every whole frame, one write. */
static void raw_child(int fd)
{
    size_t cap = 1 << 20, len = 0;
    uint8_t *in = (uint8_t *)malloc(cap), *out = (uint8_t *)malloc(cap);
    for (;;) {
        size_t pos = 0, o = 0, w = 0;
        patio__frame f;
        ssize_t n = read(fd, in + len, cap - len);
        if (n <= 0) _exit(0);
        len += (size_t)n;
        while (patio__frame_parse(in + pos, len - pos, (uint32_t)cap, &f) == 1) {
            patio__frame_header_put(out + o, PATIO__PKT_RESPONSE, 1, f.serial);
            out[o + PATIO__FRAME_HEADER] = 0x06;
            o += PATIO__FRAME_HEADER + 1;
            pos += PATIO__FRAME_HEADER + f.size;
        }
        memmove(in, in + pos, len - pos);
        len -= pos;
        while (w < o) {
            n = write(fd, out + w, o - w);
            if (n <= 0) _exit(1);
            w += (size_t)n;
        }
    }
}

typedef struct raw_link {
    int fd;
    pid_t pid;
    patio_writer req;      /* one encoded request frame */
    patio_writer out;
    uint8_t *in;
    size_t in_len, in_cap;
} raw_link;

static void raw_open(raw_link *l)
{
    int sv[2];
    size_t mark;
    memset(l, 0, sizeof *l);
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) exit(1);
    l->pid = fork();
    if (l->pid == 0) {
        close(sv[0]);
        raw_child(sv[1]);
    }
    close(sv[1]);
    l->fd = sv[0];
    patio_writer_init(&l->req, NULL);
    patio_writer_init(&l->out, NULL);
    mark = patio__frame_begin(&l->req);
    patio__write_call_request(&l->req, "mul", 3, g_args, sizeof g_args, NULL, 0, 0, 0);
    patio__frame_end(&l->req, mark, PATIO__PKT_REQUEST, 0, UINT32_MAX);
    l->in_cap = 1 << 20;
    l->in = (uint8_t *)malloc(l->in_cap);
}

static void raw_close(raw_link *l)
{
    close(l->fd);
    waitpid(l->pid, NULL, 0);
    patio_writer_free(&l->req);
    patio_writer_free(&l->out);
    free(l->in);
}

/* Sends n requests in one write and reads until n answers came back. */
static int raw_round(raw_link *l, int n, uint32_t *serial)
{
    size_t w = 0;
    int i, got = 0;
    patio_writer_reset(&l->out);
    for (i = 0; i < n; i++) {
        size_t at = l->out.len;
        patio_write_raw(&l->out, l->req.data, l->req.len);
        patio__put_be32(l->out.data + at + 5, (*serial)++);
    }
    while (w < l->out.len) {
        ssize_t k = write(l->fd, l->out.data + w, l->out.len - w);
        if (k <= 0) return -1;
        w += (size_t)k;
    }
    while (got < n) {
        size_t pos = 0;
        patio__frame f;
        ssize_t k = read(l->fd, l->in + l->in_len, l->in_cap - l->in_len);
        if (k <= 0) return -1;
        l->in_len += (size_t)k;
        while (patio__frame_parse(l->in + pos, l->in_len - pos, UINT32_MAX, &f) == 1) {
            got += f.size == 1 && f.payload[0] == 0x06;
            pos += PATIO__FRAME_HEADER + f.size;
        }
        memmove(l->in, l->in + pos, l->in_len - pos);
        l->in_len -= pos;
    }
    return 0;
}

static void raw_run(double *lat_us, double *rate)
{
    raw_link l;
    double *lat = (double *)malloc(sizeof(double) * LAT_CALLS), t0;
    uint32_t serial = 0;
    int i;
    raw_open(&l);
    for (i = 0; i < LAT_CALLS; i++) {
        double s = now_s();
        raw_round(&l, 1, &serial);
        lat[i] = now_s() - s;
    }
    *lat_us = median(lat, LAT_CALLS) * 1e6;
    t0 = now_s();
    for (i = 0; i < BATCHES; i++) raw_round(&l, WINDOW, &serial);
    *rate = (double)BATCHES * WINDOW / (now_s() - t0);
    raw_close(&l);
    free(lat);
}

/* ---- the pool through the executor interface ---------------------------- */

typedef struct counter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;        /* atomic */
    int target;
    int bad;
} counter;

static counter g_count;

static void task_done(patio_task *t)
{
    patio_reader r;
    int64_t v = 0;
    patio_reader_init(&r, t->result.data, t->result.len);
    if (t->status != PATIO_OK || patio_read_int(&r, &v) != PATIO_OK || v != 6) g_count.bad++;
    if (patio__fetch_add(&g_count.done, 1) + 1 == patio__load(&g_count.target)) {
        pthread_mutex_lock(&g_count.mu);
        pthread_cond_signal(&g_count.cv);
        pthread_mutex_unlock(&g_count.mu);
    }
}

/* For one call, polls briefly first, giving the CPU away between looks
 * (as patio's own waits do: the pool's threads may need this CPU); a
 * window waits on the condvar at once, leaving the CPUs to the pool. */
static void wait_done(int target)
{
    uint64_t spin_until = patio__now_ns() + (target == 1 ? 50000u : 0u);
    unsigned i = 0;
    while (patio__load(&g_count.done) < target && ((++i & 63) || patio__now_ns() < spin_until)) {
        if ((i & 63) == 0) sched_yield();
        patio__cpu_relax();
    }
    pthread_mutex_lock(&g_count.mu);
    while (patio__load(&g_count.done) < target) patio__cond_wait_until(&g_count.cv, &g_count.mu, patio__now_ns() + 100000000u);
    pthread_mutex_unlock(&g_count.mu);
}

static void submit_round(patio_executor *ex, patio_task *tasks, int n, const patio__entry *e)
{
    int i;
    patio__store(&g_count.done, 0);
    patio__store(&g_count.target, n);
    for (i = 0; i < n; i++) {
        patio_writer keep = tasks[i].result; /* reuse the result buffer */
        patio__task_init(&tasks[i], e, ex->hooks, g_args, sizeof g_args, NULL, 0);
        tasks[i].result = keep;
        tasks[i].timeout = -1;
        tasks[i].on_done = task_done;
        while (ex->vt->submit(ex, &tasks[i]) != PATIO_OK) patio__cpu_relax();
    }
    wait_done(n);
}

static int pool_run(const patio_process_pool_config *cfg, double *lat_us, double *rate)
{
    patio_registry *rpc = patio_registry_new(NULL);
    patio_executor *ex;
    patio_task *tasks = (patio_task *)calloc(WINDOW, sizeof *tasks);
    double *lat = (double *)malloc(sizeof(double) * LAT_CALLS), t0;
    const patio__entry *e;
    int i;
    patio_register(rpc, "mul", mul, NULL);
    e = patio__registry_find(rpc, "mul", 3);
    ex = patio_process_pool_new_ex(rpc, cfg);
    pthread_mutex_init(&g_count.mu, NULL);
    patio__cond_init(&g_count.cv);
    g_count.bad = 0;
    for (i = 0; i < WINDOW; i++) patio_writer_init(&tasks[i].result, NULL);
    for (i = 0; i < LAT_CALLS; i++) {
        double s = now_s();
        submit_round(ex, tasks, 1, e);
        lat[i] = now_s() - s;
    }
    *lat_us = median(lat, LAT_CALLS) * 1e6;
    t0 = now_s();
    for (i = 0; i < BATCHES; i++) submit_round(ex, tasks, WINDOW, e);
    *rate = (double)BATCHES * WINDOW / (now_s() - t0);
    patio_executor_free(ex);
    for (i = 0; i < WINDOW; i++) patio_writer_free(&tasks[i].result);
    patio_registry_free(rpc);
    pthread_mutex_destroy(&g_count.mu);
    pthread_cond_destroy(&g_count.cv);
    free(tasks);
    free(lat);
    return g_count.bad;
}

/* ---- the pool end to end through the memory broker ----------------------- */

static int broker_run(const patio_process_pool_config *cfg, double *lat_us, double *rate)
{
    patio_registry *rpc = patio_registry_new(NULL);
    patio_executor *ex;
    patio_broker *b;
    patio_call **calls = (patio_call **)malloc(sizeof(patio_call *) * WINDOW);
    double *lat = (double *)malloc(sizeof(double) * LAT_CALLS), t0;
    int i, k, bad = 0;
    patio_register(rpc, "mul", mul, NULL);
    ex = patio_process_pool_new_ex(rpc, cfg);
    b = patio_memory_broker_new(ex);
    for (i = 0; i < LAT_CALLS; i++) {
        double s = now_s();
        patio_call *c = patio_call_async(b, "mul", "iii", 1, 2, 3);
        patio_call_wait(c, PATIO_NO_TIMEOUT);
        lat[i] = now_s() - s;
        bad += patio_result_int(c) != 6;
        patio_call_free(c);
    }
    *lat_us = median(lat, LAT_CALLS) * 1e6;
    t0 = now_s();
    for (k = 0; k < BATCHES / 4; k++) {
        for (i = 0; i < WINDOW; i++) calls[i] = patio_call_async(b, "mul", "iii", 1, 2, 3);
        patio_wait_all(calls, WINDOW, PATIO_NO_TIMEOUT);
        for (i = 0; i < WINDOW; i++) {
            bad += patio_result_int(calls[i]) != 6;
            patio_call_free(calls[i]);
        }
    }
    *rate = (double)(BATCHES / 4) * WINDOW / (now_s() - t0);
    patio_broker_free(b);
    patio_executor_free(ex);
    patio_registry_free(rpc);
    free(calls);
    free(lat);
    return bad;
}

#define NCONF 3

int main(void)
{
    double raw_lat[ROUNDS], raw_rate[ROUNDS];
    double lat[NCONF][ROUNDS], rate[NCONF][ROUNDS];
    double blat[ROUNDS], brate[ROUNDS];
    patio_process_pool_config cfg[NCONF];
    const char *names[NCONF] = {
        "pool, defaults (4 workers, adaptive depth)",
        "pool, 1 worker, 1024 calls/worker",
        "pool, 2 workers, 256 calls/worker",
    };
    int r, c, bad = 0;
    double rl, rr, t_start = now_s();
    memset(cfg, 0, sizeof cfg);
    cfg[1].max_workers = 1;
    cfg[1].max_calls_per_worker = WINDOW;
    cfg[2].max_workers = 2;
    cfg[2].max_calls_per_worker = 256;
    for (r = 0; r < ROUNDS; r++) {
        raw_run(&raw_lat[r], &raw_rate[r]);
        for (c = 0; c < NCONF; c++) bad += pool_run(&cfg[c], &lat[c][r], &rate[c][r]);
        bad += broker_run(&cfg[0], &blat[r], &brate[r]);
    }
    rl = median(raw_lat, ROUNDS);
    rr = median(raw_rate, ROUNDS);
    printf("bench_process (median of %d runs, %.1f s; baseline: raw socketpair ping-pong between two processes,\n"
           "same frames, batched writes; pool figures through the executor interface unless noted)\n",
           ROUNDS, now_s() - t_start);
    printf("  %-44s 1 in flight %8.2f us/call | %4d in flight %10.0f calls/s\n", "raw socketpair (baseline)", rl,
           WINDOW, rr);
    for (c = 0; c < NCONF; c++) {
        double l = median(lat[c], ROUNDS), t = median(rate[c], ROUNDS);
        printf("  %-44s 1 in flight %8.2f us/call (%.2fx raw) | %4d in flight %10.0f calls/s (%.2fx raw)\n",
               names[c], l, l / rl, WINDOW, t, t / rr);
    }
    {
        double l = median(blat, ROUNDS), t = median(brate, ROUNDS);
        printf("  %-44s 1 in flight %8.2f us/call (%.2fx raw) | %4d in flight %10.0f calls/s (%.2fx raw)\n",
               "memory broker + pool, defaults", l, l / rl, WINDOW, t, t / rr);
    }
    if (bad) printf("  WRONG RESULTS: %d\n", bad);
    return bad != 0;
}
