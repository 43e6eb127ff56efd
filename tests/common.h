/* tests/common.h - shared helpers for the core tests: a gate that blocks
 * tasks until the test opens it, a counter a test can wait on, and an
 * allocator that counts. Every wait here is bounded. */
#ifndef PATIO_TEST_COMMON_H
#define PATIO_TEST_COMMON_H

#include <pthread.h>
#include <time.h>

typedef struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int open;
    int arrived;   /* how many waited at the gate */
} gate;

static inline void gate_init(gate *g)
{
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->open = 0;
    g->arrived = 0;
}

static inline void gate_destroy(gate *g)
{
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
}

static inline void deadline_in(struct timespec *ts, double seconds)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += (time_t)seconds;
    ts->tv_nsec += (long)((seconds - (double)(time_t)seconds) * 1e9);
    if (ts->tv_nsec >= 1000000000L) { ts->tv_sec++; ts->tv_nsec -= 1000000000L; }
}

/* Waits until cond(arg) holds, checking every 2 ms for at most seconds;
 * 1 if it did. */
static inline int wait_until(int (*cond)(void *), void *arg, double seconds)
{
    struct timespec now, end, nap;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += (time_t)seconds;
    end.tv_nsec += (long)((seconds - (double)(time_t)seconds) * 1e9);
    if (end.tv_nsec >= 1000000000L) { end.tv_sec++; end.tv_nsec -= 1000000000L; }
    nap.tv_sec = 0;
    nap.tv_nsec = 2000000;
    while (!cond(arg)) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > end.tv_sec || (now.tv_sec == end.tv_sec && now.tv_nsec > end.tv_nsec)) return 0;
        nanosleep(&nap, NULL);
    }
    return 1;
}

/* Blocks until the gate opens (at most 10 s, so a broken test cannot hang). */
static inline void gate_pass(gate *g)
{
    struct timespec ts;
    deadline_in(&ts, 10.0);
    pthread_mutex_lock(&g->mu);
    g->arrived++;
    pthread_cond_broadcast(&g->cv);
    while (!g->open)
        if (pthread_cond_timedwait(&g->cv, &g->mu, &ts) != 0) break;
    pthread_mutex_unlock(&g->mu);
}

static inline void gate_open(gate *g)
{
    pthread_mutex_lock(&g->mu);
    g->open = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

/* Waits until at least n tasks arrived at the gate; 1 if they did. */
static inline int gate_wait_arrived(gate *g, int n)
{
    struct timespec ts;
    int ok;
    deadline_in(&ts, 10.0);
    pthread_mutex_lock(&g->mu);
    while (g->arrived < n)
        if (pthread_cond_timedwait(&g->cv, &g->mu, &ts) != 0) break;
    ok = g->arrived >= n;
    pthread_mutex_unlock(&g->mu);
    return ok;
}

/* Allocator hooks that count, to prove every allocation is released. */
typedef struct alloc_count {
    long allocs, frees;
} alloc_count;

static inline void * count_alloc(size_t n, void *user)
{
    __atomic_fetch_add(&((alloc_count *)user)->allocs, 1, __ATOMIC_RELAXED);
    return malloc(n);
}

static inline void * count_realloc(void *p, size_t n, void *user)
{
    if (!p) __atomic_fetch_add(&((alloc_count *)user)->allocs, 1, __ATOMIC_RELAXED);
    return realloc(p, n);
}

static inline void count_free(void *p, void *user)
{
    if (p) __atomic_fetch_add(&((alloc_count *)user)->frees, 1, __ATOMIC_RELAXED);
    free(p);
}

static inline patio_hooks counting_hooks(alloc_count *c)
{
    patio_hooks h;
    memset(&h, 0, sizeof h);
    h.alloc = count_alloc;
    h.realloc = count_realloc;
    h.free = count_free;
    h.alloc_user = c;
    return h;
}

/* mul(*args) as in the quickstart. */
static inline int mul(patio_task *t)
{
    int64_t product = 1, x;
    while (patio_arg_next_int(t, &x)) product *= x;
    return patio_return_int(t, product);
}

#endif
