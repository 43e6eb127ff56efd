/* bench_memory: memory broker with the thread pool and the async executor,
 * 1 and 1024 calls in flight, each printed beside a raw mutex+condvar
 * hand-off between two threads measured in the same run (same shape:
 * one request per lock, the consumer drains in batches, replies batched).
 * Figures are medians of ROUNDS runs. */
#define PATIO_IMPLEMENTATION
#include "patio.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROUNDS 5
#define LAT_CALLS 20000
#define WINDOW 1024
#define BATCHES 300

#include "bench_util.h"

/* ---- raw hand-off baseline -------------------------------------------
 * What any thread pool must do at least: the caller hands each request (a
 * struct with its arguments) to a worker under a mutex, one per lock and
 * signalling a condvar; the worker takes every waiting request at once,
 * computes mul, and hands the batch of replies back under the mutex. */

typedef struct raw_item {
    struct raw_item *next;
    int64_t a, b, c, result;
} raw_item;

typedef struct raw_queue {
    pthread_mutex_t mu;
    pthread_cond_t cv, reply_cv;
    raw_item *requests, *replies;
    long nreplies;
    int stop;
    int one_per_lock;   /* 1: the worker takes and answers one request per lock */
} raw_queue;

static void *raw_consumer(void *arg)
{
    raw_queue *q = (raw_queue *)arg;
    pthread_mutex_lock(&q->mu);
    for (;;) {
        raw_item *batch, *it, *last = NULL;
        long n = 0;
        while (!q->requests && !q->stop) pthread_cond_wait(&q->cv, &q->mu);
        if (q->stop) break;
        batch = q->requests;
        if (q->one_per_lock) {
            q->requests = batch->next;
            batch->next = NULL;
        } else {
            q->requests = NULL;
        }
        pthread_mutex_unlock(&q->mu);
        for (it = batch; it; it = it->next) {
            it->result = it->a * it->b * it->c;
            last = it;
            n++;
        }
        pthread_mutex_lock(&q->mu);
        last->next = q->replies;
        q->replies = batch;
        q->nreplies += n;
        pthread_cond_signal(&q->reply_cv);
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

static void raw_push(raw_queue *q, raw_item *it)
{
    pthread_mutex_lock(&q->mu);
    it->next = q->requests;
    q->requests = it;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

/* Waits for n replies; returns how many were right. */
static long raw_wait_replies(raw_queue *q, long n)
{
    raw_item *it;
    long ok = 0;
    pthread_mutex_lock(&q->mu);
    while (q->nreplies < n) pthread_cond_wait(&q->reply_cv, &q->mu);
    q->nreplies -= n;
    it = q->replies;
    q->replies = NULL;
    pthread_mutex_unlock(&q->mu);
    for (; it; it = it->next) ok += it->result == 6;
    return ok;
}

static void raw_run(int one_per_lock, double *lat_p50_us, double *rate)
{
    raw_queue q;
    pthread_t th;
    raw_item *items = (raw_item *)calloc(WINDOW, sizeof *items);
    double *lat = (double *)malloc(sizeof(double) * LAT_CALLS);
    double t0;
    int i, b;
    memset(&q, 0, sizeof q);
    q.one_per_lock = one_per_lock;
    pthread_mutex_init(&q.mu, NULL);
    pthread_cond_init(&q.cv, NULL);
    pthread_cond_init(&q.reply_cv, NULL);
    pthread_create(&th, NULL, raw_consumer, &q);
    for (i = 0; i < WINDOW; i++) { items[i].a = 1; items[i].b = 2; items[i].c = 3; }
    for (i = 0; i < LAT_CALLS; i++) {
        double s = now_s();
        raw_push(&q, &items[0]);
        raw_wait_replies(&q, 1);
        lat[i] = now_s() - s;
    }
    *lat_p50_us = median(lat, LAT_CALLS) * 1e6;
    t0 = now_s();
    for (b = 0; b < BATCHES; b++) {
        for (i = 0; i < WINDOW; i++) raw_push(&q, &items[i]);
        raw_wait_replies(&q, WINDOW);
    }
    *rate = (double)BATCHES * WINDOW / (now_s() - t0);
    pthread_mutex_lock(&q.mu);
    q.stop = 1;
    pthread_cond_signal(&q.cv);
    pthread_mutex_unlock(&q.mu);
    pthread_join(th, NULL);
    free(items);
    free(lat);
}

/* ---- patio ---------------------------------------------------------- */

static int mul(patio_task *t)
{
    int64_t product = 1, x;
    while (patio_arg_next_int(t, &x)) product *= x;
    return patio_return_int(t, product);
}

static int patio_run(int async, double *lat_p50_us, double *rate)
{
    patio_registry *rpc = patio_registry_new(NULL);
    patio_executor *ex;
    patio_broker *b;
    patio_call **calls = (patio_call **)malloc(sizeof(patio_call *) * WINDOW);
    double *lat = (double *)malloc(sizeof(double) * LAT_CALLS);
    double t0;
    int i, k, bad = 0;
    patio_register(rpc, "mul", mul, NULL);
    ex = async ? patio_async_executor_new(rpc, 4) : patio_thread_pool_new(rpc, 4);
    b = patio_memory_broker_new(ex);
    for (i = 0; i < LAT_CALLS; i++) {
        double s = now_s();
        patio_call *c = patio_call_async(b, "mul", "iii", 1, 2, 3);
        patio_call_wait(c, PATIO_NO_TIMEOUT);
        lat[i] = now_s() - s;
        bad += patio_result_int(c) != 6;
        patio_call_free(c);
    }
    *lat_p50_us = median(lat, LAT_CALLS) * 1e6;
    t0 = now_s();
    for (k = 0; k < BATCHES; k++) {
        for (i = 0; i < WINDOW; i++) calls[i] = patio_call_async(b, "mul", "iii", 1, 2, 3);
        patio_wait_all(calls, WINDOW, PATIO_NO_TIMEOUT);
        for (i = 0; i < WINDOW; i++) {
            bad += patio_result_int(calls[i]) != 6;
            patio_call_free(calls[i]);
        }
    }
    *rate = (double)BATCHES * WINDOW / (now_s() - t0);
    patio_broker_free(b);
    patio_executor_free(ex);
    patio_registry_free(rpc);
    free(calls);
    free(lat);
    return bad;
}

int main(void)
{
    double raw_lat[2][ROUNDS], raw_rate[2][ROUNDS];
    double lat[2][ROUNDS], rate[2][ROUNDS];
    const char *names[2] = { "memory broker + thread pool", "memory broker + async executor" };
    const char *raw_names[2] = { "raw hand-off, 1 per lock", "raw hand-off, worker drains all" };
    int r, e, bad = 0;
    double rl, rr;
    for (r = 0; r < ROUNDS; r++) {
        raw_run(1, &raw_lat[0][r], &raw_rate[0][r]);
        raw_run(0, &raw_lat[1][r], &raw_rate[1][r]);
        for (e = 0; e < 2; e++) bad += patio_run(e, &lat[e][r], &rate[e][r]);
    }
    printf("bench_memory: mul(1,2,3), median of %d runs. Baseline (the ratios): a raw mutex+condvar\n"
           "hand-off of request structs to one worker thread, one request per lock each way; the\n"
           "second raw line lets the worker drain the whole queue per lock, a lower bound for reference.\n",
           ROUNDS);
    for (e = 0; e < 2; e++)
        printf("  %-34s 1 in flight p50 %8.2f us               | %4d in flight %10.0f calls/s\n",
               raw_names[e], median(raw_lat[e], ROUNDS), WINDOW, median(raw_rate[e], ROUNDS));
    rl = median(raw_lat[0], ROUNDS);
    rr = median(raw_rate[0], ROUNDS);
    for (e = 0; e < 2; e++) {
        double l = median(lat[e], ROUNDS), t = median(rate[e], ROUNDS);
        printf("  %-34s 1 in flight p50 %8.2f us (%5.2fx raw) | %4d in flight %10.0f calls/s (%.2fx raw)\n",
               names[e], l, l / rl, WINDOW, t, t / rr);
    }
    if (bad) printf("  WRONG RESULTS: %d\n", bad);
    return bad != 0;
}
