/* tests/kqueue/sys/event.h - a small kqueue(2) for Linux, on top of epoll,
 * so that `make test-kqueue` can build patio.h's kqueue backend here and run
 * the whole test suite through it (macOS and the BSDs have the real one).
 *
 * It covers what a level-triggered reactor needs, with BSD semantics:
 *   - one registration per (fd, filter) pair, EVFILT_READ and EVFILT_WRITE,
 *     each with its own udata; EV_ADD adds or updates, EV_DELETE removes
 *     (ENOENT when absent), EV_ENABLE / EV_DISABLE switch reporting;
 *   - EV_CLEAR (given when a filter is added): edge-triggered reports. epoll
 *     has one registration per fd, so a filter with EV_CLEAR makes the
 *     fd's other filter edge-triggered too;
 *   - kevent() applies the changes first, then waits for events; a change
 *     that fails is an EV_ERROR event (data = errno) when the event list has
 *     room, else kevent() returns -1 with errno set;
 *   - EV_EOF on the read filter once the peer stopped sending, on the write
 *     filter once the fd cannot be written any more; fflags is nonzero when
 *     the fd has an error pending (EIO: reading the socket's real error
 *     would clear it before the program sees it);
 *   - data is the number of bytes readable (FIONREAD), 0 where unknown;
 *   - the kqueue fd itself is pollable (it is an epoll fd).
 * Not covered (EINVAL): other filters, EV_ONESHOT, EV_RECEIPT.
 * Unlike the kernel's, it cannot see an fd being closed: a program must
 * EV_DELETE before it closes an fd (patio.h does), or the fd's next user
 * inherits the registration. Thread-safe: one lock around the tables. */
#ifndef PATIO_TEST_KQUEUE_SHIM_H
#define PATIO_TEST_KQUEUE_SHIM_H

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define EVFILT_READ (-1)
#define EVFILT_WRITE (-2)

#define EV_ADD 0x0001
#define EV_DELETE 0x0002
#define EV_ENABLE 0x0004
#define EV_DISABLE 0x0008
#define EV_ONESHOT 0x0010
#define EV_CLEAR 0x0020
#define EV_RECEIPT 0x0040
#define EV_ERROR 0x4000
#define EV_EOF 0x8000

struct kevent {
    uintptr_t ident;
    short filter;
    unsigned short flags;
    unsigned int fflags;
    intptr_t data;
    void *udata;
};

#define EV_SET(kev, a, b, c, d, e, f) \
    do { \
        struct kevent *kev_ = (kev); \
        kev_->ident = (a); kev_->filter = (b); kev_->flags = (c); \
        kev_->fflags = (d); kev_->data = (e); kev_->udata = (f); \
    } while (0)

/* ---- the registrations, per kqueue fd, per watched fd ------------------- */

typedef struct kq_shim_filter {
    int added, enabled, clear;
    void *udata;
} kq_shim_filter;

typedef struct kq_shim_fd {
    kq_shim_filter read, write;
    unsigned in_epoll; /* the epoll mask it is registered with; 0 = none */
} kq_shim_fd;

typedef struct kq_shim_queue {
    kq_shim_fd *fds;
    size_t nfds;
} kq_shim_queue;

static pthread_mutex_t kq_shim_mu = PTHREAD_MUTEX_INITIALIZER;
static kq_shim_queue *kq_shim_queues; /* indexed by the kqueue (epoll) fd */
static size_t kq_shim_nqueues;

/* Grows a table of `size`-byte entries to hold index i; zero-fills. */
static inline int kq_shim_grow(void **table, size_t *n, size_t i, size_t size)
{
    size_t want = *n ? *n : 16;
    void *p;
    if (i < *n) return 0;
    while (want <= i) want *= 2;
    p = realloc(*table, want * size);
    if (!p) return -1;
    memset((char *)p + *n * size, 0, (want - *n) * size);
    *table = p;
    *n = want;
    return 0;
}

static inline kq_shim_queue *kq_shim_queue_of(int kq)
{
    if (kq < 0 || (size_t)kq >= kq_shim_nqueues) return NULL;
    return &kq_shim_queues[kq];
}

static inline kq_shim_fd *kq_shim_fd_of(kq_shim_queue *q, int fd, int create)
{
    if (fd < 0) return NULL;
    if ((size_t)fd >= q->nfds) {
        void *t = q->fds;
        if (!create || kq_shim_grow(&t, &q->nfds, (size_t)fd, sizeof *q->fds) != 0) return NULL;
        q->fds = (kq_shim_fd *)t;
    }
    return &q->fds[fd];
}

static inline int kqueue(void)
{
    int fd = epoll_create1(0);
    void *t;
    if (fd < 0) return -1;
    pthread_mutex_lock(&kq_shim_mu);
    t = kq_shim_queues;
    if (kq_shim_grow(&t, &kq_shim_nqueues, (size_t)fd, sizeof *kq_shim_queues) != 0) {
        pthread_mutex_unlock(&kq_shim_mu);
        close(fd);
        errno = ENOMEM;
        return -1;
    }
    kq_shim_queues = (kq_shim_queue *)t;
    /* the number may have served a kqueue that was closed since */
    free(kq_shim_queues[fd].fds);
    kq_shim_queues[fd].fds = NULL;
    kq_shim_queues[fd].nfds = 0;
    pthread_mutex_unlock(&kq_shim_mu);
    return fd;
}

/* Makes the epoll registration of fd match its filters; 0 or an errno. */
static inline int kq_shim_sync(int kq, int fd, kq_shim_fd *f)
{
    struct epoll_event ev;
    unsigned want = 0;
    int op;
    if (f->read.added && f->read.enabled) want |= EPOLLIN | EPOLLRDHUP;
    if (f->write.added && f->write.enabled) want |= EPOLLOUT;
    if (want && ((f->read.added && f->read.clear) || (f->write.added && f->write.clear))) want |= EPOLLET;
    if (want == f->in_epoll) return 0;
    memset(&ev, 0, sizeof ev);
    ev.events = want;
    ev.data.fd = fd;
    op = !want ? EPOLL_CTL_DEL : f->in_epoll ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    /* a registration epoll dropped when its fd was closed: add it afresh */
    if (epoll_ctl(kq, op, fd, &ev) != 0 && !(op == EPOLL_CTL_MOD && errno == ENOENT &&
                                              epoll_ctl(kq, EPOLL_CTL_ADD, fd, &ev) == 0)) {
        int err = errno;
        if (op == EPOLL_CTL_DEL) f->in_epoll = 0; /* it is gone either way */
        return err;
    }
    f->in_epoll = want;
    return 0;
}

/* Applies one change; 0 or an errno. */
static inline int kq_shim_change(int kq, kq_shim_queue *q, const struct kevent *k)
{
    int fd = (int)k->ident;
    kq_shim_fd *f;
    kq_shim_filter *flt, saved;
    int err;
    if (k->filter != EVFILT_READ && k->filter != EVFILT_WRITE) return EINVAL;
    if (k->flags & (EV_ONESHOT | EV_RECEIPT)) return EINVAL;
    if ((k->flags & EV_ADD) && fcntl(fd, F_GETFD) < 0) return EBADF;
    f = kq_shim_fd_of(q, fd, (k->flags & EV_ADD) != 0);
    if (!f) return (k->flags & EV_ADD) ? ENOMEM : ENOENT;
    flt = k->filter == EVFILT_READ ? &f->read : &f->write;
    saved = *flt;
    if (k->flags & EV_DELETE) {
        if (!flt->added) return ENOENT;
        memset(flt, 0, sizeof *flt);
        return kq_shim_sync(kq, fd, f);
    }
    if (k->flags & EV_ADD) {
        if (!flt->added) {
            flt->enabled = 1;
            flt->clear = (k->flags & EV_CLEAR) != 0;
        }
        flt->added = 1;
        flt->udata = k->udata;
    } else if (!flt->added) {
        return ENOENT;
    }
    if (k->flags & EV_ENABLE) flt->enabled = 1;
    if (k->flags & EV_DISABLE) flt->enabled = 0;
    err = kq_shim_sync(kq, fd, f);
    if (err) *flt = saved;
    return err;
}

static inline void kq_shim_event(struct kevent *out, int fd, short filter, unsigned short flags,
                                 unsigned int fflags, void *udata)
{
    int avail = 0;
    memset(out, 0, sizeof *out);
    out->ident = (uintptr_t)fd;
    out->filter = filter;
    out->flags = flags;
    out->fflags = fflags;
    if (filter == EVFILT_READ && ioctl(fd, FIONREAD, &avail) == 0) out->data = avail;
    out->udata = udata;
}

static inline int kq_shim_timeout_ms(const struct timespec *ts)
{
    long long ms;
    if (!ts) return -1;
    ms = (long long)ts->tv_sec * 1000 + (ts->tv_nsec + 999999) / 1000000; /* never early */
    return ms > 0x7fffffff ? 0x7fffffff : (int)ms;
}

static inline int kevent(int kq, const struct kevent *changelist, int nchanges, struct kevent *eventlist,
                         int nevents, const struct timespec *timeout)
{
    struct epoll_event evs[64];
    kq_shim_queue *q;
    int i, n, out = 0, room = nevents > 0 ? nevents : 0;
    pthread_mutex_lock(&kq_shim_mu);
    q = kq_shim_queue_of(kq);
    if (!q) {
        pthread_mutex_unlock(&kq_shim_mu);
        errno = EBADF;
        return -1;
    }
    for (i = 0; i < nchanges; i++) {
        int err = kq_shim_change(kq, q, &changelist[i]);
        if (!err) continue;
        if (out >= room) {
            pthread_mutex_unlock(&kq_shim_mu);
            errno = err;
            return -1;
        }
        eventlist[out] = changelist[i];
        eventlist[out].flags = EV_ERROR;
        eventlist[out].data = err;
        out++;
    }
    pthread_mutex_unlock(&kq_shim_mu);
    if (out > 0 || room == 0) return out;
    /* two filters of one fd may both fire: ask epoll for half the room */
    n = epoll_wait(kq, evs, room / 2 > 64 ? 64 : room / 2 > 0 ? room / 2 : 1, kq_shim_timeout_ms(timeout));
    if (n < 0) return -1;
    pthread_mutex_lock(&kq_shim_mu);
    q = kq_shim_queue_of(kq); /* another kqueue() may have moved the tables */
    for (i = 0; i < n && out < room; i++) {
        int fd = evs[i].data.fd;
        unsigned e = evs[i].events;
        kq_shim_fd *f = kq_shim_fd_of(q, fd, 0);
        unsigned int err = (e & EPOLLERR) ? EIO : 0;
        if (!f) continue; /* deleted while we waited */
        if (f->read.added && f->read.enabled && (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
            kq_shim_event(&eventlist[out++], fd, EVFILT_READ,
                          (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) ? EV_EOF : 0, err, f->read.udata);
        if (out < room && f->write.added && f->write.enabled && (e & (EPOLLOUT | EPOLLHUP | EPOLLERR)))
            kq_shim_event(&eventlist[out++], fd, EVFILT_WRITE, (e & (EPOLLHUP | EPOLLERR)) ? EV_EOF : 0, err,
                          f->write.udata);
    }
    pthread_mutex_unlock(&kq_shim_mu);
    return out;
}

#endif
