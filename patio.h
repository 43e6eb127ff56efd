/* patio.h - distributed task execution for C, in one header.
   A re-creation of the Python library patio (Python Asynchronous Tasks for
   AsyncIO): a registry of functions, executors that run them, and brokers
   that carry calls to them, in the same process or across TCP.

   DO THIS in exactly one C or C++ file, before the #include:

       #define PATIO_IMPLEMENTATION
       #include "patio.h"

   Other files include "patio.h" alone. Include patio.h first in the
   implementation file (it needs POSIX/GNU declarations under -std=c99), or
   define _GNU_SOURCE yourself. Link with -pthread. Needs gcc or clang.

   EXAMPLE (examples/quickstart.c)

       static int mul(patio_task *t)
       {
           int64_t product = 1, x;
           while (patio_arg_next_int(t, &x)) product *= x;
           return patio_return_int(t, product);
       }

       patio_registry *rpc = patio_registry_new(NULL);
       patio_register(rpc, "mul", mul, NULL);
       patio_executor *pool = patio_thread_pool_new(rpc, 4);
       patio_broker *broker = patio_memory_broker_new(pool);

       patio_call *calls[100];
       for (int i = 0; i < 100; i++)
           calls[i] = patio_call_async(broker, "mul", "iii", 1, 2, 3);
       patio_wait_all(calls, 100, PATIO_NO_TIMEOUT);
       for (int i = 0; i < 100; i++) {
           printf("%lld\n", (long long)patio_result_int(calls[i]));   // 6
           patio_call_free(calls[i]);
       }
       patio_broker_free(broker);
       patio_executor_free(pool);
       patio_registry_free(rpc);

   CONCEPTS
     registry  names -> task functions (patio_fn) with a user pointer. Auto
               names ("project.function") via PATIO_REGISTER; strict mode adds
               a hash of a signature string. The first broker locks it.
     task      a patio_fn reads its MessagePack arguments (patio_arg_next_*,
               patio_args("iid", ...), patio_task_kwargs) and answers with
               patio_return_* or patio_fail(t, "ValueError", "..."). It may
               return PATIO_PENDING and call patio_task_finish later.
     executor  runs tasks: thread pool, process pool (forked workers), async
               (on the loop thread), null, or your own (patio_executor_vtable).
     broker    carries calls: memory broker (same process); your own
               (patio_broker_vtable). Each broker has a loop (reactor), on a
               library thread or pumped by you (patio_loop_run_once).
     call      patio_call_async/start/sync; wait with patio_call_wait,
               patio_wait_all, patio_wait_any, or get a callback on the loop
               thread. Results: patio_result_int, patio_call_unpack, readers.
               Errors: patio_call_status (patio_result), patio_call_error_type
               and patio_call_error_message ("ZeroDivisionError", ...).

   THREADS: calls may start from any thread; blocking waits from any thread
   but the loop's; callbacks run on the loop thread. A registry must not be
   changed while another thread uses it (brokers lock it).

   CONFIGURATION (define before including; defaults in brackets)
     PATIO_STATIC                  make every function static
     PATIO_API                     [extern] decoration of public functions
     PATIO_ASSERT(x)               [assert(x)] programmer-error checks
     PATIO_DEFAULT_TIMEOUT         [86400.0] seconds, a call's default timeout
     PATIO_DEFAULT_MAX_WORKERS     [4] thread pool / async executor workers
     PATIO_DEFAULT_QUEUE_SIZE      [65536] executor queue bound
     PATIO_SPIN_US                 [100] how long an idle loop (or process pool) polls before sleeping
     PATIO_POOL_SPIN_US            [20] how long an idle thread-pool worker polls
     PATIO_MAX_DEPTH               [64] MessagePack nesting limit
     PATIO_USE_EPOLL / PATIO_USE_KQUEUE / PATIO_USE_POLL
                                   force a loop backend [epoll on Linux,
                                   kqueue on macOS/BSD, poll elsewhere]
     PATIO_NO_EVENTFD              wake threads with a pipe on Linux too

   Allocation and logging hooks: patio_hooks in patio_registry_config (every
   object built on a registry uses its hooks).

   VERSION 0.1.0 - see the end of the file for the license (MIT).
*/

/* ========================================================================
 * >>config  Configuration macros (define before including patio.h)
 * ======================================================================== */
#if defined(PATIO_IMPLEMENTATION) && defined(__linux__) && !defined(_GNU_SOURCE)
/* The implementation needs POSIX and Linux extensions (clock_gettime,
 * accept4, MSG_NOSIGNAL) even under -std=c99. This only takes effect when
 * patio.h is the first header of the implementation file. */
#define _GNU_SOURCE 1
#endif
#if defined(PATIO_IMPLEMENTATION) && defined(__APPLE__) && !defined(_DARWIN_C_SOURCE)
#define _DARWIN_C_SOURCE 1
#endif

#ifndef PATIO_H_INCLUDED
#define PATIO_H_INCLUDED

#include <stddef.h>
#include <stdint.h>
#include <stdarg.h>

#define PATIO_VERSION_MAJOR 0
#define PATIO_VERSION_MINOR 1
#define PATIO_VERSION_PATCH 0
#define PATIO_VERSION "0.1.0"

/* PATIO_STATIC: make every function static (private to one translation unit). */
#ifndef PATIO_API
#ifdef PATIO_STATIC
#define PATIO_API static
#else
#define PATIO_API extern
#endif
#endif

/* PATIO_ASSERT(x): checks programmer errors only, never network input. */
#ifndef PATIO_ASSERT
#include <assert.h>
#define PATIO_ASSERT(x) assert(x)
#endif

/* Default call timeout in seconds (Python patio: 86400). */
#ifndef PATIO_DEFAULT_TIMEOUT
#define PATIO_DEFAULT_TIMEOUT 86400.0
#endif

/* Default number of workers of the thread pool and async executor (as patio). */
#ifndef PATIO_DEFAULT_MAX_WORKERS
#define PATIO_DEFAULT_MAX_WORKERS 4
#endif

/* Default bound of an executor's queue of waiting tasks. */
#ifndef PATIO_DEFAULT_QUEUE_SIZE
#define PATIO_DEFAULT_QUEUE_SIZE 65536
#endif

/* How long (microseconds) an idle loop polls for work before it sleeps, at
 * most: waking a sleeping thread on another core costs far more than a short
 * spin, and a loop waiting for a network peer's answer often waits tens of
 * microseconds. The budget adapts, so loops that catch nothing soon stop
 * polling. A blocking wait for calls polls for at most 50 us of it. The
 * process pool's I/O thread and idle worker processes use it too: their
 * work goes through sockets, and each sleep and wake-up costs syscalls. */
#ifndef PATIO_SPIN_US
#define PATIO_SPIN_US 100
#endif

/* The same for idle thread-pool workers, shorter: their work comes from
 * other threads (a loop, callers), and a worker that polls long holds a
 * CPU those threads need to produce it. */
#ifndef PATIO_POOL_SPIN_US
#define PATIO_POOL_SPIN_US 20
#endif


/* Deepest nesting of arrays/maps the MessagePack reader accepts (skip, check). */
#ifndef PATIO_MAX_DEPTH
#define PATIO_MAX_DEPTH 64
#endif

/* Event loop backend. Define at most one before including patio.h; with none
 * defined, the best one for the platform is picked below.
 *   PATIO_USE_EPOLL   Linux epoll(7): O(ready) waits, and patio_loop_fd()
 *                     gives a pollable fd for host main loops.
 *   PATIO_USE_KQUEUE  kqueue(2) on macOS and the BSDs; also a pollable fd.
 *   PATIO_USE_POLL    plain poll(2): any POSIX system; O(watched fds) per
 *                     wait and no pollable fd (patio_loop_fd() returns -1),
 *                     so a host must call patio_loop_run_once with a timeout. */
#if defined(PATIO_USE_EPOLL) && (defined(PATIO_USE_KQUEUE) || defined(PATIO_USE_POLL))
#error "patio.h: define at most one of PATIO_USE_EPOLL, PATIO_USE_KQUEUE, PATIO_USE_POLL"
#endif
#if defined(PATIO_USE_KQUEUE) && defined(PATIO_USE_POLL)
#error "patio.h: define at most one of PATIO_USE_EPOLL, PATIO_USE_KQUEUE, PATIO_USE_POLL"
#endif
#if !defined(PATIO_USE_EPOLL) && !defined(PATIO_USE_KQUEUE) && !defined(PATIO_USE_POLL)
#if defined(__linux__)
#define PATIO_USE_EPOLL 1
#elif defined(__APPLE__) || defined(__FreeBSD__) || defined(__OpenBSD__) || \
    defined(__NetBSD__) || defined(__DragonFly__)
#define PATIO_USE_KQUEUE 1
#else
#define PATIO_USE_POLL 1
#endif
#endif

/* Wake-ups between threads use an eventfd on Linux and a pipe elsewhere;
 * PATIO_NO_EVENTFD takes the pipe on Linux too (for kernels or sandboxes
 * without eventfd). */

#ifdef __cplusplus
extern "C" {
#endif

/* ========================================================================
 * >>api-base  Results, hooks, logging
 * ======================================================================== */

/* One result enum for the whole library: 0 = OK, negative = error. */
typedef enum patio_result {
    PATIO_OK = 0,
    PATIO_PENDING = 1,                /* not finished yet / task finishes later */
    PATIO_ERR_INVALID = -1,           /* invalid argument or configuration */
    PATIO_ERR_NOMEM = -2,             /* out of memory */
    PATIO_ERR_TIMEOUT = -3,           /* the call's timeout expired */
    PATIO_ERR_CANCELLED = -4,         /* the call was cancelled */
    PATIO_ERR_NOT_FOUND = -5,         /* no such function / no route */
    PATIO_ERR_REMOTE = -6,            /* the task failed: see error type and message */
    PATIO_ERR_FULL = -7,              /* executor queue full (back-pressure) */
    PATIO_ERR_CLOSED = -8,            /* executor or broker closed */
    PATIO_ERR_LOCKED = -9,            /* registry is locked */
    PATIO_ERR_EXISTS = -10,           /* name already registered */
    PATIO_ERR_DECODE = -11,           /* malformed MessagePack */
    PATIO_ERR_OVERFLOW = -12,         /* value too large / buffer too small */
    PATIO_ERR_TYPE = -13,             /* value has another type than asked */
    PATIO_ERR_CONNECTION_LOST = -14,  /* the connection carrying the call closed */
    PATIO_ERR_PROTOCOL = -15,         /* peer broke the wire protocol */
    PATIO_ERR_UNAUTHORIZED = -16,     /* authentication failed */
    PATIO_ERR_IO = -17,               /* operating system error */
    PATIO_ERR_WORKER_DIED = -18,      /* the worker process running the task died */
    PATIO_ERR_UNSUPPORTED = -19,      /* not supported on this platform/build */
    PATIO_ERR_STARTED = -20           /* too late: the task already started */
} patio_result;

/* Short English description of a result code; never NULL. */
PATIO_API const char *patio_strerror(int result);

typedef enum patio_log_level {
    PATIO_LOG_ERROR = 1,
    PATIO_LOG_WARN = 2,
    PATIO_LOG_INFO = 3,
    PATIO_LOG_DEBUG = 4
} patio_log_level;

/* Allocator and log hooks. Zero-initialised = libc allocator, silent log.
 * The three allocator functions are all-or-none. Objects copy the struct. */
typedef struct patio_hooks {
    void *(*alloc)(size_t size, void *user);
    void *(*realloc)(void *ptr, size_t new_size, void *user);
    void (*free)(void *ptr, void *user);
    void *alloc_user;
    void (*log)(int level, const char *message, void *user);
    void *log_user;
    int log_level; /* highest level passed to log(); 0 = PATIO_LOG_WARN */
} patio_hooks;


/* ========================================================================
 * >>api-msgpack  MessagePack values
 * ======================================================================== */

/* Arguments, results and errors travel as MessagePack. The writer appends
 * values to a buffer; the reader walks a buffer one item at a time and never
 * reads past its end. Both are plain structs the caller owns: no allocation
 * per value, and the reader allocates nothing at all. */

typedef enum patio_type {
    PATIO_NIL,
    PATIO_BOOL,
    PATIO_INT,    /* any integer that fits int64_t, positive or negative */
    PATIO_UINT,   /* only integers above INT64_MAX */
    PATIO_FLOAT,  /* float32 or float64, as double */
    PATIO_STR,
    PATIO_BIN,
    PATIO_ARRAY,
    PATIO_MAP,
    PATIO_EXT
} patio_type;

/* One item as the reader sees it. Strings, binaries and ext bodies point
 * into the input buffer (str is not NUL-terminated). For ARRAY and MAP only
 * the header is read: `count` elements (MAP: pairs) follow in the stream. */
typedef struct patio_value {
    patio_type type;
    union {
        int boolean;
        int64_t i;
        uint64_t u;
        double f;
        struct { const char *ptr; uint32_t len; } str;
        struct { const uint8_t *ptr; uint32_t len; } bin;
        uint32_t count;
        struct { int8_t type; const uint8_t *ptr; uint32_t len; } ext;
    } v;
} patio_value;

/* "nil", "bool", "int", ... for messages. */
PATIO_API const char *patio_type_name(patio_type type);

/* ---- writer -------------------------------------------------------------
 * Growable (memory from hooks) or over the caller's fixed buffer. Errors are
 * sticky: the first one stays in `err`, later writes do nothing, and every
 * function returns `err`, so a sequence of writes needs one check at the
 * end. Integers, strings, binaries, arrays, maps and ext take their smallest
 * form, as Python's msgpack does, so equal values encode to equal bytes. */
typedef struct patio_writer {
    uint8_t *data;
    size_t len, cap;
    const patio_hooks *hooks; /* allocator of a growable writer (NULL = libc) */
    int fixed;                /* 1 = caller's buffer, never grows (PATIO_ERR_OVERFLOW); 2 = starts in one, moves to the heap */
    int err;                  /* sticky first error (0 = OK) */
    size_t max_len;           /* 0 = unlimited; else len never exceeds it: PATIO_ERR_OVERFLOW */
} patio_writer;

PATIO_API void patio_writer_init(patio_writer *w, const patio_hooks *hooks);
PATIO_API void patio_writer_init_fixed(patio_writer *w, void *buf, size_t cap);
PATIO_API void patio_writer_reset(patio_writer *w);   /* len = 0, err = 0, keeps the memory */
PATIO_API void patio_writer_free(patio_writer *w);    /* frees growable memory; safe on a zeroed writer */
PATIO_API int patio_writer_reserve(patio_writer *w, size_t extra);

PATIO_API int patio_write_nil(patio_writer *w);
PATIO_API int patio_write_bool(patio_writer *w, int b);
PATIO_API int patio_write_int(patio_writer *w, int64_t v);
PATIO_API int patio_write_uint(patio_writer *w, uint64_t v);
PATIO_API int patio_write_double(patio_writer *w, double v);  /* always float64 (as Python) */
PATIO_API int patio_write_float(patio_writer *w, float v);    /* float32 */
PATIO_API int patio_write_str(patio_writer *w, const char *s);  /* NUL-terminated; NULL writes nil */
PATIO_API int patio_write_strn(patio_writer *w, const char *s, size_t n);
PATIO_API int patio_write_bin(patio_writer *w, const void *p, size_t n);
PATIO_API int patio_write_array(patio_writer *w, uint32_t count); /* then write count values */
PATIO_API int patio_write_map(patio_writer *w, uint32_t count);   /* then count key/value pairs */
PATIO_API int patio_write_ext(patio_writer *w, int8_t type, const void *body, size_t n);
/* An ext whose body is written in place: mark = patio_write_ext_begin(w),
 * write the body with the other functions, then patio_write_ext_end(w, type,
 * mark) inserts the smallest ext header in front of it. */
PATIO_API size_t patio_write_ext_begin(patio_writer *w);
PATIO_API int patio_write_ext_end(patio_writer *w, int8_t type, size_t mark);
/* Appends bytes that already are MessagePack, verbatim. */
PATIO_API int patio_write_raw(patio_writer *w, const void *p, size_t n);

/* Writes the values a format describes, one format character per value
 * (spaces ignored):
 *   n nil (no argument)     b bool (int)         i int            I int64_t
 *   u unsigned              U uint64_t           d double (a float promotes)
 *   s const char * (NUL-terminated; NULL = nil)  S const char *, size_t
 *   y const void *, size_t (bin)
 *   v const void *, size_t: one complete MessagePack object, checked with
 *     patio_msgpack_check_all and copied verbatim (PATIO_ERR_INVALID if not)
 *   [ ... ]  an array of the values between the brackets (nesting allowed)
 *   { ... }  a map of the key/value pairs between the braces
 * A bad format (unknown character, unbalanced brackets, odd map) writes
 * nothing and sets PATIO_ERR_INVALID. patio_pack(w, "[is]", 1, "x"). */
PATIO_API int patio_pack(patio_writer *w, const char *fmt, ...);
PATIO_API int patio_packv(patio_writer *w, const char *fmt, va_list ap);

/* ---- reader -------------------------------------------------------------
 * Reads items in stream order. Malformed input (truncation, the reserved
 * byte 0xc1, invalid UTF-8 in a str, nesting beyond max_depth) sets the
 * sticky `err` to PATIO_ERR_DECODE; every later call returns it. A typed
 * read of an item of another type returns PATIO_ERR_TYPE (an integer out of
 * range PATIO_ERR_OVERFLOW), does not consume the item and does not set
 * `err`, so the caller may try another type. Output pointers may be NULL. */
typedef struct patio_reader {
    const uint8_t *pos, *end;
    int err;        /* sticky first error */
    int max_depth;  /* nesting limit of skip/raw; 0 = PATIO_MAX_DEPTH */
} patio_reader;

PATIO_API void patio_reader_init(patio_reader *r, const void *data, size_t len);
PATIO_API size_t patio_reader_remaining(const patio_reader *r);
/* One item: the header, and the body of a scalar, str, bin or ext (the
 * reader does not look inside ext bodies). */
PATIO_API int patio_read(patio_reader *r, patio_value *out);
PATIO_API int patio_peek(patio_reader *r, patio_value *out);   /* the same, without advancing */
PATIO_API int patio_read_skip(patio_reader *r);                /* one complete object, nested ones included */
PATIO_API int patio_read_nil(patio_reader *r);
PATIO_API int patio_read_bool(patio_reader *r, int *out);
PATIO_API int patio_read_int(patio_reader *r, int64_t *out);    /* integers only, no floats */
PATIO_API int patio_read_uint(patio_reader *r, uint64_t *out);  /* negative: PATIO_ERR_TYPE */
PATIO_API int patio_read_double(patio_reader *r, double *out);  /* floats and integers */
PATIO_API int patio_read_str(patio_reader *r, const char **ptr, size_t *len);
PATIO_API int patio_read_bin(patio_reader *r, const void **ptr, size_t *len);
PATIO_API int patio_read_array(patio_reader *r, uint32_t *count);
PATIO_API int patio_read_map(patio_reader *r, uint32_t *count);
/* The bytes of one complete object, e.g. to copy it elsewhere. */
PATIO_API int patio_read_raw(patio_reader *r, const void **ptr, size_t *len);

/* Reads values by format, the counterpart of patio_pack:
 *   n expect nil        b int *            i int * (range-checked: OVERFLOW)
 *   I int64_t *         u unsigned *       U uint64_t *      d double *
 *   s const char **, size_t *     y const void **, size_t *
 *   v const void **, size_t *: the raw bytes of one object   * skip one value
 *   [ ... ] an array of exactly that many elements, else PATIO_ERR_TYPE
 *   { ... } a map of exactly that many pairs, else PATIO_ERR_TYPE
 * On any error other than malformed input the reader is left where it was. */
PATIO_API int patio_unpack(patio_reader *r, const char *fmt, ...);
PATIO_API int patio_unpackv(patio_reader *r, const char *fmt, va_list ap);

/* Full validation of untrusted input: one complete object at the start of
 * data that is well formed (no truncation, no 0xc1, UTF-8 strings), has no
 * array or map as a map key, nests at most max_depth deep (0 =
 * PATIO_MAX_DEPTH), and uses only ext type 1 (a CallRequest: [str, array,
 * map with str keys, nil | int | float]) and ext type 2 (an exception: [str,
 * str]), each body being exactly one such object; ext values are checked
 * wherever they appear. *used (may be NULL) receives the object's size.
 * PATIO_OK or PATIO_ERR_DECODE. */
PATIO_API int patio_msgpack_check(const void *data, size_t len, int max_depth, size_t *used);
/* The same, and nothing may follow the object. */
PATIO_API int patio_msgpack_check_all(const void *data, size_t len, int max_depth);
/* ========================================================================
 * >>api-registry  Registry of task functions
 * ======================================================================== */

typedef struct patio_registry patio_registry;
typedef struct patio_task patio_task;
typedef struct patio_broker patio_broker;
typedef struct patio_executor patio_executor;

/* A task function. It reads its arguments from the task (patio_arg_*,
 * patio_args, patio_task_args) and answers with patio_return_* or
 * patio_fail, returning what those return. It may instead return
 * PATIO_PENDING and finish later with patio_task_finish (from any thread). */
typedef int (*patio_fn)(patio_task *task);

typedef struct patio_registry_config {
    const char *project;   /* namespace prefix of auto-generated names; NULL = none */
    int strict;            /* auto-names end with a hash of a signature given at registration */
    int no_auto_naming;    /* 1 = every registration needs an explicit name */
    const patio_hooks *hooks; /* copied; shared by every object built on this registry */
} patio_registry_config;

PATIO_API patio_registry *patio_registry_new(const patio_registry_config *cfg);
PATIO_API void patio_registry_free(patio_registry *r);

/* Registers fn under an explicit name. PATIO_ERR_EXISTS if taken,
 * PATIO_ERR_LOCKED after patio_registry_lock. */
PATIO_API int patio_register(patio_registry *r, const char *name, patio_fn fn, void *user);

/* Registers fn under its generated name (see patio_registry_make_name);
 * fn_name is the C identifier, normally filled in by PATIO_REGISTER. */
PATIO_API int patio_register_auto(patio_registry *r, const char *fn_name, patio_fn fn,
                                  void *user, const char *signature);

#define PATIO_REGISTER(registry, fn, user) \
    patio_register_auto((registry), #fn, (fn), (user), NULL)
#define PATIO_REGISTER_SIG(registry, fn, signature, user) \
    patio_register_auto((registry), #fn, (fn), (user), (signature))

/* The generated name: "<project>.<fn_name>" ("<fn_name>" without a project);
 * in strict mode followed by "." and the unpadded base64 of
 * BLAKE2s-256(signature), as Python patio does with the source hash. A
 * strict registry needs a signature. Writes a NUL-terminated name into out.
 * PATIO_ERR_OVERFLOW if cap is too small, PATIO_ERR_INVALID if auto-naming
 * is disabled or the signature is missing in strict mode. */
PATIO_API int patio_registry_make_name(const patio_registry *r, const char *fn_name,
                                       const char *signature, char *out, size_t cap);

PATIO_API int patio_unregister(patio_registry *r, const char *name);
PATIO_API int patio_registry_lock(patio_registry *r);          /* idempotent */
PATIO_API int patio_registry_is_locked(const patio_registry *r);
PATIO_API size_t patio_registry_count(const patio_registry *r);
PATIO_API int patio_registry_contains(const patio_registry *r, const char *name);
/* Looks a name up: PATIO_OK or PATIO_ERR_NOT_FOUND; fn and user may be NULL. */
PATIO_API int patio_registry_get(const patio_registry *r, const char *name,
                                 patio_fn *fn, void **user);
/* Iteration in registration order: the name at index, NULL past the end. */
PATIO_API const char *patio_registry_name_at(const patio_registry *r, size_t index,
                                             patio_fn *fn, void **user);
/* The first name fn was registered under, NULL if none. */
PATIO_API const char *patio_registry_name_of(const patio_registry *r, patio_fn fn);
PATIO_API const char *patio_registry_project(const patio_registry *r);
PATIO_API int patio_registry_strict(const patio_registry *r);
PATIO_API int patio_registry_auto_naming(const patio_registry *r);

/* ========================================================================
 * >>api-loop  Event loop
 * ======================================================================== */

/* A loop (reactor) waits for sockets, timers and work posted from other
 * threads, and runs their callbacks on one thread: either a thread the
 * library starts (patio_loop_start) or the host's own thread, which pumps
 * it with patio_loop_run_once. A game or GUI main loop can sleep on
 * patio_loop_fd() and patio_loop_next_timeout_ms() between pumps. */
typedef struct patio_loop patio_loop;

typedef struct patio_loop_config {
    const patio_hooks *hooks;   /* copied; NULL = libc, silent */
    int spin_us;                /* poll for posted work this long before sleeping;
                                   0 = PATIO_SPIN_US, <0 = never spin */
} patio_loop_config;

/* NULL cfg = defaults. Returns NULL on error (out of memory, no fds). */
PATIO_API patio_loop *patio_loop_new(const patio_loop_config *cfg);

/* Stops the library thread if it runs, closes the loop's fds and frees work
 * posted with patio_loop_post without running it. No callback runs after. */
PATIO_API void patio_loop_free(patio_loop *loop);

/* Runs the loop on a library thread until patio_loop_stop.
 * PATIO_ERR_INVALID if a thread already runs it, PATIO_ERR_IO if the thread
 * cannot be created. */
PATIO_API int patio_loop_start(patio_loop *loop);

/* Asks the library thread to exit after its current iteration and joins it.
 * PATIO_ERR_INVALID from the loop thread itself; PATIO_OK if not running. */
PATIO_API int patio_loop_stop(patio_loop *loop);

/* Host pumping: waits up to timeout_ms (0 = do not block, <0 = until
 * something happens) for due timers, ready fds and posted work, runs their
 * callbacks, and returns how many ran (>= 0), or an error. Returns
 * PATIO_ERR_INVALID while a library thread runs the loop or when called from
 * inside one of its callbacks. If another thread is pumping, waits for it
 * (at most timeout_ms) and returns 0 if it did not finish in time. */
PATIO_API int patio_loop_run_once(patio_loop *loop, int timeout_ms);

/* An fd that becomes readable when patio_loop_run_once has work: the epoll or
 * kqueue fd. Only watch it for readability; never read it or close it.
 * Returns -1 with the poll backend (PATIO_USE_POLL): then pump with a timeout. */
PATIO_API int patio_loop_fd(const patio_loop *loop);

/* Milliseconds until the next timer is due (rounded up), 0 if work is pending
 * now, -1 if there is neither. */
PATIO_API int patio_loop_next_timeout_ms(patio_loop *loop);

/* Runs fn(arg) on the loop thread, after work posted before it (FIFO).
 * Safe from any thread, including the loop thread; allocates a small node.
 * PATIO_ERR_INVALID for NULL arguments, PATIO_ERR_NOMEM. */
PATIO_API int patio_loop_post(patio_loop *loop, void (*fn)(void *arg), void *arg);

/* 1 if the caller is the thread currently running the loop, else 0. */
PATIO_API int patio_loop_in_loop_thread(const patio_loop *loop);

/* "epoll", "kqueue" or "poll". */
PATIO_API const char *patio_loop_backend(const patio_loop *loop);

/* ========================================================================
 * >>api-task  Inside a task: arguments, result, errors
 * ======================================================================== */

PATIO_API void *patio_task_user(const patio_task *t);        /* pointer given at registration */
PATIO_API const char *patio_task_name(const patio_task *t);
PATIO_API patio_broker *patio_task_broker(const patio_task *t); /* broker that delivered it (may be NULL) */
PATIO_API uint32_t patio_task_argc(const patio_task *t);

/* Reader over the remaining positional arguments (elements of the args array). */
PATIO_API patio_reader *patio_task_args(patio_task *t);
/* Next positional argument. Return 1 when one was read, 0 at the end or on a
 * type mismatch; a mismatch makes the task fail with TypeError. */
PATIO_API int patio_arg_next_int(patio_task *t, int64_t *out);
PATIO_API int patio_arg_next_double(patio_task *t, double *out);
PATIO_API int patio_arg_next_str(patio_task *t, const char **s, size_t *len);
/* Reads all positional arguments with a patio_unpack format ("iid"); the
 * count must match. On mismatch the task fails with TypeError and this
 * returns PATIO_ERR_TYPE. */
PATIO_API int patio_args(patio_task *t, const char *fmt, ...);
/* Keyword arguments: a reader over the kwargs map (empty map if none), and a
 * look-up of one key (PATIO_ERR_NOT_FOUND if absent). */
PATIO_API int patio_task_kwargs(const patio_task *t, patio_reader *map);
PATIO_API int patio_kwarg(const patio_task *t, const char *key, patio_reader *value);

/* The result: write exactly one value into the writer and return PATIO_OK,
 * or use a shortcut below. Nothing written = nil. */
PATIO_API patio_writer *patio_task_result(patio_task *t);
PATIO_API int patio_return_nil(patio_task *t);
PATIO_API int patio_return_bool(patio_task *t, int v);
PATIO_API int patio_return_int(patio_task *t, int64_t v);
PATIO_API int patio_return_double(patio_task *t, double v);
PATIO_API int patio_return_str(patio_task *t, const char *s);
PATIO_API int patio_return_bin(patio_task *t, const void *p, size_t n);
PATIO_API int patio_return(patio_task *t, const char *fmt, ...); /* one value, patio_pack format */
/* Fails the task with an exception: type is a Python builtin name
 * ("ValueError", "ZeroDivisionError", ...) or a dotted "module.Name".
 * Returns PATIO_ERR_REMOTE, so `return patio_fail(...)` reads naturally. */
#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
PATIO_API int patio_fail(patio_task *t, const char *type, const char *fmt, ...);
/* Finishes a task whose function returned PATIO_PENDING; any thread, once. */
PATIO_API int patio_task_finish(patio_task *t);

/* ========================================================================
 * >>api-executor  Executors: thread pool, async, null, your own
 * ======================================================================== */

typedef struct patio_executor_vtable {
    const char *kind;
    /* Accepts a task (any thread). PATIO_OK, PATIO_ERR_FULL or PATIO_ERR_CLOSED. */
    int (*submit)(patio_executor *ex, patio_task *task);
    /* Removes a task that has not started: PATIO_OK, else PATIO_ERR_STARTED. May be NULL. */
    int (*cancel)(patio_executor *ex, patio_task *task);
    /* Called once by the first broker with the loop it runs on. May be NULL. */
    int (*attach)(patio_executor *ex, patio_loop *loop);
    /* Called when a task finished (after patio_task_run or patio_task_finish). May be NULL. */
    void (*finished)(patio_executor *ex, patio_task *task);
    /* Finishes queued tasks, then stops accepting and running. */
    void (*shutdown)(patio_executor *ex);
    /* Frees the object (after shutdown). */
    void (*destroy)(patio_executor *ex);
} patio_executor_vtable;

/* Embed this as the first member of your own executor. */
struct patio_executor {
    const patio_executor_vtable *vt;
    patio_registry *registry;
    const patio_hooks *hooks;
    patio_loop *loop;       /* set when a broker attaches */
    int shut_down;
};

/* For your own executors: initialise the base, and run a task on the
 * current thread. patio_task_run returns PATIO_OK when the task finished,
 * PATIO_PENDING when it will finish later (then vt->finished is called). */
PATIO_API int patio_executor_init(patio_executor *ex, const patio_executor_vtable *vt,
                                  patio_registry *r);
PATIO_API int patio_task_run(patio_task *t);

typedef struct patio_thread_pool_config {
    int max_workers;   /* 0 = PATIO_DEFAULT_MAX_WORKERS (4) */
    size_t max_queue;  /* waiting tasks before submit says PATIO_ERR_FULL; 0 = PATIO_DEFAULT_QUEUE_SIZE */
    int spin_us;       /* idle workers poll this long before sleeping; 0 = PATIO_POOL_SPIN_US, <0 = never */
} patio_thread_pool_config;

PATIO_API patio_executor *patio_thread_pool_new(patio_registry *r, int max_workers);
PATIO_API patio_executor *patio_thread_pool_new_ex(patio_registry *r, const patio_thread_pool_config *cfg);
/* Tasks run on the loop thread; at most max_workers run (or wait, having
 * returned PATIO_PENDING) at once, the rest queue (bounded by max_queue). */
PATIO_API patio_executor *patio_async_executor_new(patio_registry *r, int max_workers);
PATIO_API patio_executor *patio_async_executor_new_ex(patio_registry *r, const patio_thread_pool_config *cfg);
/* Runs nothing: every task fails with RuntimeError. */
PATIO_API patio_executor *patio_null_executor_new(patio_registry *r);

PATIO_API void patio_executor_shutdown(patio_executor *ex); /* finishes queued tasks; idempotent */
PATIO_API void patio_executor_free(patio_executor *ex);     /* shutdown + free; free its brokers first */
PATIO_API const char *patio_executor_kind(const patio_executor *ex);


/* ========================================================================
 * >>api-process  Process-pool executor
 * ======================================================================== */

/* Runs tasks in worker processes created with fork(): Python patio's
 * ProcessPoolExecutor. Creating the pool locks the registry, then forks the
 * workers, so every worker has the same functions (and user pointers) as
 * the parent had at that moment. Calls and answers travel over a
 * socketpair per worker, framed and encoded as on the network. A worker
 * that dies fails only the calls it held (PATIO_ERR_WORKER_DIED, with a
 * message naming the signal or exit status) and is replaced. POSIX only. */
typedef struct patio_process_pool_config {
    int max_workers;          /* worker processes; 0 = PATIO_DEFAULT_MAX_WORKERS (4) */
    size_t max_queue;         /* calls waiting in the parent before submit says
                                 PATIO_ERR_FULL; 0 = PATIO_DEFAULT_QUEUE_SIZE */
    int max_calls_per_worker; /* most calls sent to one worker and not answered
                                 yet (the rest wait in the parent); the pool
                                 sends fewer, about 1 ms of work at the
                                 worker's recent pace; 0 = 256 */
    int kill_on_timeout;      /* a call still running when its timeout expires
                                 gets its worker killed and replaced:
                                 0 or 1 = yes (default), -1 = no, let it finish */
    size_t max_frame_size;    /* largest encoded call or result in bytes; a
                                 larger result fails with OverflowError;
                                 0 = 16 MiB + 64 KiB */
    int inherit_fds;          /* 0 (default) = a worker closes every fd it
                                 inherited except 0, 1, 2; 1 = keeps them
                                 (its own pool's sockets excepted, but those
                                 of other pools too: their workers then see
                                 no EOF at shutdown and are killed after 2 s) */
    int spin_us;              /* the I/O thread and idle workers poll at most
                                 this long before sleeping, less when work has
                                 not come back that soon lately (polling yields
                                 the CPU to processes with work);
                                 0 = PATIO_SPIN_US, <0 = never */
} patio_process_pool_config;

/* Register every function first. NULL on an invalid configuration, out of
 * memory, or when a worker cannot be started. */
PATIO_API patio_executor *patio_process_pool_new(patio_registry *r, int max_workers);
PATIO_API patio_executor *patio_process_pool_new_ex(patio_registry *r, const patio_process_pool_config *cfg);
/* Worker processes alive and accepting calls right now (a dead one counts
 * again once its replacement runs); -1 if ex is not a process pool. */
PATIO_API int patio_process_pool_workers(const patio_executor *ex);
/* Stores the process ids of up to max live workers in out; returns how many
 * were stored, or -1 if ex is not a process pool. */
PATIO_API int patio_process_pool_pids(const patio_executor *ex, long *out, int max);
/* ========================================================================
 * >>api-broker  Brokers and calls
 * ======================================================================== */

typedef struct patio_call patio_call;
typedef void (*patio_call_cb)(patio_call *call, void *user);

#define PATIO_NO_TIMEOUT (-1.0)

typedef struct patio_call_opts {
    double timeout;          /* seconds; 0 = the broker's default; PATIO_NO_TIMEOUT = none */
    patio_call_cb on_done;   /* runs on the loop thread when the call finished */
    void *user;
    const void *args;        /* pre-encoded MessagePack array; used instead of fmt if set */
    size_t args_len;
    const void *kwargs;      /* pre-encoded MessagePack map of keyword arguments */
    size_t kwargs_len;
} patio_call_opts;

/* Starts a call of `name` with arguments given by a patio_pack format
 * ("iii", 1, 2, 3 = three ints). Any thread. Never NULL unless out of
 * memory; a call that cannot start is returned already failed. */
PATIO_API patio_call *patio_call_async(patio_broker *b, const char *name, const char *fmt, ...);
PATIO_API patio_call *patio_call_start(patio_broker *b, const patio_call_opts *opts,
                                       const char *name, const char *fmt, ...);
PATIO_API patio_call *patio_call_startv(patio_broker *b, const patio_call_opts *opts,
                                        const char *name, const char *fmt, va_list ap);
/* Starts a call and waits for it (not from the loop thread). */
PATIO_API patio_call *patio_call_sync(patio_broker *b, double timeout,
                                      const char *name, const char *fmt, ...);
/* Calls a function by itself, through the name it has in the broker's registry. */
PATIO_API patio_call *patio_call_fn(patio_broker *b, patio_fn fn, const char *fmt, ...);

/* Waits (timeout in seconds, PATIO_NO_TIMEOUT = forever). patio_call_wait
 * returns the call's status, or PATIO_PENDING if the wait timed out (the call
 * goes on). patio_wait_all returns PATIO_OK once all finished (whatever their
 * status) or PATIO_ERR_TIMEOUT. patio_wait_any stores the index of a finished
 * call. Not from the loop thread; with a host-pumped loop they pump it. */
PATIO_API int patio_call_wait(patio_call *c, double timeout);
PATIO_API int patio_wait_all(patio_call *const *calls, size_t n, double timeout);
PATIO_API int patio_wait_any(patio_call *const *calls, size_t n, double timeout, size_t *index);

/* PATIO_PENDING, PATIO_OK, or the error. */
PATIO_API int patio_call_status(const patio_call *c);
/* Cancels a call whose task has not started: PATIO_OK, else PATIO_ERR_STARTED
 * (running) or PATIO_ERR_INVALID (already finished). */
PATIO_API int patio_call_cancel(patio_call *c);
/* Releases the call; if it is still running its result is dropped. A
 * broker's calls are freed before the broker. */
PATIO_API void patio_call_free(patio_call *c);
PATIO_API const char *patio_call_name(const patio_call *c);

/* Result of a successful call: raw MessagePack, a reader, or one value. */
PATIO_API const void *patio_call_result(const patio_call *c, size_t *len);
PATIO_API int patio_call_reader(const patio_call *c, patio_reader *r);
PATIO_API int patio_call_unpack(const patio_call *c, const char *fmt, ...);
PATIO_API int64_t patio_result_int(const patio_call *c);    /* 0 unless OK and an int */
PATIO_API double patio_result_double(const patio_call *c);  /* 0 unless OK and a number */
/* Error of a failed call: exception type and message ("" when OK). Local
 * errors are named as Python would (TimeoutError, KeyError, ...). */
PATIO_API const char *patio_call_error_type(const patio_call *c);
PATIO_API const char *patio_call_error_message(const patio_call *c);

/* ---- brokers ---- */
typedef struct patio_broker_config {
    patio_loop *loop;          /* run on this loop (not owned; start or pump it yourself);
                                  NULL = the broker owns a loop on a library thread */
    double default_timeout;    /* 0 = PATIO_DEFAULT_TIMEOUT (86400 s) */
} patio_broker_config;

PATIO_API patio_broker *patio_memory_broker_new(patio_executor *ex);
PATIO_API patio_broker *patio_memory_broker_new_ex(patio_executor *ex, const patio_broker_config *cfg);
/* Fails pending calls with PATIO_ERR_CLOSED; later calls fail the same way. */
PATIO_API void patio_broker_close(patio_broker *b);
PATIO_API void patio_broker_free(patio_broker *b);
/* Waits until the broker is closed (by patio_broker_close from another
 * thread or a task). timeout in seconds, PATIO_NO_TIMEOUT = forever.
 * PATIO_OK or PATIO_ERR_TIMEOUT; not from the loop thread. */
PATIO_API int patio_broker_join(patio_broker *b, double timeout);
PATIO_API patio_loop *patio_broker_loop(const patio_broker *b);
PATIO_API patio_registry *patio_broker_registry(const patio_broker *b);
PATIO_API patio_executor *patio_broker_executor(const patio_broker *b);

/* ---- your own broker ---- */
typedef struct patio_broker_vtable {
    const char *kind;
    /* Carries a started call (any thread) and later finishes it with
     * patio_call_succeed / patio_call_fail_with. A timeout, a cancel or
     * the broker's close may finish it first, and its owner may then free
     * it at once: a broker that may still touch the call afterwards (a late
     * answer, say) takes a reference here with patio_call_ref and drops it
     * with patio_call_unref when it lets go. */
    void (*send)(patio_broker *b, patio_call *c);
    /* Tries to cancel a call not yet started: PATIO_OK or PATIO_ERR_STARTED. May be NULL. */
    int (*cancel)(patio_broker *b, patio_call *c);
    void (*close)(patio_broker *b);    /* stop carrying calls; may be NULL */
    void (*destroy)(patio_broker *b);  /* free your object */
} patio_broker_vtable;

/* Base for brokers; embed as the first member. Fields are private. */
struct patio_broker {
    const patio_broker_vtable *vt;
    patio_executor *executor;
    patio_registry *registry;
    const patio_hooks *hooks;
    patio_loop *loop;
    int owns_loop;
    double default_timeout;
    int closed;
    void *internal;
};
PATIO_API int patio_broker_init(patio_broker *b, const patio_broker_vtable *vt,
                                patio_executor *ex, const patio_broker_config *cfg);
PATIO_API void patio_broker_deinit(patio_broker *b);
/* Call details for a broker carrying it. */
PATIO_API int patio_call_args(const patio_call *c, const void **args, size_t *len,
                              const void **kwargs, size_t *kwargs_len);
PATIO_API double patio_call_timeout(const patio_call *c);   /* seconds, <0 = none */
/* Finish a call (first finisher wins; later ones return PATIO_ERR_INVALID).
 * value is one MessagePack object, copied; without memory for the copy the
 * call fails with MemoryError and PATIO_ERR_NOMEM is returned. */
PATIO_API int patio_call_succeed(patio_call *c, const void *value, size_t len);
PATIO_API int patio_call_fail_with(patio_call *c, int status, const char *type, const char *message);
/* Keeps a call's memory alive while a broker may still touch it (see send). */
PATIO_API void patio_call_ref(patio_call *c);
PATIO_API void patio_call_unref(patio_call *c);


/* ========================================================================
 * >>api-tcp  TCP broker
 * ======================================================================== */

/* A TCP broker speaks the wire protocol of Python patio (PROTOCOL.md), so
 * its peers may be patio.h brokers or Python patio 0.1.4 brokers using the
 * MessagePack serializer. One broker can listen on several addresses and
 * connect to several servers at once (server, client, mixed mode, full
 * mesh); after the handshake both ends of every connection can call
 * functions the other side registered. Calls are routed round robin among
 * the connections whose peer offers the name; a call for a name nobody
 * offers waits for a route until its own timeout.
 *
 *     patio_broker *srv = patio_tcp_server_new(pool, NULL, "0.0.0.0", PATIO_TCP_DEFAULT_PORT);
 *     patio_broker *cli = patio_tcp_client_new(pool2, NULL, "127.0.0.1", PATIO_TCP_DEFAULT_PORT);
 *     patio_tcp_wait_peers(cli, 1, 5.0);
 *     patio_call *c = patio_call_sync(cli, 5.0, "mul", "iii", 1, 2, 3);
 *
 * Every socket callback runs on the broker's loop; the functions below may
 * be called from any thread except where noted.
 *
 * A REQUEST cannot be taken back once sent: patio_call_cancel succeeds
 * only for a call still waiting for a route, and only on the loop thread
 * (else PATIO_ERR_STARTED). A call that times out keeps its serial
 * reserved on its connection until the late answer (then dropped) or the
 * end of the connection. */

#define PATIO_TCP_DEFAULT_PORT 15383

/* ---- transport seam ------------------------------------------------------
 * The bytes of a connection pass through a transport: plain TCP by default,
 * TLS from patio_tls.h. The broker owns the socket (non-blocking, already
 * connected) and calls the transport only through this table, always on
 * its loop thread:
 *
 *   create(ctx, fd, is_server, server_name, &handle)
 *       per connection, once the TCP connection is up. ctx is
 *       patio_tcp_config.transport_ctx; server_name is the host given to
 *       patio_tcp_connect (for SNI / certificate checks), NULL on accepted
 *       connections. Stores the transport's per-connection state in
 *       *handle. PATIO_OK or an error (the connection is dropped).
 *   handshake(handle)
 *       one non-blocking step of the transport's own handshake: PATIO_OK
 *       when done, PATIO_TRANSPORT_WANT_READ / _WANT_WRITE to be called
 *       again when the socket is ready, PATIO_TRANSPORT_ERROR (see error).
 *       NULL = no handshake.
 *   read(handle, buf, n)
 *       > 0 bytes read, 0 at end of stream, PATIO_TRANSPORT_WANT_READ /
 *       _WANT_WRITE when it would block, PATIO_TRANSPORT_ERROR.
 *   write(handle, buf, n)
 *       > 0 bytes written (maybe fewer than n), _WANT_READ / _WANT_WRITE
 *       when it would block, _ERROR. After a WANT the broker calls write
 *       again with the same bytes (same start, same length).
 *   pending(handle)
 *       bytes already received and decrypted inside the transport; the
 *       broker reads them before it waits on the socket again. NULL = 0.
 *   close(handle)
 *       ends the session without blocking (e.g. a TLS close_notify, best
 *       effort) and frees the handle. The broker closes the fd afterwards.
 *   error(handle)
 *       describes the last error (for the log); never NULL.
 *
 * patio_tcp_plain_transport() is the default: recv/send with MSG_NOSIGNAL. */
enum {
    PATIO_TRANSPORT_WANT_READ = -1001,
    PATIO_TRANSPORT_WANT_WRITE = -1002,
    PATIO_TRANSPORT_ERROR = -1003
};

typedef struct patio_transport {
    const char *name;
    int (*create)(void *ctx, int fd, int is_server, const char *server_name, void **handle);
    int (*handshake)(void *handle);
    ptrdiff_t (*read)(void *handle, void *buf, size_t n);
    ptrdiff_t (*write)(void *handle, const void *buf, size_t n);
    size_t (*pending)(void *handle);
    void (*close)(void *handle);
    const char *(*error)(void *handle);
} patio_transport;

PATIO_API const patio_transport *patio_tcp_plain_transport(void);

/* ---- configuration ------------------------------------------------------
 * Zero-initialised = defaults. */
typedef struct patio_tcp_config {
    patio_broker_config base;      /* loop (NULL = own loop on a library thread), default_timeout */
    const void *key;               /* shared key, 0..32 bytes (longer: PATIO_ERR_INVALID);
                                      empty = authenticates nothing, logs a warning */
    size_t key_len;
    int require_server_proof;      /* client: refuse AUTH_OK without a valid proof
                                      (this refuses Python servers) */
    uint32_t max_frame_size;       /* largest payload sent or accepted; 0 = 16 MiB */
    double handshake_timeout;      /* seconds from connect/accept to the end of discovery; 0 = 10 */
    int max_connections;           /* open connections; at the limit a new one replaces the
                                      oldest not yet authenticated, or is closed at once;
                                      0 = 1024 */
    int max_inflight;              /* received requests not yet answered, per connection;
                                      at the limit the connection is not read; 0 = 1024 */
    size_t max_inflight_bytes;     /* payload bytes of those requests, per connection; at
                                      the limit the connection is not read (a request
                                      larger than it is served alone); 0 = 64 MiB */
    double keepalive_idle;         /* TCP keep-alive: seconds a connection may be silent
                                      before the kernel probes the peer; 0 = 60,
                                      < 0 = no keep-alive; at most 32767 */
    double keepalive_interval;     /* seconds between unanswered probes; 0 = 10; 1..32767 */
    int keepalive_probes;          /* unanswered probes after which the kernel drops the
                                      connection (its calls fail at once); 0 = 5; 1..127.
                                      Sent data unacknowledged for idle + interval x probes
                                      drops it too (TCP_USER_TIMEOUT, where it exists) */
    double reconnect_delay;        /* first retry of a client connection; 0 = 1 s */
    double reconnect_max_delay;    /* the delay doubles per failure up to this; 0 = 30 s */
    int max_depth;                 /* MessagePack nesting accepted; 0 = PATIO_MAX_DEPTH */
    const patio_transport *transport; /* NULL = plain TCP */
    void *transport_ctx;           /* passed to transport->create */
} patio_tcp_config;

/* A broker with neither listeners nor connections yet. NULL cfg = defaults.
 * NULL on an invalid configuration or out of memory. */
PATIO_API patio_broker *patio_tcp_broker_new(patio_executor *ex, const patio_tcp_config *cfg);

/* Listens on host ("127.0.0.1", "::1", "0.0.0.0", a name; NULL = every
 * address, IPv4 and IPv6) and port (0 = an ephemeral port; *bound_port,
 * if not NULL, receives the real one). Callable several times. PATIO_OK,
 * PATIO_ERR_INVALID (bad address), PATIO_ERR_IO (bind/listen failed; the
 * log says why), PATIO_ERR_CLOSED. */
PATIO_API int patio_tcp_listen(patio_broker *b, const char *host, int port, int *bound_port);

/* Starts a client connection to host:port (NULL host = "localhost", port 0
 * = PATIO_TCP_DEFAULT_PORT) that reconnects with backoff until the broker
 * closes. The name is resolved here, once, on the caller's thread; the
 * connection itself is made on the loop. Returns at once: PATIO_OK, or
 * PATIO_ERR_INVALID if the address does not resolve. Callable several times. */
PATIO_API int patio_tcp_connect(patio_broker *b, const char *host, int port);

/* patio_tcp_broker_new + patio_tcp_listen / patio_tcp_connect, as Python's
 * TCPServerBroker / TCPClientBroker. NULL on failure. */
PATIO_API patio_broker *patio_tcp_server_new(patio_executor *ex, const patio_tcp_config *cfg,
                                             const char *host, int port);
PATIO_API patio_broker *patio_tcp_client_new(patio_executor *ex, const patio_tcp_config *cfg,
                                             const char *host, int port);

/* The port of the first listener, or -1 if the broker does not listen. */
PATIO_API int patio_tcp_listen_port(patio_broker *b);

/* Waits until at least n connections completed discovery (are usable for
 * calls). PATIO_OK, PATIO_ERR_TIMEOUT, PATIO_ERR_CLOSED. Not from the loop
 * thread; pumps a host-driven loop. */
PATIO_API int patio_tcp_wait_peers(patio_broker *b, int n, double timeout);

/* Waits until the broker is closed (patio_broker_close, from another thread
 * or a task), for any kind of broker. timeout in seconds, PATIO_NO_TIMEOUT =
 * forever. PATIO_OK or PATIO_ERR_TIMEOUT. */
PATIO_API int patio_broker_join(patio_broker *b, double timeout);

/* Counters since the broker was created. */
typedef struct patio_tcp_stats {
    uint64_t calls_sent;           /* REQUESTs sent */
    uint64_t calls_served;         /* REQUESTs received and answered */
    uint64_t call_errors;          /* calls sent that failed (remote error, connection lost, ...) */
    uint64_t timeouts;             /* calls sent that timed out (either side) */
    uint64_t reconnects;           /* client connection attempts after the first */
    uint64_t bytes_in, bytes_out;  /* application bytes through the transport */
    uint64_t connections_open;     /* now */
    uint64_t connections_accepted; /* ever */
    uint64_t protocol_errors;      /* connections closed for breaking the protocol */
    uint64_t auth_failures;        /* handshakes refused (wrong key, replay, bad proof) */
    uint64_t read_pauses;          /* times a connection stopped being read: max_inflight,
                                      max_inflight_bytes or a full executor */
} patio_tcp_stats;

/* PATIO_OK, or PATIO_ERR_INVALID if b is not a TCP broker. */
PATIO_API int patio_tcp_stats_get(patio_broker *b, patio_tcp_stats *out);
#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PATIO_H_INCLUDED */

/* ************************************************************************
 *
 *                          IMPLEMENTATION
 *
 * ************************************************************************ */
#if defined(PATIO_IMPLEMENTATION) && !defined(PATIO__IMPLEMENTATION_DONE)
#define PATIO__IMPLEMENTATION_DONE 1

#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <errno.h>
#include <math.h>
#include <time.h>
#include <limits.h>
#include <pthread.h>
#include <unistd.h>
#include <fcntl.h>
#include <sched.h>

/* ========================================================================
 * >>platform  Platform layer: atomics, clock, allocation, logging
 * ======================================================================== */

#if !defined(__GNUC__) && !defined(__clang__)
#error "patio.h needs GCC-compatible __atomic builtins (gcc or clang)"
#endif

#define PATIO__UNUSED(x) ((void)(x))
/* Padding that keeps a struct's hot part off the cache lines of whatever
 * the allocator put next to it: a lock that one thread takes per call must
 * not share a line with data other threads read per call. */
#define PATIO__LINE 64
#define PATIO__PAD(name) char name[PATIO__LINE]
/* internal helpers that only some configurations call */
#define PATIO__MAYBE_UNUSED __attribute__((unused))
/* a few-instruction helper on a per-call path: a call would cost more */
#define PATIO__INLINE __inline__ __attribute__((always_inline))
#define PATIO__CONTAINER(ptr, type, member) \
    ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

#define patio__load(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define patio__load_relaxed(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define patio__store(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define patio__xchg(p, v) __atomic_exchange_n((p), (v), __ATOMIC_ACQ_REL)
#define patio__fetch_add(p, v) __atomic_fetch_add((p), (v), __ATOMIC_ACQ_REL)
#define patio__fetch_sub(p, v) __atomic_fetch_sub((p), (v), __ATOMIC_ACQ_REL)
#define patio__cas(p, expected, desired) \
    __atomic_compare_exchange_n((p), (expected), (desired), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)

static void patio__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Monotonic clock in nanoseconds. */
static uint64_t patio__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The monotonic clock for loops that would read it once per item. Reading
 * it costs tens of nanoseconds, as much as a small task; where the CPU has
 * a cheap cycle counter (x86's TSC), a read that comes within
 * PATIO__CLOCK_REUSE_TICKS of the last real one returns that one instead.
 * No TSC ticks slower than 1 GHz, so the value is never more than
 * PATIO__CLOCK_REUSE_TICKS ns old. A counter that goes backwards (another
 * CPU's) reads as a large gap: a real read. */
#define PATIO__CLOCK_REUSE_TICKS 5000u

typedef struct patio__clock {
    uint64_t ns;      /* the last real read; 0 = none yet */
    uint64_t ticks;   /* the cycle counter at that read */
} patio__clock;

static uint64_t patio__clock_sync(patio__clock *c)
{
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    c->ticks = __builtin_ia32_rdtsc();
#endif
    return c->ns = patio__now_ns();
}

static uint64_t patio__clock_now(patio__clock *c)
{
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    if (c->ns && __builtin_ia32_rdtsc() - c->ticks < PATIO__CLOCK_REUSE_TICKS) return c->ns;
#endif
    return patio__clock_sync(c);
}

/* Seconds (may be fractional, <= 0 or infinite) to a deadline in ns;
 * UINT64_MAX means "never". */
static uint64_t patio__deadline_after(double seconds)
{
    double ns;
    if (seconds != seconds) return patio__now_ns(); /* NaN: already expired */
    if (seconds <= 0) return patio__now_ns();
    ns = seconds * 1e9;
    if (ns >= 1.8e19) return UINT64_MAX;
    return patio__now_ns() + (uint64_t)ns;
}

/* Like patio__deadline_after for long timeouts (>= 1 s), where a few ms
 * do not matter, from the coarse clock where there is one: reading it
 * costs a fraction of a precise read, and calls are started at high
 * rates. The coarse clock lags by at most one tick; adding 10 ms (the tick
 * at HZ=100) keeps the deadline from ever coming early. */
static uint64_t patio__deadline_after_long(double seconds)
{
#if defined(CLOCK_MONOTONIC_COARSE)
    struct timespec ts;
    if (seconds >= 1.0 && seconds * 1e9 < 1.8e19 && clock_gettime(CLOCK_MONOTONIC_COARSE, &ts) == 0)
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec + 10000000u + (uint64_t)(seconds * 1e9);
#endif
    return patio__deadline_after(seconds);
}

/* CLOCK_MONOTONIC-based absolute timespec for pthread_cond_timedwait. */
static void patio__abs_timespec(struct timespec *ts, uint64_t deadline_ns)
{
    ts->tv_sec = (time_t)(deadline_ns / 1000000000u);
    ts->tv_nsec = (long)(deadline_ns % 1000000000u);
}

/* A condition variable that waits on the monotonic clock where supported. */
static int patio__cond_init(pthread_cond_t *c)
{
    pthread_condattr_t a;
    int rc;
    if (pthread_condattr_init(&a) != 0) return PATIO_ERR_NOMEM;
#if !defined(__APPLE__)
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
#endif
    rc = pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
    return rc == 0 ? PATIO_OK : PATIO_ERR_NOMEM;
}

/* Waits until signalled or deadline_ns (monotonic; UINT64_MAX = forever).
 * Returns 0, or ETIMEDOUT. */
static int patio__cond_wait_until(pthread_cond_t *c, pthread_mutex_t *m, uint64_t deadline_ns)
{
    if (deadline_ns == UINT64_MAX) return pthread_cond_wait(c, m);
#if defined(__APPLE__)
    {
        uint64_t now = patio__now_ns();
        struct timespec rel;
        uint64_t d = deadline_ns > now ? deadline_ns - now : 0;
        rel.tv_sec = (time_t)(d / 1000000000u);
        rel.tv_nsec = (long)(d % 1000000000u);
        return pthread_cond_timedwait_relative_np(c, m, &rel);
    }
#else
    {
        struct timespec ts;
        patio__abs_timespec(&ts, deadline_ns);
        return pthread_cond_timedwait(c, m, &ts);
    }
#endif
}

/* A mutex held for a few instructions by threads on different cores: where
 * available it spins briefly before sleeping, which is far cheaper than a
 * futex sleep and wake-up for such short holds. */
static void patio__mutex_init_hot(pthread_mutex_t *m)
{
#if defined(PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP)
    pthread_mutexattr_t a;
    if (pthread_mutexattr_init(&a) == 0) {
        pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ADAPTIVE_NP);
        pthread_mutex_init(m, &a);
        pthread_mutexattr_destroy(&a);
        return;
    }
#endif
    pthread_mutex_init(m, NULL);
}

/* A lock for a few pointer moves that every call makes: one atomic swap to
 * take it, a plain store to give it back (a pthread mutex costs a call
 * and a locked instruction each way). A waiter spins briefly and then
 * yields, so a holder that lost its CPU gets it back. Holders only move
 * pointers, and now and then arm or disarm a timer (a short mutex). */
static void patio__list_lock(int *l)
{
    unsigned spins = 0;
    while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(l, __ATOMIC_RELAXED)) {
            if (++spins < 64) patio__cpu_relax();
            else sched_yield();
        }
    }
}

static void patio__list_unlock(int *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

/* Adaptive spinning. Polling before sleeping pays off only when the work
 * comes back within the spin; when it does not, the spinning thread just
 * takes a CPU from the threads doing the work (on a 2-CPU machine, badly).
 * So the budget covers twice the longest wait a spin caught lately (up to
 * the ceiling), halves after a spin that found nothing, and a thread that
 * stopped spinning probes again now and then with the whole ceiling: a
 * short probe could never learn that the work comes back after, say, 30 us,
 * and the thread would then sleep and be woken for every hand-off. One
 * owner thread updates each state. */
#define PATIO__SPIN_MIN_NS 2000u
#define PATIO__SPIN_PROBE_EVERY 32u

typedef struct patio__spin_state {
    uint64_t max_ns;   /* configured ceiling; 0 = never spin */
    uint64_t cur_ns;   /* current budget */
    unsigned idle;     /* sleeps since the budget fell to 0 */
} patio__spin_state;

static void patio__spin_init(patio__spin_state *s, uint64_t max_ns)
{
    s->max_ns = max_ns;
    s->cur_ns = max_ns;
    s->idle = 0;
}

/* How long to spin now (ns); 0 = go straight to sleep. */
static uint64_t patio__spin_budget(patio__spin_state *s)
{
    if (!s->max_ns) return 0;
    if (s->cur_ns) return s->cur_ns;
    if (++s->idle < PATIO__SPIN_PROBE_EVERY) return 0;
    s->idle = 0;
    return s->max_ns;
}

/* found_work: the spin ended because work came, waited_ns after it began. */
static void patio__spin_result(patio__spin_state *s, int found_work, uint64_t waited_ns)
{
    if (!s->max_ns) return;
    if (found_work) {
        uint64_t want = 2 * waited_ns + PATIO__SPIN_MIN_NS;
        if (want < s->cur_ns) want = s->cur_ns;
        s->cur_ns = want < s->max_ns ? want : s->max_ns;
    } else {
        s->cur_ns /= 2;
        if (s->cur_ns < PATIO__SPIN_MIN_NS) s->cur_ns = 0;
    }
}

static int patio__hooks_valid(const patio_hooks *h)
{
    int n;
    if (!h) return 1;
    n = (h->alloc != NULL) + (h->realloc != NULL) + (h->free != NULL);
    return n == 0 || n == 3;
}

static void *patio__malloc(const patio_hooks *h, size_t n)
{
    if (n == 0) n = 1;
    if (h && h->alloc) return h->alloc(n, h->alloc_user);
    return malloc(n);
}

static void *patio__calloc(const patio_hooks *h, size_t n)
{
    void *p = patio__malloc(h, n);
    if (p) memset(p, 0, n);
    return p;
}

static void *patio__realloc(const patio_hooks *h, void *p, size_t n)
{
    if (n == 0) n = 1;
    if (h && h->realloc) return h->realloc(p, n, h->alloc_user);
    return realloc(p, n);
}

static void patio__free(const patio_hooks *h, void *p)
{
    if (!p) return;
    if (h && h->free) h->free(p, h->alloc_user);
    else free(p);
}

/* Zeroed memory that starts on a cache line and fills whole lines, for
 * objects that threads hand to one another (calls): two such objects never
 * share a line, so a worker finishing one never takes the line that the
 * owner of its neighbour is writing. The block's own address is kept in
 * the word before the object; free it with patio__free_lines. */
static void *patio__calloc_lines(const patio_hooks *h, size_t n)
{
    size_t size = (n + PATIO__LINE - 1) & ~(size_t)(PATIO__LINE - 1);
    char *raw, *obj;
    if (size < n || size > SIZE_MAX - PATIO__LINE - sizeof(void *)) return NULL;
    raw = (char *)patio__malloc(h, size + PATIO__LINE + sizeof(void *));
    if (!raw) return NULL;
    obj = (char *)(((uintptr_t)raw + sizeof(void *) + PATIO__LINE - 1) & ~(uintptr_t)(PATIO__LINE - 1));
    memcpy(obj - sizeof(void *), &raw, sizeof raw);
    memset(obj, 0, size);
    return obj;
}

static void patio__free_lines(const patio_hooks *h, void *obj)
{
    void *raw;
    if (!obj) return;
    memcpy(&raw, (char *)obj - sizeof(void *), sizeof raw);
    patio__free(h, raw);
}

static char *patio__strndup(const patio_hooks *h, const char *s, size_t n)
{
    char *d = (char *)patio__malloc(h, n + 1);
    if (!d) return NULL;
    if (n) memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

static char *patio__strdup(const patio_hooks *h, const char *s)
{
    return patio__strndup(h, s, strlen(s));
}

static int patio__log_enabled(const patio_hooks *h, int level)
{
    int max;
    if (!h || !h->log) return 0;
    max = h->log_level ? h->log_level : PATIO_LOG_WARN;
    return level <= max;
}

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static void patio__log(const patio_hooks *h, int level, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    if (!patio__log_enabled(h, level)) return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    h->log(level, msg, h->log_user);
}

PATIO_API const char *patio_strerror(int result)
{
    switch (result) {
    case PATIO_OK: return "success";
    case PATIO_PENDING: return "not finished yet";
    case PATIO_ERR_INVALID: return "invalid argument";
    case PATIO_ERR_NOMEM: return "out of memory";
    case PATIO_ERR_TIMEOUT: return "timed out";
    case PATIO_ERR_CANCELLED: return "cancelled";
    case PATIO_ERR_NOT_FOUND: return "no such function or no route";
    case PATIO_ERR_REMOTE: return "the task raised an error";
    case PATIO_ERR_FULL: return "executor queue is full";
    case PATIO_ERR_CLOSED: return "closed";
    case PATIO_ERR_LOCKED: return "registry is locked";
    case PATIO_ERR_EXISTS: return "name already registered";
    case PATIO_ERR_DECODE: return "malformed MessagePack data";
    case PATIO_ERR_OVERFLOW: return "value too large or buffer too small";
    case PATIO_ERR_TYPE: return "value has an unexpected type";
    case PATIO_ERR_CONNECTION_LOST: return "connection lost";
    case PATIO_ERR_PROTOCOL: return "protocol error";
    case PATIO_ERR_UNAUTHORIZED: return "authentication failed";
    case PATIO_ERR_IO: return "input/output error";
    case PATIO_ERR_WORKER_DIED: return "worker process died";
    case PATIO_ERR_UNSUPPORTED: return "not supported";
    case PATIO_ERR_STARTED: return "task already started";
    default: return "unknown error";
    }
}


/* ========================================================================
 * >>platform-io  Platform layer: random bytes, wake-up fd, poller backends
 * ======================================================================== */

#include <poll.h>
#if defined(PATIO_USE_EPOLL)
#include <sys/epoll.h>
#elif defined(PATIO_USE_KQUEUE)
#include <sys/types.h>
#include <sys/event.h>
#include <sys/time.h>
#endif
#if defined(__linux__)
#if !defined(PATIO_NO_EVENTFD)
#include <sys/eventfd.h>
#endif
#include <sys/syscall.h>
#endif
#if defined(__APPLE__)
#include <sys/random.h>
#endif

/* Internal entry points that some builds or sections do not call. */
#define PATIO__MAYBE_UNUSED __attribute__((unused))

/* Sequentially consistent atomics, for the few "store mine, then load
 * theirs" handshakes (sleep/wake-up) where acquire/release is too weak. */
#define patio__sc_load(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define patio__sc_store(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define patio__sc_xchg(p, v) __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)

/* ---- cryptographically secure random bytes -------------------------- */

#if defined(__linux__) && defined(SYS_getrandom)
/* getrandom(2) through syscall(), so that old C libraries work too. Blocks
 * only until the kernel pool is seeded at boot. 1 = filled, 0 = unusable. */
static int patio__random_kernel(unsigned char *p, size_t n)
{
    while (n > 0) {
        long r = syscall(SYS_getrandom, p, n, 0);
        if (r > 0) { p += r; n -= (size_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        return 0; /* ENOSYS (old kernel), EPERM (seccomp), ...: try /dev/urandom */
    }
    return 1;
}
#elif defined(__APPLE__) || defined(__OpenBSD__)
/* getentropy(2) fills at most 256 bytes per call. */
static int patio__random_kernel(unsigned char *p, size_t n)
{
    while (n > 0) {
        size_t chunk = n < 256 ? n : 256;
        if (getentropy(p, chunk) != 0) return 0;
        p += chunk;
        n -= chunk;
    }
    return 1;
}
#else
static int patio__random_kernel(unsigned char *p, size_t n)
{
    PATIO__UNUSED(p);
    PATIO__UNUSED(n);
    return 0;
}
#endif

/* /dev/urandom, retrying interrupted opens and short or interrupted reads. */
static int patio__random_urandom(unsigned char *p, size_t n)
{
    int fd = -1, tries;
    for (tries = 0; tries < 16 && fd < 0; tries++) {
        fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
        if (fd < 0 && errno != EINTR) break;
    }
    if (fd < 0) return PATIO_ERR_IO;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r > 0) { p += r; n -= (size_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        close(fd);
        return PATIO_ERR_IO;
    }
    close(fd);
    return PATIO_OK;
}

/* Fills buf with n unpredictable bytes, or fails with PATIO_ERR_IO: there
 * is deliberately no weak fallback, since callers use them for keys. */
PATIO__MAYBE_UNUSED static int patio__random(void *buf, size_t n)
{
    if (n == 0) return PATIO_OK;
    if (!buf) return PATIO_ERR_INVALID;
    if (patio__random_kernel((unsigned char *)buf, n)) return PATIO_OK;
    return patio__random_urandom((unsigned char *)buf, n);
}

/* ---- wake-up fd: makes a sleeping poller return ----------------------- */

typedef struct patio__wake {
    int rfd; /* watched for readability by the poller */
    int wfd; /* written by wakers (the same fd for an eventfd) */
} patio__wake;

#if defined(__linux__) && !defined(PATIO_NO_EVENTFD)
static int patio__wake_open(patio__wake *w)
{
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0) return PATIO_ERR_IO;
    w->rfd = w->wfd = fd;
    return PATIO_OK;
}

static void patio__wake_signal(patio__wake *w)
{
    uint64_t one = 1;
    ssize_t r;
    do r = write(w->wfd, &one, sizeof one);
    while (r < 0 && errno == EINTR);
    /* EAGAIN means the counter is saturated: the fd is readable anyway. */
}

static void patio__wake_drain(patio__wake *w)
{
    uint64_t count;
    ssize_t r;
    do r = read(w->rfd, &count, sizeof count);
    while (r < 0 && errno == EINTR);
}
#else
static int patio__fd_nonblock_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return PATIO_ERR_IO;
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) return PATIO_ERR_IO;
    return PATIO_OK;
}

/* A self-pipe; pipe2() is missing on macOS, so the flags are set after. */
static int patio__wake_open(patio__wake *w)
{
    int fds[2];
    if (pipe(fds) != 0) return PATIO_ERR_IO;
    if (patio__fd_nonblock_cloexec(fds[0]) != PATIO_OK || patio__fd_nonblock_cloexec(fds[1]) != PATIO_OK) {
        close(fds[0]);
        close(fds[1]);
        return PATIO_ERR_IO;
    }
    w->rfd = fds[0];
    w->wfd = fds[1];
    return PATIO_OK;
}

static void patio__wake_signal(patio__wake *w)
{
    unsigned char one = 1;
    ssize_t r;
    do r = write(w->wfd, &one, 1);
    while (r < 0 && errno == EINTR);
    /* EAGAIN means the pipe is full: the read end is readable anyway. */
}

static void patio__wake_drain(patio__wake *w)
{
    unsigned char buf[64];
    ssize_t r;
    do r = read(w->rfd, buf, sizeof buf);
    while (r == (ssize_t)sizeof buf || (r < 0 && errno == EINTR));
}
#endif

static void patio__wake_close(patio__wake *w)
{
    if (w->wfd >= 0 && w->wfd != w->rfd) close(w->wfd);
    if (w->rfd >= 0) close(w->rfd);
    w->rfd = w->wfd = -1;
}

/* ---- poller: one small interface, three backends ---------------------- */

#define PATIO__READ 1u
#define PATIO__WRITE 2u
#define PATIO__ERROR 4u /* error or hang-up; always reported together with READ. As interest,
                          alone: the fd stays watched for errors and hang-ups only (a
                          connection that does not read for now still hears of a reset) */

/* A watched fd. The owner fills nothing by hand: patio__io_start does. */
typedef struct patio__io {
    int fd;
    unsigned events;    /* current interest: PATIO__READ | PATIO__WRITE | PATIO__ERROR */
    void (*fn)(struct patio__io *io, unsigned revents);
    int active;         /* between patio__io_start and patio__io_stop */
    size_t slot;        /* poll backend: index + 1 in its arrays, 0 = none */
} patio__io;

/* One readiness report, collected before any callback runs. */
typedef struct patio__ready {
    patio__io *io;      /* NULL once stopped by an earlier callback */
    unsigned revents;
} patio__ready;

/* Most readiness reports handled per wait; more are seen on the next one. */
#define PATIO__READY_MAX 256

/* Interface of every backend:
 *   patio__poller_open(p, h)          PATIO_OK or PATIO_ERR_IO
 *   patio__poller_close(p, h)
 *   patio__poller_fd(p)               pollable fd, or -1
 *   patio__poller_name()
 *   patio__poller_set(p, h, io, old, new)
 *                                     changes io's interest; new = 0 removes it,
 *                                     PATIO__ERROR alone keeps it for errors only
 *   patio__poller_wait(p, out, ms)    fills out[] (at most PATIO__READY_MAX);
 *                                     ms < 0 = forever; EINTR counts as 0 ready */

#if defined(PATIO_USE_EPOLL)

typedef struct patio__poller {
    int fd;
    struct epoll_event ev[PATIO__READY_MAX];
} patio__poller;

static const char *patio__poller_name(void) { return "epoll"; }

static int patio__poller_open(patio__poller *p, const patio_hooks *h)
{
    PATIO__UNUSED(h);
    p->fd = epoll_create1(EPOLL_CLOEXEC);
    return p->fd < 0 ? PATIO_ERR_IO : PATIO_OK;
}

static void patio__poller_close(patio__poller *p, const patio_hooks *h)
{
    PATIO__UNUSED(h);
    if (p->fd >= 0) close(p->fd);
    p->fd = -1;
}

static int patio__poller_fd(const patio__poller *p) { return p->fd; }

static uint32_t patio__epoll_mask(unsigned events)
{
    uint32_t m = 0;
    if (events & PATIO__READ) m |= (uint32_t)EPOLLIN;
    if (events & PATIO__WRITE) m |= (uint32_t)EPOLLOUT;
    return m;
}

static unsigned patio__epoll_revents(uint32_t e)
{
    unsigned r = 0;
    if (e & (uint32_t)EPOLLIN) r |= PATIO__READ;
    if (e & (uint32_t)EPOLLOUT) r |= PATIO__WRITE;
    if (e & ((uint32_t)EPOLLERR | (uint32_t)EPOLLHUP)) r |= PATIO__READ | PATIO__ERROR;
    return r;
}

/* Level-triggered, so a callback that reads only part of the input is
 * called again on the next wait. An fd without interest is removed: epoll
 * would otherwise keep reporting its hang-up. One watched for PATIO__ERROR
 * alone stays with an empty mask: epoll reports EPOLLERR and EPOLLHUP
 * whatever the mask. */
static int patio__poller_set(patio__poller *p, const patio_hooks *h, patio__io *io,
                             unsigned old_events, unsigned new_events)
{
    struct epoll_event e;
    int op;
    PATIO__UNUSED(h);
    if (old_events == new_events) return PATIO_OK;
    memset(&e, 0, sizeof e);
    e.events = patio__epoll_mask(new_events);
    e.data.ptr = io;
    op = !old_events ? EPOLL_CTL_ADD : !new_events ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    if (epoll_ctl(p->fd, op, io->fd, &e) == 0) return PATIO_OK;
    if (op == EPOLL_CTL_DEL) return PATIO_OK; /* fd already closed: the kernel dropped it */
    return errno == ENOMEM || errno == ENOSPC ? PATIO_ERR_NOMEM : PATIO_ERR_IO;
}

static int patio__poller_wait(patio__poller *p, patio__ready *out, int timeout_ms)
{
    int n, i;
    n = epoll_wait(p->fd, p->ev, PATIO__READY_MAX, timeout_ms);
    if (n < 0) return errno == EINTR ? 0 : PATIO_ERR_IO;
    for (i = 0; i < n; i++) {
        out[i].io = (patio__io *)p->ev[i].data.ptr;
        out[i].revents = patio__epoll_revents(p->ev[i].events);
    }
    return n;
}

#elif defined(PATIO_USE_KQUEUE)

typedef struct patio__poller {
    int fd;
    struct kevent ev[PATIO__READY_MAX];
} patio__poller;

static const char *patio__poller_name(void) { return "kqueue"; }

static int patio__poller_open(patio__poller *p, const patio_hooks *h)
{
    PATIO__UNUSED(h);
    p->fd = kqueue();
    if (p->fd < 0) return PATIO_ERR_IO;
    fcntl(p->fd, F_SETFD, FD_CLOEXEC);
    return PATIO_OK;
}

static void patio__poller_close(patio__poller *p, const patio_hooks *h)
{
    PATIO__UNUSED(h);
    if (p->fd >= 0) close(p->fd);
    p->fd = -1;
}

static int patio__poller_fd(const patio__poller *p) { return p->fd; }

/* NetBSD before 10 declares udata as intptr_t, the others as void *. */
static void patio__kevent_set(struct kevent *k, int fd, int filter, int flags, patio__io *io)
{
    memset(k, 0, sizeof *k);
    k->ident = (uintptr_t)fd;
    k->filter = (short)filter;
    k->flags = (unsigned short)flags;
#if defined(__NetBSD__)
    k->udata = (__typeof__(k->udata))(intptr_t)io;
#else
    k->udata = (void *)io;
#endif
}

static patio__io *patio__kevent_io(const struct kevent *k)
{
    return (patio__io *)(void *)(intptr_t)k->udata;
}

/* How the read filter watches an fd: 0 not at all, EV_ADD level-triggered
 * (READ), or EV_ADD | EV_CLEAR for PATIO__ERROR alone. kqueue has no filter
 * for errors only; the read filter reports them (EV_EOF with an error), and
 * edge-triggered, bytes left unread wake the loop once, not on every wait. */
static int patio__kqueue_read_flags(unsigned events)
{
    if (events & PATIO__READ) return EV_ADD;
    return events & PATIO__ERROR ? EV_ADD | EV_CLEAR : 0;
}

/* One filter per direction, added and deleted as interest changes (a
 * filter's EV_CLEAR is set when it is added, so a change of it re-adds). */
static int patio__poller_set(patio__poller *p, const patio_hooks *h, patio__io *io,
                             unsigned old_events, unsigned new_events)
{
    struct kevent ch[3];
    int n = 0, old_read = patio__kqueue_read_flags(old_events), new_read = patio__kqueue_read_flags(new_events);
    unsigned changed = old_events ^ new_events;
    PATIO__UNUSED(h);
    if (old_read != new_read) {
        if (old_read) patio__kevent_set(&ch[n++], io->fd, EVFILT_READ, EV_DELETE, io);
        if (new_read) patio__kevent_set(&ch[n++], io->fd, EVFILT_READ, new_read, io);
    }
    if (changed & PATIO__WRITE)
        patio__kevent_set(&ch[n++], io->fd, EVFILT_WRITE, new_events & PATIO__WRITE ? EV_ADD : EV_DELETE, io);
    if (n == 0) return PATIO_OK;
    if (kevent(p->fd, ch, n, NULL, 0, NULL) == 0) return PATIO_OK;
    if (!new_events) return PATIO_OK; /* fd already closed: the kernel dropped it */
    return errno == ENOMEM ? PATIO_ERR_NOMEM : PATIO_ERR_IO;
}

/* EV_EOF on the read filter is not an error: the pending bytes can still be
 * read and read() then returns 0. With an error number it is one. */
static unsigned patio__kevent_revents(const struct kevent *k)
{
    unsigned r = k->filter == EVFILT_WRITE ? PATIO__WRITE : PATIO__READ;
    if (k->flags & EV_ERROR) r |= PATIO__READ | PATIO__ERROR;
    if ((k->flags & EV_EOF) && (k->filter == EVFILT_WRITE || k->fflags != 0)) r |= PATIO__READ | PATIO__ERROR;
    return r;
}

static int patio__poller_wait(patio__poller *p, patio__ready *out, int timeout_ms)
{
    struct timespec ts, *tp = NULL;
    int n, i, got = 0;
    if (timeout_ms >= 0) {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
        tp = &ts;
    }
    n = kevent(p->fd, NULL, 0, p->ev, PATIO__READY_MAX, tp);
    if (n < 0) return errno == EINTR ? 0 : PATIO_ERR_IO;
    for (i = 0; i < n; i++) {
        patio__io *io = patio__kevent_io(&p->ev[i]);
        unsigned revents = patio__kevent_revents(&p->ev[i]);
        /* Read and write readiness arrive as two events, usually adjacent:
         * merge those so the callback runs once, as with epoll. */
        if (got > 0 && out[got - 1].io == io) {
            out[got - 1].revents |= revents;
            continue;
        }
        out[got].io = io;
        out[got].revents = revents;
        got++;
    }
    return got;
}

#else /* PATIO_USE_POLL */

/* pollfd array and the io of each entry, kept parallel; removal moves the
 * last entry into the hole so the arrays stay dense. */
typedef struct patio__poller {
    struct pollfd *fds;
    patio__io **ios;
    size_t n, cap;
    size_t start; /* where the next scan begins, so no fd starves */
} patio__poller;

static const char *patio__poller_name(void) { return "poll"; }

static int patio__poller_open(patio__poller *p, const patio_hooks *h)
{
    PATIO__UNUSED(h);
    memset(p, 0, sizeof *p);
    return PATIO_OK;
}

static void patio__poller_close(patio__poller *p, const patio_hooks *h)
{
    patio__free(h, p->fds);
    patio__free(h, p->ios);
    memset(p, 0, sizeof *p);
}

static int patio__poller_fd(const patio__poller *p)
{
    PATIO__UNUSED(p);
    return -1;
}

static short patio__poll_mask(unsigned events)
{
    return (short)((events & PATIO__READ ? POLLIN : 0) | (events & PATIO__WRITE ? POLLOUT : 0));
}

static int patio__poller_grow(patio__poller *p, const patio_hooks *h)
{
    size_t cap = p->cap ? p->cap * 2 : 16;
    struct pollfd *fds;
    patio__io **ios;
    fds = (struct pollfd *)patio__realloc(h, p->fds, cap * sizeof *fds);
    if (!fds) return PATIO_ERR_NOMEM;
    p->fds = fds;
    ios = (patio__io **)patio__realloc(h, p->ios, cap * sizeof *ios);
    if (!ios) return PATIO_ERR_NOMEM;
    p->ios = ios;
    p->cap = cap;
    return PATIO_OK;
}

static void patio__poller_remove(patio__poller *p, patio__io *io)
{
    size_t i = io->slot - 1, last = p->n - 1;
    if (i != last) {
        p->fds[i] = p->fds[last];
        p->ios[i] = p->ios[last];
        p->ios[i]->slot = i + 1;
    }
    p->n--;
    io->slot = 0;
    if (p->start >= p->n) p->start = 0;
}

/* An fd watched for PATIO__ERROR alone keeps its entry with no events: poll
 * reports POLLERR, POLLHUP and POLLNVAL whatever was asked. */
static int patio__poller_set(patio__poller *p, const patio_hooks *h, patio__io *io,
                             unsigned old_events, unsigned new_events)
{
    PATIO__UNUSED(old_events);
    if (!new_events) {
        if (io->slot) patio__poller_remove(p, io);
        return PATIO_OK;
    }
    if (!io->slot) {
        if (p->n == p->cap && patio__poller_grow(p, h) != PATIO_OK) return PATIO_ERR_NOMEM;
        p->ios[p->n] = io;
        p->fds[p->n].fd = io->fd;
        p->fds[p->n].revents = 0;
        io->slot = ++p->n;
    }
    p->fds[io->slot - 1].events = patio__poll_mask(new_events);
    return PATIO_OK;
}

static unsigned patio__poll_revents(short e)
{
    unsigned r = 0;
    if (e & POLLIN) r |= PATIO__READ;
    if (e & POLLOUT) r |= PATIO__WRITE;
    if (e & (POLLERR | POLLHUP | POLLNVAL)) r |= PATIO__READ | PATIO__ERROR;
    return r;
}

static int patio__poller_wait(patio__poller *p, patio__ready *out, int timeout_ms)
{
    size_t k, i, n = p->n;
    int got = 0, r;
    r = poll(p->fds, (nfds_t)n, timeout_ms);
    if (r < 0) return errno == EINTR ? 0 : PATIO_ERR_IO;
    if (r == 0) return 0;
    for (k = 0; k < n; k++) {
        i = (p->start + k) % n;
        if (!p->fds[i].revents) continue;
        out[got].io = p->ios[i];
        out[got].revents = patio__poll_revents(p->fds[i].revents);
        if (++got == PATIO__READY_MAX) {
            p->start = (i + 1) % n;
            break;
        }
    }
    return got;
}

#endif

/* ========================================================================
 * >>util  Utilities: BLAKE2s, base64, UTF-8, constant-time compare
 * ======================================================================== */

/* ---- BLAKE2s (RFC 7693) ---------------------------------------------------
 * Used for the handshake digest and proof (PROTOCOL.md §6) and for strict
 * registry names. Keyed, with salt and personalization, as Python's
 * hashlib.blake2s; sequential mode only (fanout 1, depth 1). */

typedef struct patio__blake2s_state {
    uint32_t h[8];      /* chain value */
    uint32_t t[2];      /* bytes compressed so far, 64-bit counter */
    uint8_t buf[64];    /* pending block: the last one must be flagged, so it waits */
    size_t buflen;
    size_t outlen;
} patio__blake2s_state;

static const uint32_t patio__blake2s_iv[8] = {
    0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
    0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u
};

/* Message word order of each of the ten rounds. */
static const uint8_t patio__blake2s_sigma[10][16] = {
    { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 },
    { 14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3 },
    { 11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4 },
    { 7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8 },
    { 9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13 },
    { 2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9 },
    { 12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11 },
    { 13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10 },
    { 6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5 },
    { 10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0 }
};

static uint32_t patio__load32_le(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static void patio__store32_le(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t patio__rotr32(uint32_t x, unsigned n)
{
    return (x >> n) | (x << (32 - n));
}

/* The mixing function G on four words of the work vector. */
static void patio__blake2s_g(uint32_t *v, int a, int b, int c, int d, uint32_t x, uint32_t y)
{
    v[a] = v[a] + v[b] + x;
    v[d] = patio__rotr32(v[d] ^ v[a], 16);
    v[c] = v[c] + v[d];
    v[b] = patio__rotr32(v[b] ^ v[c], 12);
    v[a] = v[a] + v[b] + y;
    v[d] = patio__rotr32(v[d] ^ v[a], 8);
    v[c] = v[c] + v[d];
    v[b] = patio__rotr32(v[b] ^ v[c], 7);
}

static void patio__blake2s_compress(patio__blake2s_state *s, const uint8_t *block, int last)
{
    uint32_t m[16], v[16];
    int i, r;
    for (i = 0; i < 16; i++) m[i] = patio__load32_le(block + 4 * i);
    for (i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = patio__blake2s_iv[i];
    }
    v[12] ^= s->t[0];
    v[13] ^= s->t[1];
    if (last) v[14] = ~v[14];
    for (r = 0; r < 10; r++) {
        const uint8_t *o = patio__blake2s_sigma[r];
        patio__blake2s_g(v, 0, 4, 8, 12, m[o[0]], m[o[1]]);
        patio__blake2s_g(v, 1, 5, 9, 13, m[o[2]], m[o[3]]);
        patio__blake2s_g(v, 2, 6, 10, 14, m[o[4]], m[o[5]]);
        patio__blake2s_g(v, 3, 7, 11, 15, m[o[6]], m[o[7]]);
        patio__blake2s_g(v, 0, 5, 10, 15, m[o[8]], m[o[9]]);
        patio__blake2s_g(v, 1, 6, 11, 12, m[o[10]], m[o[11]]);
        patio__blake2s_g(v, 2, 7, 8, 13, m[o[12]], m[o[13]]);
        patio__blake2s_g(v, 3, 4, 9, 14, m[o[14]], m[o[15]]);
    }
    for (i = 0; i < 8; i++) s->h[i] ^= v[i] ^ v[i + 8];
}

static void patio__blake2s_count(patio__blake2s_state *s, size_t n)
{
    s->t[0] += (uint32_t)n;
    if (s->t[0] < (uint32_t)n) s->t[1]++;
}

/* outlen 1..32, keylen 0..32; salt8/person8 are 8 bytes each or NULL (zeros). */
static void patio__blake2s_init(patio__blake2s_state *s, size_t outlen, const void *key, size_t keylen,
                                const uint8_t *salt8, const uint8_t *person8)
{
    int i;
    PATIO_ASSERT(outlen >= 1 && outlen <= 32 && keylen <= 32);
    for (i = 0; i < 8; i++) s->h[i] = patio__blake2s_iv[i];
    /* Parameter block word 0: digest length, key length, fanout 1, depth 1;
     * leaf length, node offset/depth and inner length are all zero. */
    s->h[0] ^= 0x01010000u ^ ((uint32_t)keylen << 8) ^ (uint32_t)outlen;
    if (salt8) {
        s->h[4] ^= patio__load32_le(salt8);
        s->h[5] ^= patio__load32_le(salt8 + 4);
    }
    if (person8) {
        s->h[6] ^= patio__load32_le(person8);
        s->h[7] ^= patio__load32_le(person8 + 4);
    }
    s->t[0] = s->t[1] = 0;
    s->buflen = 0;
    s->outlen = outlen;
    memset(s->buf, 0, sizeof s->buf);
    if (keylen > 0) {
        /* A key is hashed as a first block of its own, zero-padded. */
        memcpy(s->buf, key, keylen);
        s->buflen = sizeof s->buf;
    }
}

static void patio__blake2s_update(patio__blake2s_state *s, const void *data, size_t len)
{
    const uint8_t *p = (const uint8_t *)data;
    while (len > 0) {
        size_t take;
        if (s->buflen == sizeof s->buf) {
            patio__blake2s_count(s, sizeof s->buf);
            patio__blake2s_compress(s, s->buf, 0);
            s->buflen = 0;
        }
        /* Whole blocks straight from the input, keeping the last one back. */
        while (s->buflen == 0 && len > sizeof s->buf) {
            patio__blake2s_count(s, sizeof s->buf);
            patio__blake2s_compress(s, p, 0);
            p += sizeof s->buf;
            len -= sizeof s->buf;
        }
        take = sizeof s->buf - s->buflen;
        if (take > len) take = len;
        memcpy(s->buf + s->buflen, p, take);
        s->buflen += take;
        p += take;
        len -= take;
    }
}

static void patio__blake2s_final(patio__blake2s_state *s, uint8_t *out)
{
    uint8_t full[32];
    int i;
    patio__blake2s_count(s, s->buflen);
    memset(s->buf + s->buflen, 0, sizeof s->buf - s->buflen);
    patio__blake2s_compress(s, s->buf, 1);
    for (i = 0; i < 8; i++) patio__store32_le(full + 4 * i, s->h[i]);
    memcpy(out, full, s->outlen);
}

/* One-shot BLAKE2s; see patio__blake2s_init for the parameters. */
static void patio__blake2s(uint8_t *out, size_t outlen, const void *key, size_t keylen,
                           const uint8_t *salt8, const uint8_t *person8, const void *data, size_t len)
{
    patio__blake2s_state s;
    patio__blake2s_init(&s, outlen, key, keylen, salt8, person8);
    patio__blake2s_update(&s, data, len);
    patio__blake2s_final(&s, out);
}

/* ---- base64 (RFC 4648, standard alphabet) ------------------------------- */

/* Writes the base64 of in[0..n) and a NUL; out holds 4*((n+2)/3)+1 chars.
 * Without pad the trailing '=' are left out (as Python patio's names).
 * Returns the number of characters before the NUL. */
static size_t patio__base64(char *out, const uint8_t *in, size_t n, int pad)
{
    static const char digits[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i = 0, o = 0;
    uint32_t v;
    for (; n - i >= 3; i += 3) {
        v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i + 1] << 8) | in[i + 2];
        out[o++] = digits[(v >> 18) & 63];
        out[o++] = digits[(v >> 12) & 63];
        out[o++] = digits[(v >> 6) & 63];
        out[o++] = digits[v & 63];
    }
    if (n - i == 1) {
        v = (uint32_t)in[i] << 16;
        out[o++] = digits[(v >> 18) & 63];
        out[o++] = digits[(v >> 12) & 63];
        if (pad) { out[o++] = '='; out[o++] = '='; }
    } else if (n - i == 2) {
        v = ((uint32_t)in[i] << 16) | ((uint32_t)in[i + 1] << 8);
        out[o++] = digits[(v >> 18) & 63];
        out[o++] = digits[(v >> 12) & 63];
        out[o++] = digits[(v >> 6) & 63];
        if (pad) out[o++] = '=';
    }
    out[o] = '\0';
    return o;
}

/* ---- UTF-8 ---------------------------------------------------------------- */

/* 1 if p[0..n) is well-formed UTF-8 (Unicode table 3-7): no overlong forms,
 * no surrogates (U+D800..DFFF), nothing above U+10FFFF, no cut sequence. */
static int patio__utf8_valid(const uint8_t *p, size_t n)
{
    size_t i = 0;
    if (n >= 4 && n <= 8) { /* a short name, usually ASCII: two overlapping loads */
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + n - 4, 4);
        if (((a | b) & 0x80808080u) == 0) return 1;
    } else if (n < 4) {
        if (n == 0 || ((p[0] | p[n / 2] | p[n - 1]) & 0x80) == 0) return 1;
    }
    while (i < n) {
        uint8_t c, lo = 0x80, hi = 0xbf;
        size_t more, k;
        /* Strings are mostly ASCII: test eight bytes at a time. */
        if (n - i >= 8) {
            uint64_t word;
            memcpy(&word, p + i, 8);
            if ((word & UINT64_C(0x8080808080808080)) == 0) {
                i += 8;
                continue;
            }
        }
        c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) {
            more = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            more = 2;
            if (c == 0xe0) lo = 0xa0;      /* overlong below U+0800 */
            if (c == 0xed) hi = 0x9f;      /* surrogates */
        } else if (c >= 0xf0 && c <= 0xf4) {
            more = 3;
            if (c == 0xf0) lo = 0x90;      /* overlong below U+10000 */
            if (c == 0xf4) hi = 0x8f;      /* above U+10FFFF */
        } else {
            return 0;                      /* continuation byte, C0/C1, F5..FF */
        }
        if (n - i - 1 < more) return 0;
        if (p[i + 1] < lo || p[i + 1] > hi) return 0;
        for (k = 2; k <= more; k++)
            if ((p[i + k] & 0xc0) != 0x80) return 0;
        i += more + 1;
    }
    return 1;
}

/* 1 if equal. Looks at every byte whatever it finds, so the time does not
 * tell where a secret first differs. */
PATIO__MAYBE_UNUSED static int patio__consttime_equal(const void *a, const void *b, size_t n)
{
    const volatile uint8_t *x = (const volatile uint8_t *)a;
    const volatile uint8_t *y = (const volatile uint8_t *)b;
    uint8_t diff = 0;
    size_t i;
    for (i = 0; i < n; i++) diff = (uint8_t)(diff | (x[i] ^ y[i]));
    return diff == 0;
}

/* ========================================================================
 * >>msgpack  MessagePack writer, reader, validation, CallRequest, exception
 * ======================================================================== */

/* Big-endian stores and loads. Where the compiler says the CPU is
 * little-endian, each is one unaligned access and a byte swap; spelled
 * byte by byte, not every compiler merges them. */
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define PATIO__SWAP_BE 1
#endif

static void patio__put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static void patio__put_be32(uint8_t *p, uint32_t v)
{
#ifdef PATIO__SWAP_BE
    v = __builtin_bswap32(v);
    memcpy(p, &v, sizeof v);
#else
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
#endif
}

static void patio__put_be64(uint8_t *p, uint64_t v)
{
    patio__put_be32(p, (uint32_t)(v >> 32));
    patio__put_be32(p + 4, (uint32_t)v);
}

static uint32_t patio__get_be32(const uint8_t *p)
{
#ifdef PATIO__SWAP_BE
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return __builtin_bswap32(v);
#else
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
#endif
}

/* A big-endian unsigned field of 1, 2, 4 or 8 bytes (any size up to 8):
 * the fixed widths take the paths above, where a loop would stay a loop. */
static uint64_t patio__get_be(const uint8_t *p, size_t size)
{
    uint64_t v = 0;
    size_t i;
    switch (size) {
    case 1: return p[0];
    case 2: return (uint64_t)((unsigned)p[0] << 8 | p[1]);
    case 4: return patio__get_be32(p);
    case 8: return (uint64_t)patio__get_be32(p) << 32 | patio__get_be32(p + 4);
    default: break;
    }
    for (i = 0; i < size; i++) v = (v << 8) | p[i];
    return v;
}

/* Two's complement reading of a `size`-byte field, without relying on
 * implementation-defined conversions. */
static int64_t patio__to_signed(uint64_t x, size_t size)
{
    if (size == 8) return x <= (uint64_t)INT64_MAX ? (int64_t)x : -(int64_t)(~x) - 1;
    if (x >> (8 * size - 1)) return (int64_t)x - ((int64_t)1 << (8 * size));
    return (int64_t)x;
}

PATIO_API const char *patio_type_name(patio_type type)
{
    switch (type) {
    case PATIO_NIL: return "nil";
    case PATIO_BOOL: return "bool";
    case PATIO_INT: return "int";
    case PATIO_UINT: return "uint";
    case PATIO_FLOAT: return "float";
    case PATIO_STR: return "str";
    case PATIO_BIN: return "bin";
    case PATIO_ARRAY: return "array";
    case PATIO_MAP: return "map";
    case PATIO_EXT: return "ext";
    }
    return "unknown";
}

/* ---- writer --------------------------------------------------------------- */

static int patio__writer_fail(patio_writer *w, int err)
{
    if (!w->err) w->err = err;
    return w->err;
}

PATIO_API void patio_writer_init(patio_writer *w, const patio_hooks *hooks)
{
    memset(w, 0, sizeof *w);
    w->hooks = hooks;
}

PATIO_API void patio_writer_init_fixed(patio_writer *w, void *buf, size_t cap)
{
    memset(w, 0, sizeof *w);
    w->data = (uint8_t *)buf;
    w->cap = buf ? cap : 0;
    w->fixed = 1;
}

PATIO_API void patio_writer_reset(patio_writer *w)
{
    w->len = 0;
    w->err = 0;
}

/* A writer that starts in a small buffer of the caller's and moves to the
 * heap only when it outgrows it (fixed == 2): no allocation for small values. */
PATIO__MAYBE_UNUSED static void patio__writer_init_small(patio_writer *w, const patio_hooks *hooks, void *buf, size_t cap)
{
    memset(w, 0, sizeof *w);
    w->hooks = hooks;
    w->data = (uint8_t *)buf;
    w->cap = cap;
    w->fixed = 2;
}

/* Frees a writer's growable memory and leaves the writer as it is, for
 * an owner that sets it up again before any use. */
static PATIO__INLINE void patio__writer_drop(patio_writer *w)
{
    if (!w->fixed && w->data) patio__free(w->hooks, w->data);
}

PATIO_API void patio_writer_free(patio_writer *w)
{
    if (!w->fixed) patio__free(w->hooks, w->data);
    w->data = NULL;
    w->len = w->cap = 0;
    w->err = 0;
}

/* Grows a growable writer's buffer to hold at least `need` bytes, doubling
 * so that appending n bytes costs O(n) overall. */
static int patio__writer_grow(patio_writer *w, size_t need)
{
    size_t cap = w->cap ? w->cap : 128;
    uint8_t *p;
    if (w->fixed == 1) return patio__writer_fail(w, PATIO_ERR_OVERFLOW);
    while (cap < need) {
        if (cap > SIZE_MAX / 2) {
            cap = need;
            break;
        }
        cap *= 2;
    }
    if (w->max_len && cap > w->max_len) cap = w->max_len;
    if (w->fixed == 2) {
        /* leave the caller's small buffer for the heap */
        p = (uint8_t *)patio__malloc(w->hooks, cap);
        if (!p) return patio__writer_fail(w, PATIO_ERR_NOMEM);
        if (w->len) memcpy(p, w->data, w->len);
        w->fixed = 0;
    } else if (w->data) p = (uint8_t *)patio__realloc(w->hooks, w->data, cap);
    else p = (uint8_t *)patio__malloc(w->hooks, cap);
    if (!p) return patio__writer_fail(w, PATIO_ERR_NOMEM);
    w->data = p;
    w->cap = cap;
    return PATIO_OK;
}

PATIO_API int patio_writer_reserve(patio_writer *w, size_t extra)
{
    size_t need;
    if (w->err) return w->err;
    if (extra > SIZE_MAX - w->len) return patio__writer_fail(w, PATIO_ERR_OVERFLOW);
    need = w->len + extra;
    if (w->max_len && need > w->max_len) return patio__writer_fail(w, PATIO_ERR_OVERFLOW);
    if (need <= w->cap) return PATIO_OK;
    return patio__writer_grow(w, need);
}

/* memcpy for the short pieces messages are made of (a name, a few
 * arguments, a header): a library call costs more than the copy. Two
 * fixed-size copies that may overlap cover any length up to 16. */
static void patio__copy(void *dst, const void *src, size_t n)
{
    uint8_t *d = (uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    if (n > 16) {
        memcpy(d, s, n);
    } else if (n >= 8) {
        uint64_t a, b;
        memcpy(&a, s, 8);
        memcpy(&b, s + n - 8, 8);
        memcpy(d, &a, 8);
        memcpy(d + n - 8, &b, 8);
    } else if (n >= 4) {
        uint32_t a, b;
        memcpy(&a, s, 4);
        memcpy(&b, s + n - 4, 4);
        memcpy(d, &a, 4);
        memcpy(d + n - 4, &b, 4);
    } else if (n) {
        uint8_t a = s[0], b = s[n / 2], c = s[n - 1];
        d[0] = a;
        d[n / 2] = b;
        d[n - 1] = c;
    }
}

/* memcmp(a, b, n) == 0 for short names, by the same overlapping loads. */
static PATIO__INLINE int patio__same_bytes(const void *a, const void *b, size_t n)
{
    const uint8_t *x = (const uint8_t *)a, *y = (const uint8_t *)b;
    if (n > 8) return memcmp(x, y, n) == 0;
    if (n >= 4) {
        uint32_t x1, x2, y1, y2;
        memcpy(&x1, x, 4);
        memcpy(&x2, x + n - 4, 4);
        memcpy(&y1, y, 4);
        memcpy(&y2, y + n - 4, 4);
        return ((x1 ^ y1) | (x2 ^ y2)) == 0;
    }
    return n == 0 || (x[0] == y[0] && x[n / 2] == y[n / 2] && x[n - 1] == y[n - 1]);
}

/* Whether n more bytes fit as things are: no error, no growth, within
 * max_len (a user may lower max_len below len: then nothing fits). */
static int patio__writer_fits(const patio_writer *w, size_t n)
{
    return !w->err && n <= w->cap - w->len && (!w->max_len || (w->len <= w->max_len && n <= w->max_len - w->len));
}

/* Claims n (> 0) bytes at the end and returns where to store them, or NULL
 * once the writer has an error. The common case is a few compares and an add. */
static uint8_t *patio__writer_append(patio_writer *w, size_t n)
{
    uint8_t *p;
    if (!patio__writer_fits(w, n) && patio_writer_reserve(w, n) != PATIO_OK) return NULL;
    p = w->data + w->len;
    w->len += n;
    return p;
}

/* A type byte followed by a big-endian field of `size` bytes (0, 1, 2, 4, 8). */
static int patio__write_head(patio_writer *w, uint8_t tag, uint64_t field, size_t size)
{
    uint8_t *p = patio__writer_append(w, 1 + size);
    if (!p) return w->err;
    p[0] = tag;
    switch (size) {
    case 1: p[1] = (uint8_t)field; break;
    case 2: patio__put_be16(p + 1, (uint16_t)field); break;
    case 4: patio__put_be32(p + 1, (uint32_t)field); break;
    case 8: patio__put_be64(p + 1, field); break;
    default: break;
    }
    return PATIO_OK;
}

/* Smallest headers of a str / bin / ext of n bytes (n <= UINT32_MAX) into h;
 * each returns the header size. */
static size_t patio__str_head(uint8_t *h, size_t n)
{
    if (n < 32) { h[0] = (uint8_t)(0xa0 | n); return 1; }
    if (n <= 0xff) { h[0] = 0xd9; h[1] = (uint8_t)n; return 2; }
    if (n <= 0xffff) { h[0] = 0xda; patio__put_be16(h + 1, (uint16_t)n); return 3; }
    h[0] = 0xdb;
    patio__put_be32(h + 1, (uint32_t)n);
    return 5;
}

static size_t patio__bin_head(uint8_t *h, size_t n)
{
    if (n <= 0xff) { h[0] = 0xc4; h[1] = (uint8_t)n; return 2; }
    if (n <= 0xffff) { h[0] = 0xc5; patio__put_be16(h + 1, (uint16_t)n); return 3; }
    h[0] = 0xc6;
    patio__put_be32(h + 1, (uint32_t)n);
    return 5;
}

static size_t patio__ext_head(uint8_t *h, int8_t type, size_t n)
{
    uint8_t t = (uint8_t)type;
    switch (n) {
    case 1: h[0] = 0xd4; h[1] = t; return 2;
    case 2: h[0] = 0xd5; h[1] = t; return 2;
    case 4: h[0] = 0xd6; h[1] = t; return 2;
    case 8: h[0] = 0xd7; h[1] = t; return 2;
    case 16: h[0] = 0xd8; h[1] = t; return 2;
    default: break;
    }
    if (n <= 0xff) { h[0] = 0xc7; h[1] = (uint8_t)n; h[2] = t; return 3; }
    if (n <= 0xffff) { h[0] = 0xc8; patio__put_be16(h + 1, (uint16_t)n); h[3] = t; return 4; }
    h[0] = 0xc9;
    patio__put_be32(h + 1, (uint32_t)n);
    h[5] = t;
    return 6;
}

/* A header from one of the helpers above followed by n body bytes. */
static int patio__write_headed(patio_writer *w, const uint8_t *head, size_t head_len, const void *body, size_t n)
{
    uint8_t *p;
    if (n && !body) return patio__writer_fail(w, PATIO_ERR_INVALID);
    p = patio__writer_append(w, head_len + n);
    if (!p) return w->err;
    memcpy(p, head, head_len);
    if (n) memcpy(p + head_len, body, n);
    return PATIO_OK;
}

PATIO_API int patio_write_nil(patio_writer *w)
{
    return patio__write_head(w, 0xc0, 0, 0);
}

PATIO_API int patio_write_bool(patio_writer *w, int b)
{
    return patio__write_head(w, b ? 0xc3 : 0xc2, 0, 0);
}

PATIO_API int patio_write_uint(patio_writer *w, uint64_t v)
{
    if (v < 0x80 && patio__writer_fits(w, 1)) { /* the most common value of all: one byte, in place */
        w->data[w->len++] = (uint8_t)v;
        return PATIO_OK;
    }
    if (v < 0x80) return patio__write_head(w, (uint8_t)v, 0, 0);
    if (v <= 0xff) return patio__write_head(w, 0xcc, v, 1);
    if (v <= 0xffff) return patio__write_head(w, 0xcd, v, 2);
    if (v <= 0xffffffffu) return patio__write_head(w, 0xce, v, 4);
    return patio__write_head(w, 0xcf, v, 8);
}

PATIO_API int patio_write_int(patio_writer *w, int64_t v)
{
    /* Non-negative values use the unsigned forms, as Python's msgpack does. */
    if (v >= 0) return patio_write_uint(w, (uint64_t)v);
    if (v >= -32) return patio__write_head(w, (uint8_t)(0x100 + v), 0, 0);
    if (v >= INT8_MIN) return patio__write_head(w, 0xd0, (uint64_t)v, 1);
    if (v >= INT16_MIN) return patio__write_head(w, 0xd1, (uint64_t)v, 2);
    if (v >= INT32_MIN) return patio__write_head(w, 0xd2, (uint64_t)v, 4);
    return patio__write_head(w, 0xd3, (uint64_t)v, 8);
}

PATIO_API int patio_write_double(patio_writer *w, double v)
{
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    return patio__write_head(w, 0xcb, bits, 8);
}

PATIO_API int patio_write_float(patio_writer *w, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return patio__write_head(w, 0xca, bits, 4);
}

PATIO_API int patio_write_strn(patio_writer *w, const char *s, size_t n)
{
    uint8_t head[5];
    if (w->err) return w->err;
    if ((uint64_t)n > UINT32_MAX) return patio__writer_fail(w, PATIO_ERR_OVERFLOW);
    return patio__write_headed(w, head, patio__str_head(head, n), s, n);
}

PATIO_API int patio_write_str(patio_writer *w, const char *s)
{
    if (!s) return patio_write_nil(w);
    return patio_write_strn(w, s, strlen(s));
}

PATIO_API int patio_write_bin(patio_writer *w, const void *p, size_t n)
{
    uint8_t head[5];
    if (w->err) return w->err;
    if ((uint64_t)n > UINT32_MAX) return patio__writer_fail(w, PATIO_ERR_OVERFLOW);
    return patio__write_headed(w, head, patio__bin_head(head, n), p, n);
}

PATIO_API int patio_write_array(patio_writer *w, uint32_t count)
{
    if (count < 16) return patio__write_head(w, (uint8_t)(0x90 | count), 0, 0);
    if (count <= 0xffff) return patio__write_head(w, 0xdc, count, 2);
    return patio__write_head(w, 0xdd, count, 4);
}

PATIO_API int patio_write_map(patio_writer *w, uint32_t count)
{
    if (count < 16) return patio__write_head(w, (uint8_t)(0x80 | count), 0, 0);
    if (count <= 0xffff) return patio__write_head(w, 0xde, count, 2);
    return patio__write_head(w, 0xdf, count, 4);
}

PATIO_API int patio_write_ext(patio_writer *w, int8_t type, const void *body, size_t n)
{
    uint8_t head[6];
    if (w->err) return w->err;
    if ((uint64_t)n > UINT32_MAX) return patio__writer_fail(w, PATIO_ERR_OVERFLOW);
    return patio__write_headed(w, head, patio__ext_head(head, type, n), body, n);
}

PATIO_API size_t patio_write_ext_begin(patio_writer *w)
{
    return w->len;
}

PATIO_API int patio_write_ext_end(patio_writer *w, int8_t type, size_t mark)
{
    uint8_t head[6];
    size_t body, head_len;
    if (w->err) return w->err;
    if (mark > w->len) return patio__writer_fail(w, PATIO_ERR_INVALID);
    body = w->len - mark;
    if ((uint64_t)body > UINT32_MAX) return patio__writer_fail(w, PATIO_ERR_OVERFLOW);
    head_len = patio__ext_head(head, type, body);
    if (!patio__writer_append(w, head_len)) return w->err;
    /* The body size is known only now: slide it up to make room. */
    memmove(w->data + mark + head_len, w->data + mark, body);
    memcpy(w->data + mark, head, head_len);
    return PATIO_OK;
}

PATIO_API int patio_write_raw(patio_writer *w, const void *p, size_t n)
{
    uint8_t *dst;
    if (w->err || n == 0) return w->err;
    if (!p) return patio__writer_fail(w, PATIO_ERR_INVALID);
    dst = patio__writer_append(w, n);
    if (!dst) return w->err;
    patio__copy(dst, p, n);
    return PATIO_OK;
}

/* ---- pack / unpack formats ------------------------------------------------ */

/* For the bracket at open[0] ('[' or '{'): counts the values directly
 * inside (a nested group counts as one) and checks that the matching closer
 * is of the same kind. Returns the position after the closer, or NULL. */
static const char *patio__fmt_group(const char *open, uint32_t *count)
{
    char closer = *open == '[' ? ']' : '}';
    uint32_t n = 0;
    int depth = 0;
    const char *p;
    for (p = open + 1; *p; p++) {
        char c = *p;
        if (c == ' ') continue;
        if (c == '[' || c == '{') {
            if (depth++ == 0) n++;
        } else if (c == ']' || c == '}') {
            if (depth == 0) {
                if (c != closer) return NULL;
                *count = n;
                return p + 1;
            }
            depth--;
        } else if (depth == 0) {
            n++;
        }
    }
    return NULL;
}

/* 1 if fmt uses only `scalars`, spaces and brackets, every bracket pairs
 * with one of its kind, and every map holds whole key/value pairs. Checked
 * before anything is written or read, so a bad format has no effect. */
static int patio__fmt_valid(const char *fmt, const char *scalars)
{
    int depth = 0;
    const char *p;
    for (p = fmt; *p; p++) {
        char c = *p;
        if (c == ' ') continue;
        if (c == '[' || c == '{') {
            uint32_t n;
            if (!patio__fmt_group(p, &n)) return 0;
            if (c == '{' && (n & 1u)) return 0;
            depth++;
        } else if (c == ']' || c == '}') {
            if (depth-- == 0) return 0;
        } else {
            const char *k = scalars; /* a short set: cheaper than a strchr call */
            while (*k && *k != c) k++;
            if (!*k) return 0;
        }
    }
    return depth == 0;
}

/* Writes the value of one format character, taking its arguments. */
static int patio__pack_one(patio_writer *w, const char *f, va_list *ap)
{
    uint32_t n = 0;
    switch (*f) {
    case '[':
        patio__fmt_group(f, &n);
        return patio_write_array(w, n);
    case '{':
        patio__fmt_group(f, &n);
        return patio_write_map(w, n / 2);
    case 'n': return patio_write_nil(w);
    case 'b': return patio_write_bool(w, va_arg(*ap, int));
    case 'i': return patio_write_int(w, (int64_t)va_arg(*ap, int));
    case 'I': return patio_write_int(w, va_arg(*ap, int64_t));
    case 'u': return patio_write_uint(w, (uint64_t)va_arg(*ap, unsigned));
    case 'U': return patio_write_uint(w, va_arg(*ap, uint64_t));
    case 'd': return patio_write_double(w, va_arg(*ap, double));
    case 's': return patio_write_str(w, va_arg(*ap, const char *));
    case 'S': {
        const char *s = va_arg(*ap, const char *);
        size_t len = va_arg(*ap, size_t);
        return patio_write_strn(w, s, len);
    }
    case 'y': {
        const void *p = va_arg(*ap, const void *);
        size_t len = va_arg(*ap, size_t);
        return patio_write_bin(w, p, len);
    }
    case 'v': {
        const void *p = va_arg(*ap, const void *);
        size_t len = va_arg(*ap, size_t);
        if (!p || patio_msgpack_check_all(p, len, 0) != PATIO_OK)
            return patio__writer_fail(w, PATIO_ERR_INVALID);
        return patio_write_raw(w, p, len);
    }
    default: /* spaces and closing brackets: nothing to write */
        return w->err;
    }
}

/* Packs n ints from ap into a writer with room for 5 bytes each: fixints
 * are stored in place. */
static PATIO__INLINE void patio__put_ints(patio_writer *w, size_t n, va_list *ap)
{
    uint8_t *d = w->data + w->len; /* a local cursor: byte stores could alias w */
    size_t k;
    for (k = 0; k < n; k++) {
        int v = va_arg(*ap, int);
        if (v >= -32 && v < 0x80) {
            *d++ = (uint8_t)v;
        } else { /* at most 5 bytes: within the room */
            w->len = (size_t)(d - w->data);
            patio_write_int(w, v);
            d = w->data + w->len;
        }
    }
    w->len = (size_t)(d - w->data);
}

/* Packs a format without brackets in one pass, checking as it goes (the
 * common case: a call's arguments); 0 if the format needs the checked
 * path, with nothing written and no error set, so that a bad format is
 * reported as such even after a write failed. Fixints (-32 to 127), the
 * most common arguments of all, take one byte, stored in place. */
static PATIO__INLINE int patio__pack_flat(patio_writer *w, const char *fmt, va_list *ap, uint32_t *count)
{
    size_t start = w->len;
    const char *f;
    uint32_t n = 0;
    for (f = fmt; *f; f++) {
        switch (*f) {
        case 'i': { /* a run of ints, with room for all made once: fixints are stored in place */
            size_t run = 1, k;
            while (f[run] == 'i') run++;
            f += run - 1;
            n += (uint32_t)run;
            if (!patio__writer_fits(w, run * 5)) {
                for (k = 0; k < run; k++) patio_write_int(w, va_arg(*ap, int)); /* after an error: nothing */
                break;
            }
            patio__put_ints(w, run, ap);
            break;
        }
        case 'n': case 'b': case 'I': case 'u': case 'U': case 'd': case 's': case 'S': case 'y': case 'v':
            n++;
            if (!w->err) patio__pack_one(w, f, ap);
            break;
        case ' ':
            break;
        default:
            w->len = start;
            w->err = 0;
            return 0;
        }
    }
    if (count) *count = n;
    return 1;
}

PATIO_API int patio_packv(patio_writer *w, const char *fmt, va_list ap)
{
    va_list args;
    const char *f;
    int done;
    if (w->err) return w->err;
    if (!fmt) return patio__writer_fail(w, PATIO_ERR_INVALID);
    /* A copy that can be passed by address: va_list may be an array type. */
    va_copy(args, ap);
    done = patio__pack_flat(w, fmt, &args, NULL);
    va_end(args);
    if (done) return w->err;
    if (!patio__fmt_valid(fmt, "nbiIuUdsSyv")) return patio__writer_fail(w, PATIO_ERR_INVALID);
    va_copy(args, ap);
    for (f = fmt; *f && !w->err; f++) patio__pack_one(w, f, &args);
    va_end(args);
    return w->err;
}

/* How many values a format packs at its top level (a bracket is one). */
PATIO__MAYBE_UNUSED static uint32_t patio__fmt_count(const char *fmt)
{
    uint32_t n = 0;
    int depth = 0;
    for (; *fmt; fmt++) {
        char c = *fmt;
        if (c == ' ') continue;
        if (c == '[' || c == '{') { if (depth++ == 0) n++; }
        else if (c == ']' || c == '}') depth--;
        else if (depth == 0) n++;
    }
    return n;
}

/* An array of the values a format packs: a call's positional arguments.
 * A flat format of up to 15 values (nearly every call) is packed once,
 * behind a one-byte header filled in afterwards, without counting first. */
PATIO__MAYBE_UNUSED static int patio__pack_array(patio_writer *w, const char *fmt, va_list ap)
{
    size_t start = w->len;
    uint32_t n;
    int flat;
    va_list args;
    if (w->err) return w->err;
    for (n = 0; fmt[n] == 'i'; n++) {}
    if (!fmt[n] && n < 16 && patio__writer_fits(w, 1 + 5 * (size_t)n)) {
        /* only ints, as in mul(1, 2, 3): no format walk */
        w->data[w->len++] = (uint8_t)(0x90 | n);
        va_copy(args, ap);
        patio__put_ints(w, n, &args);
        va_end(args);
        return PATIO_OK;
    }
    if (patio__writer_fits(w, 1)) {
        w->len++;
        va_copy(args, ap);
        flat = patio__pack_flat(w, fmt, &args, &n);
        va_end(args);
        if (flat && n < 16) {
            w->data[start] = (uint8_t)(0x90 | n);
            return w->err;
        }
        w->len = start;
        w->err = 0;
    }
    patio_write_array(w, patio__fmt_count(fmt));
    return patio_packv(w, fmt, ap);
}

PATIO_API int patio_pack(patio_writer *w, const char *fmt, ...)
{
    va_list ap;
    int rc;
    va_start(ap, fmt);
    rc = patio_packv(w, fmt, ap);
    va_end(ap);
    return rc;
}

/* ---- reader --------------------------------------------------------------- */

static const uint8_t patio__no_bytes[1] = { 0 };

PATIO_API void patio_reader_init(patio_reader *r, const void *data, size_t len)
{
    if (!data) {
        data = patio__no_bytes;
        len = 0;
    }
    r->pos = (const uint8_t *)data;
    r->end = r->pos + len;
    r->err = 0;
    r->max_depth = 0;
}

PATIO_API size_t patio_reader_remaining(const patio_reader *r)
{
    return (size_t)(r->end - r->pos);
}

static int patio__reader_fail(patio_reader *r)
{
    if (!r->err) r->err = PATIO_ERR_DECODE;
    return r->err;
}

static int patio__depth_limit(int max_depth)
{
    return max_depth > 0 ? max_depth : PATIO_MAX_DEPTH;
}

/* Moves past a big-endian field of `size` bytes into *field, if present. */
static int patio__take_field(const uint8_t **p, size_t *avail, size_t size, uint64_t *field)
{
    if (*avail < size) return 0;
    *field = patio__get_be(*p, size);
    *p += size;
    *avail -= size;
    return 1;
}

static int patio__parse_str(const uint8_t *p, size_t avail, uint64_t len, patio_value *v, const uint8_t **next)
{
    if (len > avail || !patio__utf8_valid(p, (size_t)len)) return PATIO_ERR_DECODE;
    v->type = PATIO_STR;
    v->v.str.ptr = (const char *)p;
    v->v.str.len = (uint32_t)len;
    *next = p + len;
    return PATIO_OK;
}

/* p is at the ext type byte, len is the body size. */
static int patio__parse_ext(const uint8_t *p, size_t avail, uint64_t len, patio_value *v, const uint8_t **next)
{
    if (avail < 1 || len > avail - 1) return PATIO_ERR_DECODE;
    v->type = PATIO_EXT;
    v->v.ext.type = (int8_t)patio__to_signed(p[0], 1);
    v->v.ext.ptr = p + 1;
    v->v.ext.len = (uint32_t)len;
    *next = p + 1 + len;
    return PATIO_OK;
}

static void patio__set_int(patio_value *v, int64_t i)
{
    v->type = PATIO_INT;
    v->v.i = i;
}

/* Decodes the item at p (end: first byte after the input) into v and sets
 * *next past its header and, except for arrays and maps, its body. Every
 * length is compared with what remains before anything is read.
 * PATIO_OK or PATIO_ERR_DECODE; never touches a reader. */
static int patio__parse(const uint8_t *p, const uint8_t *end, patio_value *v, const uint8_t **next)
{
    size_t avail = (size_t)(end - p);
    uint64_t x = 0;
    uint8_t b;
    if (avail == 0) return PATIO_ERR_DECODE;
    b = *p++;
    avail--;
    /* The one-byte forms first: they are most of the traffic. */
    if (b <= 0x7f) {
        patio__set_int(v, b);
    } else if (b >= 0xe0) {
        patio__set_int(v, (int64_t)b - 0x100);
    } else if (b <= 0x8f) {
        v->type = PATIO_MAP;
        v->v.count = b & 0x0fu;
    } else if (b <= 0x9f) {
        v->type = PATIO_ARRAY;
        v->v.count = b & 0x0fu;
    } else if (b <= 0xbf) {
        return patio__parse_str(p, avail, b & 0x1fu, v, next);
    } else {
        switch (b) {
        case 0xc0:
            v->type = PATIO_NIL;
            break;
        case 0xc2: case 0xc3:
            v->type = PATIO_BOOL;
            v->v.boolean = b & 1;
            break;
        case 0xc4: case 0xc5: case 0xc6:
            if (!patio__take_field(&p, &avail, (size_t)1 << (b - 0xc4), &x) || x > avail)
                return PATIO_ERR_DECODE;
            v->type = PATIO_BIN;
            v->v.bin.ptr = p;
            v->v.bin.len = (uint32_t)x;
            p += x;
            break;
        case 0xc7: case 0xc8: case 0xc9:
            if (!patio__take_field(&p, &avail, (size_t)1 << (b - 0xc7), &x)) return PATIO_ERR_DECODE;
            return patio__parse_ext(p, avail, x, v, next);
        case 0xca: {
            float f;
            uint32_t bits;
            if (!patio__take_field(&p, &avail, 4, &x)) return PATIO_ERR_DECODE;
            bits = (uint32_t)x;
            memcpy(&f, &bits, sizeof f);
            v->type = PATIO_FLOAT;
            v->v.f = f;
            break;
        }
        case 0xcb:
            if (!patio__take_field(&p, &avail, 8, &x)) return PATIO_ERR_DECODE;
            v->type = PATIO_FLOAT;
            memcpy(&v->v.f, &x, sizeof v->v.f);
            break;
        case 0xcc: case 0xcd: case 0xce: case 0xcf:
            if (!patio__take_field(&p, &avail, (size_t)1 << (b - 0xcc), &x)) return PATIO_ERR_DECODE;
            if (x > (uint64_t)INT64_MAX) {
                v->type = PATIO_UINT;
                v->v.u = x;
            } else {
                patio__set_int(v, (int64_t)x);
            }
            break;
        case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
            size_t size = (size_t)1 << (b - 0xd0);
            if (!patio__take_field(&p, &avail, size, &x)) return PATIO_ERR_DECODE;
            patio__set_int(v, patio__to_signed(x, size));
            break;
        }
        case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:
            return patio__parse_ext(p, avail, (uint64_t)1 << (b - 0xd4), v, next);
        case 0xd9: case 0xda: case 0xdb:
            if (!patio__take_field(&p, &avail, (size_t)1 << (b - 0xd9), &x)) return PATIO_ERR_DECODE;
            return patio__parse_str(p, avail, x, v, next);
        case 0xdc: case 0xdd:
            if (!patio__take_field(&p, &avail, b == 0xdc ? 2 : 4, &x)) return PATIO_ERR_DECODE;
            v->type = PATIO_ARRAY;
            v->v.count = (uint32_t)x;
            break;
        case 0xde: case 0xdf:
            if (!patio__take_field(&p, &avail, b == 0xde ? 2 : 4, &x)) return PATIO_ERR_DECODE;
            v->type = PATIO_MAP;
            v->v.count = (uint32_t)x;
            break;
        default: /* 0xc1 is reserved: never valid */
            return PATIO_ERR_DECODE;
        }
    }
    *next = p;
    return PATIO_OK;
}

/* Decodes the next item without consuming it; *next is where it ends. */
static int patio__reader_look(patio_reader *r, patio_value *v, const uint8_t **next)
{
    if (r->err) return r->err;
    if (patio__parse(r->pos, r->end, v, next) != PATIO_OK) return patio__reader_fail(r);
    return PATIO_OK;
}

PATIO_API int patio_peek(patio_reader *r, patio_value *out)
{
    patio_value v;
    const uint8_t *next;
    int rc = patio__reader_look(r, &v, &next);
    if (rc == PATIO_OK && out) *out = v;
    return rc;
}

PATIO_API int patio_read(patio_reader *r, patio_value *out)
{
    patio_value v;
    const uint8_t *next;
    int rc = patio__reader_look(r, &v, &next);
    if (rc != PATIO_OK) return rc;
    if (out) *out = v;
    r->pos = next;
    return PATIO_OK;
}

/* Skips one object; depth_left is how many more container levels may open. */
static int patio__skip(patio_reader *r, int depth_left)
{
    patio_value v;
    uint64_t items;
    if (patio_read(r, &v) != PATIO_OK) return r->err;
    if (v.type == PATIO_ARRAY) items = v.v.count;
    else if (v.type == PATIO_MAP) items = 2 * (uint64_t)v.v.count;
    else return PATIO_OK;
    if (depth_left <= 0) return patio__reader_fail(r);
    /* Every item takes at least one byte, so a huge count on a short
     * input ends at the truncation, not after 2^32 rounds. */
    while (items--)
        if (patio__skip(r, depth_left - 1) != PATIO_OK) return r->err;
    return PATIO_OK;
}

PATIO_API int patio_read_skip(patio_reader *r)
{
    return patio__skip(r, patio__depth_limit(r->max_depth));
}

PATIO_API int patio_read_raw(patio_reader *r, const void **ptr, size_t *len)
{
    const uint8_t *start = r->pos;
    int rc = patio_read_skip(r);
    if (rc != PATIO_OK) return rc;
    if (ptr) *ptr = start;
    if (len) *len = (size_t)(r->pos - start);
    return PATIO_OK;
}

/* Typed reads: look first, consume only what matches. */
PATIO_API int patio_read_nil(patio_reader *r)
{
    patio_value v;
    const uint8_t *next;
    int rc = patio__reader_look(r, &v, &next);
    if (rc != PATIO_OK) return rc;
    if (v.type != PATIO_NIL) return PATIO_ERR_TYPE;
    r->pos = next;
    return PATIO_OK;
}

PATIO_API int patio_read_bool(patio_reader *r, int *out)
{
    patio_value v;
    const uint8_t *next;
    int rc = patio__reader_look(r, &v, &next);
    if (rc != PATIO_OK) return rc;
    if (v.type != PATIO_BOOL) return PATIO_ERR_TYPE;
    if (out) *out = v.v.boolean;
    r->pos = next;
    return PATIO_OK;
}

/* The first byte of the next item, or -1 at the end or after an error:
 * the typed reads decide the one-byte forms (most of the traffic) from it
 * without the general parse. */
static int patio__reader_byte(const patio_reader *r)
{
    return r->err || r->pos >= r->end ? -1 : *r->pos;
}

PATIO_API int patio_read_int(patio_reader *r, int64_t *out)
{
    patio_value v;
    const uint8_t *next;
    int b = patio__reader_byte(r), rc;
    if (b >= 0 && (b <= 0x7f || b >= 0xe0)) { /* fixint */
        if (out) *out = b <= 0x7f ? b : b - 0x100;
        r->pos++;
        return PATIO_OK;
    }
    rc = patio__reader_look(r, &v, &next);
    if (rc != PATIO_OK) return rc;
    if (v.type == PATIO_UINT) return PATIO_ERR_OVERFLOW;
    if (v.type != PATIO_INT) return PATIO_ERR_TYPE;
    if (out) *out = v.v.i;
    r->pos = next;
    return PATIO_OK;
}

PATIO_API int patio_read_uint(patio_reader *r, uint64_t *out)
{
    patio_value v;
    const uint8_t *next;
    uint64_t u;
    int rc = patio__reader_look(r, &v, &next);
    if (rc != PATIO_OK) return rc;
    if (v.type == PATIO_UINT) u = v.v.u;
    else if (v.type == PATIO_INT && v.v.i >= 0) u = (uint64_t)v.v.i;
    else return PATIO_ERR_TYPE;
    if (out) *out = u;
    r->pos = next;
    return PATIO_OK;
}

PATIO_API int patio_read_double(patio_reader *r, double *out)
{
    patio_value v;
    const uint8_t *next;
    double d;
    int rc = patio__reader_look(r, &v, &next);
    if (rc != PATIO_OK) return rc;
    if (v.type == PATIO_FLOAT) d = v.v.f;
    else if (v.type == PATIO_INT) d = (double)v.v.i;
    else if (v.type == PATIO_UINT) d = (double)v.v.u;
    else return PATIO_ERR_TYPE;
    if (out) *out = d;
    r->pos = next;
    return PATIO_OK;
}

PATIO_API int patio_read_str(patio_reader *r, const char **ptr, size_t *len)
{
    patio_value v;
    const uint8_t *next;
    int rc = patio__reader_look(r, &v, &next);
    if (rc != PATIO_OK) return rc;
    if (v.type != PATIO_STR) return PATIO_ERR_TYPE;
    if (ptr) *ptr = v.v.str.ptr;
    if (len) *len = v.v.str.len;
    r->pos = next;
    return PATIO_OK;
}

PATIO_API int patio_read_bin(patio_reader *r, const void **ptr, size_t *len)
{
    patio_value v;
    const uint8_t *next;
    int rc = patio__reader_look(r, &v, &next);
    if (rc != PATIO_OK) return rc;
    if (v.type != PATIO_BIN) return PATIO_ERR_TYPE;
    if (ptr) *ptr = v.v.bin.ptr;
    if (len) *len = v.v.bin.len;
    r->pos = next;
    return PATIO_OK;
}

static int patio__read_container(patio_reader *r, patio_type type, uint32_t *count)
{
    patio_value v;
    const uint8_t *next;
    int b = patio__reader_byte(r), rc;
    if (b >= 0 && (b & 0xf0) == (type == PATIO_ARRAY ? 0x90 : 0x80)) { /* fixarray, fixmap */
        if (count) *count = (uint32_t)(b & 0x0f);
        r->pos++;
        return PATIO_OK;
    }
    rc = patio__reader_look(r, &v, &next);
    if (rc != PATIO_OK) return rc;
    if (v.type != type) return PATIO_ERR_TYPE;
    if (count) *count = v.v.count;
    r->pos = next;
    return PATIO_OK;
}

PATIO_API int patio_read_array(patio_reader *r, uint32_t *count)
{
    return patio__read_container(r, PATIO_ARRAY, count);
}

PATIO_API int patio_read_map(patio_reader *r, uint32_t *count)
{
    return patio__read_container(r, PATIO_MAP, count);
}

/* Reads the value of one format character into its argument(s). */
static int patio__unpack_one(patio_reader *r, const char *f, va_list *ap)
{
    uint32_t want = 0, got = 0;
    int rc;
    switch (*f) {
    case '[':
    case '{':
        patio__fmt_group(f, &want);
        if (*f == '[') rc = patio_read_array(r, &got);
        else { want /= 2; rc = patio_read_map(r, &got); }
        if (rc != PATIO_OK) return rc;
        return got == want ? PATIO_OK : PATIO_ERR_TYPE;
    case 'n': return patio_read_nil(r);
    case 'b': return patio_read_bool(r, va_arg(*ap, int *));
    case 'i': {
        int *out = va_arg(*ap, int *);
        int64_t x;
        if ((rc = patio_read_int(r, &x)) != PATIO_OK) return rc;
        if (x < INT_MIN || x > INT_MAX) return PATIO_ERR_OVERFLOW;
        if (out) *out = (int)x;
        return PATIO_OK;
    }
    case 'I': return patio_read_int(r, va_arg(*ap, int64_t *));
    case 'u': {
        unsigned *out = va_arg(*ap, unsigned *);
        uint64_t x;
        if ((rc = patio_read_uint(r, &x)) != PATIO_OK) return rc;
        if (x > UINT_MAX) return PATIO_ERR_OVERFLOW;
        if (out) *out = (unsigned)x;
        return PATIO_OK;
    }
    case 'U': return patio_read_uint(r, va_arg(*ap, uint64_t *));
    case 'd': return patio_read_double(r, va_arg(*ap, double *));
    case 's': {
        const char **s = va_arg(*ap, const char **);
        size_t *len = va_arg(*ap, size_t *);
        return patio_read_str(r, s, len);
    }
    case 'y': {
        const void **p = va_arg(*ap, const void **);
        size_t *len = va_arg(*ap, size_t *);
        return patio_read_bin(r, p, len);
    }
    case 'v': {
        const void **p = va_arg(*ap, const void **);
        size_t *len = va_arg(*ap, size_t *);
        return patio_read_raw(r, p, len);
    }
    case '*': return patio_read_skip(r);
    default: /* spaces and closing brackets */
        return PATIO_OK;
    }
}

PATIO_API int patio_unpackv(patio_reader *r, const char *fmt, va_list ap)
{
    va_list args;
    const uint8_t *start = r->pos;
    const char *f;
    int rc = PATIO_OK;
    if (r->err) return r->err;
    if (!fmt || !patio__fmt_valid(fmt, "nbiIuUdsyv*")) return PATIO_ERR_INVALID;
    va_copy(args, ap);
    for (f = fmt; *f && rc == PATIO_OK; f++) rc = patio__unpack_one(r, f, &args);
    va_end(args);
    /* All or nothing, unless the input itself is broken. */
    if (rc != PATIO_OK && !r->err) r->pos = start;
    return rc;
}

PATIO_API int patio_unpack(patio_reader *r, const char *fmt, ...)
{
    va_list ap;
    int rc;
    va_start(ap, fmt);
    rc = patio_unpackv(r, fmt, ap);
    va_end(ap);
    return rc;
}

/* ---- validation of untrusted input (PROTOCOL.md §7.1) -------------------- */

/* CallRequest (ext 1 over [func, args, kwargs, timeout]), decoded in place:
 * func, args and kwargs point into the input. */
typedef struct patio__call_request {
    const char *func;
    size_t func_len;
    const uint8_t *args;     /* the whole args array object */
    size_t args_len;
    uint32_t argc;
    const uint8_t *kwargs;   /* the whole kwargs map object */
    size_t kwargs_len;
    uint32_t kwargc;
    int has_timeout;         /* 0: nil, no limit */
    double timeout;          /* seconds */
} patio__call_request;

static int patio__check_value(patio_reader *r, int depth_left);
static int patio__parse_call_body(const uint8_t *p, size_t len, int depth_left, int check,
                                  patio__call_request *out);
static int patio__parse_exception_body(const uint8_t *p, size_t len, int depth_left, const char **type,
                                       size_t *type_len, const char **msg, size_t *msg_len);

/* A map whose keys must not be containers (str_keys: must be str). The
 * header is already read; depth_left is the level of its keys and values. */
static int patio__check_map_items(patio_reader *r, uint32_t pairs, int depth_left, int str_keys)
{
    patio_value key;
    uint32_t i;
    for (i = 0; i < pairs; i++) {
        if (patio_peek(r, &key) != PATIO_OK) return r->err;
        if (key.type == PATIO_ARRAY || key.type == PATIO_MAP || (str_keys && key.type != PATIO_STR))
            return patio__reader_fail(r);
        if (patio__check_value(r, depth_left) != PATIO_OK) return r->err;
        if (patio__check_value(r, depth_left) != PATIO_OK) return r->err;
    }
    return PATIO_OK;
}

/* Ext 1 and 2 bodies are checked where they appear; any other type is
 * refused (the -1 timestamp included). The body takes the ext's place, so
 * its array counts as the container at this level. */
static int patio__check_ext(patio_reader *r, const patio_value *v, int depth_left)
{
    patio__call_request call;
    const char *t, *m;
    size_t tl, ml;
    int rc;
    if (v->v.ext.type == 1)
        rc = patio__parse_call_body(v->v.ext.ptr, v->v.ext.len, depth_left, 1, &call);
    else if (v->v.ext.type == 2)
        rc = patio__parse_exception_body(v->v.ext.ptr, v->v.ext.len, depth_left, &t, &tl, &m, &ml);
    else
        rc = PATIO_ERR_DECODE;
    return rc == PATIO_OK ? PATIO_OK : patio__reader_fail(r);
}

/* 1 for an object of one byte with nothing in it to check (nil, bool, a
 * fixint): most arguments are. */
static int patio__is_tiny(uint8_t b)
{
    return b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3;
}

/* Steps over the next object if it is a tiny one; 1 if it did. */
static int patio__skip_tiny(patio_reader *r)
{
    int b = patio__reader_byte(r);
    if (b < 0 || !patio__is_tiny((uint8_t)b)) return 0;
    r->pos++;
    return 1;
}

/* Checks one complete object; depth_left is how many container levels may
 * still open (recursion is bounded by it). */
static int patio__check_value(patio_reader *r, int depth_left)
{
    patio_value v;
    uint32_t i;
    if (patio__skip_tiny(r)) return PATIO_OK;
    if (patio_read(r, &v) != PATIO_OK) return r->err;
    switch (v.type) {
    case PATIO_ARRAY:
        if (depth_left <= 0) return patio__reader_fail(r);
        for (i = 0; i < v.v.count; i++)
            if (patio__check_value(r, depth_left - 1) != PATIO_OK) return r->err;
        return PATIO_OK;
    case PATIO_MAP:
        if (depth_left <= 0) return patio__reader_fail(r);
        return patio__check_map_items(r, v.v.count, depth_left - 1, 0);
    case PATIO_EXT:
        return patio__check_ext(r, &v, depth_left);
    default:
        return PATIO_OK;
    }
}

/* Checks one complete object at the reader and returns its bytes. */
static int patio__check_raw(patio_reader *r, int depth_left, const uint8_t **ptr, size_t *len)
{
    const uint8_t *start = r->pos;
    if (patio__check_value(r, depth_left) != PATIO_OK) return r->err;
    *ptr = start;
    *len = (size_t)(r->pos - start);
    return PATIO_OK;
}

/* Steps over `count` complete objects without checking them: each is
 * walked header by header (no recursion), within the reader's bounds. */
static int patio__skip_values(patio_reader *r, uint64_t count)
{
    patio_value v;
    while (count) {
        count--;
        if (patio__skip_tiny(r)) continue;
        if (patio_read(r, &v) != PATIO_OK) return r->err;
        if (v.type == PATIO_ARRAY) count += v.v.count;
        else if (v.type == PATIO_MAP) count += 2 * (uint64_t)v.v.count;
    }
    return PATIO_OK;
}

/* Finds the bytes of one object (checked with `check`, else only walked). */
static int patio__take_raw(patio_reader *r, int depth_left, int check, const uint8_t **ptr, size_t *len)
{
    const uint8_t *start = r->pos;
    if (check) return patio__check_raw(r, depth_left, ptr, len);
    if (patio__skip_values(r, 1) != PATIO_OK) return r->err;
    *ptr = start;
    *len = (size_t)(r->pos - start);
    return PATIO_OK;
}

/* The usual CallRequest read byte by byte: a fixstr name, a fixarray of
 * one-byte values (nil, bool, fixint), no kwargs, and a nil or float64
 * timeout, filling every field of out as patio__parse_call_body would. 0
 * for any other shape, which the general path then reads (and judges). */
static int patio__call_body_fast(const uint8_t *p, size_t len, patio__call_request *out)
{
    const uint8_t *end = p + len, *q = p + 2;
    size_t n, i;
    if (len < 6 || p[0] != 0x94 || (p[1] & 0xe0) != 0xa0) return 0;
    n = p[1] & 0x1fu;
    if ((size_t)(end - q) < n + 3 || !patio__utf8_valid(q, n)) return 0;
    out->func = (const char *)q;
    out->func_len = n;
    q += n;
    if ((*q & 0xf0) != 0x90) return 0;
    n = *q & 0x0fu;
    if ((size_t)(end - q) < n + 3) return 0;
    for (i = 1; i <= n; i++)
        if (!patio__is_tiny(q[i])) return 0;
    out->args = q;
    out->args_len = n + 1;
    out->argc = (uint32_t)n;
    q += n + 1;
    if (*q != 0x80) return 0;
    out->kwargs = q++;
    out->kwargs_len = 1;
    out->kwargc = 0;
    out->has_timeout = 0;
    out->timeout = 0;
    if (*q == 0xc0) return end - q == 1;
    if (*q == 0xcb && end - q == 9) {
        uint64_t bits = patio__get_be(q + 1, 8);
        memcpy(&out->timeout, &bits, sizeof out->timeout);
        out->has_timeout = 1;
        return 1;
    }
    return 0;
}

/* A CallRequest body: exactly one [func: str, args: array, kwargs: map with
 * str keys, timeout: nil | int | float], nothing after it. With check = 0
 * (bytes this process's own parent wrote) args and kwargs are only walked
 * to find their ends, not checked value by value; everything from a peer
 * is checked. */
static int patio__parse_call_body(const uint8_t *p, size_t len, int depth_left, int check,
                                  patio__call_request *out)
{
    patio_reader r;
    patio_value v;
    uint32_t n;
    if (depth_left >= 2 && patio__call_body_fast(p, len, out)) return PATIO_OK;
    memset(out, 0, sizeof *out);
    patio_reader_init(&r, p, len);
    if (depth_left <= 0) return PATIO_ERR_DECODE;
    if (patio_read_array(&r, &n) != PATIO_OK || n != 4) return PATIO_ERR_DECODE;
    if (patio_read_str(&r, &out->func, &out->func_len) != PATIO_OK) return PATIO_ERR_DECODE;

    if (patio_peek(&r, &v) != PATIO_OK || v.type != PATIO_ARRAY) return PATIO_ERR_DECODE;
    out->argc = v.v.count;
    if (patio__take_raw(&r, depth_left - 1, check, &out->args, &out->args_len) != PATIO_OK) return PATIO_ERR_DECODE;

    out->kwargs = r.pos;
    if (patio_read_map(&r, &out->kwargc) != PATIO_OK || depth_left - 1 <= 0) return PATIO_ERR_DECODE;
    if (check ? patio__check_map_items(&r, out->kwargc, depth_left - 2, 1)
              : patio__skip_values(&r, 2 * (uint64_t)out->kwargc)) return PATIO_ERR_DECODE;
    out->kwargs_len = (size_t)(r.pos - out->kwargs);

    if (patio_read(&r, &v) != PATIO_OK) return PATIO_ERR_DECODE;
    switch (v.type) {
    case PATIO_NIL: out->has_timeout = 0; break;
    case PATIO_INT: out->has_timeout = 1; out->timeout = (double)v.v.i; break;
    case PATIO_UINT: out->has_timeout = 1; out->timeout = (double)v.v.u; break;
    case PATIO_FLOAT: out->has_timeout = 1; out->timeout = v.v.f; break;
    default: return PATIO_ERR_DECODE;   /* bool or anything else */
    }
    return r.pos == r.end ? PATIO_OK : PATIO_ERR_DECODE;
}

/* An exception body: exactly one [type: str, message: str]. */
static int patio__parse_exception_body(const uint8_t *p, size_t len, int depth_left, const char **type,
                                       size_t *type_len, const char **msg, size_t *msg_len)
{
    patio_reader r;
    uint32_t n;
    patio_reader_init(&r, p, len);
    if (depth_left <= 0) return PATIO_ERR_DECODE;
    if (patio_read_array(&r, &n) != PATIO_OK || n != 2) return PATIO_ERR_DECODE;
    if (patio_read_str(&r, type, type_len) != PATIO_OK) return PATIO_ERR_DECODE;
    if (patio_read_str(&r, msg, msg_len) != PATIO_OK) return PATIO_ERR_DECODE;
    return r.pos == r.end ? PATIO_OK : PATIO_ERR_DECODE;
}

PATIO_API int patio_msgpack_check(const void *data, size_t len, int max_depth, size_t *used)
{
    patio_reader r;
    if (used) *used = 0;
    if (!data && len) return PATIO_ERR_INVALID;
    patio_reader_init(&r, data, len);
    if (patio__check_value(&r, patio__depth_limit(max_depth)) != PATIO_OK) return PATIO_ERR_DECODE;
    if (used) *used = len - patio_reader_remaining(&r);
    return PATIO_OK;
}

PATIO_API int patio_msgpack_check_all(const void *data, size_t len, int max_depth)
{
    size_t used;
    int rc = patio_msgpack_check(data, len, max_depth, &used);
    if (rc != PATIO_OK) return rc;
    return used == len ? PATIO_OK : PATIO_ERR_DECODE;
}

/* ---- CallRequest and exception on the wire (PROTOCOL.md §7.2, §7.3) ------ */

/* A CallRequest's last field: float 64 seconds, or nil for none. */
PATIO__MAYBE_UNUSED static void patio__put_timeout(uint8_t *p, int has_timeout, double timeout)
{
    if (has_timeout) {
        uint64_t bits;
        memcpy(&bits, &timeout, sizeof bits);
        *p++ = 0xcb;
        patio__put_be64(p, bits);
    } else {
        *p = 0xc0;
    }
}

/* Writes ext 1 over [func, args, kwargs, timeout]. args/kwargs are encoded
 * array/map objects (NULL or empty: [] and {}); the timeout goes out as
 * float64, or nil without one. The body size is computed first, so the
 * smallest ext header is written directly, without moving bytes. `room`
 * bytes are left in front for the caller (a frame header); *start gets
 * where they begin. */
PATIO__MAYBE_UNUSED static int patio__write_call_request_at(patio_writer *w, size_t room, uint8_t **start, const char *func,
                                        size_t func_len, const void *args, size_t args_len, const void *kwargs,
                                        size_t kwargs_len, int has_timeout, double timeout)
{
    static const uint8_t empty_array = 0x90, empty_map = 0x80;
    uint8_t head[6], func_head[5], *p;
    size_t head_len, func_head_len;
    uint64_t body;
    if (w->err) return w->err;
    if (!args || !args_len) { args = &empty_array; args_len = 1; }
    if (!kwargs || !kwargs_len) { kwargs = &empty_map; kwargs_len = 1; }
    if (func_len && !func) return patio__writer_fail(w, PATIO_ERR_INVALID);
    body = 2 + (uint64_t)func_len + args_len + kwargs_len + (has_timeout ? 9 : 1);
    if (func_len < 32 && args_len < 128 && kwargs_len < 64 && body != 8 && body != 16) {
        /* nearly every call: a fixstr name and an ext 8 head (body < 256;
         * bodies of 8 and 16 bytes take the fixext forms) */
        size_t small = (size_t)body;
        if (!(p = patio__writer_append(w, room + 3 + small))) return w->err;
        if (start) *start = p;
        p += room;
        p[0] = 0xc7;
        p[1] = (uint8_t)small;
        p[2] = 1;
        p[3] = 0x94;
        p[4] = (uint8_t)(0xa0 | func_len);
        p += 5;
        patio__copy(p, func, func_len);
        p += func_len;
        patio__copy(p, args, args_len);
        p += args_len;
        if (kwargs_len == 1) *p++ = *(const uint8_t *)kwargs;
        else { patio__copy(p, kwargs, kwargs_len); p += kwargs_len; }
        patio__put_timeout(p, has_timeout, timeout);
        return PATIO_OK;
    }
    if ((uint64_t)func_len > UINT32_MAX || (uint64_t)args_len > UINT32_MAX || (uint64_t)kwargs_len > UINT32_MAX)
        return patio__writer_fail(w, PATIO_ERR_OVERFLOW);
    func_head_len = patio__str_head(func_head, func_len);
    body = 1 + (uint64_t)func_head_len + func_len + args_len + kwargs_len + (has_timeout ? 9 : 1);
    if (body > UINT32_MAX) return patio__writer_fail(w, PATIO_ERR_OVERFLOW);
    head_len = patio__ext_head(head, 1, (size_t)body);
    if (!(p = patio__writer_append(w, room + head_len + (size_t)body))) return w->err;
    if (start) *start = p;
    p += room;
    patio__copy(p, head, head_len);
    p += head_len;
    *p++ = 0x94;
    patio__copy(p, func_head, func_head_len);
    p += func_head_len;
    patio__copy(p, func, func_len);
    p += func_len;
    patio__copy(p, args, args_len);
    p += args_len;
    patio__copy(p, kwargs, kwargs_len);
    p += kwargs_len;
    patio__put_timeout(p, has_timeout, timeout);
    return PATIO_OK;
}

/* The request alone. */
PATIO__MAYBE_UNUSED static int patio__write_call_request(patio_writer *w, const char *func, size_t func_len,
                                                         const void *args, size_t args_len, const void *kwargs,
                                                         size_t kwargs_len, int has_timeout, double timeout)
{
    return patio__write_call_request_at(w, 0, NULL, func, func_len, args, args_len, kwargs, kwargs_len, has_timeout,
                                        timeout);
}

/* Decodes a REQUEST payload: exactly one ext-1 object, validated as
 * patio_msgpack_check does. PATIO_OK or PATIO_ERR_DECODE. */
PATIO__MAYBE_UNUSED static int patio__decode_call_request(const uint8_t *p, size_t len, int max_depth, int check,
                                                          patio__call_request *out)
{
    patio_reader r;
    patio_value v;
    if (len >= 3 && p[0] == 0xc7 && p[1] == len - 3 && p[2] == 1) /* ext 8, the usual header */
        return patio__parse_call_body(p + 3, len - 3, patio__depth_limit(max_depth), check, out);
    memset(out, 0, sizeof *out);
    patio_reader_init(&r, p, len);
    if (patio_read(&r, &v) != PATIO_OK || v.type != PATIO_EXT || v.v.ext.type != 1 || r.pos != r.end)
        return PATIO_ERR_DECODE;
    return patio__parse_call_body(v.v.ext.ptr, v.v.ext.len, patio__depth_limit(max_depth), check, out);
}

/* Writes ext 2 over [type, message]. */
static int patio__write_exception(patio_writer *w, const char *type, size_t type_len, const char *msg,
                                  size_t msg_len)
{
    uint8_t head[6], type_head[5], msg_head[5], *p;
    size_t head_len, type_head_len, msg_head_len;
    uint64_t body;
    if (w->err) return w->err;
    if ((type_len && !type) || (msg_len && !msg)) return patio__writer_fail(w, PATIO_ERR_INVALID);
    if ((uint64_t)type_len > UINT32_MAX || (uint64_t)msg_len > UINT32_MAX)
        return patio__writer_fail(w, PATIO_ERR_OVERFLOW);
    type_head_len = patio__str_head(type_head, type_len);
    msg_head_len = patio__str_head(msg_head, msg_len);
    body = 1 + (uint64_t)type_head_len + type_len + msg_head_len + msg_len;
    if (body > UINT32_MAX) return patio__writer_fail(w, PATIO_ERR_OVERFLOW);
    head_len = patio__ext_head(head, 2, (size_t)body);
    if (!(p = patio__writer_append(w, head_len + (size_t)body))) return w->err;
    memcpy(p, head, head_len);
    p += head_len;
    *p++ = 0x92;
    memcpy(p, type_head, type_head_len);
    p += type_head_len;
    if (type_len) memcpy(p, type, type_len);
    p += type_len;
    memcpy(p, msg_head, msg_head_len);
    p += msg_head_len;
    if (msg_len) memcpy(p, msg, msg_len);
    return PATIO_OK;
}

/* Decodes an ERROR payload: exactly one ext-2 object, nothing after it.
 * The strings point into p. PATIO_OK or PATIO_ERR_DECODE. */
static int patio__decode_exception(const uint8_t *p, size_t len, const char **type, size_t *type_len,
                                   const char **msg, size_t *msg_len)
{
    patio_reader r;
    patio_value v;
    patio_reader_init(&r, p, len);
    if (patio_read(&r, &v) != PATIO_OK || v.type != PATIO_EXT || v.v.ext.type != 2 || r.pos != r.end)
        return PATIO_ERR_DECODE;
    return patio__parse_exception_body(v.v.ext.ptr, v.v.ext.len, PATIO_MAX_DEPTH, type, type_len, msg,
                                       msg_len);
}
/* ========================================================================
 * >>frame  Wire framing (PROTOCOL.md §2-§3): 9-byte header + payload
 * ======================================================================== */

#define PATIO__FRAME_HEADER 9u

enum {
    PATIO__PKT_AUTH_DIGEST = 0,
    PATIO__PKT_AUTH_REQUEST = 1,
    PATIO__PKT_AUTH_OK = 3,
    PATIO__PKT_DISCOVER_REQUEST = 5,
    PATIO__PKT_DISCOVER_RESPONSE = 6,
    PATIO__PKT_REQUEST = 10,
    PATIO__PKT_RESPONSE = 20,
    PATIO__PKT_ERROR = 30
};

typedef struct patio__frame {
    int type;              /* signed: a byte >= 0x80 is negative, hence unknown */
    uint32_t size;         /* payload length */
    uint32_t serial;
    const uint8_t *payload;
} patio__frame;

PATIO__MAYBE_UNUSED static void patio__frame_header_put(uint8_t *out, int type, uint32_t size, uint32_t serial)
{
    out[0] = (uint8_t)(int8_t)type;
    patio__put_be32(out + 1, size);
    patio__put_be32(out + 5, serial);
}

/* Appends a whole frame whose payload is at hand. PATIO_ERR_OVERFLOW,
 * with nothing written, for a payload above max_payload. */
PATIO__MAYBE_UNUSED static int patio__frame_put(patio_writer *w, int type, uint32_t serial, const void *payload,
                                                size_t len, uint32_t max_payload)
{
    uint8_t *p;
    if (w->err) return w->err;
    if (len > max_payload) return PATIO_ERR_OVERFLOW;
    if (!(p = patio__writer_append(w, PATIO__FRAME_HEADER + len))) return w->err;
    patio__frame_header_put(p, type, (uint32_t)len, serial);
    patio__copy(p + PATIO__FRAME_HEADER, payload, len);
    return PATIO_OK;
}

/* Starts a frame in w: reserves the header; write the payload, then end. */
PATIO__MAYBE_UNUSED static size_t patio__frame_begin(patio_writer *w)
{
    static const uint8_t zero[PATIO__FRAME_HEADER] = { 0 };
    size_t mark = w->len;
    patio_write_raw(w, zero, sizeof zero);
    return mark;
}

/* Fills in the header of the frame begun at mark. A payload above
 * max_payload is taken back out and PATIO_ERR_OVERFLOW returned, so the
 * writer holds only whole frames. */
PATIO__MAYBE_UNUSED static int patio__frame_end(patio_writer *w, size_t mark, int type, uint32_t serial,
                                                uint32_t max_payload)
{
    size_t payload;
    if (w->err) return w->err;
    payload = w->len - mark - PATIO__FRAME_HEADER;
    if (payload > max_payload || payload > UINT32_MAX) {
        w->len = mark;
        return PATIO_ERR_OVERFLOW;
    }
    patio__frame_header_put(w->data + mark, type, (uint32_t)payload, serial);
    return PATIO_OK;
}

/* Parses one frame at the start of buf. Returns 1 with *f filled when a
 * whole frame is there, 0 when more bytes are needed, PATIO_ERR_PROTOCOL if
 * the header announces more than max_size (checked before anything is
 * buffered for it). */
PATIO__MAYBE_UNUSED static int patio__frame_parse(const uint8_t *buf, size_t len, uint32_t max_size, patio__frame *f)
{
    uint32_t size;
    if (len < PATIO__FRAME_HEADER) return 0;
    size = (uint32_t)patio__get_be(buf + 1, 4);
    if (size > max_size) return PATIO_ERR_PROTOCOL;
    if (len - PATIO__FRAME_HEADER < size) return 0;
    f->type = (int)(int8_t)buf[0];
    f->size = size;
    f->serial = (uint32_t)patio__get_be(buf + 5, 4);
    f->payload = buf + PATIO__FRAME_HEADER;
    return 1;
}

/* ========================================================================
 * >>registry  Registry: names -> functions, registration order kept
 * ======================================================================== */

typedef struct patio__entry {
    char *name;
    size_t name_len;
    uint32_t hash;
    patio_fn fn;
    void *user;
} patio__entry;

/* A bounded cache of freed call objects. Calls come and go in bursts;
 * keeping their memory avoids malloc and page-fault churn per call. It
 * lives in the registry because calls already rely on the registry's hooks
 * outliving them. */
#define PATIO__CALL_CACHE_MAX 2048

typedef struct patio__obj_cache {
    PATIO__PAD(pad_before);
    pthread_mutex_t mu;
    void *head;            /* freed objects, linked through their first word */
    size_t count;
    PATIO__PAD(pad_after);
} patio__obj_cache;

struct patio_registry {
    patio_hooks hooks;
    patio__obj_cache call_cache;
    char *project;
    int strict;
    int auto_naming;
    int locked;
    patio__entry *entries;  /* registration order */
    size_t count, cap;
    uint32_t *slots;        /* open addressing: entry index + 1, 0 = empty */
    size_t nslots;          /* power of two, > 2 * count */
};

/* An object of `size` bytes whose first `zeroed` bytes are zero, from the
 * cache when it has one (the rest is left as it was: buffers need no
 * zeroing). Objects start on a cache line: see patio__calloc_lines. */
static void *patio__cache_take(patio__obj_cache *cache, const patio_hooks *h, size_t size, size_t zeroed)
{
    void *obj;
    pthread_mutex_lock(&cache->mu);
    obj = cache->head;
    if (obj) { cache->head = *(void **)obj; cache->count--; }
    pthread_mutex_unlock(&cache->mu);
    if (!obj) return patio__calloc_lines(h, size);
    memset(obj, 0, zeroed);
    return obj;
}

static void patio__cache_give(patio__obj_cache *cache, const patio_hooks *h, void *obj)
{
    pthread_mutex_lock(&cache->mu);
    if (cache->count < PATIO__CALL_CACHE_MAX) {
        *(void **)obj = cache->head;
        cache->head = obj;
        cache->count++;
        obj = NULL;
    }
    pthread_mutex_unlock(&cache->mu);
    patio__free_lines(h, obj);
}

/* FNV-1a: names are short and this runs once per call. */
static uint32_t patio__hash_name(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < n; i++) { h ^= (uint8_t)s[i]; h *= 16777619u; }
    return h;
}

static const patio__entry *patio__registry_find(const patio_registry *r, const char *name, size_t len)
{
    uint32_t h;
    size_t i, mask;
    if (!r->nslots) return NULL;
    h = patio__hash_name(name, len);
    mask = r->nslots - 1;
    for (i = h & mask;; i = (i + 1) & mask) {
        uint32_t slot = r->slots[i];
        const patio__entry *e;
        if (!slot) return NULL;
        e = &r->entries[slot - 1];
        if (e->hash == h && e->name_len == len && memcmp(e->name, name, len) == 0) return e;
    }
}

/* patio__registry_find through a one-entry cache, for callers that look
 * the same name up call after call. Only a locked registry's entries are
 * cached: they can no longer move or go away. */
static const patio__entry *patio__registry_find_cached(const patio_registry *r, const patio__entry **last,
                                                       const char *name, size_t len)
{
    const patio__entry *e = __atomic_load_n(last, __ATOMIC_ACQUIRE);
    if (e && e->name_len == len && patio__same_bytes(e->name, name, len)) return e;
    e = patio__registry_find(r, name, len);
    if (e && patio__load(&r->locked)) __atomic_store_n(last, e, __ATOMIC_RELEASE);
    return e;
}

static void patio__registry_index(patio_registry *r)
{
    size_t i, mask = r->nslots - 1;
    memset(r->slots, 0, r->nslots * sizeof *r->slots);
    for (i = 0; i < r->count; i++) {
        size_t j = r->entries[i].hash & mask;
        while (r->slots[j]) j = (j + 1) & mask;
        r->slots[j] = (uint32_t)(i + 1);
    }
}

static int patio__registry_grow(patio_registry *r)
{
    if (r->count + 1 > r->cap) {
        size_t ncap = r->cap ? r->cap * 2 : 8;
        patio__entry *ne = (patio__entry *)patio__realloc(&r->hooks, r->entries, ncap * sizeof *ne);
        if (!ne) return PATIO_ERR_NOMEM;
        r->entries = ne;
        r->cap = ncap;
    }
    if ((r->count + 1) * 2 >= r->nslots) {
        size_t nn = r->nslots ? r->nslots * 2 : 16;
        uint32_t *ns = (uint32_t *)patio__malloc(&r->hooks, nn * sizeof *ns);
        if (!ns) return PATIO_ERR_NOMEM;
        patio__free(&r->hooks, r->slots);
        r->slots = ns;
        r->nslots = nn;
        patio__registry_index(r);
    }
    return PATIO_OK;
}

PATIO_API patio_registry *patio_registry_new(const patio_registry_config *cfg)
{
    patio_registry_config def;
    patio_registry *r;
    const patio_hooks *h;
    if (!cfg) { memset(&def, 0, sizeof def); cfg = &def; }
    h = cfg->hooks;
    if (!patio__hooks_valid(h)) return NULL;
    r = (patio_registry *)patio__calloc(h, sizeof *r);
    if (!r) return NULL;
    if (h) r->hooks = *h;
    patio__mutex_init_hot(&r->call_cache.mu);
    r->strict = cfg->strict != 0;
    r->auto_naming = !cfg->no_auto_naming;
    if (cfg->project) {
        r->project = patio__strdup(&r->hooks, cfg->project);
        if (!r->project) { patio__free(&r->hooks, r); return NULL; }
    }
    return r;
}

PATIO_API void patio_registry_free(patio_registry *r)
{
    size_t i;
    patio_hooks h;
    if (!r) return;
    h = r->hooks;
    while (r->call_cache.head) {
        void *obj = r->call_cache.head;
        r->call_cache.head = *(void **)obj;
        patio__free_lines(&h, obj);
    }
    pthread_mutex_destroy(&r->call_cache.mu);
    for (i = 0; i < r->count; i++) patio__free(&h, r->entries[i].name);
    patio__free(&h, r->entries);
    patio__free(&h, r->slots);
    patio__free(&h, r->project);
    patio__free(&h, r);
}

static int patio__registry_writable(patio_registry *r, const char *what)
{
    if (!r->locked) return PATIO_OK;
    patio__log(&r->hooks, PATIO_LOG_ERROR, "registry: cannot %s: the registry is locked", what);
    return PATIO_ERR_LOCKED;
}

PATIO_API int patio_register(patio_registry *r, const char *name, patio_fn fn, void *user)
{
    patio__entry *e;
    size_t len;
    int rc;
    if (!r || !name || !fn) return PATIO_ERR_INVALID;
    if ((rc = patio__registry_writable(r, "register")) != PATIO_OK) return rc;
    len = strlen(name);
    if (len == 0 || len > UINT32_MAX) return PATIO_ERR_INVALID;
    if (patio__registry_find(r, name, len)) {
        patio__log(&r->hooks, PATIO_LOG_ERROR, "registry: '%s' is already registered", name);
        return PATIO_ERR_EXISTS;
    }
    if ((rc = patio__registry_grow(r)) != PATIO_OK) return rc;
    e = &r->entries[r->count];
    e->name = patio__strndup(&r->hooks, name, len);
    if (!e->name) return PATIO_ERR_NOMEM;
    e->name_len = len;
    e->hash = patio__hash_name(name, len);
    e->fn = fn;
    e->user = user;
    r->count++;
    patio__registry_index(r);
    return PATIO_OK;
}

/* Python patio strips '=' padding from the base64 of a 32-byte BLAKE2s digest. */
#define PATIO__STRICT_HASH_CHARS 43

PATIO_API int patio_registry_make_name(const patio_registry *r, const char *fn_name,
                                       const char *signature, char *out, size_t cap)
{
    char hash[PATIO__STRICT_HASH_CHARS + 2];
    size_t need;
    if (!r || !fn_name || !*fn_name || !out) return PATIO_ERR_INVALID;
    if (!r->auto_naming) {
        patio__log(&r->hooks, PATIO_LOG_ERROR, "registry: auto-naming is disabled, a name is required");
        return PATIO_ERR_INVALID;
    }
    hash[0] = '\0';
    if (r->strict) {
        uint8_t digest[32];
        if (!signature) {
            patio__log(&r->hooks, PATIO_LOG_ERROR, "registry: strict mode needs a signature for '%s'", fn_name);
            return PATIO_ERR_INVALID;
        }
        patio__blake2s(digest, 32, NULL, 0, NULL, NULL, signature, strlen(signature));
        patio__base64(hash, digest, sizeof digest, 0);
    }
    need = (r->project ? strlen(r->project) + 1 : 0) + strlen(fn_name)
         + (r->strict ? strlen(hash) + 1 : 0) + 1;
    if (need > cap) return PATIO_ERR_OVERFLOW;
    snprintf(out, cap, "%s%s%s%s%s", r->project ? r->project : "", r->project ? "." : "",
             fn_name, r->strict ? "." : "", hash);
    return PATIO_OK;
}

PATIO_API int patio_register_auto(patio_registry *r, const char *fn_name, patio_fn fn,
                                  void *user, const char *signature)
{
    char stack[256];
    char *name = stack;
    size_t cap;
    int rc;
    if (!r || !fn_name || !fn) return PATIO_ERR_INVALID;
    cap = strlen(fn_name) + (r->project ? strlen(r->project) : 0) + PATIO__STRICT_HASH_CHARS + 4;
    if (cap > sizeof stack) {
        name = (char *)patio__malloc(&r->hooks, cap);
        if (!name) return PATIO_ERR_NOMEM;
    }
    rc = patio_registry_make_name(r, fn_name, signature, name, cap);
    if (rc == PATIO_OK) rc = patio_register(r, name, fn, user);
    if (name != stack) patio__free(&r->hooks, name);
    return rc;
}

PATIO_API int patio_unregister(patio_registry *r, const char *name)
{
    const patio__entry *e;
    size_t idx;
    int rc;
    if (!r || !name) return PATIO_ERR_INVALID;
    if ((rc = patio__registry_writable(r, "unregister")) != PATIO_OK) return rc;
    e = patio__registry_find(r, name, strlen(name));
    if (!e) return PATIO_ERR_NOT_FOUND;
    idx = (size_t)(e - r->entries);
    patio__free(&r->hooks, r->entries[idx].name);
    memmove(&r->entries[idx], &r->entries[idx + 1], (r->count - idx - 1) * sizeof *r->entries);
    r->count--;
    patio__registry_index(r);
    return PATIO_OK;
}

PATIO_API int patio_registry_lock(patio_registry *r)
{
    if (!r) return PATIO_ERR_INVALID;
    patio__store(&r->locked, 1);
    return PATIO_OK;
}

PATIO_API int patio_registry_is_locked(const patio_registry *r) { return r ? patio__load(&r->locked) : 0; }
PATIO_API size_t patio_registry_count(const patio_registry *r) { return r ? r->count : 0; }
PATIO_API const char *patio_registry_project(const patio_registry *r) { return r ? r->project : NULL; }
PATIO_API int patio_registry_strict(const patio_registry *r) { return r ? r->strict : 0; }
PATIO_API int patio_registry_auto_naming(const patio_registry *r) { return r ? r->auto_naming : 0; }

PATIO_API int patio_registry_contains(const patio_registry *r, const char *name)
{
    return r && name && patio__registry_find(r, name, strlen(name)) != NULL;
}

PATIO_API int patio_registry_get(const patio_registry *r, const char *name, patio_fn *fn, void **user)
{
    const patio__entry *e;
    if (!r || !name) return PATIO_ERR_INVALID;
    e = patio__registry_find(r, name, strlen(name));
    if (!e) return PATIO_ERR_NOT_FOUND;
    if (fn) *fn = e->fn;
    if (user) *user = e->user;
    return PATIO_OK;
}

PATIO_API const char *patio_registry_name_at(const patio_registry *r, size_t index, patio_fn *fn, void **user)
{
    if (!r || index >= r->count) return NULL;
    if (fn) *fn = r->entries[index].fn;
    if (user) *user = r->entries[index].user;
    return r->entries[index].name;
}

PATIO_API const char *patio_registry_name_of(const patio_registry *r, patio_fn fn)
{
    size_t i;
    if (!r || !fn) return NULL;
    for (i = 0; i < r->count; i++)
        if (r->entries[i].fn == fn) return r->entries[i].name;
    return NULL;
}


/* ========================================================================
 * >>loop  Event loop: posted work, timers, fd watchers, thread mode
 * ======================================================================== */

/* Work handed to the loop thread. Intrusive: the owner embeds the node and
 * sets fn, so posting never allocates. */
typedef struct patio__post {
    struct patio__post *next;
    void (*fn)(struct patio__post *);
} patio__post;

/* A one-shot timer. The owner embeds it and sets fn; deadlines are
 * patio__now_ns() based. Equal deadlines fire in the order they were set. */
typedef struct patio__timer {
    uint64_t deadline_ns;
    uint64_t seq;       /* arming order: breaks deadline ties */
    /* pairing-heap links: first child, next sibling, and the previous
     * sibling or, for a first child, the parent */
    struct patio__timer *child, *sibling, *prev;
    int armed;
    void (*fn)(struct patio__timer *);
} patio__timer;

/* A hand-off to a busy loop skips the fd poll, but never more often than
 * this in a row nor for longer than this, so fds are still served. */
#define PATIO__MAX_SKIPPED_POLLS 16
#define PATIO__SPIN_POLL_NS 3000u   /* fd check interval while spinning */
#define PATIO__MAX_POLL_GAP_NS 20000u

struct patio_loop {
    patio_hooks hooks_copy;
    const patio_hooks *hooks;    /* &hooks_copy, or NULL for libc */
    uint64_t spin_ns;            /* 0 = never spin */
    patio__spin_state spin;      /* adaptive budget within spin_ns */
    patio__poller poller;
    patio__wake wake;
    patio__io wake_io;

    /* Posted work: producers push onto a lock-free stack; the loop takes
     * the whole stack at once and reverses it, which restores FIFO order.
     * Padded: producers write these lines once per post. */
    PATIO__PAD(pad_posts);
    patio__post *posts;          /* atomic */
    /* 1 while the loop is awake or a wake-up is already on its way: only
     * the producer that flips it from 0 writes the wake fd. */
    int wake_pending;            /* atomic */
    PATIO__PAD(pad_wake);

    /* Timers: a pairing heap on (deadline, seq), linked through the timers
     * themselves, so arming one never allocates and cannot fail. Other
     * threads start and stop timers, hence the mutex; callbacks run
     * without it. */
    pthread_mutex_t timer_mu;
    patio__timer *timers;        /* the earliest, the root */
    uint64_t timer_seq;          /* atomic reads; written under timer_mu */
    uint64_t next_due;           /* atomic: earliest deadline, UINT64_MAX = none */
    uint64_t sleep_until;        /* atomic: deadline the loop last slept to; an
                                    earlier timer must wake it */

    /* The readiness batch being dispatched; stopping an io clears its
     * later entries so that nothing touches it after patio__io_stop. */
    patio__ready ready[PATIO__READY_MAX];
    int nready, ready_pos;

    /* Who runs the loop: at most one thread at a time. */
    pthread_mutex_t run_mu;
    pthread_cond_t run_cv;
    int running;                 /* under run_mu */
    int thread_mode;             /* under run_mu: a library thread owns the loop */
    int stop_claimed;            /* under run_mu: a stop is joining the thread */
    int owner_set;               /* atomic */
    pthread_t owner;             /* atomic (generic builtins): valid while owner_set */
    pthread_t thread;
    int stop;                    /* atomic: the library thread should exit */
    int handover;                /* atomic: a starting library thread waits for
                                    the host's run_once to return */

    /* Loop-thread state */
    patio__post *local_head;     /* posted by the loop thread itself: a FIFO */
    patio__post *local_tail;     /* no other thread touches, so no atomics */
    uint64_t last_work_ns;       /* when a callback last ran: spin only after work */
    uint64_t last_poll_ns;
    int polls_skipped;

    /* Statistics (atomic): wake fd writes, and iterations. */
    uint64_t wakeups;
    uint64_t iterations;
};

PATIO__MAYBE_UNUSED static const patio_hooks *patio__loop_hooks(patio_loop *l) { return l->hooks; }

/* ---- wake-up ------------------------------------------------------------ */

/* Makes a sleeping loop return from its wait. Coalesced: while the loop is
 * awake or already being woken this is a single atomic exchange. */
static void patio__loop_wake(patio_loop *l)
{
    if (patio__sc_xchg(&l->wake_pending, 1) != 0) return;
    patio__fetch_add(&l->wakeups, 1);
    patio__wake_signal(&l->wake);
}

static void patio__loop_on_wake_fd(patio__io *io, unsigned revents)
{
    patio_loop *l = PATIO__CONTAINER(io, patio_loop, wake_io);
    PATIO__UNUSED(revents);
    patio__wake_drain(&l->wake);
}

/* ---- posted work -------------------------------------------------------- */

static void patio__loop_push_shared(patio_loop *l, patio__post *p)
{
    patio__post *head = patio__load_relaxed(&l->posts);
    do p->next = head;
    while (!__atomic_compare_exchange_n(&l->posts, &head, p, 1, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
}

/* Queues p to run on the loop thread; any thread. The loop thread's own
 * posts (a completion delivering on_done, a call started from a callback)
 * go to a plain list: the loop is awake, so they need neither the shared
 * stack's compare-and-swap nor a wake-up. */
static void patio__loop_post(patio_loop *l, patio__post *p)
{
    if (patio_loop_in_loop_thread(l)) {
        p->next = NULL;
        if (l->local_tail) l->local_tail->next = p; else l->local_head = p;
        l->local_tail = p;
        return;
    }
    patio__loop_push_shared(l, p);
    patio__loop_wake(l);
}

/* Before the loop thread lets go of the loop: its own posts join the
 * shared stack, where whoever runs the loop next finds them. */
static void patio__loop_share_local(patio_loop *l)
{
    patio__post *p = l->local_head, *next;
    l->local_head = l->local_tail = NULL;
    for (; p; p = next) {
        next = p->next;
        patio__loop_push_shared(l, p);
    }
}

static int patio__loop_has_posts(patio_loop *l)
{
    return l->local_head != NULL || patio__load_relaxed(&l->posts) != NULL;
}

static int patio__loop_run_list(patio__post *p)
{
    patio__post *next;
    int ran = 0;
    for (; p; p = next) {
        next = p->next; /* fn may free or re-post its node */
        p->fn(p);
        ran++;
    }
    return ran;
}

/* Runs the batch posted so far; work posted meanwhile waits for the next
 * iteration, so a callback that re-posts itself cannot starve the loop. */
static int patio__loop_run_posts(patio_loop *l)
{
    patio__post *p = NULL, *fifo = NULL, *next, *local = l->local_head;
    int ran;
    l->local_head = l->local_tail = NULL;
    /* Both lists are taken before anything runs: a post made while they
     * run, on any thread, waits for the next round. Each thread's posts
     * keep their order; between the two lists there is none to keep. */
    if (patio__load_relaxed(&l->posts)) p = patio__xchg(&l->posts, (patio__post *)NULL);
    while (p) {
        next = p->next;
        p->next = fifo;
        fifo = p;
        p = next;
    }
    ran = patio__loop_run_list(local);
    return ran + patio__loop_run_list(fifo);
}

/* Nodes of patio_loop_post: the one kind of post the loop owns. */
typedef struct patio__user_post {
    patio__post base;
    void (*fn)(void *arg);
    void *arg;
    const patio_hooks *hooks;
} patio__user_post;

static void patio__user_post_run(patio__post *p)
{
    patio__user_post *u = PATIO__CONTAINER(p, patio__user_post, base);
    void (*fn)(void *) = u->fn;
    void *arg = u->arg;
    patio__free(u->hooks, u);
    fn(arg);
}

PATIO_API int patio_loop_post(patio_loop *loop, void (*fn)(void *arg), void *arg)
{
    patio__user_post *u;
    if (!loop || !fn) return PATIO_ERR_INVALID;
    u = (patio__user_post *)patio__malloc(loop->hooks, sizeof *u);
    if (!u) return PATIO_ERR_NOMEM;
    u->base.fn = patio__user_post_run;
    u->fn = fn;
    u->arg = arg;
    u->hooks = loop->hooks;
    patio__loop_post(loop, &u->base);
    return PATIO_OK;
}

/* ---- timers --------------------------------------------------------------- */

static int patio__timer_before(const patio__timer *a, const patio__timer *b)
{
    return a->deadline_ns < b->deadline_ns || (a->deadline_ns == b->deadline_ns && a->seq < b->seq);
}

/* Links two detached heaps; returns the new root. */
static patio__timer *patio__heap_meld(patio__timer *a, patio__timer *b)
{
    patio__timer *x;
    if (!a) return b;
    if (!b) return a;
    if (patio__timer_before(b, a)) { x = a; a = b; b = x; }
    b->prev = a;
    b->sibling = a->child;
    if (a->child) a->child->prev = b;
    a->child = b;
    return a;
}

/* Melds a list of siblings into one heap: neighbours in pairs from the
 * left, then the pairs from the right (what keeps pairing heaps fast).
 * Iterative: a long list cannot exhaust the stack. */
static patio__timer *patio__heap_merge_pairs(patio__timer *first)
{
    patio__timer *pairs = NULL, *root = NULL;
    while (first) {
        patio__timer *a = first, *b = first->sibling, *m;
        first = b ? b->sibling : NULL;
        a->sibling = a->prev = NULL;
        if (b) b->sibling = b->prev = NULL;
        m = patio__heap_meld(a, b);
        m->sibling = pairs; /* a stack of the pairs' roots */
        pairs = m;
    }
    while (pairs) {
        patio__timer *next = pairs->sibling;
        pairs->sibling = NULL;
        root = patio__heap_meld(root, pairs);
        pairs = next;
    }
    return root;
}

static void patio__heap_publish_next(patio_loop *l)
{
    patio__store(&l->next_due, l->timers ? l->timers->deadline_ns : UINT64_MAX);
}

static void patio__heap_push(patio_loop *l, patio__timer *t)
{
    t->child = t->sibling = t->prev = NULL;
    t->armed = 1;
    l->timers = patio__heap_meld(l->timers, t);
    patio__heap_publish_next(l);
}

static void patio__heap_remove(patio_loop *l, patio__timer *t)
{
    patio__timer *rest;
    if (t == l->timers) {
        l->timers = patio__heap_merge_pairs(t->child);
    } else {
        if (t->prev->child == t) t->prev->child = t->sibling;
        else t->prev->sibling = t->sibling;
        if (t->sibling) t->sibling->prev = t->prev;
        rest = patio__heap_merge_pairs(t->child);
        l->timers = patio__heap_meld(l->timers, rest);
    }
    t->child = t->sibling = t->prev = NULL;
    t->armed = 0;
    patio__heap_publish_next(l);
}

/* Arms t (re-arms it if armed) to fire at deadline_ns; any thread. Wakes
 * the loop only when it sleeps past the new deadline. */
PATIO__MAYBE_UNUSED static void patio__timer_start(patio_loop *l, patio__timer *t, uint64_t deadline_ns)
{
    int wake = 0;
    pthread_mutex_lock(&l->timer_mu);
    if (t->armed) patio__heap_remove(l, t);
    t->deadline_ns = deadline_ns;
    t->seq = l->timer_seq + 1;
    patio__store(&l->timer_seq, t->seq);
    patio__heap_push(l, t);
    if (deadline_ns < patio__load(&l->sleep_until)) {
        patio__sc_store(&l->sleep_until, deadline_ns);
        wake = 1;
    }
    pthread_mutex_unlock(&l->timer_mu);
    if (wake) patio__loop_wake(l);
}

/* Disarms t; any thread. 1 if it was disarmed before firing, 0 if it had
 * already fired or its callback is running now. */
PATIO__MAYBE_UNUSED static int patio__timer_stop(patio_loop *l, patio__timer *t)
{
    int armed;
    pthread_mutex_lock(&l->timer_mu);
    armed = t->armed;
    if (armed) patio__heap_remove(l, t);
    pthread_mutex_unlock(&l->timer_mu);
    return armed;
}

/* Pops the earliest timer if it is due and was armed before this round
 * began (max_seq): a callback that re-arms its timer for "now" waits for
 * the next iteration instead of looping here forever. */
static patio__timer *patio__loop_pop_due(patio_loop *l, uint64_t now, uint64_t max_seq)
{
    patio__timer *t = NULL;
    if (patio__load(&l->next_due) > now) return NULL;
    pthread_mutex_lock(&l->timer_mu);
    if (l->timers && l->timers->deadline_ns <= now && l->timers->seq <= max_seq) {
        t = l->timers;
        patio__heap_remove(l, t);
    }
    pthread_mutex_unlock(&l->timer_mu);
    return t;
}

static int patio__loop_fire_timers(patio_loop *l)
{
    uint64_t now, max_seq;
    patio__timer *t;
    int ran = 0;
    if (patio__load(&l->next_due) == UINT64_MAX) return 0;
    now = patio__now_ns();
    max_seq = patio__load(&l->timer_seq);
    while ((t = patio__loop_pop_due(l, now, max_seq)) != NULL) {
        t->fn(t);
        ran++;
    }
    return ran;
}

/* ---- fd watchers (loop thread, or before the loop runs) ------------------ */

/* Changes io's interest to events (PATIO__READ | PATIO__WRITE, or
 * PATIO__ERROR for errors and hang-ups only; 0 stops reports). */
PATIO__MAYBE_UNUSED static int patio__io_update(patio_loop *l, patio__io *io, unsigned events)
{
    int rc;
    events &= PATIO__READ | PATIO__WRITE | PATIO__ERROR;
    if (!io->active) return PATIO_ERR_INVALID;
    rc = patio__poller_set(&l->poller, l->hooks, io, io->events, events);
    if (rc == PATIO_OK) io->events = events;
    return rc;
}

/* Watches fd; fn(io, revents) runs on the loop thread when it is ready.
 * revents holds the ready directions of interest, and PATIO__READ |
 * PATIO__ERROR on an error or hang-up. Stop before closing fd. */
PATIO__MAYBE_UNUSED static int patio__io_start(patio_loop *l, patio__io *io, int fd, unsigned events,
                                               void (*fn)(patio__io *, unsigned))
{
    int rc;
    if (!l || !io || fd < 0 || !fn || io->active) return PATIO_ERR_INVALID;
    io->fd = fd;
    io->fn = fn;
    io->events = 0;
    io->slot = 0;
    io->active = 1;
    rc = patio__io_update(l, io, events);
    if (rc != PATIO_OK) io->active = 0;
    return rc;
}

/* Stops watching io. Safe inside any callback, including io's own: the
 * loop does not touch io afterwards, so the caller may free it at once. */
PATIO__MAYBE_UNUSED static void patio__io_stop(patio_loop *l, patio__io *io)
{
    int i;
    if (!io->active) return;
    patio__poller_set(&l->poller, l->hooks, io, io->events, 0);
    io->events = 0;
    io->active = 0;
    for (i = l->ready_pos + 1; i < l->nready; i++)
        if (l->ready[i].io == io) l->ready[i].io = NULL;
}

static int patio__loop_dispatch_io(patio_loop *l)
{
    int ran = 0;
    for (l->ready_pos = 0; l->ready_pos < l->nready; l->ready_pos++) {
        patio__ready *r = &l->ready[l->ready_pos];
        patio__io *io = r->io;
        unsigned revents;
        if (!io) continue;
        revents = r->revents & io->events;
        if (r->revents & PATIO__ERROR) revents |= PATIO__READ | PATIO__ERROR;
        if (!revents) continue; /* interest dropped by an earlier callback */
        io->fn(io, revents);
        if (io != &l->wake_io) ran++;
    }
    l->nready = 0;
    l->ready_pos = 0;
    return ran;
}

/* ---- one iteration -------------------------------------------------------- */

/* Milliseconds from now to deadline, rounded up so a timer is due when the
 * wait ends; -1 = no deadline. */
static int patio__ms_until(uint64_t deadline_ns, uint64_t now)
{
    uint64_t ms;
    if (deadline_ns == UINT64_MAX) return -1;
    if (deadline_ns <= now) return 0;
    ms = (deadline_ns - now + 999999u) / 1000000u;
    return ms > (uint64_t)INT_MAX ? INT_MAX : (int)ms;
}

/* Something the loop must not sleep through: posted work, a stop, or a
 * library thread waiting to take the loop over from the host. */
static int patio__loop_has_urgent(patio_loop *l)
{
    return l->local_head != NULL || patio__sc_load(&l->posts) != NULL || patio__sc_load(&l->stop) != 0 ||
           patio__sc_load(&l->handover) != 0;
}

/* Records the deadline the loop is about to sleep to, so that a timer
 * started later by another thread knows whether it must wake the loop. */
static void patio__loop_publish_sleep(patio_loop *l)
{
    pthread_mutex_lock(&l->timer_mu);
    patio__sc_store(&l->sleep_until, l->timers ? l->timers->deadline_ns : UINT64_MAX);
    pthread_mutex_unlock(&l->timer_mu);
}

static int patio__loop_poll(patio_loop *l, int timeout_ms)
{
    int n = patio__poller_wait(&l->poller, l->ready, timeout_ms);
    l->polls_skipped = 0;
    l->last_poll_ns = patio__now_ns();
    l->nready = n > 0 ? n : 0;
    return n;
}

/* Busy-waits for posted work for at most the adaptive budget (at most
 * spin_ns), and only when the loop was busy within the last spin_ns: a
 * hand-off to a spinning loop costs the producer no system call, while an
 * idle loop goes straight to sleep. Sockets are checked too, without
 * blocking, every few microseconds, so a reply arriving on a connection is
 * not left waiting for the spin to end; each check also yields the CPU.
 * Returns 1 if posted work arrived, 2 if fds are ready (l->nready set). */
static int patio__loop_spin(patio_loop *l, uint64_t now, uint64_t until)
{
    uint64_t start = now, end, budget, next_poll = now + PATIO__SPIN_POLL_NS;
    unsigned i;
    if (!l->spin_ns || now - l->last_work_ns > l->spin_ns) return 0;
    budget = patio__spin_budget(&l->spin);
    if (!budget) return 0;
    end = now + budget < until ? now + budget : until;
    for (i = 1;; i++) {
        if (patio__loop_has_posts(l) || patio__load_relaxed(&l->stop)) {
            patio__spin_result(&l->spin, 1, now - start); /* `now` is at most 32 rounds old */
            return 1;
        }
        patio__cpu_relax();
        if ((i & 31) == 0) {
            now = patio__now_ns();
            if (now >= end) {
                patio__spin_result(&l->spin, 0, budget);
                return 0;
            }
            if (now >= next_poll) {
                if (patio__loop_poll(l, 0) > 0) {
                    patio__spin_result(&l->spin, 1, now - start);
                    return 2;
                }
                next_poll = now + PATIO__SPIN_POLL_NS;
                /* a thread with work on this CPU runs now, not when the
                 * spin's time slice ends: with more busy threads than
                 * CPUs (loops, pool workers, a peer), spinning that does
                 * not yield starves the very work it waits for */
                sched_yield();
            }
        }
    }
}

/* Work is waiting: check fds without blocking, or skip even that for a
 * few rounds so that back-to-back hand-offs stay free of system calls. */
static int patio__loop_poll_busy(patio_loop *l, uint64_t now)
{
    if (l->polls_skipped < PATIO__MAX_SKIPPED_POLLS && now - l->last_poll_ns < PATIO__MAX_POLL_GAP_NS) {
        l->polls_skipped++;
        return 0;
    }
    return patio__loop_poll(l, 0);
}

/* Sleeps in the poller until an fd is ready, a timer or host_deadline is
 * due, or someone wakes the loop. Producers see wake_pending == 0 only
 * between the two stores below; the checks in between close the race with
 * a post or timer that came just before. */
static int patio__loop_sleep(patio_loop *l, uint64_t host_deadline)
{
    uint64_t until;
    int timeout, n;
    patio__loop_publish_sleep(l);
    patio__sc_store(&l->wake_pending, 0);
    until = patio__sc_load(&l->sleep_until);
    if (host_deadline < until) until = host_deadline;
    timeout = patio__loop_has_urgent(l) ? 0 : patio__ms_until(until, patio__now_ns());
    n = patio__loop_poll(l, timeout);
    patio__sc_store(&l->wake_pending, 1);
    return n;
}

/* Waits as the state demands and collects ready fds; count or error. */
static int patio__loop_wait(patio_loop *l, uint64_t host_deadline)
{
    uint64_t now = patio__now_ns();
    uint64_t until = patio__load(&l->next_due);
    if (host_deadline < until) until = host_deadline;
    if (patio__loop_has_urgent(l)) return patio__loop_poll_busy(l, now);
    if (until <= now) return patio__loop_poll(l, 0);
    switch (patio__loop_spin(l, now, until)) {
    case 1: return patio__loop_poll_busy(l, patio__now_ns());
    case 2: return l->nready;
    default: return patio__loop_sleep(l, host_deadline);
    }
}

/* One round: wait, then fds, due timers, posted work. Returns the number
 * of callbacks run, or an error from the poller. */
static int patio__loop_iterate(patio_loop *l, uint64_t host_deadline)
{
    int n, ran;
    patio__fetch_add(&l->iterations, 1);
    n = patio__loop_wait(l, host_deadline);
    if (n < 0) return n;
    ran = patio__loop_dispatch_io(l);
    ran += patio__loop_fire_timers(l);
    ran += patio__loop_run_posts(l);
    if (ran) l->last_work_ns = patio__now_ns();
    return ran;
}

/* Leaves the loop asleep between host pumps: a post from now on writes the
 * wake fd (so patio_loop_fd turns readable), as does a timer earlier than
 * the published deadline. Work that is already queued is signalled now. */
static void patio__loop_doze(patio_loop *l)
{
    patio__loop_share_local(l);
    patio__loop_publish_sleep(l);
    patio__sc_store(&l->wake_pending, 0);
    if (patio__sc_load(&l->posts)) patio__loop_wake(l);
}

/* ---- who runs the loop ------------------------------------------------------ */

static void patio__loop_set_owner(patio_loop *l, int set)
{
    if (set) {
        pthread_t self = pthread_self();
        __atomic_store(&l->owner, &self, __ATOMIC_RELEASE);
    }
    patio__store(&l->owner_set, set);
}

/* Makes the caller the one thread running the loop. PATIO_OK; PATIO_PENDING
 * if another thread still runs it at deadline; PATIO_ERR_INVALID when a
 * library thread owns the loop or the caller is inside a loop callback. */
static int patio__loop_enter(patio_loop *l, uint64_t deadline, int library_thread)
{
    int rc = PATIO_OK;
    pthread_mutex_lock(&l->run_mu);
    for (;;) {
        if (l->running && pthread_equal(l->owner, pthread_self())) { rc = PATIO_ERR_INVALID; break; }
        if (l->thread_mode && !library_thread) { rc = PATIO_ERR_INVALID; break; }
        if (!l->running) break;
        if (patio__cond_wait_until(&l->run_cv, &l->run_mu, deadline) == ETIMEDOUT && l->running) {
            rc = PATIO_PENDING;
            break;
        }
    }
    if (rc == PATIO_OK) {
        l->running = 1;
        patio__loop_set_owner(l, 1);
    }
    pthread_mutex_unlock(&l->run_mu);
    return rc;
}

static void patio__loop_leave(patio_loop *l)
{
    pthread_mutex_lock(&l->run_mu);
    patio__loop_set_owner(l, 0);
    l->running = 0;
    pthread_cond_broadcast(&l->run_cv);
    pthread_mutex_unlock(&l->run_mu);
}

PATIO_API int patio_loop_in_loop_thread(const patio_loop *loop)
{
    pthread_t owner;
    if (!loop || !patio__load(&loop->owner_set)) return 0;
    __atomic_load(&loop->owner, &owner, __ATOMIC_ACQUIRE);
    return pthread_equal(owner, pthread_self()) != 0;
}

PATIO_API int patio_loop_run_once(patio_loop *loop, int timeout_ms)
{
    uint64_t deadline;
    int rc, ran;
    if (!loop) return PATIO_ERR_INVALID;
    deadline = timeout_ms < 0 ? UINT64_MAX : patio__now_ns() + (uint64_t)timeout_ms * 1000000u;
    rc = patio__loop_enter(loop, deadline, 0);
    if (rc == PATIO_PENDING) return 0;
    if (rc != PATIO_OK) return rc;
    patio__sc_store(&loop->wake_pending, 1); /* awake: posts need no wake-up */
    do ran = patio__loop_iterate(loop, deadline);
    while (ran == 0 && patio__now_ns() < deadline && !patio__load(&loop->handover));
    patio__loop_doze(loop);
    patio__loop_leave(loop);
    return ran;
}

static void *patio__loop_thread_main(void *arg)
{
    patio_loop *l = (patio_loop *)arg;
    if (patio__loop_enter(l, UINT64_MAX, 1) != PATIO_OK) return NULL;
    patio__store(&l->handover, 0);
    patio__sc_store(&l->wake_pending, 1);
    while (!patio__load(&l->stop)) {
        int rc = patio__loop_iterate(l, UINT64_MAX);
        if (rc < 0) {
            /* The poller failed (e.g. out of memory): retry, but gently. */
            patio__log(l->hooks, PATIO_LOG_ERROR, "loop: wait failed: %s", patio_strerror(rc));
            poll(NULL, 0, 10);
        }
    }
    patio__loop_doze(l);
    patio__loop_leave(l);
    return NULL;
}

PATIO_API int patio_loop_start(patio_loop *loop)
{
    if (!loop) return PATIO_ERR_INVALID;
    pthread_mutex_lock(&loop->run_mu);
    if (loop->thread_mode) {
        pthread_mutex_unlock(&loop->run_mu);
        return PATIO_ERR_INVALID;
    }
    loop->thread_mode = 1;
    patio__store(&loop->stop, 0);
    patio__sc_store(&loop->handover, loop->running); /* a host pump is in progress */
    pthread_mutex_unlock(&loop->run_mu);
    if (pthread_create(&loop->thread, NULL, patio__loop_thread_main, loop) != 0) {
        pthread_mutex_lock(&loop->run_mu);
        loop->thread_mode = 0;
        patio__store(&loop->handover, 0);
        pthread_mutex_unlock(&loop->run_mu);
        return PATIO_ERR_IO;
    }
    if (patio__load(&loop->handover)) patio__loop_wake(loop);
    return PATIO_OK;
}

PATIO_API int patio_loop_stop(patio_loop *loop)
{
    if (!loop) return PATIO_ERR_INVALID;
    if (patio_loop_in_loop_thread(loop)) return PATIO_ERR_INVALID; /* would join itself */
    pthread_mutex_lock(&loop->run_mu);
    if (!loop->thread_mode || loop->stop_claimed) {
        pthread_mutex_unlock(&loop->run_mu);
        return PATIO_OK;
    }
    loop->stop_claimed = 1;
    pthread_mutex_unlock(&loop->run_mu);
    patio__sc_store(&loop->stop, 1);
    patio__loop_wake(loop);
    pthread_join(loop->thread, NULL);
    pthread_mutex_lock(&loop->run_mu);
    loop->thread_mode = 0;
    loop->stop_claimed = 0;
    patio__store(&loop->stop, 0);
    pthread_mutex_unlock(&loop->run_mu);
    return PATIO_OK;
}

/* ---- creation and queries -------------------------------------------------- */

/* Frees posted nodes the loop owns (from patio_loop_post) without running
 * them; intrusive posts belong to their owners and are just dropped. */
static void patio__loop_drop_posts(patio_loop *l)
{
    patio__post *p = patio__xchg(&l->posts, (patio__post *)NULL), *next;
    for (; p; p = next) {
        next = p->next;
        if (p->fn == patio__user_post_run) patio__free(l->hooks, PATIO__CONTAINER(p, patio__user_post, base));
    }
}

static void patio__loop_destroy(patio_loop *l)
{
    patio__loop_drop_posts(l);
    while (l->timers) patio__heap_remove(l, l->timers); /* they read as disarmed */
    patio__poller_close(&l->poller, l->hooks);
    patio__wake_close(&l->wake);
    pthread_mutex_destroy(&l->timer_mu);
    pthread_mutex_destroy(&l->run_mu);
    pthread_cond_destroy(&l->run_cv);
    patio__free(l->hooks, l);
}

PATIO_API patio_loop *patio_loop_new(const patio_loop_config *cfg)
{
    const patio_hooks *h = cfg ? cfg->hooks : NULL;
    int spin_us = cfg ? cfg->spin_us : 0;
    patio_loop *l;
    if (!patio__hooks_valid(h)) return NULL;
    l = (patio_loop *)patio__calloc(h, sizeof *l);
    if (!l) return NULL;
    if (h) {
        l->hooks_copy = *h;
        l->hooks = &l->hooks_copy;
    }
    if (spin_us == 0) spin_us = PATIO_SPIN_US;
    l->spin_ns = spin_us > 0 ? (uint64_t)spin_us * 1000u : 0;
    patio__spin_init(&l->spin, l->spin_ns);
    l->wake.rfd = l->wake.wfd = -1;
    l->next_due = UINT64_MAX;
    l->sleep_until = UINT64_MAX;
    pthread_mutex_init(&l->timer_mu, NULL);
    pthread_mutex_init(&l->run_mu, NULL);
    patio__cond_init(&l->run_cv);
    if (patio__poller_open(&l->poller, l->hooks) != PATIO_OK) {
        patio__log(l->hooks, PATIO_LOG_ERROR, "loop: cannot create the %s poller (errno %d)",
                   patio__poller_name(), errno);
        patio__loop_destroy(l);
        return NULL;
    }
    if (patio__wake_open(&l->wake) != PATIO_OK ||
        patio__io_start(l, &l->wake_io, l->wake.rfd, PATIO__READ, patio__loop_on_wake_fd) != PATIO_OK) {
        patio__log(l->hooks, PATIO_LOG_ERROR, "loop: cannot create the wake-up fd (errno %d)", errno);
        patio__loop_destroy(l);
        return NULL;
    }
    return l;
}

PATIO_API void patio_loop_free(patio_loop *loop)
{
    if (!loop) return;
    if (patio_loop_in_loop_thread(loop)) {
        patio__log(loop->hooks, PATIO_LOG_ERROR, "loop: cannot be freed from its own thread");
        return;
    }
    patio_loop_stop(loop);
    patio__io_stop(loop, &loop->wake_io);
    patio__loop_destroy(loop);
}

PATIO_API int patio_loop_fd(const patio_loop *loop)
{
    return loop ? patio__poller_fd(&loop->poller) : -1;
}

PATIO_API int patio_loop_next_timeout_ms(patio_loop *loop)
{
    if (!loop) return -1;
    if (patio__load(&loop->posts)) return 0;
    return patio__ms_until(patio__load(&loop->next_due), patio__now_ns());
}

PATIO_API const char *patio_loop_backend(const patio_loop *loop)
{
    PATIO__UNUSED(loop);
    return patio__poller_name();
}
/* ========================================================================
 * >>task  Task: arguments in, result or exception out
 * ======================================================================== */

enum {
    PATIO__TASK_NEW = 0,
    PATIO__TASK_QUEUED = 1,
    PATIO__TASK_RUNNING = 2,
    PATIO__TASK_DONE = 3,
    PATIO__TASK_CANCELLED = 4
};

/* A task usually runs on another thread than the one that prepared it,
 * and its memory is used again for the next one: so what the running
 * thread writes sits together at the front, and a task moves few cache
 * lines between the two threads and back. */
struct patio_task {
    /* Written while it runs. The two atomics are never cleared with
     * memset: a caller's call may time out on the loop thread, which peeks
     * at state, while its broker is still preparing the task. */
    int state;                  /* PATIO__TASK_*, atomic */
    int finished;               /* atomic guard: a task finishes once */
    int status;                 /* PATIO_OK, or the error (PATIO_ERR_REMOTE: the task failed) */
    int arg_error;              /* a type mismatch was seen: fail with TypeError */
    uint32_t argc, argi;
    patio_reader argr;          /* positioned at the next unread argument */
    patio_writer result;        /* one value, or an ext-2 exception when status is an error */
    patio_task *next, *prev;    /* executor queue links */
    int in_queue;               /* under the executor's lock: linked in its queue */
    uint8_t result_small[40];   /* room for a small result (see patio__task_small_result) */
    /* Set by whoever submits it, then only read. */
    const patio__entry *entry;
    patio_executor *executor;
    patio_broker *broker;
    const uint8_t *args;        /* the whole args array object */
    size_t args_len;
    const uint8_t *kwargs;      /* the whole kwargs map object; NULL = {} */
    size_t kwargs_len;
    double timeout;             /* the caller's timeout in seconds, < 0 = none */
    void (*on_done)(patio_task *t);   /* set by whoever submitted it */
    void *owner;
    char arg_message[160];      /* valid when arg_error; last, so it is never cleared */
};

static const uint8_t patio__empty_map[1] = { 0x80 };
static const uint8_t patio__empty_array[1] = { 0x90 };

/* Prepares a task to run entry with the given encoded arguments. */
static void patio__task_init(patio_task *t, const patio__entry *entry, const patio_hooks *hooks,
                             const uint8_t *args, size_t args_len,
                             const uint8_t *kwargs, size_t kwargs_len)
{
    /* field by field: a memset of the whole task would also clear
     * result_small, and costs more than the stores (calls start at high rates) */
    patio__store(&t->state, PATIO__TASK_NEW);
    patio__store(&t->finished, 0);
    t->status = PATIO_OK;
    t->arg_error = 0;
    t->argc = t->argi = 0;
    patio_reader_init(&t->argr, NULL, 0);
    t->next = t->prev = NULL;
    t->in_queue = 0;
    t->executor = NULL;
    t->broker = NULL;
    t->timeout = 0;
    t->on_done = NULL;
    t->owner = NULL;
    t->entry = entry;
    t->args = args_len ? args : patio__empty_array;
    t->args_len = args_len ? args_len : 1;
    t->kwargs = kwargs_len ? kwargs : NULL;
    t->kwargs_len = kwargs_len;
    patio_writer_init(&t->result, hooks);
}

/* Lets the result live in the task itself while it is small. */
static void patio__task_small_result(patio_task *t, const patio_hooks *hooks)
{
    patio__writer_init_small(&t->result, hooks, t->result_small, sizeof t->result_small);
}

static void patio__task_reset_args(patio_task *t)
{
    patio_reader_init(&t->argr, t->args, t->args_len);
    t->argi = 0;
    t->argc = 0;
    if (patio_read_array(&t->argr, &t->argc) != PATIO_OK) {
        t->arg_error = 1;
        snprintf(t->arg_message, sizeof t->arg_message, "arguments are not an array");
    }
}

static void patio__task_type_error(patio_task *t, const char *fmt, ...)
{
    va_list ap;
    if (t->arg_error) return; /* keep the first reason */
    t->arg_error = 1;
    va_start(ap, fmt);
    vsnprintf(t->arg_message, sizeof t->arg_message, fmt, ap);
    va_end(ap);
}

static void patio__task_set_exception(patio_task *t, const char *type, const char *msg, size_t msg_len)
{
    patio_writer_reset(&t->result);
    patio__write_exception(&t->result, type, strlen(type), msg, msg_len);
    t->status = PATIO_ERR_REMOTE;
}

/* For executors: finishes a task with a library error (for example
 * PATIO_ERR_WORKER_DIED) and an exception describing it. */
PATIO__MAYBE_UNUSED static void patio__task_fail_code(patio_task *t, int code, const char *type, const char *msg)
{
    patio__task_set_exception(t, type, msg, strlen(msg));
    t->status = code;
    patio__store(&t->finished, 1);
    patio__store(&t->state, PATIO__TASK_DONE);
    if (t->executor && t->executor->vt->finished) t->executor->vt->finished(t->executor, t);
    if (t->on_done) t->on_done(t);
}

/* Turns the function's return code into the final status and result. */
static void patio__task_settle(patio_task *t, int rc)
{
    if (t->arg_error) {
        patio__task_set_exception(t, "TypeError", t->arg_message, strlen(t->arg_message));
    } else if (t->status < 0) {
        /* patio_fail (or an executor) already wrote the exception */
    } else if (rc < 0) {
        const char *m = patio_strerror(rc);
        patio__task_set_exception(t, rc == PATIO_ERR_OVERFLOW ? "OverflowError" : "RuntimeError", m, strlen(m));
    } else if (t->result.err) {
        const char *m = "result could not be encoded";
        if (t->result.err == PATIO_ERR_OVERFLOW) m = "result too large";
        patio__task_set_exception(t, "OverflowError", m, strlen(m));
    } else {
        if (t->result.len == 0) patio_write_nil(&t->result);
        t->status = PATIO_OK;
    }
}

static void patio__task_complete(patio_task *t, int rc)
{
    patio_executor *ex = t->executor;
    patio__task_settle(t, rc);
    patio__store(&t->state, PATIO__TASK_DONE);
    if (ex && ex->vt->finished) ex->vt->finished(ex, t);
    if (t->on_done) t->on_done(t);
}

PATIO_API int patio_task_run(patio_task *t)
{
    int rc;
    if (!t || !t->entry) return PATIO_ERR_INVALID;
    patio__store(&t->state, PATIO__TASK_RUNNING);
    patio__task_reset_args(t);
    if (t->arg_error) rc = PATIO_ERR_TYPE;
    else rc = t->entry->fn(t);
    if (rc == PATIO_PENDING) return PATIO_PENDING;
    patio__store(&t->finished, 1);
    patio__task_complete(t, rc);
    return PATIO_OK;
}

PATIO_API int patio_task_finish(patio_task *t)
{
    int expected = 0;
    if (!t) return PATIO_ERR_INVALID;
    if (!patio__cas(&t->finished, &expected, 1)) return PATIO_ERR_INVALID;
    patio__task_complete(t, t->status == PATIO_ERR_REMOTE ? PATIO_ERR_REMOTE : PATIO_OK);
    return PATIO_OK;
}

PATIO_API void *patio_task_user(const patio_task *t) { return t && t->entry ? t->entry->user : NULL; }
PATIO_API const char *patio_task_name(const patio_task *t) { return t && t->entry ? t->entry->name : ""; }
PATIO_API patio_broker *patio_task_broker(const patio_task *t) { return t ? t->broker : NULL; }
PATIO_API uint32_t patio_task_argc(const patio_task *t) { return t ? t->argc : 0; }
PATIO_API patio_reader *patio_task_args(patio_task *t) { return &t->argr; }

static int patio__arg_begin(patio_task *t)
{
    if (t->arg_error) return 0;
    return t->argi < t->argc;
}

static int patio__arg_end(patio_task *t, int rc, const char *expected)
{
    if (rc == PATIO_OK) { t->argi++; return 1; }
    patio__task_type_error(t, "%s(): argument %u must be %s", t->entry->name, (unsigned)(t->argi + 1), expected);
    return 0;
}

PATIO_API int patio_arg_next_int(patio_task *t, int64_t *out)
{
    if (!patio__arg_begin(t)) return 0;
    return patio__arg_end(t, patio_read_int(&t->argr, out), "an integer");
}

PATIO_API int patio_arg_next_double(patio_task *t, double *out)
{
    if (!patio__arg_begin(t)) return 0;
    return patio__arg_end(t, patio_read_double(&t->argr, out), "a number");
}

PATIO_API int patio_arg_next_str(patio_task *t, const char **s, size_t *len)
{
    if (!patio__arg_begin(t)) return 0;
    return patio__arg_end(t, patio_read_str(&t->argr, s, len), "a string");
}

PATIO_API int patio_args(patio_task *t, const char *fmt, ...)
{
    va_list ap;
    uint32_t want;
    int rc;
    if (!t || !fmt) return PATIO_ERR_INVALID;
    if (t->arg_error) return PATIO_ERR_TYPE;
    want = patio__fmt_count(fmt);
    if (want != t->argc - t->argi) {
        patio__task_type_error(t, "%s() takes %u positional arguments but %u were given",
                               t->entry->name, (unsigned)want, (unsigned)(t->argc - t->argi));
        return PATIO_ERR_TYPE;
    }
    va_start(ap, fmt);
    rc = patio_unpackv(&t->argr, fmt, ap);
    va_end(ap);
    if (rc != PATIO_OK) {
        patio__task_type_error(t, "%s(): arguments do not match \"%s\" (%s)", t->entry->name, fmt,
                               patio_strerror(rc));
        return PATIO_ERR_TYPE;
    }
    t->argi = t->argc;
    return PATIO_OK;
}

PATIO_API int patio_task_kwargs(const patio_task *t, patio_reader *map)
{
    if (!t || !map) return PATIO_ERR_INVALID;
    if (t->kwargs) patio_reader_init(map, t->kwargs, t->kwargs_len);
    else patio_reader_init(map, patio__empty_map, sizeof patio__empty_map);
    return PATIO_OK;
}

PATIO_API int patio_kwarg(const patio_task *t, const char *key, patio_reader *value)
{
    patio_reader r;
    uint32_t n, i;
    size_t klen;
    int rc;
    if (!t || !key || !value) return PATIO_ERR_INVALID;
    patio_task_kwargs(t, &r);
    if ((rc = patio_read_map(&r, &n)) != PATIO_OK) return rc;
    klen = strlen(key);
    for (i = 0; i < n; i++) {
        patio_value k;
        if (patio_peek(&r, &k) != PATIO_OK) return PATIO_ERR_DECODE;
        /* keys that are not strings (Python allows ints, say) are passed over */
        if (k.type == PATIO_STR && k.v.str.len == klen && memcmp(k.v.str.ptr, key, klen) == 0) {
            patio_read(&r, NULL);
            *value = r;
            return PATIO_OK;
        }
        if (patio_read_skip(&r) != PATIO_OK || patio_read_skip(&r) != PATIO_OK) return PATIO_ERR_DECODE;
    }
    return PATIO_ERR_NOT_FOUND;
}

PATIO_API patio_writer *patio_task_result(patio_task *t) { return &t->result; }

#define PATIO__RETURN(t, write_call) \
    do { patio_writer_reset(&(t)->result); write_call; \
         return (t)->result.err ? (t)->result.err : PATIO_OK; } while (0)

PATIO_API int patio_return_nil(patio_task *t) { PATIO__RETURN(t, patio_write_nil(&t->result)); }
PATIO_API int patio_return_bool(patio_task *t, int v) { PATIO__RETURN(t, patio_write_bool(&t->result, v)); }
PATIO_API int patio_return_int(patio_task *t, int64_t v) { PATIO__RETURN(t, patio_write_int(&t->result, v)); }
PATIO_API int patio_return_double(patio_task *t, double v) { PATIO__RETURN(t, patio_write_double(&t->result, v)); }
PATIO_API int patio_return_str(patio_task *t, const char *s) { PATIO__RETURN(t, patio_write_str(&t->result, s)); }
PATIO_API int patio_return_bin(patio_task *t, const void *p, size_t n) { PATIO__RETURN(t, patio_write_bin(&t->result, p, n)); }

PATIO_API int patio_return(patio_task *t, const char *fmt, ...)
{
    va_list ap;
    patio_writer_reset(&t->result);
    if (patio__fmt_count(fmt) != 1) return PATIO_ERR_INVALID;
    va_start(ap, fmt);
    patio_packv(&t->result, fmt, ap);
    va_end(ap);
    return t->result.err ? t->result.err : PATIO_OK;
}

PATIO_API int patio_fail(patio_task *t, const char *type, const char *fmt, ...)
{
    char stack[256];
    char *msg = stack;
    va_list ap;
    int n;
    if (!t) return PATIO_ERR_INVALID;
    if (!type || !*type) type = "RuntimeError";
    if (!fmt) fmt = "%s";
    va_start(ap, fmt);
    n = vsnprintf(stack, sizeof stack, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n >= sizeof stack) {
        msg = (char *)patio__malloc(t->result.hooks, (size_t)n + 1);
        if (msg) {
            va_start(ap, fmt);
            vsnprintf(msg, (size_t)n + 1, fmt, ap);
            va_end(ap);
        } else {
            msg = stack;
            n = (int)strlen(stack);
        }
    }
    patio__task_set_exception(t, type, msg, (size_t)n);
    if (msg != stack) patio__free(t->result.hooks, msg);
    return PATIO_ERR_REMOTE;
}

/* ========================================================================
 * >>executor  Executors: common part, thread pool, async, null
 * ======================================================================== */

PATIO_API int patio_executor_init(patio_executor *ex, const patio_executor_vtable *vt, patio_registry *r)
{
    if (!ex || !vt || !vt->submit || !r) return PATIO_ERR_INVALID;
    memset(ex, 0, sizeof *ex);
    ex->vt = vt;
    ex->registry = r;
    ex->hooks = &r->hooks;
    return PATIO_OK;
}

/* An executor serves the loop of the first broker that uses it. */
static int patio__executor_attach(patio_executor *ex, patio_loop *loop)
{
    if (ex->loop == loop) return PATIO_OK;
    if (ex->loop) return PATIO_ERR_INVALID;
    if (ex->vt->attach) {
        int rc = ex->vt->attach(ex, loop);
        if (rc != PATIO_OK) return rc;
    }
    ex->loop = loop;
    return PATIO_OK;
}

PATIO_API void patio_executor_shutdown(patio_executor *ex)
{
    if (!ex || ex->shut_down) return;
    ex->shut_down = 1;
    if (ex->vt->shutdown) ex->vt->shutdown(ex);
}

PATIO_API void patio_executor_free(patio_executor *ex)
{
    if (!ex) return;
    if (ex->loop && patio_loop_in_loop_thread(ex->loop)) {
        /* a task of its own may be running right here */
        patio__log(ex->hooks, PATIO_LOG_ERROR, "executor: cannot be freed from its loop thread");
        return;
    }
    patio_executor_shutdown(ex);
    if (ex->vt->destroy) ex->vt->destroy(ex);
}

PATIO_API const char *patio_executor_kind(const patio_executor *ex)
{
    return ex && ex->vt->kind ? ex->vt->kind : "";
}

/* A doubly linked FIFO of tasks, shared by the queueing executors. */
typedef struct patio__task_queue {
    patio_task *head, *tail;
    size_t count;
} patio__task_queue;

static void patio__tq_push(patio__task_queue *q, patio_task *t)
{
    t->next = NULL;
    t->prev = q->tail;
    if (q->tail) q->tail->next = t; else q->head = t;
    q->tail = t;
    q->count++;
    t->in_queue = 1;
}

static void patio__tq_push_front(patio__task_queue *q, patio_task *t)
{
    t->prev = NULL;
    t->next = q->head;
    if (q->head) q->head->prev = t; else q->tail = t;
    q->head = t;
    q->count++;
    t->in_queue = 1;
}

static void patio__tq_unlink(patio__task_queue *q, patio_task *t)
{
    if (t->prev) t->prev->next = t->next; else q->head = t->next;
    if (t->next) t->next->prev = t->prev; else q->tail = t->prev;
    t->next = t->prev = NULL;
    q->count--;
    t->in_queue = 0;
}

static patio_task *patio__tq_pop(patio__task_queue *q)
{
    patio_task *t = q->head;
    if (t) patio__tq_unlink(q, t);
    return t;
}

/* Queued -> cancelled, under the owner's lock. A task whose submitter is
 * still pushing it into an inbox is QUEUED but not in q yet: it cannot be
 * cancelled any more than a started one. */
static int patio__tq_cancel(patio__task_queue *q, patio_task *t)
{
    if (patio__load(&t->state) != PATIO__TASK_QUEUED || !t->in_queue) return PATIO_ERR_STARTED;
    patio__tq_unlink(q, t);
    patio__store(&t->state, PATIO__TASK_CANCELLED);
    return PATIO_OK;
}

/* A lock-free inbox in front of a task queue. Submitters push with one
 * compare-and-swap and never wait for the lock that the consumers hold
 * while they take work; a consumer holding that lock moves the whole inbox
 * into the queue at once. `pending` counts tasks accepted and not started
 * (in the inbox or the queue, or a submitter between its reservation and
 * its push): it bounds the queue, and a closing executor has taken
 * everything it accepted once it reads 0. */
typedef struct patio__inbox {
    patio_task *head;      /* atomic: newest first, linked through next */
    size_t pending;        /* atomic */
} patio__inbox;

/* Reserves room for a task: PATIO_OK, PATIO_ERR_CLOSED or PATIO_ERR_FULL.
 * `closing` is read after the reservation is visible, so a closer that
 * sets it and then waits for pending to drain misses no task. */
static int patio__inbox_reserve(patio__inbox *in, const int *closing, size_t max_queue)
{
    size_t n = __atomic_fetch_add(&in->pending, 1, __ATOMIC_SEQ_CST);
    int rc = PATIO_OK;
    if (__atomic_load_n(closing, __ATOMIC_SEQ_CST)) rc = PATIO_ERR_CLOSED;
    else if (n >= max_queue) rc = PATIO_ERR_FULL;
    if (rc != PATIO_OK) __atomic_fetch_sub(&in->pending, 1, __ATOMIC_SEQ_CST);
    return rc;
}

/* After a successful reservation: queues t (any thread, no lock).
 * Returns 1 if the inbox was empty. If it was not, the task already there
 * covers t: no consumer has taken it yet, and whoever does takes t with it
 * in the same swap, so t needs no wake-up of its own. */
static int patio__inbox_push(patio__inbox *in, patio_executor *ex, patio_task *t)
{
    patio_task *before;
    t->executor = ex;
    t->prev = NULL;
    patio__store(&t->state, PATIO__TASK_QUEUED);
    /* `before` is ours: once t is in, a consumer may rewrite t->next */
    before = __atomic_load_n(&in->head, __ATOMIC_RELAXED);
    do t->next = before;
    while (!__atomic_compare_exchange_n(&in->head, &before, t, 1, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return before == NULL;
}

static int patio__inbox_empty(patio__inbox *in)
{
    return __atomic_load_n(&in->head, __ATOMIC_SEQ_CST) == NULL;
}

/* Under the consumers' lock: appends the inbox to q, oldest first. */
static void patio__inbox_move(patio__inbox *in, patio__task_queue *q)
{
    patio_task *t, *fifo = NULL;
    if (patio__inbox_empty(in)) return; /* a load spares the line a swap would take */
    t = __atomic_exchange_n(&in->head, NULL, __ATOMIC_SEQ_CST);
    while (t) {
        patio_task *next = t->next;
        t->next = fifo;
        fifo = t;
        t = next;
    }
    while ((t = fifo) != NULL) {
        fifo = t->next;
        patio__tq_push(q, t);
    }
}

/* Under the consumers' lock: the counterpart of patio__inbox_reserve for
 * n tasks taken off the queue (started, cancelled, or failed). */
static void patio__inbox_taken(patio__inbox *in, size_t n)
{
    if (n) __atomic_fetch_sub(&in->pending, n, __ATOMIC_SEQ_CST);
}

static size_t patio__inbox_pending(patio__inbox *in)
{
    return __atomic_load_n(&in->pending, __ATOMIC_SEQ_CST);
}

/* Without the lock, when work is coming in from other threads: waits while
 * the submitters are still adding to it (each look PATIO__SETTLE_NS apart,
 * at most PATIO__SETTLE_MAX_NS in all), so the consumer takes a burst in
 * batches instead of racing the submitter for its tasks one by one. Each
 * take writes the inbox's line, so the submitter's next push would miss
 * the cache: a consumer that keeps up costs the submitter a miss or two
 * per task. The looks are far apart for the same reason. A single task is
 * taken at once (waiting would only add to its latency), and so is a
 * burst of `full` or more. */
#define PATIO__SETTLE_NS 500u
#define PATIO__SETTLE_MAX_NS 10000u

static void patio__inbox_settle(patio__inbox *in, size_t full)
{
    uint64_t start = patio__now_ns(), mark = start;
    size_t last = patio__inbox_pending(in);
    while (last > 1 && last < full) {
        uint64_t now = patio__now_ns();
        size_t n;
        if (now - start >= PATIO__SETTLE_MAX_NS) return;
        if (now - mark < PATIO__SETTLE_NS) { patio__cpu_relax(); continue; }
        n = patio__inbox_pending(in);
        if (n <= last) return; /* the burst is in (or taken by another consumer) */
        last = n;
        mark = now;
    }
}

/* Cancels a task still in the inbox or in q, the queue behind it that the
 * consumers guard with mu. */
static int patio__inbox_cancel(pthread_mutex_t *mu, patio__inbox *in, patio__task_queue *q, patio_task *t)
{
    int rc;
    pthread_mutex_lock(mu);
    patio__inbox_move(in, q);
    rc = patio__tq_cancel(q, t);
    if (rc == PATIO_OK) patio__inbox_taken(in, 1);
    pthread_mutex_unlock(mu);
    return rc;
}

static int patio__spin_us(int cfg)
{
    if (cfg < 0) return 0;
    return cfg ? cfg : PATIO_POOL_SPIN_US;
}

/* ---- thread pool ---------------------------------------------------- */

/* Waking a sleeping worker costs tens of microseconds of latency and CPU
 * time on both sides; with tiny tasks, one awake worker drains a burst
 * faster than several that wake one another and share the CPUs. So a
 * submit wakes a sleeper only when no worker is awake for the work, or
 * when the queue holds more than PATIO__POOL_HELP_NS of work (at the
 * measured pace) per busy worker. A task that turns out long cannot hold
 * up the queue behind it for long: while workers are busy (and for two
 * rounds after), one sleeper stands by with a timeout and takes over a
 * queue that made no progress for PATIO__POOL_STANDBY_NS.
 * Each worker sleeps on a condition variable of its own, and work wakes
 * the one that went to sleep last: its cache is warm and it often has not
 * left its CPU yet, while a shared condition variable would wake the one
 * that slept longest, so every burst would start on a cold thread.
 * Submitting takes no lock while a worker is sure to look at the queue
 * anyway (see patio__pool_covered): tasks go to the inbox, and workers
 * move it into the queue under the lock. */
#define PATIO__POOL_HELP_NS 500000u
#define PATIO__POOL_STANDBY_NS 1000000u
#define PATIO__POOL_BATCH 16

struct patio__pool;

typedef struct patio__pool_worker {
    struct patio__pool *pool;
    pthread_cond_t cv;
    int woken;             /* under mu: a waker picked this sleeper */
} patio__pool_worker;

/* Fields marked "sc" are written under mu with sequentially consistent
 * stores, so that a submitter may read them without the lock; each such
 * reading is paired with a re-check of the inbox by the worker that
 * changes the field (see patio__pool_covered). */
typedef struct patio__pool {
    patio_executor base;
    PATIO__PAD(pad_before);
    pthread_mutex_t mu;
    patio__pool_worker *workers;  /* one per thread */
    int *idle;             /* sleepers other than the standby, the most recent last */
    int nidle;             /* sc */
    patio__task_queue q;
    int nthreads;          /* threads started (the starting thread's count) */
    int size;              /* max_workers: set before any thread starts, then read-only */
    int busy;              /* sc: workers running a batch */
    int standby;           /* sc: index of the sleeper waiting with a timeout (see above), -1 = none */
    int want_standby;      /* a sleeper was woken to become the standby */
    int waking;            /* sc: a sleeper was signalled, and none has woken since */
    int held;              /* sc: wake-ups held back while a burst is submitted */
    uint64_t taken;        /* batches taken so far: the queue's progress */
    int spin_us;
    PATIO__PAD(pad_mid);   /* below: written without mu */
    /* What a submit reads, on a line of its own: workers write the lines
     * around it for every batch, and a submit would pay for each. */
    patio__inbox in;
    size_t max_queue;
    int closing;           /* atomic */
    PATIO__PAD(pad_inbox);
    uint64_t task_ns;      /* atomic: moving average of a task's run time */
    int spinner;           /* atomic: 1 while one idle worker polls (only one does, to spare the CPUs) */
    patio__spin_state spin;  /* updated only by the worker holding `spinner` */
    pthread_t *threads;
    PATIO__PAD(pad_after);
} patio__pool;

#define PATIO__SC_SET(field, v) __atomic_store_n(&(field), (v), __ATOMIC_SEQ_CST)
#define PATIO__SC_GET(field) __atomic_load_n(&(field), __ATOMIC_SEQ_CST)

/* Under mu: takes entry i off the idle list and returns the worker's index. */
static int patio__pool_unidle(patio__pool *p, int i)
{
    int idx = p->idle[i];
    memmove(p->idle + i, p->idle + i + 1, (size_t)(p->nidle - i - 1) * sizeof *p->idle);
    PATIO__SC_SET(p->nidle, p->nidle - 1);
    return idx;
}

/* Under mu: marks sleeper idx woken and returns it (signal it after unlocking). */
static patio__pool_worker *patio__pool_pick(patio__pool *p, int idx)
{
    patio__pool_worker *w = &p->workers[idx];
    w->woken = 1;
    PATIO__SC_SET(p->waking, 1);
    return w;
}

/* Under mu, with the inbox moved into the queue and tasks queued: the
 * sleeper to wake, to run them or to stand by while busy workers run
 * theirs; NULL if none should wake. Work goes to the sleeper that went to
 * sleep last; standing by, which may well end without work, to the one
 * that has slept longest. */
static patio__pool_worker *patio__pool_wake_one(patio__pool *p)
{
    int idx;
    /* nobody to wake, a polling worker will take them, or one is on its way */
    if ((!p->nidle && p->standby < 0) || patio__load(&p->spinner) || p->waking) return NULL;
    if (p->busy && (uint64_t)p->q.count * patio__load(&p->task_ns) <=
                       (uint64_t)PATIO__POOL_HELP_NS * (uint64_t)p->busy) {
        if (p->standby >= 0 || p->want_standby || !p->nidle) return NULL;
        p->want_standby = 1;
        return patio__pool_pick(p, patio__pool_unidle(p, 0));
    }
    if (p->nidle) return patio__pool_pick(p, patio__pool_unidle(p, p->nidle - 1));
    idx = p->standby;
    PATIO__SC_SET(p->standby, -1);
    return patio__pool_pick(p, idx);
}

/* Without the lock, after a push: 1 if some worker is sure to look at the
 * queue without being woken, by the rules of patio__pool_wake_one. Each
 * rule pairs with the worker side: a worker stores the field, then looks
 * at the inbox (all sequentially consistent), so either the submitter
 * sees the new value and takes the lock, or the worker sees the task. */
static int patio__pool_covered(patio__pool *p)
{
    int busy;
    if (PATIO__SC_GET(p->held) || PATIO__SC_GET(p->spinner) || PATIO__SC_GET(p->waking)) return 1;
    if (!PATIO__SC_GET(p->nidle) && PATIO__SC_GET(p->standby) < 0) return 1; /* nobody sleeps */
    busy = PATIO__SC_GET(p->busy);
    return busy && PATIO__SC_GET(p->standby) >= 0 &&
           (uint64_t)patio__inbox_pending(&p->in) * patio__load(&p->task_ns) <=
               (uint64_t)PATIO__POOL_HELP_NS * (uint64_t)busy;
}

/* Under mu: wakes every sleeper (tasks came back to the queue, or the
 * pool closes). Rare, so it signals under the lock. */
static void patio__pool_wake_all(patio__pool *p)
{
    int i;
    for (i = 0; i < p->nidle; i++) pthread_cond_signal(&patio__pool_pick(p, p->idle[i])->cv);
    PATIO__SC_SET(p->nidle, 0);
    if (p->standby >= 0) pthread_cond_signal(&patio__pool_pick(p, p->standby)->cv);
    PATIO__SC_SET(p->standby, -1);
}

/* Under mu: the sleeper to wake for what the inbox holds, if any. */
static patio__pool_worker *patio__pool_wake_for_inbox(patio__pool *p)
{
    patio__inbox_move(&p->in, &p->q);
    return p->q.head && !p->held ? patio__pool_wake_one(p) : NULL;
}

static int patio__pool_submit(patio_executor *ex, patio_task *t)
{
    patio__pool *p = (patio__pool *)ex;
    patio__pool_worker *wake;
    int rc = patio__inbox_reserve(&p->in, &p->closing, p->max_queue);
    if (rc != PATIO_OK) return rc;
    if (!patio__inbox_push(&p->in, ex, t) || patio__pool_covered(p)) return PATIO_OK;
    pthread_mutex_lock(&p->mu);
    wake = patio__pool_wake_for_inbox(p);
    pthread_mutex_unlock(&p->mu);
    if (wake) pthread_cond_signal(&wake->cv);
    return PATIO_OK;
}

static int patio__pool_cancel(patio_executor *ex, patio_task *t)
{
    patio__pool *p = (patio__pool *)ex;
    return patio__inbox_cancel(&p->mu, &p->in, &p->q, t);
}

/* Polls for work without the lock for up to the adaptive budget; 1 if
 * work appeared. Only the worker holding `spinner` calls it. */
static int patio__pool_spin(patio__pool *p)
{
    uint64_t budget = patio__spin_budget(&p->spin), start, until;
    unsigned i;
    if (!budget) return 0;
    start = patio__now_ns();
    until = start + budget;
    for (i = 0;; i++) {
        if (patio__inbox_pending(&p->in) || patio__load(&p->closing)) {
            patio__spin_result(&p->spin, 1, patio__now_ns() - start);
            return 1;
        }
        if ((i & 63) == 63) {
            if (patio__now_ns() >= until) {
                patio__spin_result(&p->spin, 0, budget);
                return 0;
            }
            sched_yield(); /* see patio__loop_spin */
        }
        patio__cpu_relax();
    }
}

/* A burst is taken in batches of this many per worker. */
static size_t patio__pool_burst(const patio__pool *p) { return (size_t)p->size * 2u * PATIO__POOL_BATCH; }

/* Sleeps (lock held) as the standby; returns 1 if it should take work:
 * it was woken for it, or the queue made no progress while it slept.
 * *idle counts the rounds in a row that found the pool idle. */
static int patio__pool_stand_by(patio__pool *p, patio__pool_worker *w, int *idle)
{
    uint64_t seen = p->taken, until = patio__now_ns() + PATIO__POOL_STANDBY_NS;
    int timed_out = 0;
    PATIO__SC_SET(p->standby, (int)(w - p->workers));
    p->want_standby = 0; /* a request for one is met */
    if (!patio__inbox_empty(&p->in)) { /* pushed by a submitter that saw no standby */
        PATIO__SC_SET(p->standby, -1);
        return 1;
    }
    while (!w->woken && !patio__load(&p->closing) && !timed_out)
        timed_out = patio__cond_wait_until(&w->cv, &p->mu, until) == ETIMEDOUT;
    if (w->woken) { /* the waker took it off the standby post */
        w->woken = 0;
        PATIO__SC_SET(p->waking, 0);
        return 1;
    }
    PATIO__SC_SET(p->standby, -1);
    if (patio__load(&p->closing)) return 1;
    *idle = p->taken == seen && !p->busy && !p->q.head ? *idle + 1 : 0;
    return p->taken == seen;
}

/* Sleeps (lock held) until a waker picks this worker or the pool closes;
 * returns 1 if a waker picked it. */
static int patio__pool_sleep(patio__pool *p, patio__pool_worker *w)
{
    int i, me = (int)(w - p->workers);
    p->idle[p->nidle] = me;
    PATIO__SC_SET(p->nidle, p->nidle + 1);
    if (!patio__inbox_empty(&p->in)) { /* pushed by a submitter that saw nobody asleep */
        patio__pool_unidle(p, p->nidle - 1);
        return 0;
    }
    while (!w->woken && !patio__load(&p->closing)) pthread_cond_wait(&w->cv, &p->mu);
    if (w->woken) {
        w->woken = 0;
        PATIO__SC_SET(p->waking, 0);
        return 1;
    }
    for (i = 0; i < p->nidle; i++) /* closing: leave the idle list */
        if (p->idle[i] == me) {
            patio__pool_unidle(p, i);
            break;
        }
    return 0;
}

/* Waits (lock held) until this worker should run queued tasks, or the
 * pool closes. An awake worker takes what is queued; a sleeper takes it
 * when woken for it, or as the standby of a stalled queue. */
static void patio__pool_wait_for_work(patio__pool *p, patio__pool_worker *w)
{
    int take = 1, idle = 0;
    for (;;) {
        int expected = 0;
        patio__inbox_move(&p->in, &p->q);
        if (patio__load(&p->closing) || (p->q.head && (take || !p->busy))) return;
        if (!p->q.head && p->spin_us && patio__cas(&p->spinner, &expected, 1)) {
            int found;
            pthread_mutex_unlock(&p->mu);
            found = patio__pool_spin(p);
            if (found) patio__inbox_settle(&p->in, patio__pool_burst(p));
            PATIO__SC_SET(p->spinner, 0);
            pthread_mutex_lock(&p->mu);
            take = 1;
            patio__inbox_move(&p->in, &p->q);
            if (p->q.head || patio__load(&p->closing)) continue;
        }
        /* the standby stays one until the pool was idle for two rounds:
         * work that comes in bursts would otherwise wake a new one each time */
        if (p->standby < 0 && p->size > 1 && (p->busy || idle < 2)) {
            take = patio__pool_stand_by(p, w, &idle);
        } else if (patio__pool_sleep(p, w)) {
            take = !p->want_standby;
            p->want_standby = 0; /* this one stands by now (next round) */
        } else {
            take = 1;
        }
    }
}

#define PATIO__POOL_SLOW_NS 100000u

/* Puts tasks a worker took but has not started back at the queue's head. */
static void patio__pool_give_back(patio__pool *p, patio_task **tasks, size_t n)
{
    size_t i;
    pthread_mutex_lock(&p->mu);
    __atomic_fetch_add(&p->in.pending, n, __ATOMIC_SEQ_CST);
    for (i = n; i-- > 0;) {
        patio__tq_push_front(&p->q, tasks[i]);
        patio__store(&tasks[i]->state, PATIO__TASK_QUEUED);
    }
    patio__pool_wake_all(p);
    pthread_mutex_unlock(&p->mu);
}

/* Runs a batch; if one task turns out slow, the rest go back to the queue
 * so that other workers run them instead of waiting behind it. */
static void patio__pool_run_batch(patio__pool *p, patio_task **batch, size_t n, int measure)
{
    uint64_t first, start, avg, pace;
    patio__clock clock = { 0, 0 };
    size_t i;
    if (n == 1 && !measure) { patio_task_run(batch[0]); return; }
    first = start = patio__clock_sync(&clock);
    for (i = 0; i < n; i++) {
        uint64_t end;
        patio_task_run(batch[i]);
        end = patio__clock_now(&clock);
        if (end - start > PATIO__POOL_SLOW_NS && i + 1 < n) {
            patio__pool_give_back(p, batch + i + 1, n - i - 1);
            i++;
            break;
        }
        start = end;
    }
    /* the pace the wake-up rule goes by (weight 1/4; races lose a sample) */
    avg = (patio__clock_sync(&clock) - first) / i;
    pace = patio__load(&p->task_ns);
    patio__store(&p->task_ns, pace - pace / 4 + avg / 4);
}

/* Under mu: takes a batch off the queue into `batch`; returns how many.
 * Batches cut the locking for bursts of short tasks; a short queue is
 * taken one by one so that idle workers share it. */
static size_t patio__pool_take(patio__pool *p, patio_task **batch)
{
    size_t n, take = p->q.count / (2 * (size_t)p->size);
    if (take < 1) take = 1;
    if (take > PATIO__POOL_BATCH) take = PATIO__POOL_BATCH;
    for (n = 0; n < take && p->q.head; n++) {
        batch[n] = patio__tq_pop(&p->q);
        patio__store(&batch[n]->state, PATIO__TASK_RUNNING);
    }
    patio__inbox_taken(&p->in, n);
    return n;
}

static void *patio__pool_worker_main(void *arg)
{
    patio__pool_worker *self = (patio__pool_worker *)arg;
    patio__pool *p = self->pool;
    patio_task *batch[PATIO__POOL_BATCH];
    unsigned singles = 0;
    int busy = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        patio__pool_worker *helper = NULL;
        size_t n;
        if (!busy) patio__pool_wait_for_work(p, self);
        if (!p->q.head) {
            /* closing: done once no submitter is between its check and its push */
            if (!patio__inbox_pending(&p->in)) break;
            pthread_mutex_unlock(&p->mu);
            sched_yield();
            pthread_mutex_lock(&p->mu);
            continue;
        }
        n = patio__pool_take(p, batch);
        p->taken++;
        if (!busy) PATIO__SC_SET(p->busy, p->busy + 1);
        busy = 1;
        if (p->q.count) helper = patio__pool_wake_one(p);
        pthread_mutex_unlock(&p->mu);
        if (helper) pthread_cond_signal(&helper->cv);
        /* single tasks are timed one in 8: reading the clock is not free */
        patio__pool_run_batch(p, batch, n, n > 1 || (++singles & 7) == 0);
        if (patio__inbox_pending(&p->in)) patio__inbox_settle(&p->in, patio__pool_burst(p));
        pthread_mutex_lock(&p->mu);
        /* More work: take it still counted as busy. Dropping the count
         * only to raise it again would show submitters a pool with nobody
         * busy, and send them to this lock to wake a sleeper for nothing.
         * Without work, the count drops before wait_for_work looks at the
         * inbox again, which a submitter that saw this worker busy relies on. */
        patio__inbox_move(&p->in, &p->q);
        if (!p->q.head) {
            PATIO__SC_SET(p->busy, p->busy - 1);
            busy = 0;
        }
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void patio__pool_shutdown(patio_executor *ex)
{
    patio__pool *p = (patio__pool *)ex;
    int i;
    pthread_mutex_lock(&p->mu);
    PATIO__SC_SET(p->closing, 1); /* idle workers poll it without the lock */
    patio__pool_wake_all(p);
    pthread_mutex_unlock(&p->mu);
    for (i = 0; i < p->nthreads; i++) pthread_join(p->threads[i], NULL);
    p->nthreads = 0;
}

static void patio__pool_destroy(patio_executor *ex)
{
    patio__pool *p = (patio__pool *)ex;
    const patio_hooks *h = ex->hooks;
    int i;
    pthread_mutex_destroy(&p->mu);
    for (i = 0; i < p->size; i++) pthread_cond_destroy(&p->workers[i].cv);
    patio__free(h, p->workers);
    patio__free(h, p->idle);
    patio__free(h, p->threads);
    patio__free(h, p);
}

static const patio_executor_vtable patio__pool_vt = {
    "thread_pool", patio__pool_submit, patio__pool_cancel, NULL, NULL,
    patio__pool_shutdown, patio__pool_destroy
};

/* See patio__executor_hold_wakes. */
static void patio__pool_hold_wakes(patio__pool *p, int hold)
{
    patio__pool_worker *wake = NULL;
    pthread_mutex_lock(&p->mu);
    PATIO__SC_SET(p->held, p->held + (hold ? 1 : -1));
    if (!p->held) wake = patio__pool_wake_for_inbox(p);
    pthread_mutex_unlock(&p->mu);
    if (wake) pthread_cond_signal(&wake->cv);
}

static int patio__pool_start_threads(patio__pool *p, int want)
{
    const patio_hooks *h = p->base.hooks;
    p->threads = (pthread_t *)patio__calloc(h, (size_t)want * sizeof *p->threads);
    p->workers = (patio__pool_worker *)patio__calloc(h, (size_t)want * sizeof *p->workers);
    p->idle = (int *)patio__calloc(h, (size_t)want * sizeof *p->idle);
    if (!p->threads || !p->workers || !p->idle) return PATIO_ERR_NOMEM;
    for (p->size = 0; p->size < want; p->size++) {
        p->workers[p->size].pool = p;
        patio__cond_init(&p->workers[p->size].cv); /* the standby's timed wait uses the monotonic clock */
    }
    for (p->nthreads = 0; p->nthreads < want; p->nthreads++)
        if (pthread_create(&p->threads[p->nthreads], NULL, patio__pool_worker_main, &p->workers[p->nthreads]) != 0)
            return PATIO_ERR_NOMEM;
    return PATIO_OK;
}

PATIO_API patio_executor *patio_thread_pool_new_ex(patio_registry *r, const patio_thread_pool_config *cfg)
{
    patio_thread_pool_config def;
    patio__pool *p;
    int workers;
    if (!r) return NULL;
    if (!cfg) { memset(&def, 0, sizeof def); cfg = &def; }
    workers = cfg->max_workers ? cfg->max_workers : PATIO_DEFAULT_MAX_WORKERS;
    if (workers < 1 || workers > 4096) return NULL;
    p = (patio__pool *)patio__calloc(&r->hooks, sizeof *p);
    if (!p) return NULL;
    patio_executor_init(&p->base, &patio__pool_vt, r);
    p->max_queue = cfg->max_queue ? cfg->max_queue : PATIO_DEFAULT_QUEUE_SIZE;
    p->spin_us = patio__spin_us(cfg->spin_us);
    patio__spin_init(&p->spin, (uint64_t)p->spin_us * 1000u);
    p->task_ns = PATIO__POOL_HELP_NS; /* until measured, tasks count as long: spread them */
    p->standby = -1;
    patio__mutex_init_hot(&p->mu);
    if (patio__pool_start_threads(p, workers) != PATIO_OK) {
        patio_executor_free(&p->base);
        return NULL;
    }
    return &p->base;
}

PATIO_API patio_executor *patio_thread_pool_new(patio_registry *r, int max_workers)
{
    patio_thread_pool_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = max_workers;
    return patio_thread_pool_new_ex(r, &cfg);
}

/* ---- async executor: tasks run on the loop thread ------------------- */

typedef struct patio__async {
    patio_executor base;
    PATIO__PAD(pad_before);
    pthread_mutex_t mu;    /* the queue, `running`; taken by the loop thread */
    pthread_cond_t cv;
    patio__task_queue q;
    int running;           /* started and not finished (includes PATIO_PENDING ones) */
    int max_workers;
    int draining;          /* loop thread only: patio__async_drain runs tasks */
    int ended_in_drain;    /* loop thread only: tasks that ended meanwhile, not yet counted off */
    patio__post drain;
    /* What a submit touches, apart from what the loop thread writes for
     * every batch: sharing their line would cost a submit a miss each time. */
    PATIO__PAD(pad_mid);
    patio__inbox in;
    size_t max_queue;
    int closing;           /* atomic */
    int drain_posted;      /* atomic: a drain is queued on the loop */
    int pushed_from_afar;  /* atomic: the push that asked for it came from another thread */
    PATIO__PAD(pad_after);
} patio__async;

/* The swap pairs with the drain's reset and its look at the inbox (both
 * sequentially consistent): a task pushed after the drain looked finds
 * drain_posted at 0 and posts a new drain. */
static void patio__async_schedule(patio__async *a)
{
    if (__atomic_exchange_n(&a->drain_posted, 1, __ATOMIC_SEQ_CST) == 0)
        patio__loop_post(a->base.loop, &a->drain);
}

/* Under mu: nothing queued or running. */
static int patio__async_idle_locked(patio__async *a)
{
    return a->running == 0 && patio__inbox_pending(&a->in) == 0;
}

#define PATIO__ASYNC_BATCH 32
#define PATIO__ASYNC_BURST (8 * PATIO__ASYNC_BATCH)

/* Under mu: counts off the tasks that ended during the drain, and takes
 * the next batch to start into `batch`; returns how many. */
static size_t patio__async_take(patio__async *a, patio_task **batch)
{
    size_t n = 0;
    a->running -= a->ended_in_drain;
    a->ended_in_drain = 0;
    patio__inbox_move(&a->in, &a->q);
    while (n < PATIO__ASYNC_BATCH && a->running < a->max_workers && a->q.head) {
        patio_task *t = patio__tq_pop(&a->q);
        a->running++;
        patio__store(&t->state, PATIO__TASK_RUNNING);
        batch[n++] = t;
    }
    patio__inbox_taken(&a->in, n);
    if (!n && patio__async_idle_locked(a)) pthread_cond_broadcast(&a->cv);
    return n;
}

/* On the loop thread: starts queued tasks while slots are free, a batch
 * per lock. A task that ends during the drain is counted off at the next
 * lock rather than taking the lock itself (see patio__async_finished).
 * Tasks that other threads submit are let settle first: a drain that kept
 * up with such a submitter would take them one or two at a time. */
static void patio__async_drain(patio__post *post)
{
    patio__async *a = PATIO__CONTAINER(post, patio__async, drain);
    patio_task *batch[PATIO__ASYNC_BATCH];
    __atomic_store_n(&a->drain_posted, 0, __ATOMIC_SEQ_CST);
    /* tasks from the loop thread itself are all in by now */
    if (patio__load_relaxed(&a->pushed_from_afar)) patio__inbox_settle(&a->in, PATIO__ASYNC_BURST);
    a->draining = 1;
    for (;;) {
        size_t n, i;
        pthread_mutex_lock(&a->mu);
        n = patio__async_take(a, batch);
        pthread_mutex_unlock(&a->mu);
        if (!n) break;
        for (i = 0; i < n; i++) patio_task_run(batch[i]);
    }
    a->draining = 0;
}

static int patio__async_attach(patio_executor *ex, patio_loop *loop)
{
    PATIO__UNUSED(ex);
    PATIO__UNUSED(loop);
    return PATIO_OK;
}

static int patio__async_submit(patio_executor *ex, patio_task *t)
{
    patio__async *a = (patio__async *)ex;
    int rc;
    if (!ex->loop) return PATIO_ERR_CLOSED;
    rc = patio__inbox_reserve(&a->in, &a->closing, a->max_queue);
    if (rc != PATIO_OK) return rc;
    if (patio__inbox_push(&a->in, ex, t)) {
        __atomic_store_n(&a->pushed_from_afar, !patio_loop_in_loop_thread(ex->loop), __ATOMIC_RELAXED);
        patio__async_schedule(a);
    }
    return PATIO_OK;
}

static int patio__async_cancel(patio_executor *ex, patio_task *t)
{
    patio__async *a = (patio__async *)ex;
    return patio__inbox_cancel(&a->mu, &a->in, &a->q, t);
}

static void patio__async_finished(patio_executor *ex, patio_task *t)
{
    patio__async *a = (patio__async *)ex;
    int more;
    PATIO__UNUSED(t);
    if (patio_loop_in_loop_thread(ex->loop) && a->draining) {
        a->ended_in_drain++;
        return;
    }
    pthread_mutex_lock(&a->mu);
    a->running--;
    more = a->q.head != NULL;
    if (patio__async_idle_locked(a)) pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    if (more) patio__async_schedule(a);
}

static int patio__async_idle(patio__async *a)
{
    int idle;
    pthread_mutex_lock(&a->mu);
    idle = patio__async_idle_locked(a);
    pthread_mutex_unlock(&a->mu);
    return idle;
}

/* Finishes queued and running tasks: pumps the loop when nobody else runs
 * it, else waits for the loop thread to do the work. */
static void patio__async_shutdown(patio_executor *ex)
{
    patio__async *a = (patio__async *)ex;
    __atomic_store_n(&a->closing, 1, __ATOMIC_SEQ_CST);
    if (!ex->loop) return;
    if (patio_loop_in_loop_thread(ex->loop)) {
        patio__log(ex->hooks, PATIO_LOG_WARN, "async executor: shutdown from the loop thread does not wait");
        return;
    }
    while (!patio__async_idle(a)) {
        if (patio_loop_run_once(ex->loop, 10) == PATIO_ERR_INVALID) {
            pthread_mutex_lock(&a->mu);
            if (!patio__async_idle_locked(a))
                patio__cond_wait_until(&a->cv, &a->mu, patio__now_ns() + 10000000u);
            pthread_mutex_unlock(&a->mu);
        }
    }
}

static void patio__async_destroy(patio_executor *ex)
{
    patio__async *a = (patio__async *)ex;
    pthread_mutex_destroy(&a->mu);
    pthread_cond_destroy(&a->cv);
    patio__free(ex->hooks, a);
}

static const patio_executor_vtable patio__async_vt = {
    "async", patio__async_submit, patio__async_cancel, patio__async_attach, patio__async_finished,
    patio__async_shutdown, patio__async_destroy
};

PATIO_API patio_executor *patio_async_executor_new_ex(patio_registry *r, const patio_thread_pool_config *cfg)
{
    patio_thread_pool_config def;
    patio__async *a;
    if (!r) return NULL;
    if (!cfg) { memset(&def, 0, sizeof def); cfg = &def; }
    a = (patio__async *)patio__calloc(&r->hooks, sizeof *a);
    if (!a) return NULL;
    patio_executor_init(&a->base, &patio__async_vt, r);
    a->max_workers = cfg->max_workers ? cfg->max_workers : PATIO_DEFAULT_MAX_WORKERS;
    a->max_queue = cfg->max_queue ? cfg->max_queue : PATIO_DEFAULT_QUEUE_SIZE;
    a->drain.fn = patio__async_drain;
    if (a->max_workers < 1) { patio__free(&r->hooks, a); return NULL; }
    patio__mutex_init_hot(&a->mu);
    patio__cond_init(&a->cv);
    return &a->base;
}

PATIO_API patio_executor *patio_async_executor_new(patio_registry *r, int max_workers)
{
    patio_thread_pool_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = max_workers;
    return patio_async_executor_new_ex(r, &cfg);
}

/* ---- null executor -------------------------------------------------- */

static int patio__null_submit(patio_executor *ex, patio_task *t)
{
    t->executor = ex;
    patio_fail(t, "RuntimeError", "the null executor does not run tasks");
    patio__store(&t->finished, 1);
    patio__task_complete(t, PATIO_ERR_REMOTE);
    return PATIO_OK;
}

static void patio__null_destroy(patio_executor *ex) { patio__free(ex->hooks, ex); }

static const patio_executor_vtable patio__null_vt = {
    "null", patio__null_submit, NULL, NULL, NULL, NULL, patio__null_destroy
};

PATIO_API patio_executor *patio_null_executor_new(patio_registry *r)
{
    patio_executor *ex;
    if (!r) return NULL;
    ex = (patio_executor *)patio__calloc(&r->hooks, sizeof *ex);
    if (!ex) return NULL;
    patio_executor_init(ex, &patio__null_vt, r);
    return ex;
}


/* ========================================================================
 * >>process-pool  Process-pool executor: forked workers over socketpairs
 * ======================================================================== */

/* Shape: the parent keeps a bounded queue of submitted tasks and one I/O
 * thread. That thread gives each queued task to the live worker with the
 * fewest calls in flight, up to about 1 ms of work at that worker's pace
 * (capped by max_calls_per_worker), and encodes it
 * into that worker's output buffer. A worker gets its buffered calls in one
 * write when it is idle, when its answers come back, or once a good batch
 * waits; a worker whose current call has run for a while (PATIO__PP_BUSY_NS)
 * gets no new calls, and the ones buffered for it go back to the queue: so
 * a long task holds up only the calls that were already written to its
 * worker. The thread reads answers, completes their tasks, kills workers
 * whose call outlived its timeout, and reaps and replaces dead workers.
 * A worker is a plain blocking loop: read frames, run each call with a
 * task on its stack, write the answers in batches. Parent and worker speak
 * the wire framing (REQUEST with a CallRequest, RESPONSE with the value,
 * ERROR with the exception); a worker answers in order, and serials check
 * that each answer belongs to the oldest call. */

#include <sys/types.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <signal.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

#define PATIO__PP_DEFAULT_CALLS 256
/* How many calls a new worker is sent at once, before its pace is known. */
#define PATIO__PP_START_DEPTH 16
#define PATIO__PP_DEFAULT_FRAME (16u * 1024u * 1024u + 64u * 1024u)
#define PATIO__PP_MAX_WORKERS 1024
/* A worker writes its answers when its input runs dry, or before starting a
 * call once the oldest unsent answer belongs to a call that started this
 * long ago, or once this many bytes wait: batching without holding answers
 * back for long. */
#define PATIO__PP_BATCH_NS 50000u
#define PATIO__PP_BATCH_BYTES (64u * 1024u)
/* Buffers above this are released once empty, so one huge call does not
 * pin its memory for the life of the pool. */
#define PATIO__PP_KEEP_BUFFER (1024u * 1024u)
#define PATIO__PP_READ_CHUNK (64u * 1024u)
/* An expired call's answer may be on its way: wait this long before killing. */
#define PATIO__PP_KILL_GRACE_NS 20000000u
/* A worker whose socket closed but that cannot be reaped after this long is
 * killed (a task closed the socket, or it hangs in exit handlers). */
#define PATIO__PP_REAP_NS 2000000000u
/* After a failed fork (EAGAIN, ENOMEM), try again this much later. */
#define PATIO__PP_RESPAWN_NS 100000000u
/* A worker whose current call ran this long is taken for busy (see
 * patio__pp_room). */
#define PATIO__PP_BUSY_NS 1000000u
/* Tasks moved from the queue per lock hold. */
#define PATIO__PP_BATCH 64

/* ---- platform part: sockets, fds, signal names ------------------------ */

#if defined(MSG_NOSIGNAL)
#define PATIO__PP_SEND_FLAGS MSG_NOSIGNAL
#else
#define PATIO__PP_SEND_FLAGS 0 /* SO_NOSIGPIPE is set on both ends instead */
#endif

static void patio__pp_fd_setup(int fd, int cloexec_done)
{
    if (!cloexec_done) fcntl(fd, F_SETFD, FD_CLOEXEC);
#if defined(SO_NOSIGPIPE)
    {
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
    }
#endif
}

/* A close-on-exec socketpair; sv[0] (the parent's end) is non-blocking. */
static int patio__pp_socketpair(int sv[2])
{
    int cloexec_done = 0;
#if defined(SOCK_CLOEXEC)
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0) cloexec_done = 1;
    else
#endif
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return PATIO_ERR_IO;
    patio__pp_fd_setup(sv[0], cloexec_done);
    patio__pp_fd_setup(sv[1], cloexec_done);
    if (fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK) != 0) {
        close(sv[0]);
        close(sv[1]);
        return PATIO_ERR_IO;
    }
    return PATIO_OK;
}

#if defined(__linux__) && defined(SYS_getdents64)
/* Closes fds >= 3 but keep, listed from /proc/self/fd with the raw
 * getdents64 call: no malloc, safe in a child of a threaded parent. */
static int patio__pp_close_listed(int keep)
{
    char buf[4096];
    int dfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return -1;
    for (;;) {
        long n = syscall(SYS_getdents64, dfd, buf, sizeof buf), off;
        if (n <= 0) break;
        for (off = 0; off < n;) {
            unsigned short reclen;
            const char *name = buf + off + 19; /* struct linux_dirent64: d_name */
            int fd = 0;
            memcpy(&reclen, buf + off + 16, sizeof reclen);
            while (*name >= '0' && *name <= '9') fd = fd * 10 + (*name++ - '0');
            if (*name == '\0' && name != buf + off + 19 && fd > 2 && fd != keep && fd != dfd) close(fd);
            off += reclen ? reclen : n; /* a zero length would loop forever */
        }
    }
    close(dfd);
    return 0;
}
#endif

/* In a new worker: closes every inherited fd except 0, 1, 2 and keep, so
 * that it holds none of the parent's sockets, listening ports or poller
 * registrations alive. Returns the fd to use in place of keep. */
static int patio__pp_close_inherited(int keep)
{
#if defined(__linux__) && defined(SYS_close_range)
    int ok = 1;
    if (keep > 3) ok = syscall(SYS_close_range, 3u, (unsigned)keep - 1u, 0u) == 0;
    if (ok && syscall(SYS_close_range, (unsigned)(keep >= 3 ? keep + 1 : 3), ~0u, 0u) == 0) return keep;
#endif
#if defined(__linux__) && defined(SYS_getdents64)
    if (patio__pp_close_listed(keep) == 0) return keep;
#endif
#if defined(__FreeBSD__) || defined(__OpenBSD__) || defined(__NetBSD__) || defined(__DragonFly__)
    if (keep != 3) {
        if (dup2(keep, 3) != 3) return keep;
        close(keep);
        keep = 3;
    }
    closefrom(4);
    return keep;
#else
    {
        long max = sysconf(_SC_OPEN_MAX), fd;
        if (max < 0 || max > 65536) max = 65536;
        for (fd = 3; fd < max; fd++)
            if (fd != keep) close((int)fd);
        return keep;
    }
#endif
}

/* Our own table: strsignal() is not thread-safe everywhere. */
static const char *patio__signal_name(int sig)
{
    switch (sig) {
    case SIGHUP: return "SIGHUP";
    case SIGINT: return "SIGINT";
    case SIGQUIT: return "SIGQUIT";
    case SIGILL: return "SIGILL";
    case SIGABRT: return "SIGABRT";
    case SIGFPE: return "SIGFPE";
    case SIGKILL: return "SIGKILL";
    case SIGSEGV: return "SIGSEGV";
    case SIGPIPE: return "SIGPIPE";
    case SIGALRM: return "SIGALRM";
    case SIGTERM: return "SIGTERM";
    case SIGUSR1: return "SIGUSR1";
    case SIGUSR2: return "SIGUSR2";
#ifdef SIGBUS
    case SIGBUS: return "SIGBUS";
#endif
#ifdef SIGTRAP
    case SIGTRAP: return "SIGTRAP";
#endif
#ifdef SIGSYS
    case SIGSYS: return "SIGSYS";
#endif
#ifdef SIGXCPU
    case SIGXCPU: return "SIGXCPU";
#endif
#ifdef SIGXFSZ
    case SIGXFSZ: return "SIGXFSZ";
#endif
    default: return "unknown signal";
    }
}

/* "worker process 123 was killed by signal 11 (SIGSEGV)", "... exited (exit status 3)". */
static void patio__pp_describe_exit(char *out, size_t cap, long pid, int status, int known)
{
    if (!known) {
        snprintf(out, cap, "worker process %ld died (exit status unknown: it was reaped elsewhere)", pid);
    } else if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        int core = 0;
#ifdef WCOREDUMP
        core = WCOREDUMP(status) != 0;
#endif
        snprintf(out, cap, "worker process %ld was killed by signal %d (%s)%s", pid, sig,
                 patio__signal_name(sig), core ? ", core dumped" : "");
    } else if (WIFEXITED(status)) {
        snprintf(out, cap, "worker process %ld exited (exit status %d)", pid, WEXITSTATUS(status));
    } else {
        snprintf(out, cap, "worker process %ld died (wait status %d)", pid, status);
    }
}

/* Seconds to nanoseconds, saturating; UINT64_MAX = never. */
static uint64_t patio__pp_after(uint64_t now, double seconds)
{
    double ns;
    if (seconds != seconds || seconds <= 0) return now;
    ns = seconds * 1e9;
    if (ns >= 1.8e19 || now + (uint64_t)ns < now) return UINT64_MAX;
    return now + (uint64_t)ns;
}

/* ---- the worker process ------------------------------------------------ */

/* Everything a worker uses: its own buffers, the (read-only) registry and
 * its socket. Nothing of the parent's threads or locks. */
typedef struct patio__pw {
    const patio_registry *reg;
    const patio_hooks *hooks;
    int fd;
    uint32_t max_frame;
    patio__spin_state spin;  /* polling for more calls before blocking */
    const patio__entry *last; /* the function called last: most calls repeat it */
    uint8_t *in;
    size_t in_len, in_cap;
    patio_writer out;        /* answer frames not yet written */
    patio_writer result;     /* lent to each task: small results do not allocate */
    uint64_t oldest;         /* start of the oldest call whose answer is unsent */
    patio__clock clock;
    int flush_now;           /* an answer the parent should see at once */
} patio__pw;

static void patio__pw_flush(patio__pw *w)
{
    size_t off = 0;
    while (off < w->out.len) {
        ssize_t n = send(w->fd, w->out.data + off, w->out.len - off, PATIO__PP_SEND_FLAGS);
        if (n > 0) { off += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        _exit(0); /* the parent is gone: nobody waits for these answers */
    }
    patio_writer_reset(&w->out);
    if (w->out.cap > PATIO__PP_KEEP_BUFFER) patio_writer_free(&w->out);
    w->oldest = 0;
    w->flush_now = 0;
}

/* Appends one answer frame. A result above max_frame_size is answered
 * with OverflowError; without memory for the frame, the answers waiting
 * are written first and it is tried again, then MemoryError is answered. */
static void patio__pw_frame(patio__pw *w, int type, uint32_t serial, const void *payload, size_t len,
                            const char *exc_type, const char *exc_msg)
{
    char msg[120];
    int attempt;
    for (attempt = 0; attempt < 4; attempt++) {
        size_t mark = patio__frame_begin(&w->out);
        int rc;
        if (exc_type) patio__write_exception(&w->out, exc_type, strlen(exc_type), exc_msg, strlen(exc_msg));
        else patio_write_raw(&w->out, payload, len);
        rc = patio__frame_end(&w->out, mark, type, serial, w->max_frame);
        if (rc == PATIO_OK) return;
        w->out.len = mark;
        w->out.err = 0;
        if (rc == PATIO_ERR_OVERFLOW && !exc_type) {
            snprintf(msg, sizeof msg, "result too large: %lu bytes, the pool's max_frame_size is %lu",
                     (unsigned long)len, (unsigned long)w->max_frame);
            exc_type = "OverflowError";
            exc_msg = msg;
        } else if (w->out.len) {
            patio__pw_flush(w);
        } else {
            exc_type = "MemoryError";
            exc_msg = "the worker could not buffer the answer";
        }
        type = exc_type ? PATIO__PKT_ERROR : type;
    }
    _exit(70); /* not even a small frame fits: the parent reports the exit */
}

static void patio__pw_fail(patio__pw *w, uint32_t serial, const char *type, const char *msg)
{
    patio__pw_frame(w, PATIO__PKT_ERROR, serial, NULL, 0, type, msg);
}

/* Runs one call with a task on the stack and queues its answer. */
static void patio__pw_run(patio__pw *w, const patio__entry *e, const patio__call_request *req, uint32_t serial)
{
    patio_task t;
    patio__task_init(&t, e, w->hooks, req->args, req->args_len, req->kwargs, req->kwargs_len);
    t.result = w->result;
    patio_writer_reset(&t.result);
    t.timeout = req->has_timeout ? req->timeout : -1;
    if (patio_task_run(&t) == PATIO_PENDING) {
        /* Nothing runs here to finish it later; leave the buffer to it. */
        patio_writer_init(&w->result, w->hooks);
        patio__pw_fail(w, serial, "RuntimeError",
                       "tasks that return PATIO_PENDING cannot run in a process pool worker");
        return;
    }
    w->result = t.result;
    patio__pw_frame(w, t.status == PATIO_OK ? PATIO__PKT_RESPONSE : PATIO__PKT_ERROR, serial,
                    w->result.data, w->result.len, NULL, NULL);
    if (w->result.cap > PATIO__PP_KEEP_BUFFER) patio_writer_free(&w->result);
}

static void patio__pw_call(patio__pw *w, const patio__frame *f, uint64_t received)
{
    patio__call_request req;
    const patio__entry *e;
    uint64_t start = patio__clock_now(&w->clock);
    if (w->out.len && (w->flush_now || start - w->oldest >= PATIO__PP_BATCH_NS ||
                       w->out.len >= PATIO__PP_BATCH_BYTES)) {
        patio__pw_flush(w);
        start = patio__clock_sync(&w->clock); /* a slow write must not count against the next batch */
    }
    if (!w->out.len) w->oldest = start;
    if (patio__decode_call_request(f->payload, f->size, 0, 0, &req) != PATIO_OK) {
        patio__pw_fail(w, f->serial, "RuntimeError", "malformed call request");
        return;
    }
    e = w->last;
    if (!e || e->name_len != req.func_len || memcmp(e->name, req.func, req.func_len) != 0)
        e = w->last = patio__registry_find(w->reg, req.func, req.func_len);
    if (!e) {
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(req.func_len < 255 ? req.func_len : 255), req.func);
        patio__pw_fail(w, f->serial, "KeyError", name);
        return;
    }
    if (req.has_timeout && patio__pp_after(received, req.timeout) <= start) {
        /* Its caller gave up while it waited here: do not run it, and tell
         * the parent at once so it does not take the worker for stuck. */
        patio__pw_fail(w, f->serial, "TimeoutError", "the call expired before it started");
        w->flush_now = 1;
        return;
    }
    patio__pw_run(w, e, &req, f->serial);
}

/* Makes room for the next read: at least a chunk, or the whole frame
 * whose header is already in. */
static void patio__pw_reserve(patio__pw *w)
{
    size_t need = w->in_len + PATIO__PP_READ_CHUNK;
    uint8_t *p;
    if (w->in_len >= PATIO__FRAME_HEADER) {
        uint64_t size = patio__get_be(w->in + 1, 4);
        if (size > w->max_frame) _exit(72); /* the parent never sends these */
        if (PATIO__FRAME_HEADER + (size_t)size > need) need = PATIO__FRAME_HEADER + (size_t)size;
    }
    if (need <= w->in_cap) return;
    p = (uint8_t *)patio__realloc(w->hooks, w->in, need);
    if (!p) _exit(71);
    w->in = p;
    w->in_cap = need;
}

/* Waits for input: polls briefly first (the next calls usually follow the
 * answers closely, and waking a sleeping process costs far more), then
 * blocks in poll() for POLLIN. Not in recv(): the parent reading our
 * answers frees their buffers, which wakes everyone blocked in a read on
 * this socket for nothing, while poll() sleeps through all but input.
 * The parent closing the socket ends the worker. */
static uint64_t patio__pw_read(patio__pw *w)
{
    uint64_t budget = patio__spin_budget(&w->spin), start = budget ? patio__now_ns() : 0, now;
    int polling = budget != 0;
    ssize_t n;
    patio__pw_reserve(w);
    for (;;) {
        n = recv(w->fd, w->in + w->in_len, w->in_cap - w->in_len, MSG_DONTWAIT);
        if (n > 0) break;
        if (n == 0) _exit(0);
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) _exit(0);
        if (polling && patio__now_ns() - start >= budget) {
            patio__spin_result(&w->spin, 0, budget);
            polling = 0;
        }
        if (polling) {
            sched_yield(); /* polling must not keep the CPU from a process with work */
        } else {
            struct pollfd pfd;
            pfd.fd = w->fd;
            pfd.events = POLLIN;
            pfd.revents = 0;
            if (poll(&pfd, 1, -1) < 0 && errno != EINTR) _exit(0);
        }
    }
    w->in_len += (size_t)n;
    now = patio__clock_sync(&w->clock);
    if (polling) patio__spin_result(&w->spin, 1, now - start);
    return now;
}

#if defined(__GNUC__)
__attribute__((noreturn))
#endif
static void patio__pw_main(const patio_registry *reg, int fd, uint32_t max_frame, uint64_t spin_ns)
{
    patio__pw w;
    memset(&w, 0, sizeof w);
    w.reg = reg;
    w.hooks = &reg->hooks;
    w.fd = fd;
    w.max_frame = max_frame;
    patio__spin_init(&w.spin, spin_ns);
    patio_writer_init(&w.out, w.hooks);
    patio_writer_init(&w.result, w.hooks);
    for (;;) {
        uint64_t received = patio__pw_read(&w);
        size_t pos = 0;
        for (;;) {
            patio__frame f;
            int rc = patio__frame_parse(w.in + pos, w.in_len - pos, w.max_frame, &f);
            if (rc == 0) break;
            if (rc < 0) _exit(72); /* the parent never sends these */
            pos += PATIO__FRAME_HEADER + f.size;
            if (f.type == PATIO__PKT_REQUEST) patio__pw_call(&w, &f, received);
        }
        if (pos) {
            memmove(w.in, w.in + pos, w.in_len - pos);
            w.in_len -= pos;
        }
        if (w.in_len == 0 && w.in_cap > PATIO__PP_KEEP_BUFFER) {
            patio__free(w.hooks, w.in);
            w.in = NULL;
            w.in_cap = 0;
        }
        patio__pw_flush(&w);
    }
}

/* ---- the parent: bookkeeping ------------------------------------------- */

enum { PATIO__PW_EMPTY = 0, PATIO__PW_ALIVE = 1, PATIO__PW_DYING = 2 };

typedef struct patio__pp_slot {
    patio_task *task;
    uint32_t serial;
    uint64_t sent;        /* when it was queued for the worker */
    uint64_t deadline;    /* sent + the caller's timeout; UINT64_MAX = none */
    size_t end;           /* where its frame ends in the worker's out buffer */
} patio__pp_slot;

typedef struct patio__pp_worker {
    int state;            /* PATIO__PW_*: written under the pool mutex */
    long pid;             /* written under the pool mutex */
    int fd;               /* parent's end; -1 once closed */
    patio__pp_slot *ring; /* calls sent and not answered, oldest first */
    unsigned head, count;
    uint32_t serial;
    uint64_t head_since;  /* when ring[head] became the call the worker runs */
    uint64_t call_ns;     /* moving average of the time between its answers */
    unsigned depth;       /* patio__pp_depth, refreshed once per dispatch */
    patio_writer out;     /* request frames not yet written */
    size_t out_off;
    unsigned unsent;      /* calls whose frames are (partly) in out */
    int blocked;          /* the socket was full: wait for POLLOUT */
    int answered;         /* answers arrived since the last write */
    uint8_t *in;          /* answer bytes not yet parsed */
    size_t in_len, in_cap;
    uint64_t eof_at;      /* when its socket closed (its exit status is due) */
    int killed;           /* we sent SIGKILL */
    char reason[200];     /* why we killed it, told to the calls it held */
} patio__pp_worker;

enum { PATIO__IO_AWAKE = 0, PATIO__IO_ASLEEP = 1, PATIO__IO_WOKEN = 2 };

typedef struct patio__ppool {
    patio_executor base;
    /* Submitters push to the lock-free inbox and take no lock: the I/O
     * thread moves it into q under mu (which cancel also takes). The
     * fields marked "sc" are sequentially consistent, paired as in
     * patio__pp_submit and patio__pp_wait, so that a submitter never misses
     * the I/O thread going to sleep. */
    pthread_mutex_t mu;
    patio__task_queue q;   /* under mu */
    PATIO__PAD(pad_inbox); /* below, what a submit touches; the I/O thread writes q per batch */
    patio__inbox in;       /* its `pending` counts every task not yet given to a worker */
    size_t max_queue;
    int closing;           /* sc */
    int io_state;          /* sc: PATIO__IO_AWAKE, _ASLEEP or _WOKEN (see patio__pp_wait) */
    int held;              /* sc: wake-ups held back while a burst is submitted */
    PATIO__PAD(pad_after_inbox);
    int live;              /* under mu: workers in state ALIVE */
    patio__wake wake;
    pthread_t io;
    int io_running;
    int nworkers, max_calls, kill_on_timeout, inherit_fds;
    uint32_t max_frame;
    uint64_t spin_ns;      /* the ceiling of the adaptive polling below */
    patio__spin_state spin; /* I/O thread: polling before it blocks */
    patio__pp_worker *w;
    struct pollfd *pfd;    /* I/O thread: the wake fd, then worker sockets */
    int *pfd_worker;
    uint64_t respawn_at;   /* I/O thread: earliest next fork after one failed */
} patio__ppool;

static void patio__pp_set_state(patio__ppool *p, patio__pp_worker *w, int state, long pid)
{
    pthread_mutex_lock(&p->mu);
    if (w->state == PATIO__PW_ALIVE) p->live--;
    if (state == PATIO__PW_ALIVE) p->live++;
    w->state = state;
    w->pid = pid;
    pthread_mutex_unlock(&p->mu);
}

/* ---- the parent: creating a worker ------------------------------------- */

#if defined(__GNUC__)
__attribute__((noreturn))
#endif
static void patio__pp_child(patio__ppool *p, int fd)
{
    int i;
    if (!p->inherit_fds) {
        fd = patio__pp_close_inherited(fd);
    } else {
        /* keep the user's fds, but none of ours: the other workers'
         * sockets would otherwise never see EOF */
        for (i = 0; i < p->nworkers; i++)
            if (p->w[i].fd >= 0) close(p->w[i].fd);
        patio__wake_close(&p->wake);
    }
    patio__pw_main(p->base.registry, fd, p->max_frame, p->spin_ns);
}

/* How many calls a worker may hold: about PATIO__PP_BUSY_NS of work at
 * its recent pace (so tiny calls travel in deep batches while a call
 * that turns out long holds up little behind it), at least 2 (the next
 * call is there when one ends), at most max_calls_per_worker. */
static unsigned patio__pp_depth(const patio__ppool *p, const patio__pp_worker *w)
{
    uint64_t depth = PATIO__PP_BUSY_NS / (w->call_ns ? w->call_ns : 1);
    if (depth < 2) depth = 2;
    if (depth > (uint64_t)p->max_calls) depth = (uint64_t)p->max_calls;
    return (unsigned)depth;
}

static int patio__pp_spawn(patio__ppool *p, patio__pp_worker *w)
{
    int sv[2];
    pid_t pid;
    if (patio__pp_socketpair(sv) != PATIO_OK) return PATIO_ERR_IO;
    pid = fork();
    if (pid < 0) {
        int e = errno;
        close(sv[0]);
        close(sv[1]);
        errno = e;
        return PATIO_ERR_IO;
    }
    if (pid == 0) {
        close(sv[0]);
        patio__pp_child(p, sv[1]);
    }
    close(sv[1]);
    w->fd = sv[0];
    w->head = w->count = w->unsent = 0;
    w->call_ns = PATIO__PP_BUSY_NS / PATIO__PP_START_DEPTH;
    w->depth = patio__pp_depth(p, w);
    w->in_len = 0;
    patio_writer_reset(&w->out);
    w->out_off = 0;
    w->blocked = w->answered = 0;
    w->eof_at = 0;
    w->killed = 0;
    w->reason[0] = '\0';
    patio__pp_set_state(p, w, PATIO__PW_ALIVE, (long)pid);
    return PATIO_OK;
}

/* ---- the parent: finishing tasks -------------------------------------- */

static void patio__pp_succeed(patio_task *t, const patio__frame *f)
{
    patio_writer_reset(&t->result);
    patio_write_raw(&t->result, f->payload, f->size);
    patio__store(&t->finished, 1);
    patio__task_complete(t, t->result.err ? t->result.err : PATIO_OK);
}

static void patio__pp_raise(patio_task *t, const patio__frame *f)
{
    const char *ty, *msg;
    size_t tl, ml;
    patio_writer_reset(&t->result);
    if (patio__decode_exception(f->payload, f->size, &ty, &tl, &msg, &ml) == PATIO_OK)
        patio_write_raw(&t->result, f->payload, f->size);
    else
        patio__write_exception(&t->result, "RuntimeError", 12, "undecodable error from a worker", 31);
    t->status = PATIO_ERR_REMOTE;
    patio__store(&t->finished, 1);
    patio__task_complete(t, PATIO_ERR_REMOTE);
}

/* The ring slot `k` places after the oldest (k < max_calls): no division
 * on the per-call path. */
static unsigned patio__pp_ring_at(const patio__pp_worker *w, const patio__ppool *p, unsigned k)
{
    unsigned i = w->head + k;
    return i >= (unsigned)p->max_calls ? i - (unsigned)p->max_calls : i;
}

static patio__pp_slot patio__pp_pop(patio__ppool *p, patio__pp_worker *w)
{
    patio__pp_slot s = w->ring[w->head];
    if (++w->head == (unsigned)p->max_calls) w->head = 0;
    w->count--;
    return s;
}

/* Fails every call a dead worker held: it may have run them, or not. */
static void patio__pp_fail_held(patio__ppool *p, patio__pp_worker *w, const char *msg)
{
    while (w->count) {
        patio__pp_slot s = patio__pp_pop(p, w);
        patio__task_fail_code(s.task, PATIO_ERR_WORKER_DIED, "RuntimeError", msg);
    }
}

/* Answers come in batches: the first of a batch brings the time the
 * whole batch took, the others nothing; the average (weight 1/8) evens
 * that out into the time one call takes. */
static void patio__pp_learn_pace(patio__pp_worker *w, uint64_t sample)
{
    if (sample > 1000u * PATIO__PP_BUSY_NS) sample = 1000u * PATIO__PP_BUSY_NS;
    w->call_ns = w->call_ns - w->call_ns / 8 + sample / 8;
}

/* One answer: it belongs to the oldest call, since a worker runs its calls
 * in order. Anything else means the worker is broken. */
static int patio__pp_answer(patio__ppool *p, patio__pp_worker *w, const patio__frame *f, uint64_t now)
{
    patio__pp_slot s;
    if (!w->count || w->ring[w->head].serial != f->serial) return PATIO_ERR_PROTOCOL;
    if (f->type != PATIO__PKT_RESPONSE && f->type != PATIO__PKT_ERROR) return PATIO_ERR_PROTOCOL;
    s = patio__pp_pop(p, w);
    patio__pp_learn_pace(w, now - w->head_since);
    w->head_since = now;
    w->answered = 1;
    if (f->type == PATIO__PKT_RESPONSE) patio__pp_succeed(s.task, f);
    else patio__pp_raise(s.task, f);
    return PATIO_OK;
}

/* ---- the parent: worker sockets ---------------------------------------- */

/* Calls whose frames a worker has not received entirely cannot have
 * started there: they go back to the front of the parent's queue, in
 * order, for another worker (used when a worker dies or turns out busy). */
static void patio__pp_take_back(patio__ppool *p, patio__pp_worker *w)
{
    unsigned n = w->unsent;
    if (n) {
        pthread_mutex_lock(&p->mu);
        for (; n; n--) {
            patio__pp_slot *s = &w->ring[patio__pp_ring_at(w, p, w->count - 1)];
            patio_task *t = s->task;
            if (s->end <= w->out_off) break; /* written in full: the worker may run it */
            w->count--;
            __atomic_fetch_add(&p->in.pending, 1, __ATOMIC_SEQ_CST);
            patio__store(&t->state, PATIO__TASK_QUEUED);
            patio__tq_push_front(&p->q, t);
        }
        pthread_mutex_unlock(&p->mu);
    }
    w->unsent = 0;
    patio_writer_reset(&w->out);
    w->out_off = 0;
    w->blocked = 0;
}

/* Stops using a worker that misbehaved or outlived a timeout. Its calls
 * fail once it is reaped, with `reason`. */
static void patio__pp_kill(patio__ppool *p, patio__pp_worker *w, const char *reason)
{
    if (!w->killed) {
        kill((pid_t)w->pid, SIGKILL);
        w->killed = 1;
        if (!w->reason[0]) snprintf(w->reason, sizeof w->reason, "%s", reason);
    }
    patio__pp_take_back(p, w);
    if (w->state == PATIO__PW_ALIVE) patio__pp_set_state(p, w, PATIO__PW_DYING, w->pid);
}

/* The socket closed (or failed): the worker is exiting. */
static void patio__pp_closed(patio__ppool *p, patio__pp_worker *w)
{
    if (w->fd >= 0) close(w->fd);
    w->fd = -1;
    w->eof_at = patio__now_ns();
    patio__pp_take_back(p, w);
    if (w->state == PATIO__PW_ALIVE) patio__pp_set_state(p, w, PATIO__PW_DYING, w->pid);
}

static void patio__pp_protocol_error(patio__ppool *p, patio__pp_worker *w, const char *what)
{
    char msg[160];
    snprintf(msg, sizeof msg, "worker process %ld was killed (SIGKILL): %s", w->pid, what);
    patio__log(p->base.hooks, PATIO_LOG_ERROR, "process pool: %s", msg);
    patio__pp_kill(p, w, msg);
    patio__pp_closed(p, w);
}

static void patio__pp_write(patio__ppool *p, patio__pp_worker *w)
{
    w->answered = 0;
    while (w->out_off < w->out.len) {
        ssize_t n = send(w->fd, w->out.data + w->out_off, w->out.len - w->out_off, PATIO__PP_SEND_FLAGS);
        if (n > 0) { w->out_off += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) { w->blocked = 1; return; }
        /* EPIPE, ECONNRESET: it is dying; EOF and its exit status follow */
        patio__pp_take_back(p, w);
        if (w->state == PATIO__PW_ALIVE) patio__pp_set_state(p, w, PATIO__PW_DYING, w->pid);
        return;
    }
    patio_writer_reset(&w->out);
    w->out_off = 0;
    w->unsent = 0;
    w->blocked = 0;
    if (w->out.cap > PATIO__PP_KEEP_BUFFER) patio_writer_free(&w->out);
}

/* Whether to write a worker's buffered calls now: when it is idle, when
 * its answers show progress, or once a good batch waits. A worker still
 * busy with calls it has could not start new ones sooner anyway, and one
 * write per batch instead of one per trickle of submissions is much of the
 * throughput. Calls kept back from a worker whose call then runs long go
 * to another worker (see patio__pp_watch). */
static int patio__pp_should_write(const patio__pp_worker *w)
{
    if (w->state != PATIO__PW_ALIVE || w->fd < 0 || w->blocked || w->out_off >= w->out.len) return 0;
    return w->count == w->unsent || w->answered || w->out.len - w->out_off >= PATIO__PP_BATCH_BYTES;
}

/* Room for the next read: a chunk, or the whole frame whose header is in. */
static int patio__pp_reserve(patio__ppool *p, patio__pp_worker *w)
{
    size_t need = w->in_len + PATIO__PP_READ_CHUNK;
    uint8_t *n;
    if (w->in_len >= PATIO__FRAME_HEADER) {
        uint64_t size = patio__get_be(w->in + 1, 4);
        if (size > p->max_frame) return PATIO_ERR_PROTOCOL;
        if (PATIO__FRAME_HEADER + (size_t)size > need) need = PATIO__FRAME_HEADER + (size_t)size;
    }
    if (need <= w->in_cap) return PATIO_OK;
    n = (uint8_t *)patio__realloc(p->base.hooks, w->in, need);
    if (!n) return PATIO_ERR_NOMEM;
    w->in = n;
    w->in_cap = need;
    return PATIO_OK;
}

/* Completes every whole answer in the buffer and keeps the partial rest. */
static int patio__pp_parse(patio__ppool *p, patio__pp_worker *w)
{
    uint64_t now = patio__now_ns();
    size_t pos = 0;
    int rc = PATIO_OK;
    for (;;) {
        patio__frame f;
        int r = patio__frame_parse(w->in + pos, w->in_len - pos, p->max_frame, &f);
        if (r == 0) break;
        if (r < 0 || patio__pp_answer(p, w, &f, now) != PATIO_OK) { rc = PATIO_ERR_PROTOCOL; break; }
        pos += PATIO__FRAME_HEADER + f.size;
    }
    if (pos) {
        memmove(w->in, w->in + pos, w->in_len - pos);
        w->in_len -= pos;
    }
    if (w->in_len == 0 && w->in_cap > PATIO__PP_KEEP_BUFFER) {
        patio__free(p->base.hooks, w->in);
        w->in = NULL;
        w->in_cap = 0;
    }
    return rc;
}

/* Reads what is there (a bounded amount, so other workers get their turn). */
static void patio__pp_read(patio__ppool *p, patio__pp_worker *w)
{
    int round;
    for (round = 0; round < 16 && w->fd >= 0; round++) {
        size_t room;
        ssize_t n;
        int rc = patio__pp_reserve(p, w);
        if (rc != PATIO_OK) {
            patio__pp_protocol_error(p, w, rc == PATIO_ERR_NOMEM ? "no memory for its answer"
                                                                 : "it sent an oversized frame");
            return;
        }
        room = w->in_cap - w->in_len;
        n = recv(w->fd, w->in + w->in_len, room, 0);
        if (n > 0) {
            w->in_len += (size_t)n;
            if (patio__pp_parse(p, w) != PATIO_OK) {
                patio__pp_protocol_error(p, w, "it sent a malformed answer");
                return;
            }
            if ((size_t)n < room) return;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        patio__pp_closed(p, w); /* EOF or ECONNRESET */
        return;
    }
}

/* ---- the parent: sending calls ----------------------------------------- */

/* Calls a worker can take now. A worker whose current call has run for
 * PATIO__PP_BUSY_NS gets no more until it answers: what is queued waits in
 * the parent for whichever worker frees up first, instead of behind it. */
static unsigned patio__pp_room(const patio__pp_worker *w, uint64_t now)
{
    if (w->state != PATIO__PW_ALIVE) return 0;
    if (w->count && now - w->head_since >= PATIO__PP_BUSY_NS) return 0;
    return w->count < w->depth ? w->depth - w->count : 0;
}

static unsigned patio__pp_free_slots(const patio__ppool *p, uint64_t now)
{
    unsigned n = 0;
    int i;
    for (i = 0; i < p->nworkers; i++) n += patio__pp_room(&p->w[i], now);
    return n;
}

/* The worker with room and the fewest calls in flight; among equals, the
 * one whose current call started last (the least likely to be a long one). */
static patio__pp_worker *patio__pp_pick(patio__ppool *p, uint64_t now)
{
    patio__pp_worker *best = NULL;
    int i;
    for (i = 0; i < p->nworkers; i++) {
        patio__pp_worker *w = &p->w[i];
        if (!patio__pp_room(w, now)) continue;
        if (w->count == 0) return w;
        if (!best || w->count < best->count || (w->count == best->count && w->head_since > best->head_since))
            best = w;
    }
    return best;
}

/* Encodes a task as a REQUEST frame for the least busy worker. */
static void patio__pp_send(patio__ppool *p, patio_task *t, uint64_t now)
{
    patio__pp_worker *w = patio__pp_pick(p, now);
    const patio__entry *e = t->entry;
    patio__pp_slot *s;
    size_t mark;
    int rc;
    if (!w) { /* cannot happen: the caller counted free slots */
        patio__task_fail_code(t, PATIO_ERR_WORKER_DIED, "RuntimeError", "no worker process is available");
        return;
    }
    mark = patio__frame_begin(&w->out);
    patio__write_call_request(&w->out, e->name, e->name_len, t->args, t->args_len, t->kwargs, t->kwargs_len,
                              t->timeout >= 0, t->timeout);
    rc = patio__frame_end(&w->out, mark, PATIO__PKT_REQUEST, w->serial, p->max_frame);
    if (rc != PATIO_OK) {
        w->out.len = mark;
        w->out.err = 0;
        if (rc == PATIO_ERR_OVERFLOW)
            patio__task_fail_code(t, rc, "OverflowError", "the call's arguments exceed the pool's max_frame_size");
        else
            patio__task_fail_code(t, rc, "MemoryError", "no memory to encode the call");
        return;
    }
    s = &w->ring[patio__pp_ring_at(w, p, w->count)];
    s->task = t;
    s->serial = w->serial++;
    s->sent = now;
    s->deadline = t->timeout >= 0 ? patio__pp_after(now, t->timeout) : UINT64_MAX;
    s->end = w->out.len;
    w->unsent++;
    if (w->count++ == 0) w->head_since = now;
}

/* Moves queued tasks to workers while they have room. */
static void patio__pp_dispatch(patio__ppool *p)
{
    patio_task *batch[PATIO__PP_BATCH];
    uint64_t now;
    unsigned room;
    int i;
    if (!patio__inbox_pending(&p->in)) return;
    for (i = 0; i < p->nworkers; i++) p->w[i].depth = patio__pp_depth(p, &p->w[i]);
    now = patio__now_ns();
    room = patio__pp_free_slots(p, now);
    while (room > 0) {
        size_t n = 0, i;
        pthread_mutex_lock(&p->mu);
        patio__inbox_move(&p->in, &p->q);
        while (n < room && n < PATIO__PP_BATCH && p->q.head) {
            batch[n] = patio__tq_pop(&p->q);
            patio__store(&batch[n]->state, PATIO__TASK_RUNNING);
            n++;
        }
        patio__inbox_taken(&p->in, n);
        pthread_mutex_unlock(&p->mu);
        if (!n) return;
        for (i = 0; i < n; i++) patio__pp_send(p, batch[i], now);
        room -= (unsigned)n;
    }
}

/* ---- the parent: timeouts, deaths, replacements ------------------------ */

/* When a worker must be killed for its running call: the call's deadline,
 * if it passed while the call ran; for a call that started late, its whole
 * timeout counted from its start (the worker skips ones already expired). */
static uint64_t patio__pp_kill_time(const patio__pp_worker *w, const patio__pp_slot *s)
{
    uint64_t at;
    if (s->deadline == UINT64_MAX) return UINT64_MAX;
    at = s->deadline >= w->head_since ? s->deadline : w->head_since + (s->deadline - s->sent);
    return at > UINT64_MAX - PATIO__PP_KILL_GRACE_NS ? UINT64_MAX : at + PATIO__PP_KILL_GRACE_NS;
}

static void patio__pp_kill_late(patio__ppool *p, patio__pp_worker *w, const patio__pp_slot *s)
{
    char reason[200];
    snprintf(reason, sizeof reason, "worker process %ld was killed (SIGKILL): call '%s' ran past its timeout of %g s",
             w->pid, s->task->entry->name, s->task->timeout);
    patio__log(p->base.hooks, PATIO_LOG_WARN, "process pool: %s", reason);
    patio__pp_kill(p, w, reason);
}

/* Watches the call each worker runs: kills the worker when the call
 * outlived its timeout, and takes back the calls buffered for a worker
 * whose call turned out long. Returns when to look again (UINT64_MAX =
 * only on events). */
static uint64_t patio__pp_watch(patio__ppool *p, uint64_t now)
{
    uint64_t next = UINT64_MAX;
    int i;
    for (i = 0; i < p->nworkers; i++) {
        patio__pp_worker *w = &p->w[i];
        const patio__pp_slot *s = &w->ring[w->head];
        uint64_t at;
        if (w->state != PATIO__PW_ALIVE || w->count <= w->unsent) continue; /* none at the worker */
        if (p->kill_on_timeout > 0) {
            at = patio__pp_kill_time(w, s);
            if (at <= now) { patio__pp_kill_late(p, w, s); continue; }
            if (at < next) next = at;
        }
        if (w->unsent && w->out_off == 0) {
            at = w->head_since + PATIO__PP_BUSY_NS;
            if (at <= now) patio__pp_take_back(p, w);
            else if (at < next) next = at;
        }
    }
    return next;
}

/* A worker whose socket closed: collect its exit status, fail its calls
 * with it, and free the slot. Returns 1 once reaped. */
static int patio__pp_reap(patio__ppool *p, patio__pp_worker *w, uint64_t now)
{
    char msg[200];
    int status = 0;
    pid_t r;
    do r = waitpid((pid_t)w->pid, &status, WNOHANG);
    while (r < 0 && errno == EINTR);
    if (r == 0) {
        if (!w->killed && now - w->eof_at > PATIO__PP_REAP_NS) {
            snprintf(msg, sizeof msg, "worker process %ld closed its socket but did not exit: killed (SIGKILL)",
                     w->pid);
            patio__pp_kill(p, w, msg);
        }
        return 0;
    }
    if (w->reason[0]) snprintf(msg, sizeof msg, "%s", w->reason);
    else patio__pp_describe_exit(msg, sizeof msg, w->pid, status, r > 0);
    if (!w->killed) patio__log(p->base.hooks, PATIO_LOG_WARN, "process pool: %s", msg);
    patio__pp_set_state(p, w, PATIO__PW_EMPTY, 0);
    patio__pp_fail_held(p, w, msg);
    return 1;
}

/* Replaces dead workers (while there is or may be work for them). */
static void patio__pp_respawn(patio__ppool *p, uint64_t now)
{
    int i, needed;
    if (p->respawn_at && now < p->respawn_at) return;
    needed = !PATIO__SC_GET(p->closing) || patio__inbox_pending(&p->in);
    if (!needed) return;
    p->respawn_at = 0;
    for (i = 0; i < p->nworkers; i++) {
        if (p->w[i].state != PATIO__PW_EMPTY) continue;
        if (patio__pp_spawn(p, &p->w[i]) != PATIO_OK) {
            patio__log(p->base.hooks, PATIO_LOG_ERROR, "process pool: cannot start a worker process: %s",
                       strerror(errno));
            p->respawn_at = now + PATIO__PP_RESPAWN_NS;
            return;
        }
    }
}

/* Closing, and no worker can be started: queued tasks cannot run. */
static void patio__pp_fail_queue(patio__ppool *p)
{
    for (;;) {
        patio_task *t;
        pthread_mutex_lock(&p->mu);
        patio__inbox_move(&p->in, &p->q);
        t = patio__tq_pop(&p->q);
        if (t) {
            patio__store(&t->state, PATIO__TASK_RUNNING);
            patio__inbox_taken(&p->in, 1);
        }
        pthread_mutex_unlock(&p->mu);
        if (!t) return;
        patio__task_fail_code(t, PATIO_ERR_WORKER_DIED, "RuntimeError", "no worker process could be started");
    }
}

/* ---- the parent: the I/O thread ---------------------------------------- */

static unsigned patio__pp_in_flight(const patio__ppool *p)
{
    unsigned n = 0;
    int i;
    for (i = 0; i < p->nworkers; i++) n += p->w[i].count;
    return n;
}

/* 1 when shutting down and every task has finished. */
static int patio__pp_done(patio__ppool *p)
{
    int queued, i, any = 0;
    if (!PATIO__SC_GET(p->closing)) return 0;
    /* a submitter between its reservation and its push counts as queued:
     * it pushes, then wakes this thread */
    queued = patio__inbox_pending(&p->in) != 0;
    for (i = 0; i < p->nworkers; i++) any |= p->w[i].state != PATIO__PW_EMPTY;
    if (queued && !any && p->respawn_at) patio__pp_fail_queue(p);
    return !queued && patio__pp_in_flight(p) == 0;
}

/* Earliest moment something needs doing without an fd event. */
static uint64_t patio__pp_next_due(patio__ppool *p, uint64_t now)
{
    uint64_t next = patio__pp_watch(p, now);
    int i;
    for (i = 0; i < p->nworkers; i++) {
        const patio__pp_worker *w = &p->w[i];
        if (w->state == PATIO__PW_DYING && w->fd < 0) {
            /* its exit status is normally there within microseconds */
            uint64_t at = now + (now - w->eof_at < 10000000u ? 1000000u : 10000000u);
            if (at < next) next = at;
        }
        if (w->state == PATIO__PW_EMPTY && p->respawn_at && p->respawn_at < next) next = p->respawn_at;
    }
    return next;
}

/* Fills the poll set: the wake fd first, then each open worker socket. */
static nfds_t patio__pp_poll_set(patio__ppool *p)
{
    nfds_t n = 1;
    int i;
    p->pfd[0].fd = p->wake.rfd;
    p->pfd[0].events = POLLIN;
    p->pfd[0].revents = 0;
    for (i = 0; i < p->nworkers; i++) {
        patio__pp_worker *w = &p->w[i];
        if (w->fd < 0) continue;
        p->pfd[n].fd = w->fd;
        p->pfd[n].events = (short)(POLLIN | (w->blocked ? POLLOUT : 0));
        p->pfd[n].revents = 0;
        p->pfd_worker[n] = i;
        n++;
    }
    return n;
}

/* Before sleeping, polls briefly for answers and new calls: they usually
 * follow within microseconds, and a wake-up costs far more. 1 if some came.
 * The budget adapts (see patio__spin_budget): a pool whose work comes
 * back later than that stops polling. */
static int patio__pp_spin(patio__ppool *p, nfds_t n, uint64_t now)
{
    uint64_t budget = patio__spin_budget(&p->spin), t = now;
    unsigned i;
    if (!budget) return 0;
    for (i = 0;; i++) {
        if (poll(p->pfd, n, 0) > 0 || (patio__inbox_pending(&p->in) && patio__pp_free_slots(p, now))) {
            patio__spin_result(&p->spin, 1, t - now);
            return 1;
        }
        if ((i & 7) == 7) {
            t = patio__now_ns();
            if (t - now >= budget) {
                patio__spin_result(&p->spin, 0, budget);
                return 0;
            }
            sched_yield(); /* a worker process with work may share this CPU */
        }
        patio__cpu_relax();
    }
}

/* Waits until a worker socket or the wake fd is ready, or until `due`.
 * Submitters write the wake fd only while we announce that we sleep: we
 * store ASLEEP and then look at the inbox, a submitter pushes and then
 * looks at io_state (all sequentially consistent), so either we see its
 * task or it sees us asleep. The first submitter to turn ASLEEP into
 * WOKEN writes the wake fd; we set the state back to AWAKE after the
 * poll, so a wake-up is never taken for one still to come. */
static void patio__pp_wait(patio__ppool *p, uint64_t due, uint64_t now)
{
    nfds_t n = patio__pp_poll_set(p), k;
    int ms = 0, announced = 0, ready;
    if (due > now) {
        uint64_t d = due == UINT64_MAX ? UINT64_MAX : (due - now + 999999u) / 1000000u;
        ms = d > (uint64_t)INT_MAX ? -1 : (int)d;
    }
    if (ms != 0 && patio__pp_spin(p, n, now)) ms = 0;
    if (ms != 0) {
        PATIO__SC_SET(p->io_state, PATIO__IO_ASLEEP);
        announced = 1;
        if (patio__inbox_pending(&p->in) && patio__pp_free_slots(p, now)) ms = 0;
    }
    ready = poll(p->pfd, n, ms);
    if (announced) PATIO__SC_SET(p->io_state, PATIO__IO_AWAKE);
    if (ready <= 0) return;
    if (p->pfd[0].revents & POLLIN) patio__wake_drain(&p->wake);
    for (k = 1; k < n; k++) {
        patio__pp_worker *w = &p->w[p->pfd_worker[k]];
        short re = p->pfd[k].revents;
        if (!re) continue;
        if ((re & POLLOUT) && w->fd >= 0) { w->blocked = 0; patio__pp_write(p, w); }
        if ((re & (POLLIN | POLLHUP | POLLERR | POLLNVAL)) && w->fd >= 0) patio__pp_read(p, w);
    }
}

static void patio__pp_flush_all(patio__ppool *p)
{
    int i;
    for (i = 0; i < p->nworkers; i++) {
        patio__pp_worker *w = &p->w[i];
        if (patio__pp_should_write(w)) patio__pp_write(p, w);
    }
}

static void *patio__pp_io_main(void *arg)
{
    patio__ppool *p = (patio__ppool *)arg;
    for (;;) {
        uint64_t now;
        int i;
        patio__pp_dispatch(p);
        patio__pp_flush_all(p);
        if (patio__pp_done(p)) break;
        now = patio__now_ns();
        patio__pp_wait(p, patio__pp_next_due(p, now), now);
        now = patio__now_ns();
        patio__pp_watch(p, now);
        for (i = 0; i < p->nworkers; i++)
            if (p->w[i].state == PATIO__PW_DYING && p->w[i].fd < 0) patio__pp_reap(p, &p->w[i], now);
        patio__pp_respawn(p, now);
    }
    return NULL;
}

/* ---- the parent: shutdown ---------------------------------------------- */

/* Waits for one child, at most about two seconds before killing it. */
static void patio__pp_reap_now(patio__pp_worker *w)
{
    int i, status;
    for (i = 0; i < 2000; i++) {
        pid_t r = waitpid((pid_t)w->pid, &status, WNOHANG);
        if (r == (pid_t)w->pid || (r < 0 && errno != EINTR)) return;
        if (r == 0) {
            struct timespec ts;
            ts.tv_sec = 0;
            ts.tv_nsec = 1000000;
            nanosleep(&ts, NULL);
        }
    }
    kill((pid_t)w->pid, SIGKILL);
    while (waitpid((pid_t)w->pid, &status, 0) < 0 && errno == EINTR) {}
}

/* Closes every socket (a worker exits on EOF), then reaps them all. */
static void patio__pp_stop_workers(patio__ppool *p)
{
    int i;
    if (!p->w) return;
    for (i = 0; i < p->nworkers; i++) {
        if (p->w[i].fd >= 0) close(p->w[i].fd);
        p->w[i].fd = -1;
    }
    for (i = 0; i < p->nworkers; i++) {
        patio__pp_worker *w = &p->w[i];
        if (w->state == PATIO__PW_EMPTY) continue;
        patio__pp_reap_now(w);
        patio__pp_fail_held(p, w, "the process pool shut down");
        patio__pp_set_state(p, w, PATIO__PW_EMPTY, 0);
    }
}

static void patio__pp_shutdown(patio_executor *ex)
{
    patio__ppool *p = (patio__ppool *)ex;
    PATIO__SC_SET(p->closing, 1);
    if (p->io_running) {
        patio__wake_signal(&p->wake);
        pthread_join(p->io, NULL);
        p->io_running = 0;
    }
    patio__pp_fail_queue(p); /* only if the I/O thread never started */
    patio__pp_stop_workers(p);
}

static void patio__pp_destroy(patio_executor *ex)
{
    patio__ppool *p = (patio__ppool *)ex;
    const patio_hooks *h = ex->hooks;
    int i;
    if (p->w) {
        for (i = 0; i < p->nworkers; i++) {
            patio__free(h, p->w[i].ring);
            patio__free(h, p->w[i].in);
            patio_writer_free(&p->w[i].out);
        }
    }
    patio__free(h, p->w);
    patio__free(h, p->pfd);
    patio__free(h, p->pfd_worker);
    patio__wake_close(&p->wake);
    pthread_mutex_destroy(&p->mu);
    patio__free(h, p);
}

/* ---- the parent: the executor interface -------------------------------- */

/* After a push (or a release of held wake-ups): wakes the I/O thread if
 * it sleeps, once per sleep (see patio__pp_wait). */
static void patio__pp_wake_io(patio__ppool *p)
{
    int asleep = PATIO__IO_ASLEEP;
    if (PATIO__SC_GET(p->io_state) == PATIO__IO_ASLEEP &&
        __atomic_compare_exchange_n(&p->io_state, &asleep, PATIO__IO_WOKEN, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
        patio__wake_signal(&p->wake);
}

static int patio__pp_submit(patio_executor *ex, patio_task *t)
{
    patio__ppool *p = (patio__ppool *)ex;
    int rc;
    if (!t || !t->entry) return PATIO_ERR_INVALID;
    rc = patio__inbox_reserve(&p->in, &p->closing, p->max_queue);
    if (rc != PATIO_OK) return rc;
    if (patio__inbox_push(&p->in, ex, t) && !PATIO__SC_GET(p->held)) patio__pp_wake_io(p);
    return PATIO_OK;
}

/* See patio__executor_hold_wakes. */
static void patio__pp_hold_wakes(patio__ppool *p, int hold)
{
    if (__atomic_add_fetch(&p->held, hold ? 1 : -1, __ATOMIC_SEQ_CST) == 0 && patio__inbox_pending(&p->in))
        patio__pp_wake_io(p);
}

/* Only a task still in the parent's queue can be cancelled: once written
 * to a worker it may already run there. */
static int patio__pp_cancel(patio_executor *ex, patio_task *t)
{
    patio__ppool *p = (patio__ppool *)ex;
    return patio__inbox_cancel(&p->mu, &p->in, &p->q, t);
}

static const patio_executor_vtable patio__pp_vt = {
    "process_pool", patio__pp_submit, patio__pp_cancel, NULL, NULL, patio__pp_shutdown, patio__pp_destroy
};

static int patio__pp_alloc(patio__ppool *p)
{
    const patio_hooks *h = p->base.hooks;
    int i;
    p->w = (patio__pp_worker *)patio__calloc(h, (size_t)p->nworkers * sizeof *p->w);
    p->pfd = (struct pollfd *)patio__calloc(h, (size_t)(p->nworkers + 1) * sizeof *p->pfd);
    p->pfd_worker = (int *)patio__calloc(h, (size_t)(p->nworkers + 1) * sizeof *p->pfd_worker);
    if (!p->w || !p->pfd || !p->pfd_worker) return PATIO_ERR_NOMEM;
    for (i = 0; i < p->nworkers; i++) {
        p->w[i].fd = -1;
        patio_writer_init(&p->w[i].out, h);
        p->w[i].ring = (patio__pp_slot *)patio__calloc(h, (size_t)p->max_calls * sizeof *p->w[i].ring);
        if (!p->w[i].ring) return PATIO_ERR_NOMEM;
    }
    return PATIO_OK;
}

static int patio__pp_configure(patio__ppool *p, const patio_process_pool_config *cfg)
{
    p->nworkers = cfg->max_workers ? cfg->max_workers : PATIO_DEFAULT_MAX_WORKERS;
    p->max_queue = cfg->max_queue ? cfg->max_queue : PATIO_DEFAULT_QUEUE_SIZE;
    p->max_calls = cfg->max_calls_per_worker ? cfg->max_calls_per_worker : PATIO__PP_DEFAULT_CALLS;
    p->kill_on_timeout = cfg->kill_on_timeout < 0 ? -1 : 1;
    p->inherit_fds = cfg->inherit_fds != 0;
    /* the I/O thread waits on its sockets as a loop does: the same ceiling */
    p->spin_ns = cfg->spin_us < 0 ? 0 : (uint64_t)(cfg->spin_us ? cfg->spin_us : PATIO_SPIN_US) * 1000u;
    patio__spin_init(&p->spin, p->spin_ns);
    if (cfg->max_frame_size > UINT32_MAX) return PATIO_ERR_INVALID;
    p->max_frame = cfg->max_frame_size ? (uint32_t)cfg->max_frame_size : PATIO__PP_DEFAULT_FRAME;
    if (p->nworkers < 1 || p->nworkers > PATIO__PP_MAX_WORKERS) return PATIO_ERR_INVALID;
    if (p->max_calls < 1 || p->max_calls > 65536) return PATIO_ERR_INVALID;
    if (p->max_frame < 64) return PATIO_ERR_INVALID;
    return PATIO_OK;
}

PATIO_API patio_executor *patio_process_pool_new_ex(patio_registry *r, const patio_process_pool_config *cfg)
{
    patio_process_pool_config def;
    patio__ppool *p;
    int i;
    if (!r) return NULL;
    if (!cfg) { memset(&def, 0, sizeof def); cfg = &def; }
    p = (patio__ppool *)patio__calloc(&r->hooks, sizeof *p);
    if (!p) return NULL;
    patio_executor_init(&p->base, &patio__pp_vt, r);
    p->wake.rfd = p->wake.wfd = -1;
    patio__mutex_init_hot(&p->mu);
    if (patio__pp_configure(p, cfg) != PATIO_OK || patio__pp_alloc(p) != PATIO_OK ||
        patio__wake_open(&p->wake) != PATIO_OK) {
        patio_executor_free(&p->base);
        return NULL;
    }
    /* Workers get the registry as it is now, so it must not change later. */
    patio_registry_lock(r);
    for (i = 0; i < p->nworkers; i++) {
        if (patio__pp_spawn(p, &p->w[i]) != PATIO_OK) {
            patio__log(&r->hooks, PATIO_LOG_ERROR, "process pool: cannot start a worker process: %s",
                       strerror(errno));
            patio_executor_free(&p->base);
            return NULL;
        }
    }
    /* Started after the first forks, so those copy a process with no
     * thread of ours; replacements are forked by this thread. */
    if (pthread_create(&p->io, NULL, patio__pp_io_main, p) != 0) {
        patio_executor_free(&p->base);
        return NULL;
    }
    p->io_running = 1;
    return &p->base;
}

PATIO_API patio_executor *patio_process_pool_new(patio_registry *r, int max_workers)
{
    patio_process_pool_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_workers = max_workers;
    return patio_process_pool_new_ex(r, &cfg);
}

static patio__ppool *patio__pp_of(const patio_executor *ex)
{
    return ex && ex->vt == &patio__pp_vt ? (patio__ppool *)(void *)(uintptr_t)ex : NULL;
}

PATIO_API int patio_process_pool_workers(const patio_executor *ex)
{
    patio__ppool *p = patio__pp_of(ex);
    int n;
    if (!p) return -1;
    pthread_mutex_lock(&p->mu);
    n = p->live;
    pthread_mutex_unlock(&p->mu);
    return n;
}

PATIO_API int patio_process_pool_pids(const patio_executor *ex, long *out, int max)
{
    patio__ppool *p = patio__pp_of(ex);
    int i, n = 0;
    if (!p) return -1;
    pthread_mutex_lock(&p->mu);
    for (i = 0; i < p->nworkers && n < max; i++)
        if (p->w[i].state == PATIO__PW_ALIVE && out) out[n++] = p->w[i].pid;
    pthread_mutex_unlock(&p->mu);
    return n;
}

/* ---- bursts of submissions --------------------------------------------- */

/* A broker that submits a burst of tasks (every request in one read) holds
 * the pools' wake-ups until the burst is in: a thread woken by the first
 * task would otherwise preempt the submitting thread on its CPU and take
 * the tasks one by one as they trickle in. Does nothing for executors that
 * do not wake anyone. Calls nest; the last release wakes if one is due. */
static void patio__executor_hold_wakes(patio_executor *ex, int hold)
{
    if (ex->vt == &patio__pool_vt) patio__pool_hold_wakes((patio__pool *)ex, hold);
    else if (ex->vt == &patio__pp_vt) patio__pp_hold_wakes((patio__ppool *)ex, hold);
}
/* ========================================================================
 * >>call  Calls: start, finish, wait, results
 * ======================================================================== */

enum { PATIO__CALL_PENDING = 0, PATIO__CALL_FINISHING = 1, PATIO__CALL_DONE = 2 };

/* A thread blocked in patio_wait_*: completers of the calls it registered
 * on bump `notified` under the mutex, and only the one that reaches
 * `target` signals, so a batch of completions costs one wake-up. */
typedef struct patio__waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int notified;      /* calls that finished (atomic) */
    int target;        /* notifications the sleeper waits for (atomic) */
    int exited;        /* notifiers done touching the waiter (atomic) */
} patio__waiter;

/* c->waiter holds NULL, a waiter, or this mark once the call finished. */
static patio__waiter patio__waiter_fired_mark;
#define PATIO__WAITER_FIRED (&patio__waiter_fired_mark)

/* The fields that whoever finishes a call writes come first, then the
 * local task (whose own hot part leads it): a call finished on another
 * thread and then reused moves few cache lines between the two. */
struct patio_call {
    /* Written by the finisher, read by the owner (cleared at start). */
    int refs;                 /* atomic: user + in flight + task + timer */
    int state;                /* atomic PATIO__CALL_* */
    int status;
    int timer_armed;
    patio__waiter *waiter;    /* atomic */
    const patio_writer *result;
    patio_call_cb on_done;
    void *on_done_user;
    int deliver_drops;        /* references patio__call_deliver drops */
    patio_loop *loop;
    int listed;
    patio_task task;          /* local execution by the memory broker */
    /* Set at start. */
    patio_broker *broker;     /* valid until the call finished */
    const patio_hooks *hooks;
    char *name;
    size_t name_len;          /* routing looks the name up once per call */
    patio_writer args;        /* encoded positional arguments (array) */
    double timeout;           /* < 0 = none */
    uint64_t deadline_ns;
    patio_call *next, *prev;  /* broker's pending list */
    patio_call *retired_next; /* broker's retired stack (patio__core_retire) */
    struct patio__lane *lane; /* the timeout lane listing it; NULL = the other list */
    patio__obj_cache *cache;  /* where its memory goes back */
    char *err_type, *err_msg;
    patio_writer kwargs;      /* encoded keyword arguments (map), empty = none */
    patio_writer own_result;  /* a value set by patio_call_succeed */
    patio__timer timer;
    patio__post done_post;    /* delivers on_done on the loop thread */
    /* small names and arguments live here: no allocation */
    char name_inline[48];
    uint8_t args_inline[96];
};

/* Pending calls with the same timeout finish their waits in the order
 * they started, so each distinct timeout gets a FIFO "lane" watched by ONE
 * timer armed for its oldest call: starting or finishing a call costs a
 * list operation, not a timer-heap operation. Calls whose timeout finds no
 * free lane use a timer of their own. */
#define PATIO__LANES 4

typedef struct patio__call_list {
    patio_call *head, *tail;
} patio__call_list;

typedef struct patio__lane {
    struct patio__broker_core *core;
    double timeout;
    patio__call_list calls;   /* by deadline */
    patio__timer timer;
} patio__lane;

/* Tasks in flight are counted as started minus ended, each counter on a
 * cache line of its own: the submitting thread and the workers that end
 * tasks then never write the same line, and neither takes a lock. */
typedef struct patio__task_counter {
    size_t n;                 /* atomic */
    int closing;              /* atomic mirror of core->closing, read by enders */
    char pad[PATIO__LINE - sizeof(size_t) - sizeof(int)];
} patio__task_counter;

/* Broker-private bookkeeping behind patio_broker.internal. */
typedef struct patio__broker_core {
    PATIO__PAD(pad_before);   /* lists is taken once or twice per call */
    int lists;                /* patio__list_lock: the lists, lanes, spares, `closing` */
    pthread_mutex_t mu;       /* with cv: waits for closing and for tasks to end */
    pthread_cond_t cv;
    patio_broker *broker;
    patio__call_list other;   /* pending calls not in a lane */
    patio__lane lanes[PATIO__LANES];
    int closing;
    /* Set by the memory broker, whose send runs every listed call as a
     * task: listing then counts the task as started and takes the task's
     * reference, under the lock it holds anyway, which spares a call two
     * atomic additions. */
    int sends_run_tasks;
    /* Set by brokers whose send keeps a reference to the call (the memory
     * broker's task, the TCP broker's pending request): listing takes it,
     * likewise without an atomic addition. */
    int sends_take_ref;
    /* Freed call objects kept for this broker's next calls. They come back
     * under `lists`, with the unlisting, and go out one ahead: listing a call
     * also puts a spare in `ready`, which the next call takes with one
     * swap. So a call costs no lock of the registry's shared cache. */
    patio_call *spares;       /* linked through next */
    size_t nspares;
    patio_call *ready;        /* atomic */
    /* Freed calls still on a list: a lock-free stack the next listing,
     * which holds `lists` anyway, empties. Freeing a call so takes no lock. */
    patio_call *retired;      /* atomic */
    /* The same two for calls the loop thread starts and frees (callbacks
     * chaining calls): only it touches these, so they take no atomics. */
    patio_call *loop_ready;
    patio_call *loop_retired; /* linked through retired_next */
    size_t nloop_retired;
    const patio__entry *last_entry; /* atomic: what the last send looked up */
    PATIO__PAD(pad_mid);
    patio__task_counter tasks_started;
    patio__task_counter tasks_ended;
    PATIO__PAD(pad_after);
} patio__broker_core;

static patio__broker_core *patio__core(const patio_broker *b) { return (patio__broker_core *)b->internal; }


static void patio__core_retire(patio__broker_core *core, patio_call *c)
{
    patio_call *head = patio__load_relaxed(&core->retired);
    do c->retired_next = head;
    while (!__atomic_compare_exchange_n(&core->retired, &head, c, 1, __ATOMIC_RELEASE, __ATOMIC_RELAXED));
}

static patio_call *patio__core_reap_loop(patio__broker_core *core, patio_call *rest);
static void patio__calls_give(patio_call *c);

/* The loop thread keeps what it retires to itself and unlists a batch at
 * a time (its next listing does it sooner), one lock for many calls. */
#define PATIO__LOOP_RETIRE_BATCH 32u

static void patio__core_retire_on_loop(patio__broker_core *core, patio_call *c)
{
    patio_call *rest;
    c->retired_next = core->loop_retired;
    core->loop_retired = c;
    if (++core->nloop_retired < PATIO__LOOP_RETIRE_BATCH) return;
    patio__list_lock(&core->lists);
    rest = patio__core_reap_loop(core, NULL);
    patio__list_unlock(&core->lists);
    patio__calls_give(rest);
}

/* A finished call stays on its broker's list until its last reference goes,
 * so completing a call on a worker touches no shared list. The thread that
 * frees it then retires it; the broker's next listing unlists it. */
static void patio__call_release_n(patio_call *c, int n)
{
    const patio_hooks *h;
    if (patio__fetch_sub(&c->refs, n) != n) return;
    h = c->hooks;
    /* the writers and error strings are set up afresh by patio__call_new */
    patio__writer_drop(&c->args);
    patio__writer_drop(&c->kwargs);
    patio__writer_drop(&c->own_result);
    patio__writer_drop(&c->task.result);
    if (c->err_type) patio__free(h, c->err_type);
    if (c->err_msg) patio__free(h, c->err_msg);
    if (c->name != c->name_inline) patio__free(h, c->name);
    if (!c->broker || !patio__load(&c->listed)) patio__cache_give(c->cache, h, c);
    else if (patio_loop_in_loop_thread(c->loop)) patio__core_retire_on_loop(patio__core(c->broker), c);
    else patio__core_retire(patio__core(c->broker), c);
}

static void patio__call_release(patio_call *c) { patio__call_release_n(c, 1); }

/* Takes a reference unless the call is already being freed. */
static int patio__call_try_ref(patio_call *c)
{
    int n = patio__load(&c->refs);
    while (n > 0)
        if (patio__cas(&c->refs, &n, n + 1)) return 1;
    return 0;
}

static void patio__list_append(patio__call_list *l, patio_call *c)
{
    c->next = NULL;
    c->prev = l->tail;
    if (l->tail) l->tail->next = c; else l->head = c;
    l->tail = c;
    patio__store(&c->listed, 1);
}

static void patio__list_unlink(patio__call_list *l, patio_call *c)
{
    if (c->prev) c->prev->next = c->next; else l->head = c->next;
    if (c->next) c->next->prev = c->prev; else l->tail = c->prev;
    c->next = c->prev = NULL;
    patio__store(&c->listed, 0);
}

/* Under core->lists: takes c off its list; an emptied lane stops its timer. */
static void patio__call_unlink_locked(patio__broker_core *core, patio_call *c)
{
    patio__lane *lane = c->lane;
    if (!c->listed) return;
    patio__list_unlink(lane ? &lane->calls : &core->other, c);
    if (lane && !lane->calls.head) patio__timer_stop(core->broker->loop, &lane->timer);
}

/* Under core->lists: unlists the retired calls (a listing that closes
 * found some already unlisted) and keeps them as spares while there is
 * room; returns the rest, linked through next, for patio__calls_give. */
static patio_call *patio__core_reap_chain(patio__broker_core *core, patio_call *c, patio_call *rest)
{
    patio_call *next;
    for (; c; c = next) {
        next = c->retired_next;
        patio__call_unlink_locked(core, c);
        if (core->nspares < PATIO__CALL_CACHE_MAX) {
            c->next = core->spares;
            core->spares = c;
            core->nspares++;
        } else {
            c->next = rest;
            rest = c;
        }
    }
    return rest;
}

static patio_call *patio__core_reap(patio__broker_core *core)
{
    return patio__core_reap_chain(core, patio__xchg(&core->retired, (patio_call *)NULL), NULL);
}

/* Under core->lists, on the loop thread: the same for its own retired calls. */
static patio_call *patio__core_reap_loop(patio__broker_core *core, patio_call *rest)
{
    patio_call *c = core->loop_retired;
    core->loop_retired = NULL;
    core->nloop_retired = 0;
    return patio__core_reap_chain(core, c, rest);
}

/* Outside core->lists: back to the registry's cache, which has its own lock. */
static void patio__calls_give(patio_call *c)
{
    patio_call *next;
    for (; c; c = next) {
        next = c->next;
        patio__cache_give(c->cache, c->hooks, c);
    }
}

/* Under core->lists: moves a spare to `ready` (`loop_ready` for the loop
 * thread) if that is empty. Only this stores to `ready` (takers swap it to
 * NULL), so nothing is lost. */
static void patio__core_ready_spare(patio__broker_core *core, int on_loop)
{
    patio_call *c = core->spares;
    if (!c || (on_loop ? core->loop_ready != NULL : patio__load(&core->ready) != NULL)) return;
    core->spares = c->next; /* before c is out: its taker rewrites it */
    core->nspares--;
    if (on_loop) core->loop_ready = c;
    else patio__store(&core->ready, c);
}

/* Lock-free unless this completion is the one the sleeper waits for. The
 * counter/target pair is a Dekker handshake (sequentially consistent on
 * both sides), so a sleeper never misses its wake-up. `exited` is the last
 * thing a notifier touches, so the waiter knows when it may go away. */
static void patio__waiter_notify(patio__waiter *w)
{
    int n = __atomic_add_fetch(&w->notified, 1, __ATOMIC_SEQ_CST);
    if (n >= __atomic_load_n(&w->target, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&w->mu);
        pthread_cond_signal(&w->cv);
        pthread_mutex_unlock(&w->mu);
    }
    __atomic_add_fetch(&w->exited, 1, __ATOMIC_RELEASE);
}

static void patio__call_deliver(patio__post *p)
{
    patio_call *c = PATIO__CONTAINER(p, patio_call, done_post);
    int drops = c->deliver_drops;
    c->on_done(c, c->on_done_user);
    patio__call_release_n(c, drops);
}

/* Copies an error's type and message into the call (for local errors). */
static void patio__call_set_error(patio_call *c, const char *type, size_t tlen, const char *msg, size_t mlen)
{
    c->err_type = patio__strndup(c->hooks, type, tlen);
    c->err_msg = patio__strndup(c->hooks, msg, mlen);
}

/* First finisher wins: publishes status and result, wakes the waiter,
 * queues on_done (or runs it, PATIO__DONE_INLINE) and drops the in-flight
 * reference. */
static int patio__call_claim(patio_call *c)
{
    int expected = PATIO__CALL_PENDING;
    return patio__cas(&c->state, &expected, PATIO__CALL_FINISHING);
}

/* How a finisher completes a call (patio__call_complete's `how`). */
#define PATIO__DONE_DROP_REF 1 /* the finisher's own reference goes with the in-flight one */
#define PATIO__DONE_INLINE 2   /* on the call's loop thread, between frames: on_done runs at once */

/* For the finisher that claimed c: the rest of patio__call_finish. The
 * in-flight reference goes (with the finisher's own, PATIO__DONE_DROP_REF)
 * in one atomic subtraction, after on_done if there is one. */
static void patio__call_complete(patio_call *c, int status, const patio_writer *result,
                                 const char *type, const char *msg, int how)
{
    int drops = 1 + (how & PATIO__DONE_DROP_REF);
    patio__waiter *w;
    c->status = status;
    if (status == PATIO_OK) {
        c->result = result;
    } else if (result && result->len) {
        const char *t, *m;
        size_t tl, ml;
        if (patio__decode_exception(result->data, result->len, &t, &tl, &m, &ml) == PATIO_OK)
            patio__call_set_error(c, t, tl, m, ml);
        else
            patio__call_set_error(c, "RuntimeError", 12, "undecodable error", 17);
    } else {
        if (!type) type = "RuntimeError";
        if (!msg) msg = patio_strerror(status);
        patio__call_set_error(c, type, strlen(type), msg, strlen(msg));
    }
    patio__store(&c->state, PATIO__CALL_DONE);
    if (patio__load(&c->timer_armed) && patio__timer_stop(c->loop, &c->timer) == 1)
        patio__call_release(c);
    w = patio__xchg(&c->waiter, PATIO__WAITER_FIRED);
    if (w && w != PATIO__WAITER_FIRED) patio__waiter_notify(w);
    if (c->on_done) {
        c->deliver_drops = drops;
        if (how & PATIO__DONE_INLINE) patio__call_deliver(&c->done_post);
        else patio__loop_post(c->loop, &c->done_post);
    } else {
        patio__call_release_n(c, drops);
    }
}

static int patio__call_finish(patio_call *c, int status, const patio_writer *result,
                              const char *type, const char *msg)
{
    if (!patio__call_claim(c)) return PATIO_ERR_INVALID;
    patio__call_complete(c, status, result, type, msg, 0);
    return PATIO_OK;
}

/* Finishes c for a finisher that holds a reference of its own: if it wins,
 * that reference goes with the in-flight one; if not, the caller still
 * holds it. `inline_done`: see PATIO__DONE_INLINE. */
static int patio__call_finish_dropping(patio_call *c, int status, const patio_writer *result, int inline_done)
{
    if (!patio__call_claim(c)) return PATIO_ERR_INVALID;
    patio__call_complete(c, status, result, NULL, NULL, PATIO__DONE_DROP_REF | (inline_done ? PATIO__DONE_INLINE : 0));
    return PATIO_OK;
}

static void patio__call_expire(patio_call *c);

static void patio__call_timed_out(patio__timer *t)
{
    patio_call *c = PATIO__CONTAINER(t, patio_call, timer);
    patio__call_expire(c);
    patio__call_release(c);
}

PATIO_API int patio_call_succeed(patio_call *c, const void *value, size_t len)
{
    int rc;
    if (!c || !value || !len) return PATIO_ERR_INVALID;
    if (!patio__call_claim(c)) return PATIO_ERR_INVALID; /* before the result buffer is ours */
    patio_writer_reset(&c->own_result);
    rc = patio_write_raw(&c->own_result, value, len);
    if (rc != PATIO_OK) patio__call_complete(c, rc, NULL, "MemoryError", "no memory for the call's result", 0);
    else patio__call_complete(c, PATIO_OK, &c->own_result, NULL, NULL, 0);
    return rc;
}

PATIO_API void patio_call_ref(patio_call *c)
{
    if (c) patio__fetch_add(&c->refs, 1);
}

PATIO_API void patio_call_unref(patio_call *c)
{
    if (c) patio__call_release(c);
}

PATIO_API int patio_call_fail_with(patio_call *c, int status, const char *type, const char *message)
{
    if (!c || status >= 0) return PATIO_ERR_INVALID;
    if (status == PATIO_ERR_REMOTE && !type) type = "RuntimeError";
    return patio__call_finish(c, status, NULL, type, message ? message : (type ? "" : NULL));
}

static patio_call *patio__call_new(patio_broker *b, const char *name, int on_loop)
{
    patio__broker_core *core = patio__core(b);
    patio_call *c;
    if (on_loop && core->loop_ready) {
        c = core->loop_ready;
        core->loop_ready = NULL;
    } else {
        c = patio__xchg(&core->ready, (patio_call *)NULL);
    }
    if (c) memset(c, 0, offsetof(patio_call, task));
    else c = (patio_call *)patio__cache_take(&b->registry->call_cache, b->hooks, sizeof *c,
                                             offsetof(patio_call, task));
    if (!c) return NULL;
    c->cache = &b->registry->call_cache;
    c->refs = 2; /* the user's and the in-flight reference */
    c->broker = b;
    c->loop = b->loop;
    c->hooks = b->hooks;
    c->task.state = PATIO__TASK_NEW; /* nobody else sees the call yet */
    c->timeout = 0;
    c->deadline_ns = 0;
    c->next = c->prev = NULL;
    c->lane = NULL;
    c->err_type = c->err_msg = NULL;
    memset(&c->timer, 0, sizeof c->timer);
    c->timer.fn = patio__call_timed_out;
    c->done_post.next = NULL;
    c->done_post.fn = patio__call_deliver;
    patio__writer_init_small(&c->args, b->hooks, c->args_inline, sizeof c->args_inline);
    patio_writer_init(&c->kwargs, b->hooks);
    patio_writer_init(&c->own_result, b->hooks);
    patio_writer_init(&c->task.result, b->hooks);
    if (!name) name = "";
    c->name_len = strlen(name);
    if (c->name_len < sizeof c->name_inline) {
        c->name = c->name_inline;
        memcpy(c->name_inline, name, c->name_len + 1);
    } else {
        c->name = patio__strdup(b->hooks, name);
        if (!c->name) { patio__cache_give(c->cache, b->hooks, c); return NULL; }
    }
    return c;
}

/* 1 if data is exactly one valid MessagePack object of the given type. */
static int patio__is_msgpack(const void *data, size_t len, patio_type type)
{
    patio_reader r;
    patio_value v;
    patio_reader_init(&r, data, len);
    if (patio_peek(&r, &v) != PATIO_OK || v.type != type) return 0;
    return patio_msgpack_check_all(data, len, 0) == PATIO_OK;
}

/* Encodes positional and keyword arguments into the call. */
static int patio__call_encode_args(patio_call *c, const patio_call_opts *o, const char *fmt, va_list ap)
{
    if (o && o->args) {
        if (!patio__is_msgpack(o->args, o->args_len, PATIO_ARRAY)) return PATIO_ERR_INVALID;
        patio_write_raw(&c->args, o->args, o->args_len);
    } else {
        patio__pack_array(&c->args, fmt ? fmt : "", ap);
    }
    if (o && o->kwargs && o->kwargs_len) {
        if (!patio__is_msgpack(o->kwargs, o->kwargs_len, PATIO_MAP)) return PATIO_ERR_INVALID;
        patio_write_raw(&c->kwargs, o->kwargs, o->kwargs_len);
    }
    if (c->args.err) return c->args.err;
    return c->kwargs.err;
}

/* Under core->lists: the lane for this timeout, claiming a free one; NULL if
 * all lanes serve other timeouts. */
static patio__lane *patio__lane_for(patio__broker_core *core, double timeout)
{
    patio__lane *free_lane = NULL;
    int i;
    for (i = 0; i < PATIO__LANES; i++) {
        patio__lane *l = &core->lanes[i];
        if (!l->calls.head) { if (!free_lane) free_lane = l; }
        else if (l->timeout == timeout) return l;
    }
    if (free_lane) free_lane->timeout = timeout;
    return free_lane;
}

/* Lists a starting call; returns 1 if its timeout is watched by a lane. */
static int patio__call_enlist(patio_broker *b, patio_call *c, int *in_lane, int on_loop)
{
    patio__broker_core *core = patio__core(b);
    patio__lane *lane = NULL;
    patio_call *rest = NULL;
    patio__list_lock(&core->lists);
    if (core->closing) { patio__list_unlock(&core->lists); return PATIO_ERR_CLOSED; }
    if (patio__load_relaxed(&core->retired)) rest = patio__core_reap(core);
    if (on_loop && core->loop_retired) rest = patio__core_reap_loop(core, rest);
    if (c->timeout >= 0) lane = patio__lane_for(core, c->timeout);
    c->lane = lane;
    if (lane) {
        /* read under the lock, so deadlines in a lane never decrease */
        c->deadline_ns = patio__deadline_after_long(c->timeout);
        patio__list_append(&lane->calls, c);
        if (lane->calls.head == c) patio__timer_start(b->loop, &lane->timer, c->deadline_ns);
    } else {
        patio__list_append(&core->other, c);
    }
    if (core->sends_take_ref) c->refs++; /* nobody else sees the call before the unlock */
    if (core->sends_run_tasks)
        __atomic_store_n(&core->tasks_started.n, core->tasks_started.n + 1, __ATOMIC_RELAXED);
    patio__core_ready_spare(core, on_loop);
    patio__list_unlock(&core->lists);
    patio__calls_give(rest);
    *in_lane = lane != NULL;
    return PATIO_OK;
}

static void patio__call_expire(patio_call *c)
{
    patio_broker *b = c->broker;
    if (patio__load(&c->state) == PATIO__CALL_PENDING && b->vt->cancel) b->vt->cancel(b, c);
    patio__call_finish(c, PATIO_ERR_TIMEOUT, NULL, "TimeoutError", "");
}

/* A lane's timer: expires its calls that are due, re-arms for the next. */
static void patio__lane_fire(patio__timer *t)
{
    patio__lane *lane = PATIO__CONTAINER(t, patio__lane, timer);
    patio__broker_core *core = lane->core;
    patio_call *due = NULL, *c;
    uint64_t now = patio__now_ns();
    patio__list_lock(&core->lists);
    while ((c = lane->calls.head) != NULL && c->deadline_ns <= now) {
        /* decide before unlinking: once off the list, a call nobody else
         * holds may be freed by its last owner at any moment */
        int expire = patio__load(&c->state) == PATIO__CALL_PENDING && patio__call_try_ref(c);
        patio__list_unlink(&lane->calls, c);
        if (!expire) continue;
        c->next = due;
        due = c;
    }
    if (lane->calls.head) patio__timer_start(core->broker->loop, &lane->timer, lane->calls.head->deadline_ns);
    patio__list_unlock(&core->lists);
    while ((c = due) != NULL) {
        due = c->next;
        c->next = NULL;
        patio__call_expire(c);
        patio__call_release(c);
    }
}

static void patio__call_arm_timer(patio_call *c)
{
    if (c->timeout < 0) return;
    patio__fetch_add(&c->refs, 1);
    patio__store(&c->timer_armed, 1);
    patio__timer_start(c->loop, &c->timer, patio__deadline_after(c->timeout));
}

/* A call that never reaches its broker: finished at once with rc. */
static patio_call *patio__call_refused(patio_call *c, int rc)
{
    c->broker = NULL;
    patio__call_finish(c, rc, NULL, rc == PATIO_ERR_CLOSED ? "RuntimeError" : "ValueError", NULL);
    return c;
}

PATIO_API patio_call *patio_call_startv(patio_broker *b, const patio_call_opts *opts,
                                        const char *name, const char *fmt, va_list ap)
{
    patio_call *c;
    int rc, in_lane = 0, held, on_loop;
    if (!b) return NULL;
    on_loop = patio_loop_in_loop_thread(b->loop);
    c = patio__call_new(b, name, on_loop);
    if (!c) return NULL;
    if (opts) { c->on_done = opts->on_done; c->on_done_user = opts->user; }
    c->timeout = opts && opts->timeout != 0 ? opts->timeout : b->default_timeout;
    if (c->timeout != c->timeout) c->timeout = 0; /* NaN: expired at once */
    if (c->timeout < 0 && !(opts && opts->timeout < 0)) c->timeout = 0;
    rc = (!name || !*name) ? PATIO_ERR_INVALID : patio__call_encode_args(c, opts, fmt, ap);
    if (rc != PATIO_OK) return patio__call_refused(c, rc);
    /* Once listed, the call can time out on the loop thread, and an
     * on_done that frees it may run before this function is done with it:
     * hold it until then. Without on_done the caller's own reference, which
     * it cannot drop before it has the pointer, does that; on the loop
     * thread nothing that could drop the last one runs before it returns. */
    held = c->on_done != NULL && !on_loop;
    if (held) patio__fetch_add(&c->refs, 1);
    rc = patio__call_enlist(b, c, &in_lane, on_loop);
    if (rc != PATIO_OK) patio__call_refused(c, rc);
    else {
        if (!in_lane) patio__call_arm_timer(c);
        b->vt->send(b, c);
    }
    if (held) patio__call_release(c);
    return c;
}

PATIO_API patio_call *patio_call_start(patio_broker *b, const patio_call_opts *opts,
                                       const char *name, const char *fmt, ...)
{
    patio_call *c;
    va_list ap;
    va_start(ap, fmt);
    c = patio_call_startv(b, opts, name, fmt, ap);
    va_end(ap);
    return c;
}

PATIO_API patio_call *patio_call_async(patio_broker *b, const char *name, const char *fmt, ...)
{
    patio_call *c;
    va_list ap;
    va_start(ap, fmt);
    c = patio_call_startv(b, NULL, name, fmt, ap);
    va_end(ap);
    return c;
}

PATIO_API patio_call *patio_call_sync(patio_broker *b, double timeout, const char *name, const char *fmt, ...)
{
    patio_call_opts o;
    patio_call *c;
    va_list ap;
    memset(&o, 0, sizeof o);
    o.timeout = timeout;
    va_start(ap, fmt);
    c = patio_call_startv(b, &o, name, fmt, ap);
    va_end(ap);
    if (c) patio_call_wait(c, PATIO_NO_TIMEOUT);
    return c;
}

PATIO_API patio_call *patio_call_fn(patio_broker *b, patio_fn fn, const char *fmt, ...)
{
    const char *name;
    patio_call *c;
    va_list ap;
    if (!b) return NULL;
    name = patio_registry_name_of(b->registry, fn);
    if (!name || !b->registry->auto_naming) {
        c = patio__call_new(b, "", 0);
        if (!c) return NULL;
        c->broker = NULL;
        patio__call_finish(c, name ? PATIO_ERR_INVALID : PATIO_ERR_NOT_FOUND, NULL,
                           name ? "ValueError" : "KeyError",
                           name ? "auto-naming is disabled, call by name" : "function is not registered");
        return c;
    }
    va_start(ap, fmt);
    c = patio_call_startv(b, NULL, name, fmt, ap);
    va_end(ap);
    return c;
}

PATIO_API int patio_call_status(const patio_call *c)
{
    if (!c) return PATIO_ERR_NOMEM;
    if (patio__load(&c->state) != PATIO__CALL_DONE) return PATIO_PENDING;
    return c->status;
}

PATIO_API const char *patio_call_name(const patio_call *c) { return c ? c->name : ""; }

PATIO_API int patio_call_cancel(patio_call *c)
{
    patio_broker *b;
    if (!c) return PATIO_ERR_INVALID;
    if (patio__load(&c->state) != PATIO__CALL_PENDING) return PATIO_ERR_INVALID;
    b = c->broker;
    if (!b || !b->vt->cancel || b->vt->cancel(b, c) != PATIO_OK) return PATIO_ERR_STARTED;
    /* its timeout may have finished it meanwhile: then that stands */
    return patio__call_finish(c, PATIO_ERR_CANCELLED, NULL, "CancelledError", "");
}

PATIO_API void patio_call_free(patio_call *c)
{
    if (c) patio__call_release(c);
}

PATIO_API int patio_call_args(const patio_call *c, const void **args, size_t *len,
                              const void **kwargs, size_t *kwargs_len)
{
    if (!c) return PATIO_ERR_INVALID;
    if (args) *args = c->args.data;
    if (len) *len = c->args.len;
    if (kwargs) *kwargs = c->kwargs.len ? (const void *)c->kwargs.data : NULL;
    if (kwargs_len) *kwargs_len = c->kwargs.len;
    return PATIO_OK;
}

PATIO_API double patio_call_timeout(const patio_call *c) { return c ? c->timeout : -1; }

PATIO_API const void *patio_call_result(const patio_call *c, size_t *len)
{
    if (patio_call_status(c) != PATIO_OK) { if (len) *len = 0; return NULL; }
    if (len) *len = c->result->len;
    return c->result->data;
}

PATIO_API int patio_call_reader(const patio_call *c, patio_reader *r)
{
    int st = patio_call_status(c);
    if (st != PATIO_OK) return st;
    patio_reader_init(r, c->result->data, c->result->len);
    return PATIO_OK;
}

PATIO_API int patio_call_unpack(const patio_call *c, const char *fmt, ...)
{
    patio_reader r;
    va_list ap;
    int rc = patio_call_reader(c, &r);
    if (rc != PATIO_OK) return rc;
    va_start(ap, fmt);
    rc = patio_unpackv(&r, fmt, ap);
    va_end(ap);
    return rc;
}

PATIO_API int64_t patio_result_int(const patio_call *c)
{
    patio_reader r;
    int64_t v = 0;
    if (c && patio__load(&c->state) == PATIO__CALL_DONE && c->status == PATIO_OK && c->result && c->result->len == 1) {
        uint8_t b = c->result->data[0]; /* a fixint, the usual answer */
        if (b <= 0x7f) return b;
        if (b >= 0xe0) return (int64_t)b - 0x100;
    }
    if (patio_call_reader(c, &r) != PATIO_OK || patio_read_int(&r, &v) != PATIO_OK) return 0;
    return v;
}

PATIO_API double patio_result_double(const patio_call *c)
{
    patio_reader r;
    double v = 0;
    if (patio_call_reader(c, &r) != PATIO_OK || patio_read_double(&r, &v) != PATIO_OK) return 0;
    return v;
}

PATIO_API const char *patio_call_error_type(const patio_call *c)
{
    int st = patio_call_status(c);
    if (st == PATIO_OK || st == PATIO_PENDING || !c->err_type) return "";
    return c->err_type;
}

PATIO_API const char *patio_call_error_message(const patio_call *c)
{
    int st = patio_call_status(c);
    if (st == PATIO_OK || st == PATIO_PENDING) return "";
    return c->err_msg ? c->err_msg : patio_strerror(st);
}

/* ---- waiting ---------------------------------------------------------- */

static int patio__calls_done(patio_call *const *calls, size_t n, int any, size_t *index)
{
    size_t i, done = 0;
    for (i = 0; i < n; i++) {
        if (patio__load(&calls[i]->state) == PATIO__CALL_DONE) {
            if (any) { if (index) *index = i; return 1; }
            done++;
        }
    }
    return !any && done == n;
}

/* Who drives the loop while we wait: 1 = we must pump it ourselves. */
static int patio__must_pump(patio_loop *loop)
{
    return patio_loop_run_once(loop, 0) != PATIO_ERR_INVALID;
}

/* Whether the wait is over. For "all", calls before *first are known to
 * be done: each look starts there, so a finished prefix is read once.
 * Until the last call is done, only it is looked at: calls usually finish
 * in the order they started, and every look at a call that a worker is
 * about to finish costs that worker a cache miss when it does. */
static int patio__wait_met(patio_call *const *calls, size_t n, int any, size_t *index, size_t *first)
{
    size_t i = *first;
    if (any) return patio__calls_done(calls, n, 1, index);
    if (i + 1 < n && patio__load(&calls[n - 1]->state) != PATIO__CALL_DONE) return 0;
    while (i < n && patio__load(&calls[i]->state) == PATIO__CALL_DONE) i++;
    *first = i;
    return i == n;
}

/* Registers w on every call that is still pending; returns how many took
 * it. *shared counts calls another thread already waits on (they are
 * polled). A finished call is skipped with a load: it notifies nobody. */
static size_t patio__waiter_register(patio__waiter *w, patio_call *const *calls, size_t n,
                                     unsigned char *mine, size_t *shared)
{
    size_t i, k = 0;
    *shared = 0;
    for (i = 0; i < n; i++) {
        patio__waiter *expected = NULL;
        mine[i] = 0;
        if (patio__load(&calls[i]->state) == PATIO__CALL_DONE) continue;
        mine[i] = (unsigned char)patio__cas(&calls[i]->waiter, &expected, w);
        k += mine[i];
        if (!mine[i] && expected != PATIO__WAITER_FIRED) (*shared)++;
    }
    return k;
}

/* Rare case: another thread waits on one of these calls too. Poll. */
static void patio__wait_poll(patio_call *const *calls, size_t n, int any, size_t *index, uint64_t deadline)
{
    while (!patio__calls_done(calls, n, any, index) && patio__now_ns() < deadline) {
        struct timespec ts;
        ts.tv_sec = 0;
        ts.tv_nsec = 1000000;
        nanosleep(&ts, NULL);
    }
}

/* Takes w back from calls that have not fired; returns how many fired
 * (each of those notifies w exactly once). */
static size_t patio__waiter_unregister(patio__waiter *w, patio_call *const *calls, size_t n,
                                       const unsigned char *mine)
{
    size_t i, fired = 0;
    for (i = 0; i < n; i++) {
        patio__waiter *expected = w;
        if (mine[i] && !patio__cas(&calls[i]->waiter, &expected, NULL)) fired++;
    }
    return fired;
}

/* A blocking wait polls for at most this long: it holds a CPU that the
 * threads finishing its calls may need. */
#define PATIO__WAIT_SPIN_US (PATIO_SPIN_US < 50 ? PATIO_SPIN_US : 50)

/* While polling, a waiter gives its CPU away this often: the worker that
 * runs its call may have been woken onto this very CPU (the scheduler
 * often places a woken thread beside its waker), and would otherwise wait
 * for the whole poll to end. */
#define PATIO__WAIT_YIELD_NS 1000u

/* Polls the calls themselves, with plain loads, for up to the spin budget
 * (never past the deadline); 1 if the wait is over. Calls in flight
 * usually finish within it, and then no call pays for registering a
 * waiter: an atomic operation on each, and another to take it back. */
static int patio__wait_spin(patio_call *const *calls, size_t n, int any, size_t *index,
                            size_t *first, uint64_t deadline)
{
    uint64_t now = patio__now_ns(), next_yield = now + PATIO__WAIT_YIELD_NS;
    uint64_t until = now + (uint64_t)PATIO__WAIT_SPIN_US * 1000u;
    unsigned i = 0;
    if (until > deadline) until = deadline;
    for (;;) {
        if (patio__wait_met(calls, n, any, index, first)) return 1;
        if ((++i & 7) != 0) { patio__cpu_relax(); continue; }
        now = patio__now_ns();
        if (now >= until) return 0;
        if (now >= next_yield) {
            sched_yield();
            next_yield = now + PATIO__WAIT_YIELD_NS;
        }
    }
}

/* Sleeps (or pumps) until `target` registered calls notified, or the
 * deadline. */
static void patio__wait_block(patio__waiter *w, int target, uint64_t deadline, patio_loop *pump)
{
    while (patio__load(&w->notified) < target) {
        uint64_t now = patio__now_ns();
        if (now >= deadline) return;
        if (pump) {
            patio_loop_run_once(pump, deadline - now < 1000000u ? 0 : 1);
            continue;
        }
        pthread_mutex_lock(&w->mu);
        __atomic_store_n(&w->target, target, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&w->notified, __ATOMIC_SEQ_CST) < target)
            patio__cond_wait_until(&w->cv, &w->mu, deadline);
        __atomic_store_n(&w->target, INT_MAX, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&w->mu);
    }
}

/* Waits until `fired` notifiers have completely left the waiter. */
static void patio__waiter_drain(patio__waiter *w, size_t fired)
{
    unsigned i;
    for (i = 0; (size_t)__atomic_load_n(&w->exited, __ATOMIC_ACQUIRE) < fired; i++) {
        if (i < 64) patio__cpu_relax();
        else sched_yield(); /* a notifier is between two instructions: let it run */
    }
}

/* Registers a waiter on the calls still pending from calls[first] on and
 * sleeps (or pumps the loop) until the wait is over or the deadline. */
static int patio__wait_registered(patio_call *const *calls, size_t n, int any, size_t *index,
                                  size_t first, uint64_t deadline, patio_loop *loop)
{
    patio__waiter w;
    unsigned char small[64];
    unsigned char *mine = small;
    size_t m = n - first, seen = first, fired, registered, shared;
    int rc;
    if (m > sizeof small) {
        mine = (unsigned char *)patio__malloc(calls[0]->hooks, m);
        if (!mine) return PATIO_ERR_NOMEM;
    }
    pthread_mutex_init(&w.mu, NULL);
    patio__cond_init(&w.cv);
    w.notified = 0;
    w.exited = 0;
    w.target = INT_MAX;
    registered = patio__waiter_register(&w, calls + first, m, mine, &shared);
    /* calls that finished before we registered count at once */
    if (!patio__wait_met(calls, n, any, index, &seen)) {
        if (shared) patio__wait_poll(calls, n, any, index, deadline);
        else patio__wait_block(&w, any ? 1 : (int)registered, deadline,
                               loop && patio__must_pump(loop) ? loop : NULL);
    }
    rc = patio__wait_met(calls, n, any, index, &seen) ? PATIO_OK : PATIO_ERR_TIMEOUT;
    /* Calls that fired hold w until they notified: wait for exactly those. */
    fired = patio__waiter_unregister(&w, calls + first, m, mine);
    patio__waiter_drain(&w, fired);
    pthread_mutex_destroy(&w.mu);
    pthread_cond_destroy(&w.cv);
    if (mine != small) patio__free(calls[0]->hooks, mine);
    return rc;
}

static int patio__wait(patio_call *const *calls, size_t n, double timeout, int any, size_t *index)
{
    patio_loop *loop = NULL;
    uint64_t deadline;
    size_t i, first = 0;
    if (!calls && n) return PATIO_ERR_INVALID;
    for (i = 0; i < n; i++) if (!calls[i]) return PATIO_ERR_INVALID;
    if (n == 0) return any ? PATIO_ERR_INVALID : PATIO_OK;
    if (patio__wait_met(calls, n, any, index, &first)) return PATIO_OK;
    for (i = first; i < n && !loop; i++)
        if (patio__load(&calls[i]->state) != PATIO__CALL_DONE) loop = calls[i]->loop;
    if (loop && patio_loop_in_loop_thread(loop)) return PATIO_ERR_INVALID; /* would deadlock */
    deadline = timeout < 0 ? UINT64_MAX : patio__deadline_after(timeout);
    if (patio__wait_spin(calls, n, any, index, &first, deadline)) return PATIO_OK;
    return patio__wait_registered(calls, n, any, index, first, deadline, loop);
}

PATIO_API int patio_call_wait(patio_call *c, double timeout)
{
    int rc;
    if (!c) return PATIO_ERR_INVALID;
    rc = patio__wait(&c, 1, timeout, 0, NULL);
    if (rc == PATIO_ERR_TIMEOUT) return PATIO_PENDING;
    if (rc != PATIO_OK) return rc;
    return c->status;
}

PATIO_API int patio_wait_all(patio_call *const *calls, size_t n, double timeout)
{
    return patio__wait(calls, n, timeout, 0, NULL);
}

PATIO_API int patio_wait_any(patio_call *const *calls, size_t n, double timeout, size_t *index)
{
    return patio__wait(calls, n, timeout, 1, index);
}

/* ========================================================================
 * >>broker  Broker base and the memory broker
 * ======================================================================== */

PATIO_API int patio_broker_init(patio_broker *b, const patio_broker_vtable *vt,
                                patio_executor *ex, const patio_broker_config *cfg)
{
    patio__broker_core *core;
    int rc;
    if (!b || !vt || !vt->send || !ex) return PATIO_ERR_INVALID;
    memset(b, 0, sizeof *b);
    b->vt = vt;
    b->executor = ex;
    b->registry = ex->registry;
    b->hooks = ex->hooks;
    b->default_timeout = cfg && cfg->default_timeout > 0 ? cfg->default_timeout : PATIO_DEFAULT_TIMEOUT;
    core = (patio__broker_core *)patio__calloc(b->hooks, sizeof *core);
    if (!core) return PATIO_ERR_NOMEM;
    patio__mutex_init_hot(&core->mu);
    patio__cond_init(&core->cv);
    core->broker = b;
    {
        int i;
        for (i = 0; i < PATIO__LANES; i++) {
            core->lanes[i].core = core;
            core->lanes[i].timer.fn = patio__lane_fire;
        }
    }
    b->internal = core;
    if (cfg && cfg->loop) {
        b->loop = cfg->loop;
    } else {
        patio_loop_config lc;
        memset(&lc, 0, sizeof lc);
        lc.hooks = b->hooks;
        b->loop = patio_loop_new(&lc);
        if (!b->loop) { patio_broker_deinit(b); return PATIO_ERR_NOMEM; }
        b->owns_loop = 1;
    }
    rc = ex->vt->attach ? patio__executor_attach(ex, b->loop) : PATIO_OK;
    if (rc == PATIO_OK && b->owns_loop) rc = patio_loop_start(b->loop);
    if (rc != PATIO_OK) { patio_broker_deinit(b); return rc; }
    patio_registry_lock(b->registry);
    return PATIO_OK;
}

/* Pops one pending call (with a reference) for closing; NULL when none. */
static patio_call *patio__broker_take_pending(patio__broker_core *core)
{
    patio_call *c;
    int i;
    patio__list_lock(&core->lists);
    for (;;) {
        c = NULL;
        for (i = 0; i < PATIO__LANES && !c; i++) c = core->lanes[i].calls.head;
        if (!c) c = core->other.head;
        if (!c) break;
        if (patio__call_try_ref(c)) {
            patio__call_unlink_locked(core, c);
            break;
        }
        patio__call_unlink_locked(core, c); /* its last owner is freeing it: leave it be */
    }
    patio__list_unlock(&core->lists);
    return c;
}

PATIO_API void patio_broker_close(patio_broker *b)
{
    patio__broker_core *core;
    patio_call *c;
    if (!b || !b->internal) return;
    core = patio__core(b);
    pthread_mutex_lock(&core->mu);
    patio__list_lock(&core->lists); /* listing reads `closing` under this one */
    core->closing = 1;
    patio__list_unlock(&core->lists);
    __atomic_store_n(&core->tasks_ended.closing, 1, __ATOMIC_SEQ_CST);
    b->closed = 1;
    pthread_cond_broadcast(&core->cv); /* wakes patio_broker_join */
    pthread_mutex_unlock(&core->mu);
    if (b->vt->close) b->vt->close(b);
    while ((c = patio__broker_take_pending(core)) != NULL) {
        if (patio__load(&c->state) == PATIO__CALL_PENDING && b->vt->cancel) b->vt->cancel(b, c);
        patio__call_finish(c, PATIO_ERR_CLOSED, NULL, "RuntimeError", "broker closed");
        patio__call_release(c);
    }
}

typedef struct patio__barrier {
    patio__post post;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int passed;
} patio__barrier;

static void patio__barrier_pass(patio__post *p)
{
    patio__barrier *br = PATIO__CONTAINER(p, patio__barrier, post);
    pthread_mutex_lock(&br->mu);
    br->passed = 1;
    pthread_cond_signal(&br->cv);
    pthread_mutex_unlock(&br->mu);
}

/* Waits until everything posted to the loop before now has run. */
static void patio__loop_flush(patio_loop *loop)
{
    patio__barrier br;
    int pump = patio__must_pump(loop);
    memset(&br, 0, sizeof br);
    br.post.fn = patio__barrier_pass;
    pthread_mutex_init(&br.mu, NULL);
    patio__cond_init(&br.cv);
    patio__loop_post(loop, &br.post);
    pthread_mutex_lock(&br.mu);
    while (!br.passed) {
        if (pump) {
            pthread_mutex_unlock(&br.mu);
            patio_loop_run_once(loop, 1);
            pthread_mutex_lock(&br.mu);
        } else {
            pthread_cond_wait(&br.cv, &br.mu);
        }
    }
    pthread_mutex_unlock(&br.mu);
    pthread_mutex_destroy(&br.mu);
    pthread_cond_destroy(&br.cv);
}

static size_t patio__broker_tasks_running(patio__broker_core *core)
{
    size_t ended = __atomic_load_n(&core->tasks_ended.n, __ATOMIC_SEQ_CST);
    return __atomic_load_n(&core->tasks_started.n, __ATOMIC_SEQ_CST) - ended;
}

/* Waits for tasks this broker submitted and that are still running. */
static void patio__broker_wait_tasks(patio_broker *b)
{
    patio__broker_core *core = patio__core(b);
    int pump = patio__must_pump(b->loop);
    pthread_mutex_lock(&core->mu);
    while (patio__broker_tasks_running(core)) {
        if (pump) {
            pthread_mutex_unlock(&core->mu);
            patio_loop_run_once(b->loop, 1);
            pthread_mutex_lock(&core->mu);
        } else {
            patio__cond_wait_until(&core->cv, &core->mu, patio__now_ns() + 1000000u);
        }
    }
    pthread_mutex_unlock(&core->mu);
}

PATIO_API void patio_broker_deinit(patio_broker *b)
{
    patio__broker_core *core;
    if (!b) return;
    core = patio__core(b);
    /* the executor outlives the broker: it must not keep a freed loop */
    if (b->owns_loop && b->executor && b->executor->loop == b->loop) b->executor->loop = NULL;
    if (b->owns_loop && b->loop) patio_loop_free(b->loop);
    b->loop = NULL;
    if (core) {
        patio_call *c = patio__xchg(&core->ready, (patio_call *)NULL), *next;
        patio__free_lines(b->hooks, c);
        while ((c = core->spares) != NULL) {
            core->spares = c->next;
            patio__free_lines(b->hooks, c);
        }
        for (c = patio__xchg(&core->retired, (patio_call *)NULL); c; c = next) {
            next = c->retired_next;
            patio__free_lines(b->hooks, c);
        }
        for (c = core->loop_retired; c; c = next) {
            next = c->retired_next;
            patio__free_lines(b->hooks, c);
        }
        patio__free_lines(b->hooks, core->loop_ready);
        pthread_mutex_destroy(&core->mu);
        pthread_cond_destroy(&core->cv);
        patio__free(b->hooks, core);
        b->internal = NULL;
    }
}

PATIO_API void patio_broker_free(patio_broker *b)
{
    if (!b) return;
    if (b->loop && patio_loop_in_loop_thread(b->loop)) {
        patio__log(b->hooks, PATIO_LOG_ERROR, "broker: cannot be freed from its loop thread");
        return;
    }
    patio_broker_close(b);
    if (b->loop && b->internal) {
        patio__broker_wait_tasks(b);
        patio__loop_flush(b->loop);
    }
    patio_broker_deinit(b);
    if (b->vt->destroy) b->vt->destroy(b);
}

PATIO_API int patio_broker_join(patio_broker *b, double timeout)
{
    patio__broker_core *core;
    uint64_t deadline;
    int pump, closed;
    if (!b || !b->internal) return PATIO_ERR_INVALID;
    if (patio_loop_in_loop_thread(b->loop)) return PATIO_ERR_INVALID;
    core = patio__core(b);
    deadline = timeout < 0 ? UINT64_MAX : patio__deadline_after(timeout);
    pump = patio__must_pump(b->loop);
    pthread_mutex_lock(&core->mu);
    while (!core->closing && patio__now_ns() < deadline) {
        if (pump) {
            pthread_mutex_unlock(&core->mu);
            patio_loop_run_once(b->loop, 10);
            pthread_mutex_lock(&core->mu);
        } else {
            patio__cond_wait_until(&core->cv, &core->mu, deadline);
        }
    }
    closed = core->closing;
    pthread_mutex_unlock(&core->mu);
    return closed ? PATIO_OK : PATIO_ERR_TIMEOUT;
}

PATIO_API patio_loop *patio_broker_loop(const patio_broker *b) { return b ? b->loop : NULL; }
PATIO_API patio_registry *patio_broker_registry(const patio_broker *b) { return b ? b->registry : NULL; }
PATIO_API patio_executor *patio_broker_executor(const patio_broker *b) { return b ? b->executor : NULL; }

/* ---- running a call's task on the broker's executor ------------------- */

/* One thread starts a broker's tasks (the TCP broker's loop thread; the
 * memory broker counts them at listing, under its lock), so the count is a
 * plain load and store. The task is handed over after it, so whoever ends
 * it counts the end after this start is visible. */
static void patio__broker_task_started(patio_broker *b)
{
    size_t *n = &patio__core(b)->tasks_started.n;
    __atomic_store_n(n, __atomic_load_n(n, __ATOMIC_RELAXED) + 1, __ATOMIC_RELEASE);
}

/* Lock-free unless the broker is closing. The increment must be the last
 * thing an ender touches: once the count adds up, the closer may free the
 * broker. So `closing` is read first, and a closing broker gets its count
 * under the mutex, with a broadcast the closer cannot miss. An ender that
 * read `closing` just before it was set increments without waking the
 * closer, which therefore re-checks every millisecond. */
static void patio__broker_task_ended(patio_broker *b)
{
    patio__broker_core *core = patio__core(b);
    if (!__atomic_load_n(&core->tasks_ended.closing, __ATOMIC_SEQ_CST)) {
        __atomic_add_fetch(&core->tasks_ended.n, 1, __ATOMIC_SEQ_CST);
        return;
    }
    pthread_mutex_lock(&core->mu);
    __atomic_add_fetch(&core->tasks_ended.n, 1, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast(&core->cv);
    pthread_mutex_unlock(&core->mu);
}

static void patio__memory_task_done(patio_task *t)
{
    patio_call *c = (patio_call *)t->owner;
    patio_broker *b = t->broker;
    /* the task's reference goes with the call's, while the broker surely lives */
    if (patio__call_finish_dropping(c, t->status, &t->result, 0) != PATIO_OK) patio__call_release(c);
    patio__broker_task_ended(b);
}

static void patio__memory_send(patio_broker *b, patio_call *c)
{
    const patio__entry *e = patio__registry_find_cached(b->registry, &patio__core(b)->last_entry, c->name, c->name_len);
    int rc;
    /* the task was counted as started, with its reference, at listing */
    if (!e) {
        patio__broker_task_ended(b);
        patio__call_finish(c, PATIO_ERR_NOT_FOUND, NULL, "KeyError", c->name);
        patio__call_release(c);
        return;
    }
    patio_writer_free(&c->task.result);
    patio__task_init(&c->task, e, b->hooks, c->args.data, c->args.len,
                     c->kwargs.len ? c->kwargs.data : NULL, c->kwargs.len);
    patio__task_small_result(&c->task, b->hooks);
    c->task.broker = b;
    c->task.timeout = c->timeout;
    c->task.owner = c;
    c->task.on_done = patio__memory_task_done;
    rc = b->executor->vt->submit(b->executor, &c->task);
    if (rc != PATIO_OK) {
        patio__broker_task_ended(b);
        patio__call_finish(c, rc, NULL, "RuntimeError", NULL);
        patio__call_release(c);
    }
}

static int patio__memory_cancel(patio_broker *b, patio_call *c)
{
    patio_executor *ex = b->executor;
    if (patio__load(&c->task.state) != PATIO__TASK_QUEUED || !ex->vt->cancel) return PATIO_ERR_STARTED;
    if (ex->vt->cancel(ex, &c->task) != PATIO_OK) return PATIO_ERR_STARTED;
    patio__broker_task_ended(b);
    patio__call_release(c); /* the task will never run: drop its reference */
    return PATIO_OK;
}

static void patio__memory_destroy(patio_broker *b) { patio__free(b->hooks, b); }

static const patio_broker_vtable patio__memory_vt = {
    "memory", patio__memory_send, patio__memory_cancel, NULL, patio__memory_destroy
};

PATIO_API patio_broker *patio_memory_broker_new_ex(patio_executor *ex, const patio_broker_config *cfg)
{
    patio_broker *b;
    if (!ex) return NULL;
    b = (patio_broker *)patio__calloc(ex->hooks, sizeof *b);
    if (!b) return NULL;
    if (patio_broker_init(b, &patio__memory_vt, ex, cfg) != PATIO_OK) {
        patio__free(ex->hooks, b);
        return NULL;
    }
    patio__core(b)->sends_run_tasks = 1; /* no call is started before this returns */
    patio__core(b)->sends_take_ref = 1;
    return b;
}

PATIO_API patio_broker *patio_memory_broker_new(patio_executor *ex)
{
    return patio_memory_broker_new_ex(ex, NULL);
}


/* ========================================================================
 * >>tcp  TCP broker
 * ======================================================================== */

/* Everything below runs on the broker's loop thread unless a comment says
 * otherwise. Other threads reach the loop through three doors: the inbox
 * (calls to send), the done list (finished tasks) and patio__tcp_run_sync.
 *
 * Ownership: a connection belongs to the broker's list until it closes,
 * then to the dead list until the end of the current loop callback (so a
 * frame handler never frees the connection under its caller). A received
 * REQUEST lives in a patio__tcp_req taken from a pool; a sent REQUEST is a
 * reference on its patio_call held by the connection's pending map. */

#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <netdb.h>

#ifdef MSG_NOSIGNAL
#define PATIO__MSG_NOSIGNAL MSG_NOSIGNAL
#else
#define PATIO__MSG_NOSIGNAL 0
#endif

#define PATIO__TCP_PREAUTH_MAX 1024u            /* frame limit before authentication */
#define PATIO__TCP_RBUF_MIN 16384u              /* first read buffer of a connection */
#define PATIO__TCP_RBUF_BIG (256u * 1024u)      /* a busy connection's buffer grows to this */
#define PATIO__TCP_OUT_HIGH (8u * 1024u * 1024u) /* unsent bytes above which a connection takes
                                                    on no new work (see patio__tcp_backlogged) */
#define PATIO__TCP_POOL_MAX 4096u               /* request structs kept for reuse */
#define PATIO__TCP_READS_PER_EVENT 64
#define PATIO__TCP_KEEP_BUF (64u * 1024u)       /* larger buffers are released when idle */
#define PATIO__TCP_EARLY_WRITE 4096u            /* queued bytes that leave before the flush */
#define PATIO__TCP_RETRY_NS 2000000u            /* executor full: retry after 2 ms */

/* Only the loop thread writes the counters, so an update is a plain load
 * and store (atomic, for readers on other threads) without a locked add. */
#define PATIO__TCP_COUNT(tb, field, n) \
    __atomic_store_n(&(tb)->stats.field, \
                     __atomic_load_n(&(tb)->stats.field, __ATOMIC_RELAXED) + (uint64_t)(n), __ATOMIC_RELAXED)

/* ---- plain transport: recv/send on the socket ------------------------------ */

static int patio__plain_fd(void *handle) { return (int)((intptr_t)handle - 1); }

static int patio__plain_create(void *ctx, int fd, int is_server, const char *server_name, void **handle)
{
    PATIO__UNUSED(ctx);
    PATIO__UNUSED(is_server);
    PATIO__UNUSED(server_name);
    *handle = (void *)(intptr_t)(fd + 1);
    return PATIO_OK;
}

static ptrdiff_t patio__plain_read(void *handle, void *buf, size_t n)
{
    ssize_t r;
    do r = recv(patio__plain_fd(handle), buf, n, 0);
    while (r < 0 && errno == EINTR);
    if (r >= 0) return (ptrdiff_t)r;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return PATIO_TRANSPORT_WANT_READ;
    return PATIO_TRANSPORT_ERROR;
}

static ptrdiff_t patio__plain_write(void *handle, const void *buf, size_t n)
{
    ssize_t r;
    do r = send(patio__plain_fd(handle), buf, n, PATIO__MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r >= 0) return (ptrdiff_t)r;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return PATIO_TRANSPORT_WANT_WRITE;
    return PATIO_TRANSPORT_ERROR;
}

static void patio__plain_close(void *handle) { PATIO__UNUSED(handle); }

static const char *patio__plain_error(void *handle)
{
    PATIO__UNUSED(handle);
    return errno ? strerror(errno) : "connection error";
}

static const patio_transport patio__plain_transport = {
    "tcp", patio__plain_create, NULL, patio__plain_read, patio__plain_write, NULL,
    patio__plain_close, patio__plain_error
};

PATIO_API const patio_transport *patio_tcp_plain_transport(void) { return &patio__plain_transport; }

/* ---- serial -> pointer map (linear probing, key 0 = empty) ----------------- */

typedef struct patio__tcp_map {
    uint32_t *keys;
    void **vals;
    size_t cap, count;   /* cap: 0 or a power of two */
} patio__tcp_map;

/* Keys are spread: serials in order would make one long run of slots, and
 * a removal shifts back everything up to the run's end. */
static size_t patio__tcp_slot(uint32_t key, size_t mask) { return (size_t)(key * 2654435761u) & mask; }

static void *patio__tcp_map_get(const patio__tcp_map *m, uint32_t key)
{
    size_t i, mask;
    if (!m->cap || !key) return NULL;
    mask = m->cap - 1;
    for (i = patio__tcp_slot(key, mask); m->keys[i]; i = (i + 1) & mask)
        if (m->keys[i] == key) return m->vals[i];
    return NULL;
}

static void patio__tcp_map_place(patio__tcp_map *m, uint32_t key, void *val)
{
    size_t mask = m->cap - 1, i = patio__tcp_slot(key, mask);
    while (m->keys[i]) i = (i + 1) & mask;
    m->keys[i] = key;
    m->vals[i] = val;
    m->count++;
}

static int patio__tcp_map_grow(const patio_hooks *h, patio__tcp_map *m)
{
    patio__tcp_map old = *m;
    size_t cap = m->cap ? m->cap * 2 : 16, i;
    uint32_t *keys = (uint32_t *)patio__calloc(h, cap * sizeof *keys);
    void **vals = (void **)patio__malloc(h, cap * sizeof *vals);
    if (!keys || !vals) {
        patio__free(h, keys);
        patio__free(h, vals);
        return PATIO_ERR_NOMEM;
    }
    m->keys = keys;
    m->vals = vals;
    m->cap = cap;
    m->count = 0;
    for (i = 0; i < old.cap; i++)
        if (old.keys[i]) patio__tcp_map_place(m, old.keys[i], old.vals[i]);
    patio__free(h, old.keys);
    patio__free(h, old.vals);
    return PATIO_OK;
}

/* Adds key (not present, not 0). */
static int patio__tcp_map_put(const patio_hooks *h, patio__tcp_map *m, uint32_t key, void *val)
{
    if ((m->count + 1) * 2 > m->cap && patio__tcp_map_grow(h, m) != PATIO_OK) return PATIO_ERR_NOMEM;
    patio__tcp_map_place(m, key, val);
    return PATIO_OK;
}

/* Removes key; returns its value or NULL. Later entries of the probe run
 * move back, so no tombstones are left. */
static void *patio__tcp_map_del(patio__tcp_map *m, uint32_t key)
{
    size_t i, j, k, mask;
    void *val;
    if (!m->cap || !key) return NULL;
    mask = m->cap - 1;
    for (i = patio__tcp_slot(key, mask); m->keys[i] != key; i = (i + 1) & mask)
        if (!m->keys[i]) return NULL;
    val = m->vals[i];
    m->keys[i] = 0;
    m->count--;
    for (j = (i + 1) & mask; m->keys[j]; j = (j + 1) & mask) {
        k = patio__tcp_slot(m->keys[j], mask);
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue;
        m->keys[i] = m->keys[j];
        m->vals[i] = m->vals[j];
        m->keys[j] = 0;
        i = j;
    }
    return val;
}

/* Takes every entry at once and leaves m empty: a drain walks the copy's
 * slots once (removing entries one by one would rescan the table each
 * time), and whatever the walk sets off finds m empty. The caller frees the
 * copy with patio__tcp_map_free. */
static patio__tcp_map patio__tcp_map_take(patio__tcp_map *m)
{
    patio__tcp_map all = *m;
    memset(m, 0, sizeof *m);
    return all;
}

static void patio__tcp_map_free(const patio_hooks *h, patio__tcp_map *m)
{
    patio__free(h, m->keys);
    patio__free(h, m->vals);
    memset(m, 0, sizeof *m);
}

/* ---- objects ------------------------------------------------------------- */

typedef struct patio__tcp_broker patio__tcp_broker;
typedef struct patio__tcp_conn patio__tcp_conn;

/* A REQUEST received and being served. */
typedef struct patio__tcp_req {
    patio_task task;
    patio__tcp_broker *tb;
    patio__tcp_conn *conn;         /* NULL once answered or the connection is gone */
    uint32_t serial;
    uint32_t size;                 /* payload bytes, counted in conn->inflight_bytes */
    int running;                   /* submitted; its completion not handled yet */
    int timer_armed;
    patio__timer timer;            /* the caller's timeout, when no lane watches it */
    struct patio__tcp_lane *lane;  /* the timeout lane listing it, or NULL */
    struct patio__tcp_req *lane_next, *lane_prev;
    uint64_t deadline_ns;          /* while in a lane */
    patio_writer in;               /* the arguments: args array, then kwargs map */
    size_t args_len;
    struct patio__tcp_req *next;   /* pool, done list */
    uint8_t in_inline[192];
    uint8_t out_inline[128];
} patio__tcp_req;

/* Requests that came with the same timeout expire in the order they came,
 * so (as the broker does for calls) each distinct timeout gets a FIFO lane
 * watched by one timer armed for its oldest request: serving a request
 * costs two list operations instead of a timer-heap insert and removal.
 * Requests whose timeout finds no free lane get a timer of their own. */
#define PATIO__TCP_LANES 4

typedef struct patio__tcp_lane {
    patio__tcp_broker *tb;
    double timeout;
    patio__tcp_req *head, *tail;   /* by deadline */
    int armed;
    patio__timer timer;
} patio__tcp_lane;

/* Callers of one function name: connections offering it, and calls waiting
 * for one. */
typedef struct patio__tcp_route {
    struct patio__tcp_route *next;  /* hash chain */
    uint32_t hash;
    char *name;
    size_t name_len;
    patio__tcp_conn **conns;
    size_t nconns, conns_cap, cursor;
    patio_call **waiting;
    size_t nwaiting, waiting_cap;
    size_t nlisted;                 /* connections holding it in c->routes, ready or
                                       still in discovery: it lives while they do */
    const void *seen;               /* while reading a peer's names: that peer */
} patio__tcp_route;

enum {
    PATIO__TC_CONNECTING,   /* client: TCP connect in progress */
    PATIO__TC_TRANSPORT,    /* transport handshake (TLS) */
    PATIO__TC_WAIT_AREQ,    /* server: AUTH_DIGEST sent, AUTH_REQUEST expected */
    PATIO__TC_WAIT_DIGEST,  /* client: AUTH_DIGEST expected */
    PATIO__TC_WAIT_OK,      /* client: AUTH_REQUEST sent, AUTH_OK expected */
    PATIO__TC_DISCOVERY,
    PATIO__TC_READY,
    PATIO__TC_CLOSED
};

enum {
    PATIO__TC_PAUSE_INFLIGHT = 1,   /* max_inflight requests not answered */
    PATIO__TC_PAUSE_STALLED = 2     /* a request waits for room in the executor */
};

typedef struct patio__tcp_target patio__tcp_target;

struct patio__tcp_conn {
    patio__tcp_broker *tb;
    patio__io io;
    int fd;
    void *th;                      /* transport handle; NULL before create */
    int state, is_server, counted, was_ready;
    patio__tcp_target *target;     /* client connections: what to reconnect */
    char peer[64];                 /* address, for the log */
    uint8_t auth[64];              /* server: the AUTH_DIGEST payload P (18 bytes);
                                      client: the AUTH_REQUEST payload (61 bytes) */
    uint32_t serial;               /* last serial taken */
    int serial_wrapped;            /* serials ahead of `serial` may be in use */
    uint32_t disc_serial;          /* our DISCOVER_REQUEST */
    int disc_answered, disc_received;
    uint8_t *rbuf;
    size_t rpos, rlen, rcap;       /* unparsed bytes: rbuf[rpos, rlen) */
    patio_writer out;              /* frames to send from out_pos */
    size_t out_pos, want_len;      /* want_len: length of a write to repeat after a WANT */
    int want;                      /* 0 or the WANT of the last write */
    int read_wants_write;          /* the transport must write before it can read */
    int hs_want;                   /* transport handshake: what it waits for */
    int pause;                     /* PATIO__TC_PAUSE_* */
    int dirty;
    patio__tcp_map pending;        /* serial -> patio_call * (our REQUESTs) */
    patio__tcp_map inflight;       /* serial -> patio__tcp_req * (theirs) */
    size_t inflight_bytes;         /* payload bytes of the requests patio__tcp_load counts */
    patio__tcp_req *stalled;
    patio_writer held;             /* frames asking for an answer, held while the
                                      output is backlogged: from held_pos on */
    size_t held_pos, nheld;
    int releasing;                 /* patio__tcp_release_held is running */
    int read_deferred;             /* reading resumed meanwhile: it reads when done */
    int passed_over;               /* calls went elsewhere or wait: it was backlogged */
    patio__tcp_route **routes;     /* names the peer offers */
    size_t nroutes, routes_cap;
    patio__timer hs_timer;
    int hs_timer_armed;
    patio__tcp_conn *next, *prev;  /* broker's list */
    patio__tcp_conn *dirty_next, *dead_next;
};

typedef struct patio__tcp_addr {
    struct sockaddr_storage ss;
    socklen_t len;
} patio__tcp_addr;

/* A server this broker keeps a connection to. */
struct patio__tcp_target {
    patio__tcp_broker *tb;
    patio__tcp_target *next;
    char *host;
    patio__tcp_addr *addrs;
    size_t naddrs, addr_pos, tried;
    patio__tcp_conn *conn;
    unsigned failures;
    uint64_t attempts;
    int timer_armed;
    patio__timer timer;            /* reconnect */
    patio__post post;              /* first connect, on the loop */
};

typedef struct patio__tcp_listener {
    patio__tcp_broker *tb;
    struct patio__tcp_listener *next;
    patio__io io;
    int fd, port;
    patio__timer resume;  /* armed while accepting is paused */
    unsigned failures;    /* accept failures in a row */
} patio__tcp_listener;

struct patio__tcp_broker {
    patio_broker base;
    patio_tcp_config cfg;          /* defaults filled in */
    uint8_t key[32];
    const patio_transport *tr;
    patio_writer names;            /* DISCOVER_RESPONSE payload */

    /* shared with other threads, under mu */
    pthread_mutex_t mu;            /* held briefly by the loop and callers on other threads: spins first */
    pthread_cond_t cv;
    patio_call **inbox;
    size_t inbox_len, inbox_cap;
    int work_posted;
    int ready_peers;
    patio__post work_post;
    /* Tasks that finished on other threads (pool workers): a lock-free
     * stack, taken whole by one post of the loop (done_posted says one is
     * queued), so a finishing task costs one compare-and-swap. */
    patio__tcp_req *done_stack;    /* atomic, newest first */
    int done_posted;               /* atomic */
    patio__post done_post;
    int listen_port;               /* atomic */
    uint32_t test_serial;          /* atomic: serial base of new connections */

    /* loop thread */
    int closing;
    /* Tasks that finished on the loop thread itself (the async executor's)
     * and calls started there: they need no lock, and one post per batch
     * answers them and flushes what they wrote. */
    patio__tcp_req *local_done, *local_done_tail;
    int local_posted;
    patio__post local_post;
    const patio__entry *last_entry; /* what the last request looked up */
    patio_call **batch;
    size_t batch_cap;
    patio__tcp_conn *conns, *dirty, *dead;
    size_t nopen;
    patio__tcp_listener *listeners;
    patio__tcp_target *targets;
    patio__tcp_route **routes;
    size_t route_cap, route_count;
    patio__tcp_route *last_route;  /* the one patio__tcp_route_get found last */
    patio__tcp_req *pool;
    size_t pool_len;
    size_t nstalled;
    int retry_armed;
    patio__timer retry_timer;
    patio__tcp_lane lanes[PATIO__TCP_LANES];

    patio_tcp_stats stats;         /* written by the loop thread only (PATIO__TCP_COUNT) */
};

static void patio__tcp_vt_destroy(patio_broker *b);

static patio__tcp_broker *patio__tcp_of(patio_broker *b)
{
    return b && b->vt && b->vt->destroy == patio__tcp_vt_destroy ? (patio__tcp_broker *)b : NULL;
}

static const patio_hooks *patio__tcp_hooks(const patio__tcp_broker *tb) { return tb->base.hooks; }

static uint32_t patio__tcp_hash(const char *s, size_t n)
{
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

/* ------------------------------------------------------------------------
 * >>tcp-conn  connections: buffers, reading, writing, closing
 * ------------------------------------------------------------------------ */

static void patio__tcp_on_frame(patio__tcp_conn *c, const patio__frame *f);
static void patio__tcp_auth_start(patio__tcp_conn *c);
static void patio__tcp_routes_drop(patio__tcp_conn *c);
static void patio__tcp_req_put(patio__tcp_broker *tb, patio__tcp_req *req);
static void patio__tcp_target_conn_closed(patio__tcp_target *t, int was_ready);

/* One write of queued output: > 0 bytes written, a PATIO_TRANSPORT_WANT_*
 * (remembered: TLS must be offered the same bytes again), or an error. */
static ptrdiff_t patio__tcp_write_some(patio__tcp_conn *c)
{
    size_t n = c->want ? c->want_len : c->out.len - c->out_pos;
    ptrdiff_t w = c->tb->tr->write(c->th, c->out.data + c->out_pos, n);
    if (w > 0) {
        c->want = 0;
        c->out_pos += (size_t)w;
        PATIO__TCP_COUNT(c->tb, bytes_out, w);
    } else if (w == PATIO_TRANSPORT_WANT_READ || w == PATIO_TRANSPORT_WANT_WRITE) {
        c->want = (int)w;
        c->want_len = n;
    }
    return w;
}

/* A long burst of frames (a read that brought hundreds of requests or
 * answers) starts leaving as soon as this much is queued instead of at the
 * end of the loop callback: the peer then works on the first part while
 * this side builds the rest, and two loop threads on two cores overlap
 * instead of taking turns. A failed write is left to the closing flush. */
static void patio__tcp_write_early(patio__tcp_conn *c)
{
    if (c->out.len - c->out_pos < PATIO__TCP_EARLY_WRITE || c->state != PATIO__TC_READY || c->want || c->out.err)
        return;
    (void)patio__tcp_write_some(c);
}

static void patio__tcp_mark_dirty(patio__tcp_conn *c)
{
    patio__tcp_write_early(c);
    if (c->dirty || c->state == PATIO__TC_CLOSED) return;
    c->dirty = 1;
    c->dirty_next = c->tb->dirty;
    c->tb->dirty = c;
}

static int patio__tcp_authenticated(const patio__tcp_conn *c) { return c->state >= PATIO__TC_DISCOVERY; }

/* Takes a fresh serial: never 0 nor 0xffffffff, never one still pending.
 * Until the counter first wraps, every serial taken lies behind it, so
 * only a wrapped counter needs to look for one still in use. */
static uint32_t patio__tcp_next_serial(patio__tcp_conn *c)
{
    for (;;) {
        if (c->serial >= 0xfffffffeu) {
            c->serial = 1u;
            c->serial_wrapped = 1;
        } else {
            c->serial++;
        }
        if (!c->serial_wrapped) return c->serial;
        if (!patio__tcp_map_get(&c->pending, c->serial) && c->serial != c->disc_serial) return c->serial;
    }
}

/* Queues one frame; it leaves with the connection's next flush. */
static int patio__tcp_send(patio__tcp_conn *c, int type, uint32_t serial, const void *payload, size_t len)
{
    int rc = patio__frame_put(&c->out, type, serial, payload, len, c->tb->cfg.max_frame_size);
    patio__tcp_mark_dirty(c);
    return rc;
}

/* Sends an ERROR with an exception built from type and message. */
static void patio__tcp_send_exception(patio__tcp_conn *c, uint32_t serial, const char *type,
                                      const char *msg, size_t msg_len)
{
    size_t mark = patio__frame_begin(&c->out);
    patio__write_exception(&c->out, type, strlen(type), msg, msg_len);
    if (patio__frame_end(&c->out, mark, PATIO__PKT_ERROR, serial, c->tb->cfg.max_frame_size) == PATIO_ERR_OVERFLOW) {
        mark = patio__frame_begin(&c->out);
        patio__write_exception(&c->out, "OverflowError", 13, "error message too large", 23);
        patio__frame_end(&c->out, mark, PATIO__PKT_ERROR, serial, c->tb->cfg.max_frame_size);
    }
    patio__tcp_mark_dirty(c);
}

static void patio__tcp_conn_interest(patio__tcp_conn *c)
{
    unsigned ev = 0;
    if (c->state == PATIO__TC_CLOSED || !c->io.active) return;
    if (c->state == PATIO__TC_CONNECTING) {
        ev = PATIO__WRITE;
    } else if (c->state == PATIO__TC_TRANSPORT) {
        ev = c->hs_want == PATIO_TRANSPORT_WANT_WRITE ? PATIO__WRITE : PATIO__READ;
    } else {
        ev = PATIO__ERROR; /* paused, it still hears of a reset: its calls fail at once (§8) */
        if (!c->pause) ev |= PATIO__READ;
        if (c->want == PATIO_TRANSPORT_WANT_WRITE) ev |= PATIO__WRITE;
        if (c->want == PATIO_TRANSPORT_WANT_READ) ev |= PATIO__READ;
        if (c->read_wants_write) ev |= PATIO__WRITE;
    }
    if (ev != c->io.events && patio__io_update(c->tb->base.loop, &c->io, ev) != PATIO_OK)
        patio__log(patio__tcp_hooks(c->tb), PATIO_LOG_ERROR, "patio tcp: %s: cannot watch the socket", c->peer);
}

static void patio__tcp_conn_free(patio__tcp_conn *c)
{
    const patio_hooks *h = patio__tcp_hooks(c->tb);
    patio__free(h, c->rbuf);
    patio_writer_free(&c->out);
    patio_writer_free(&c->held);
    patio__tcp_map_free(h, &c->pending);
    patio__tcp_map_free(h, &c->inflight);
    patio__free(h, c->routes);
    patio__free(h, c);
}

/* Every call waiting for an answer on c fails at once (PROTOCOL.md §8). */
static void patio__tcp_fail_pending(patio__tcp_conn *c)
{
    patio__tcp_map all = patio__tcp_map_take(&c->pending);
    size_t i;
    for (i = 0; i < all.cap; i++) {
        patio_call *call = (patio_call *)all.vals[i];
        if (!all.keys[i]) continue;
        if (patio_call_fail_with(call, PATIO_ERR_CONNECTION_LOST, "ConnectionError", "connection lost") == PATIO_OK)
            PATIO__TCP_COUNT(c->tb, call_errors, 1);
        patio__call_release(call);
    }
    patio__tcp_map_free(patio__tcp_hooks(c->tb), &all);
}

/* ---- request timeouts: lanes (see patio__tcp_lane) ----------------------- */

static void patio__tcp_lane_fire(patio__timer *t);

/* The lane for this timeout, claiming a free one; NULL if all serve others. */
static patio__tcp_lane *patio__tcp_lane_for(patio__tcp_broker *tb, double timeout)
{
    patio__tcp_lane *free_lane = NULL;
    int i;
    for (i = 0; i < PATIO__TCP_LANES; i++) {
        patio__tcp_lane *l = &tb->lanes[i];
        if (!l->head) { if (!free_lane) free_lane = l; }
        else if (l->timeout == timeout) return l;
    }
    if (free_lane) free_lane->timeout = timeout;
    return free_lane;
}

/* Starts watching a request's timeout: in a lane, or with its own timer. */
static void patio__tcp_req_watch(patio__tcp_req *req, double timeout)
{
    patio__tcp_broker *tb = req->tb;
    patio__tcp_lane *l = patio__tcp_lane_for(tb, timeout);
    if (!l) {
        req->timer_armed = 1;
        patio__timer_start(tb->base.loop, &req->timer, patio__deadline_after(timeout));
        return;
    }
    req->lane = l;
    req->deadline_ns = patio__deadline_after_long(timeout); /* never below the lane's last */
    req->lane_next = NULL;
    req->lane_prev = l->tail;
    if (l->tail) l->tail->lane_next = req; else l->head = req;
    l->tail = req;
    if (!l->armed) {
        l->armed = 1;
        patio__timer_start(tb->base.loop, &l->timer, l->head->deadline_ns);
    }
}

/* Stops watching it. A lane whose oldest request leaves keeps its timer:
 * when that fires, it re-arms for the request that is oldest then. */
static void patio__tcp_req_unwatch(patio__tcp_req *req)
{
    patio__tcp_broker *tb = req->tb;
    patio__tcp_lane *l = req->lane;
    if (req->timer_armed) {
        patio__timer_stop(tb->base.loop, &req->timer);
        req->timer_armed = 0;
    }
    if (!l) return;
    if (req->lane_prev) req->lane_prev->lane_next = req->lane_next; else l->head = req->lane_next;
    if (req->lane_next) req->lane_next->lane_prev = req->lane_prev; else l->tail = req->lane_prev;
    req->lane = NULL;
    req->lane_next = req->lane_prev = NULL;
    if (!l->head && l->armed) {
        patio__timer_stop(tb->base.loop, &l->timer);
        l->armed = 0;
    }
}

/* Requests of a closed connection: tasks still running finish unanswered. */
static void patio__tcp_drop_inflight(patio__tcp_conn *c)
{
    patio__tcp_broker *tb = c->tb;
    patio__tcp_map all = patio__tcp_map_take(&c->inflight);
    size_t i;
    c->inflight_bytes = 0;
    if (c->stalled) {
        c->stalled = NULL;
        tb->nstalled--;
    }
    for (i = 0; i < all.cap; i++) {
        patio__tcp_req *req = (patio__tcp_req *)all.vals[i];
        if (!all.keys[i]) continue;
        req->conn = NULL;
        patio__tcp_req_unwatch(req);
        if (!req->running) patio__tcp_req_put(tb, req);
    }
    patio__tcp_map_free(patio__tcp_hooks(tb), &all);
}

static void patio__tcp_conn_unlink(patio__tcp_conn *c)
{
    patio__tcp_broker *tb = c->tb;
    if (c->prev) c->prev->next = c->next; else tb->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    c->next = c->prev = NULL;
}

/* Closes c for the reason given (logged at level); its memory goes at the
 * end of the current loop callback. */
static void patio__tcp_conn_close(patio__tcp_conn *c, int level, const char *fmt, ...)
{
    patio__tcp_broker *tb = c->tb;
    char why[256];
    va_list ap;
    if (c->state == PATIO__TC_CLOSED) return;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    patio__log(patio__tcp_hooks(tb), level, "patio tcp: connection %s %s closed: %s",
               c->is_server ? "from" : "to", c->peer, why);
    c->was_ready = c->state == PATIO__TC_READY;
    c->state = PATIO__TC_CLOSED;
    if (c->io.active) patio__io_stop(tb->base.loop, &c->io);
    if (c->hs_timer_armed) patio__timer_stop(tb->base.loop, &c->hs_timer);
    c->hs_timer_armed = 0;
    if (c->was_ready) {
        pthread_mutex_lock(&tb->mu);
        tb->ready_peers--;
        pthread_mutex_unlock(&tb->mu);
    }
    patio__tcp_routes_drop(c);
    patio__tcp_fail_pending(c);
    patio__tcp_drop_inflight(c);
    if (c->th) tb->tr->close(c->th);
    c->th = NULL;
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    patio__tcp_conn_unlink(c);
    if (c->counted) {
        tb->nopen--;
        PATIO__TCP_COUNT(tb, connections_open, (uint64_t)-1);
    }
    if (c->target) patio__tcp_target_conn_closed(c->target, c->was_ready);
    c->target = NULL;
    c->dead_next = tb->dead;
    tb->dead = c;
}

static void patio__tcp_protocol_error(patio__tcp_conn *c, const char *fmt, ...)
{
    char why[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    PATIO__TCP_COUNT(c->tb, protocol_errors, 1);
    patio__tcp_conn_close(c, PATIO_LOG_WARN, "protocol error: %s", why);
}

static void patio__tcp_set_pause(patio__tcp_conn *c, int flag, int on);
static void patio__tcp_drained(patio__tcp_conn *c);

/* Unsent output above the mark: the peer reads slower than this side
 * writes. The connection then takes on no new work that would add to its
 * output: its REQUESTs wait unread by the executor, and new calls go to
 * other connections or wait (patio__tcp_hold, patio__tcp_route_next). It
 * goes on reading, though: the answers to its own calls are among what it
 * reads, and a side that stopped reading because its output is stuck would
 * wait for ever on a peer doing the same. */
static int patio__tcp_backlogged(const patio__tcp_conn *c)
{
    return c->out.len - c->out_pos > PATIO__TCP_OUT_HIGH;
}

/* Writes queued frames until done or the transport would block. */
static void patio__tcp_flush(patio__tcp_conn *c)
{
    patio__tcp_broker *tb = c->tb;
    if (c->out.err) {
        patio__tcp_conn_close(c, PATIO_LOG_ERROR, "out of memory for output");
        return;
    }
    while (c->state != PATIO__TC_CLOSED && c->out_pos < c->out.len) {
        ptrdiff_t w = patio__tcp_write_some(c);
        if (w > 0) continue;
        if (w == PATIO_TRANSPORT_WANT_READ || w == PATIO_TRANSPORT_WANT_WRITE) break;
        patio__tcp_conn_close(c, PATIO_LOG_WARN, "write failed: %s", tb->tr->error(c->th));
        return;
    }
    if (c->out_pos == c->out.len) {
        c->out_pos = 0;
        patio_writer_reset(&c->out);
        if (c->out.cap > PATIO__TCP_KEEP_BUF) patio_writer_free(&c->out);
    } else if (!c->want && c->out_pos >= PATIO__TCP_KEEP_BUF && c->out_pos * 2 >= c->out.len) {
        memmove(c->out.data, c->out.data + c->out_pos, c->out.len - c->out_pos);
        c->out.len -= c->out_pos;
        c->out_pos = 0;
    }
    if ((c->nheld || c->passed_over) && c->state != PATIO__TC_CLOSED && !patio__tcp_backlogged(c))
        patio__tcp_drained(c);
    patio__tcp_conn_interest(c);
}

/* Makes room in the read buffer: for the frame being received when its
 * header is in, and at least a minimum buffer otherwise. A large frame's
 * buffer grows with the bytes that arrive (at most to twice what is in,
 * plus the minimum), not at once to the size its header announces: a peer
 * that sends headers alone cannot make the broker reserve max_frame_size
 * per connection. */
static int patio__tcp_rbuf_room(patio__tcp_conn *c)
{
    size_t avail = c->rlen - c->rpos, want = PATIO__TCP_RBUF_MIN;
    if (avail >= PATIO__FRAME_HEADER) {
        size_t whole = PATIO__FRAME_HEADER + (size_t)patio__get_be(c->rbuf + c->rpos + 1, 4);
        size_t earned = 2 * avail + PATIO__TCP_RBUF_MIN;
        if (whole > want) want = whole < earned ? whole : earned;
    }
    if (c->rpos) {
        memmove(c->rbuf, c->rbuf + c->rpos, avail);
        c->rpos = 0;
        c->rlen = avail;
    }
    if (c->rcap > want) want = c->rcap;
    if (c->rlen == c->rcap && c->rcap && c->rcap < PATIO__TCP_RBUF_BIG && want < 2 * c->rcap) want = 2 * c->rcap;
    if (want > c->rcap) {
        uint8_t *p = (uint8_t *)patio__realloc(patio__tcp_hooks(c->tb), c->rbuf, want);
        if (!p) return PATIO_ERR_NOMEM;
        c->rbuf = p;
        c->rcap = want;
    }
    return PATIO_OK;
}

/* Handles every complete frame in the read buffer; stops early when the
 * connection pauses or closes. The requests among them reach the executor
 * as one burst (see patio__executor_hold_wakes). */
static void patio__tcp_parse(patio__tcp_conn *c)
{
    patio_executor *ex = c->tb->base.executor;
    patio__executor_hold_wakes(ex, 1);
    while (c->state != PATIO__TC_CLOSED && !c->pause && c->rlen > c->rpos) {
        patio__frame f;
        uint32_t max = patio__tcp_authenticated(c) ? c->tb->cfg.max_frame_size : PATIO__TCP_PREAUTH_MAX;
        int rc = patio__frame_parse(c->rbuf + c->rpos, c->rlen - c->rpos, max, &f);
        if (rc == 0) break;
        if (rc < 0) {
            patio__tcp_protocol_error(c, "frame of %lu bytes is over the limit of %lu",
                                      (unsigned long)patio__get_be(c->rbuf + c->rpos + 1, 4), (unsigned long)max);
            break; /* closed now */
        }
        c->rpos += PATIO__FRAME_HEADER + f.size;
        patio__tcp_on_frame(c, &f);
    }
    patio__executor_hold_wakes(ex, 0);
    if (c->state != PATIO__TC_CLOSED && c->rpos == c->rlen) {
        c->rpos = c->rlen = 0;
        if (c->rcap > PATIO__TCP_RBUF_BIG) {
            patio__free(patio__tcp_hooks(c->tb), c->rbuf);
            c->rbuf = NULL;
            c->rcap = 0;
        }
    }
}

/* Reads what the transport has (bounded per event unless it holds
 * decrypted bytes) and handles the frames. */
static void patio__tcp_read(patio__tcp_conn *c)
{
    patio__tcp_broker *tb = c->tb;
    int i;
    c->read_wants_write = 0;
    patio__tcp_parse(c);
    for (i = 0; c->state != PATIO__TC_CLOSED && !c->pause; i++) {
        ptrdiff_t n;
        size_t room;
        if (i >= PATIO__TCP_READS_PER_EVENT && !(tb->tr->pending && tb->tr->pending(c->th))) break;
        if (patio__tcp_rbuf_room(c) != PATIO_OK) {
            patio__tcp_conn_close(c, PATIO_LOG_ERROR, "out of memory for input");
            return;
        }
        room = c->rcap - c->rlen;
        n = tb->tr->read(c->th, c->rbuf + c->rlen, room);
        if (n > 0) {
            c->rlen += (size_t)n;
            PATIO__TCP_COUNT(tb, bytes_in, n);
            patio__tcp_parse(c);
            if (c->state == PATIO__TC_CLOSED) return; /* a frame closed it: the transport is gone */
            /* a short read emptied the socket: the next readiness event
             * says when there is more (saves a read that would block) */
            if ((size_t)n < room && !(tb->tr->pending && tb->tr->pending(c->th))) break;
        } else if (n == 0) {
            patio__tcp_conn_close(c, c->state == PATIO__TC_READY ? PATIO_LOG_INFO : PATIO_LOG_WARN,
                                  c->state == PATIO__TC_READY ? "closed by the peer"
                                                              : "closed by the peer during the handshake");
            return;
        } else if (n == PATIO_TRANSPORT_WANT_READ || n == PATIO_TRANSPORT_WANT_WRITE) {
            c->read_wants_write = n == PATIO_TRANSPORT_WANT_WRITE;
            break;
        } else {
            patio__tcp_conn_close(c, PATIO_LOG_WARN, "read failed: %s", tb->tr->error(c->th));
            return;
        }
    }
    patio__tcp_conn_interest(c);
}

/* Sets or clears a reason not to read; reading resumes (buffered frames
 * first) when the last reason goes, or, while held frames are being
 * served (they point into the buffer that new ones would join), right
 * after. */
static void patio__tcp_set_pause(patio__tcp_conn *c, int flag, int on)
{
    int was = c->pause;
    if (on) c->pause |= flag;
    else c->pause &= ~flag;
    if (c->state == PATIO__TC_CLOSED) return;
    if (!was && c->pause) PATIO__TCP_COUNT(c->tb, read_pauses, 1);
    if (was && !c->pause && !c->releasing) patio__tcp_read(c);
    else if (!was != !c->pause) patio__tcp_conn_interest(c);
    if (was && !c->pause && c->releasing) c->read_deferred = 1;
}

/* Flushes connections with queued frames and frees closed ones; every
 * loop callback of the broker ends here, so a batch leaves in one write. */
static void patio__tcp_tail(patio__tcp_broker *tb)
{
    patio__tcp_conn *c;
    while ((c = tb->dirty) != NULL) {
        tb->dirty = c->dirty_next;
        c->dirty = 0;
        if (c->state != PATIO__TC_CLOSED) patio__tcp_flush(c);
    }
    while ((c = tb->dead) != NULL) {
        tb->dead = c->dead_next;
        patio__tcp_conn_free(c);
    }
}

static void patio__tcp_hs_expired(patio__timer *t)
{
    patio__tcp_conn *c = PATIO__CONTAINER(t, patio__tcp_conn, hs_timer);
    patio__tcp_broker *tb = c->tb;
    c->hs_timer_armed = 0;
    patio__tcp_conn_close(c, PATIO_LOG_WARN, "handshake not finished within %g s", tb->cfg.handshake_timeout);
    patio__tcp_tail(tb);
}

static void patio__tcp_transport_step(patio__tcp_conn *c)
{
    patio__tcp_broker *tb = c->tb;
    int rc = tb->tr->handshake(c->th);
    if (rc == PATIO_OK) {
        patio__tcp_auth_start(c);
    } else if (rc == PATIO_TRANSPORT_WANT_READ || rc == PATIO_TRANSPORT_WANT_WRITE) {
        c->hs_want = rc;
        patio__tcp_conn_interest(c);
    } else {
        PATIO__TCP_COUNT(tb, auth_failures, 1);
        patio__tcp_conn_close(c, PATIO_LOG_WARN, "%s handshake failed: %s", tb->tr->name ? tb->tr->name : "transport",
                              tb->tr->error(c->th));
    }
}

static void patio__tcp_connect_done(patio__tcp_conn *c);

static void patio__tcp_conn_io(patio__io *io, unsigned ev)
{
    patio__tcp_conn *c = PATIO__CONTAINER(io, patio__tcp_conn, io);
    patio__tcp_broker *tb = c->tb;
    if (c->state == PATIO__TC_CONNECTING) {
        patio__tcp_connect_done(c);
    } else if (c->state == PATIO__TC_TRANSPORT) {
        patio__tcp_transport_step(c);
    } else {
        if ((ev & PATIO__WRITE) || (c->want == PATIO_TRANSPORT_WANT_READ && (ev & PATIO__READ)))
            patio__tcp_flush(c);
        if (c->state != PATIO__TC_CLOSED && (ev & PATIO__WRITE) && c->read_wants_write && !c->pause)
            patio__tcp_read(c);
        if (c->state != PATIO__TC_CLOSED && (ev & PATIO__READ)) {
            if (!c->pause) patio__tcp_read(c);
            else if (ev & PATIO__ERROR) patio__tcp_conn_close(c, PATIO_LOG_INFO, "socket error or hang-up");
        }
    }
    patio__tcp_tail(tb);
}

/* Seconds rounded up, at least 1: the unit of the kernel's keep-alive knobs. */
static int patio__whole_seconds(double s)
{
    int whole = (int)s;
    if ((double)whole < s) whole++;
    return whole < 1 ? 1 : whole;
}

/* Keep-alive finds a peer that vanished without closing (power loss, a
 * dropped route): the kernel's own default waits two hours before the first
 * probe, so the broker sets its own. Keep-alive only probes an idle line;
 * data the peer never acknowledges would be retransmitted for about 15
 * minutes, so where TCP_USER_TIMEOUT exists it gets the same bound. Where a
 * system lacks one of the knobs, its default stays. */
static void patio__tcp_keepalive(int fd, const patio_tcp_config *cfg)
{
    int on = cfg->keepalive_idle > 0, idle = patio__whole_seconds(cfg->keepalive_idle);
    int interval = patio__whole_seconds(cfg->keepalive_interval), probes = cfg->keepalive_probes;
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
    if (!on) return;
#if defined(TCP_KEEPIDLE)
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
#elif defined(TCP_KEEPALIVE) /* macOS */
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPALIVE, &idle, sizeof idle);
#endif
#if defined(TCP_KEEPINTVL)
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
#endif
#if defined(TCP_KEEPCNT)
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof probes);
#endif
#if defined(TCP_USER_TIMEOUT)
    {
        /* at most 32767 + 32767 * 127 s: fits in 32 bits as milliseconds */
        unsigned int ms = ((unsigned int)idle + (unsigned int)interval * (unsigned int)probes) * 1000u;
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ms, sizeof ms);
    }
#endif
    PATIO__UNUSED(idle);
    PATIO__UNUSED(interval);
    PATIO__UNUSED(probes);
}

static void patio__tcp_sockopts(int fd, const patio_tcp_config *cfg)
{
    int one = 1;
    patio__tcp_keepalive(fd, cfg);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
#ifdef SO_NOSIGPIPE
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#endif
}

static int patio__tcp_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL, 0);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return PATIO_ERR_IO;
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    return PATIO_OK;
}

static void patio__tcp_addr_text(const struct sockaddr *sa, char *out, size_t n)
{
    char ip[INET6_ADDRSTRLEN];
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)(const void *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof ip);
        snprintf(out, n, "[%s]:%u", ip, (unsigned)ntohs(s6->sin6_port));
    } else if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)(const void *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof ip);
        snprintf(out, n, "%s:%u", ip, (unsigned)ntohs(s4->sin_port));
    } else {
        snprintf(out, n, "?");
    }
}

/* A connection object for fd (already non-blocking), listed and watched. */
static patio__tcp_conn *patio__tcp_conn_new(patio__tcp_broker *tb, int fd, int is_server, const struct sockaddr *sa)
{
    patio__tcp_conn *c = (patio__tcp_conn *)patio__calloc(patio__tcp_hooks(tb), sizeof *c);
    if (!c) return NULL;
    c->tb = tb;
    c->fd = fd;
    c->is_server = is_server;
    c->state = is_server ? PATIO__TC_TRANSPORT : PATIO__TC_CONNECTING;
    c->serial = patio__load(&tb->test_serial);
    patio_writer_init(&c->out, patio__tcp_hooks(tb));
    patio_writer_init(&c->held, patio__tcp_hooks(tb));
    patio__tcp_addr_text(sa, c->peer, sizeof c->peer);
    c->hs_timer.fn = patio__tcp_hs_expired;
    if (patio__io_start(tb->base.loop, &c->io, fd, is_server ? PATIO__READ : PATIO__WRITE, patio__tcp_conn_io) != PATIO_OK) {
        patio__tcp_conn_free(c);
        return NULL;
    }
    c->next = tb->conns;
    if (tb->conns) tb->conns->prev = c;
    tb->conns = c;
    c->hs_timer_armed = 1;
    patio__timer_start(tb->base.loop, &c->hs_timer, patio__deadline_after(tb->cfg.handshake_timeout));
    return c;
}

/* The TCP connection is up: socket options, transport, then our handshake. */
static void patio__tcp_conn_up(patio__tcp_conn *c, const char *server_name)
{
    patio__tcp_broker *tb = c->tb;
    patio__tcp_sockopts(c->fd, &tb->cfg);
    c->counted = 1;
    tb->nopen++;
    PATIO__TCP_COUNT(tb, connections_open, 1);
    if (tb->tr->create(tb->cfg.transport_ctx, c->fd, c->is_server, server_name, &c->th) != PATIO_OK) {
        c->th = NULL;
        patio__tcp_conn_close(c, PATIO_LOG_ERROR, "the %s transport could not start", tb->tr->name ? tb->tr->name : "");
        return;
    }
    if (tb->tr->handshake) {
        c->state = PATIO__TC_TRANSPORT;
        c->hs_want = PATIO_TRANSPORT_WANT_READ;
        patio__tcp_transport_step(c);
    } else {
        patio__tcp_auth_start(c);
    }
}

/* ------------------------------------------------------------------------
 * >>handshake  authentication and discovery (PROTOCOL.md §5, §6)
 * ------------------------------------------------------------------------ */

static const uint8_t patio__tcp_nil = 0xc0;
static const uint8_t patio__tcp_person[8] = { 'p', 'a', 't', 'i', 'o', '-', 'o', 'k' };

static void patio__tcp_ready(patio__tcp_conn *c);

static void patio__tcp_salt8(uint8_t salt8[8], const uint8_t *salt4)
{
    memcpy(salt8, salt4, 4);
    memset(salt8 + 4, 0, 4);
}

static void patio__tcp_auth_fail(patio__tcp_conn *c, const char *why)
{
    PATIO__TCP_COUNT(c->tb, auth_failures, 1);
    patio__tcp_conn_close(c, PATIO_LOG_WARN, "authentication failed: %s", why);
}

/* Both sides send one DISCOVER_REQUEST right after AUTH_OK. */
static void patio__tcp_discovery_start(patio__tcp_conn *c)
{
    c->state = PATIO__TC_DISCOVERY;
    c->disc_serial = patio__tcp_next_serial(c);
    patio__tcp_send(c, PATIO__PKT_DISCOVER_REQUEST, c->disc_serial, &patio__tcp_nil, 1);
}

static void patio__tcp_auth_start(patio__tcp_conn *c)
{
    if (!c->is_server) {
        c->state = PATIO__TC_WAIT_DIGEST;
        patio__tcp_read(c); /* the transport may hold bytes already */
        return;
    }
    c->auth[0] = 0xc4;
    c->auth[1] = 16;
    if (patio__random(c->auth + 2, 16) != PATIO_OK) {
        patio__tcp_conn_close(c, PATIO_LOG_ERROR, "no random bytes for the challenge");
        return;
    }
    c->state = PATIO__TC_WAIT_AREQ;
    patio__tcp_send(c, PATIO__PKT_AUTH_DIGEST, patio__tcp_next_serial(c), c->auth, 18);
    patio__tcp_conn_interest(c);
}

/* Server: checks an AUTH_REQUEST (§6.2) and answers AUTH_OK with the proof. */
static void patio__tcp_on_auth_request(patio__tcp_conn *c, const patio__frame *f)
{
    patio__tcp_broker *tb = c->tb;
    patio_reader r;
    uint32_t n;
    const void *salt, *digest, *token;
    size_t salt_len, digest_len, token_len;
    uint8_t salt8[8], expect[32], ok[34];
    patio_reader_init(&r, f->payload, f->size);
    if (patio_read_array(&r, &n) != PATIO_OK || n != 3 || patio_read_bin(&r, &salt, &salt_len) != PATIO_OK ||
        patio_read_bin(&r, &digest, &digest_len) != PATIO_OK || patio_read_bin(&r, &token, &token_len) != PATIO_OK ||
        r.pos != r.end || salt_len != 4 || digest_len != 32) {
        patio__tcp_auth_fail(c, "malformed AUTH_REQUEST");
        return;
    }
    if (token_len != 18 || !patio__consttime_equal(token, c->auth, 18)) {
        patio__tcp_auth_fail(c, "the token is not the one sent on this connection");
        return;
    }
    patio__tcp_salt8(salt8, (const uint8_t *)salt);
    patio__blake2s(expect, 32, tb->key, tb->cfg.key_len, salt8, NULL, c->auth, 18);
    if (!patio__consttime_equal(expect, digest, 32)) {
        patio__tcp_auth_fail(c, "wrong digest (different key?)");
        return;
    }
    ok[0] = 0xc4;
    ok[1] = 32;
    patio__blake2s(ok + 2, 32, tb->key, tb->cfg.key_len, salt8, patio__tcp_person, f->payload, f->size);
    patio__tcp_send(c, PATIO__PKT_AUTH_OK, patio__tcp_next_serial(c), ok, sizeof ok);
    patio__tcp_discovery_start(c);
}

/* Client: answers the challenge (§5 step 3). */
static void patio__tcp_on_auth_digest(patio__tcp_conn *c, const patio__frame *f)
{
    patio__tcp_broker *tb = c->tb;
    uint8_t *a = c->auth, salt8[8];
    if (f->size != 18 || f->payload[0] != 0xc4 || f->payload[1] != 16) {
        patio__tcp_protocol_error(c, "AUTH_DIGEST is not a 16-byte bin");
        return;
    }
    a[0] = 0x93;
    a[1] = 0xc4;
    a[2] = 4;
    if (patio__random(a + 3, 4) != PATIO_OK) {
        patio__tcp_conn_close(c, PATIO_LOG_ERROR, "no random bytes for the salt");
        return;
    }
    a[7] = 0xc4;
    a[8] = 32;
    patio__tcp_salt8(salt8, a + 3);
    patio__blake2s(a + 9, 32, tb->key, tb->cfg.key_len, salt8, NULL, f->payload, 18);
    a[41] = 0xc4;
    a[42] = 18;
    memcpy(a + 43, f->payload, 18);
    c->state = PATIO__TC_WAIT_OK;
    patio__tcp_send(c, PATIO__PKT_AUTH_REQUEST, patio__tcp_next_serial(c), a, 61);
}

/* Client: AUTH_OK is nil (Python servers) or carries the server proof (§6.4). */
static void patio__tcp_on_auth_ok(patio__tcp_conn *c, const patio__frame *f)
{
    patio__tcp_broker *tb = c->tb;
    if (f->size == 1 && f->payload[0] == 0xc0) {
        if (tb->cfg.require_server_proof) {
            patio__tcp_auth_fail(c, "the server sent no proof of the key");
            return;
        }
    } else if (f->size == 34 && f->payload[0] == 0xc4 && f->payload[1] == 32) {
        uint8_t salt8[8], proof[32];
        patio__tcp_salt8(salt8, c->auth + 3);
        patio__blake2s(proof, 32, tb->key, tb->cfg.key_len, salt8, patio__tcp_person, c->auth, 61);
        if (!patio__consttime_equal(proof, f->payload + 2, 32)) {
            patio__tcp_auth_fail(c, "wrong server proof (different key?)");
            return;
        }
    } else {
        patio__tcp_auth_fail(c, "malformed AUTH_OK");
        return;
    }
    patio__tcp_discovery_start(c);
}

static void patio__tcp_answer_discover(patio__tcp_conn *c, uint32_t serial)
{
    patio__tcp_broker *tb = c->tb;
    patio__tcp_send(c, PATIO__PKT_DISCOVER_RESPONSE, serial, tb->names.data, tb->names.len);
}

static int patio__tcp_routes_learn(patio__tcp_conn *c, const patio__frame *f);

static void patio__tcp_discovery_frame(patio__tcp_conn *c, const patio__frame *f)
{
    if (f->type == PATIO__PKT_DISCOVER_REQUEST && !c->disc_answered) {
        c->disc_answered = 1;
        patio__tcp_answer_discover(c, f->serial);
    } else if (f->type == PATIO__PKT_DISCOVER_RESPONSE && !c->disc_received && f->serial == c->disc_serial) {
        if (patio__tcp_routes_learn(c, f) != PATIO_OK) return;
        c->disc_received = 1;
        c->disc_serial = 0;
    } else {
        patio__tcp_protocol_error(c, "unexpected frame type %d (serial %lu) during discovery", f->type,
                                  (unsigned long)f->serial);
        return;
    }
    if (c->disc_answered && c->disc_received) patio__tcp_ready(c);
}

/* ------------------------------------------------------------------------
 * >>routing  routes per name, round robin, calls waiting for a route (§8)
 * ------------------------------------------------------------------------ */

static patio__tcp_route *patio__tcp_route_find(patio__tcp_broker *tb, const char *name, size_t len, uint32_t hash)
{
    patio__tcp_route *r;
    if (!tb->route_cap) return NULL;
    for (r = tb->routes[hash & (tb->route_cap - 1)]; r; r = r->next)
        if (r->hash == hash && r->name_len == len && memcmp(r->name, name, len) == 0) return r;
    return NULL;
}

static int patio__tcp_routes_grow(patio__tcp_broker *tb)
{
    size_t cap = tb->route_cap ? tb->route_cap * 2 : 64, i;
    patio__tcp_route **t = (patio__tcp_route **)patio__calloc(patio__tcp_hooks(tb), cap * sizeof *t);
    if (!t) return PATIO_ERR_NOMEM;
    for (i = 0; i < tb->route_cap; i++) {
        patio__tcp_route *r = tb->routes[i], *next;
        for (; r; r = next) {
            next = r->next;
            r->next = t[r->hash & (cap - 1)];
            t[r->hash & (cap - 1)] = r;
        }
    }
    patio__free(patio__tcp_hooks(tb), tb->routes);
    tb->routes = t;
    tb->route_cap = cap;
    return PATIO_OK;
}

/* The route for a name, made (with nobody offering it) if it is new;
 * NULL without memory. */
static patio__tcp_route *patio__tcp_route_lookup(patio__tcp_broker *tb, const char *name, size_t len)
{
    uint32_t hash = patio__tcp_hash(name, len);
    patio__tcp_route *r;
    size_t slot;
    r = patio__tcp_route_find(tb, name, len, hash);
    if (r) return tb->last_route = r;
    if (tb->route_count + 1 > tb->route_cap && patio__tcp_routes_grow(tb) != PATIO_OK) return NULL;
    r = (patio__tcp_route *)patio__calloc(patio__tcp_hooks(tb), sizeof *r);
    if (!r) return NULL;
    r->name = patio__strndup(patio__tcp_hooks(tb), name, len);
    if (!r->name) {
        patio__free(patio__tcp_hooks(tb), r);
        return NULL;
    }
    r->name_len = len;
    r->hash = hash;
    slot = hash & (tb->route_cap - 1);
    r->next = tb->routes[slot];
    tb->routes[slot] = r;
    tb->route_count++;
    return r;
}

/* Calls come in runs of one name: the last route found is tried first,
 * inline. */
static PATIO__INLINE patio__tcp_route *patio__tcp_route_get(patio__tcp_broker *tb, const char *name, size_t len)
{
    patio__tcp_route *r = tb->last_route;
    if (r && r->name_len == len && patio__same_bytes(r->name, name, len)) return r;
    return patio__tcp_route_lookup(tb, name, len);
}

/* Frees a route nobody offers, nobody waits for and no connection lists
 * (a peer's names are learnt before its connection is ready, PROTOCOL.md
 * §5.1, so a connection in discovery points to routes it does not offer
 * yet). */
static void patio__tcp_route_release(patio__tcp_broker *tb, patio__tcp_route *r)
{
    patio__tcp_route **pp;
    const patio_hooks *h = patio__tcp_hooks(tb);
    if (r->nconns || r->nwaiting || r->nlisted) return;
    if (tb->last_route == r) tb->last_route = NULL;
    for (pp = &tb->routes[r->hash & (tb->route_cap - 1)]; *pp != r; pp = &(*pp)->next) {}
    *pp = r->next;
    tb->route_count--;
    patio__free(h, r->conns);
    patio__free(h, r->waiting);
    patio__free(h, r->name);
    patio__free(h, r);
}

static int patio__tcp_grow_ptrs(const patio_hooks *h, void ***arr, size_t *cap, size_t need)
{
    size_t n = *cap ? *cap * 2 : 4;
    void **p;
    if (need <= *cap) return PATIO_OK;
    while (n < need) n *= 2;
    p = (void **)patio__realloc(h, *arr, n * sizeof *p);
    if (!p) return PATIO_ERR_NOMEM;
    *arr = p;
    *cap = n;
    return PATIO_OK;
}

/* Reads the names of a DISCOVER_RESPONSE into c->routes (duplicates once). */
static int patio__tcp_routes_learn(patio__tcp_conn *c, const patio__frame *f)
{
    patio__tcp_broker *tb = c->tb;
    const patio_hooks *h = patio__tcp_hooks(tb);
    patio_reader r;
    uint32_t n, i;
    size_t k;
    int rc = PATIO_OK;
    patio_reader_init(&r, f->payload, f->size);
    if (patio_read_array(&r, &n) != PATIO_OK) {
        patio__tcp_protocol_error(c, "DISCOVER_RESPONSE is not an array");
        return PATIO_ERR_PROTOCOL;
    }
    for (i = 0; i < n && rc == PATIO_OK; i++) {
        const char *name;
        size_t len;
        patio__tcp_route *route;
        if (patio_read_str(&r, &name, &len) != PATIO_OK) {
            patio__tcp_protocol_error(c, "DISCOVER_RESPONSE holds something other than names");
            return PATIO_ERR_PROTOCOL;
        }
        route = patio__tcp_route_get(tb, name, len);
        if (!route ||
            patio__tcp_grow_ptrs(h, (void ***)&c->routes, &c->routes_cap, c->nroutes + 1) != PATIO_OK) {
            if (route) patio__tcp_route_release(tb, route);
            rc = PATIO_ERR_NOMEM;
            break;
        }
        if (route->seen != c) {
            route->seen = c;
            route->nlisted++;
            c->routes[c->nroutes++] = route;
        }
    }
    for (k = 0; k < c->nroutes; k++) c->routes[k]->seen = NULL;
    if (rc != PATIO_OK) {
        patio__tcp_conn_close(c, PATIO_LOG_ERROR, "out of memory for the peer's names");
        return rc;
    }
    if (r.pos != r.end) {
        patio__tcp_protocol_error(c, "trailing bytes after DISCOVER_RESPONSE");
        return PATIO_ERR_PROTOCOL;
    }
    return PATIO_OK;
}

static void patio__tcp_call_to(patio__tcp_conn *c, patio_call *call);

/* The next connection of r for a call, round robin; NULL when none can take
 * one now. A backlogged one is passed over (and told, so that its drain
 * wakes the calls that wait meanwhile): a call's REQUEST would only add to
 * output the peer is not reading. */
static patio__tcp_conn *patio__tcp_route_next(patio__tcp_route *r)
{
    size_t k;
    for (k = 0; k < r->nconns; k++) {
        patio__tcp_conn *c;
        if (r->cursor >= r->nconns) r->cursor = 0; /* no division: this runs per call */
        c = r->conns[r->cursor++];
        if (!patio__tcp_backlogged(c)) return c;
        c->passed_over = 1;
    }
    return NULL;
}

/* Sends the calls that waited for this route, in the order they came. */
static void patio__tcp_route_wake(patio__tcp_broker *tb, patio__tcp_route *r)
{
    size_t i;
    for (i = 0; i < r->nwaiting; i++) {
        patio__tcp_conn *c = patio__tcp_route_next(r);
        if (!c) break;
        patio__tcp_call_to(c, r->waiting[i]);
    }
    if (i) memmove(r->waiting, r->waiting + i, (r->nwaiting - i) * sizeof *r->waiting);
    r->nwaiting -= i;
    PATIO__UNUSED(tb);
}

/* Discovery is complete: c joins the routes of every name its peer offers
 * (and is ready only once it is in all of them; closing leaves them). */
static void patio__tcp_ready(patio__tcp_conn *c)
{
    patio__tcp_broker *tb = c->tb;
    size_t i;
    for (i = 0; i < c->nroutes; i++) {
        patio__tcp_route *r = c->routes[i];
        if (patio__tcp_grow_ptrs(patio__tcp_hooks(tb), (void ***)&r->conns, &r->conns_cap, r->nconns + 1) != PATIO_OK) {
            patio__tcp_conn_close(c, PATIO_LOG_ERROR, "out of memory for routes");
            return;
        }
        r->conns[r->nconns++] = c;
    }
    c->state = PATIO__TC_READY;
    if (c->hs_timer_armed) patio__timer_stop(tb->base.loop, &c->hs_timer);
    c->hs_timer_armed = 0;
    if (c->target) c->target->failures = 0;
    pthread_mutex_lock(&tb->mu);
    tb->ready_peers++;
    pthread_cond_broadcast(&tb->cv);
    pthread_mutex_unlock(&tb->mu);
    patio__log(patio__tcp_hooks(tb), PATIO_LOG_INFO, "patio tcp: connection %s %s ready, %lu names offered",
               c->is_server ? "from" : "to", c->peer, (unsigned long)c->nroutes);
    for (i = 0; i < c->nroutes && c->state == PATIO__TC_READY; i++)
        if (c->routes[i]->nwaiting) patio__tcp_route_wake(tb, c->routes[i]);
}

/* c closes: it leaves every route it offered or learnt; emptied routes go. */
static void patio__tcp_routes_drop(patio__tcp_conn *c)
{
    patio__tcp_broker *tb = c->tb;
    size_t i, k;
    for (i = 0; i < c->nroutes; i++) {
        patio__tcp_route *r = c->routes[i];
        r->seen = NULL;
        r->nlisted--;
        for (k = 0; k < r->nconns && r->conns[k] != c; k++) {}
        if (k < r->nconns) {
            memmove(r->conns + k, r->conns + k + 1, (r->nconns - k - 1) * sizeof *r->conns);
            r->nconns--;
            if (k < r->cursor) r->cursor--;
            if (r->cursor >= r->nconns) r->cursor = 0;
        }
        patio__tcp_route_release(tb, r);
    }
    c->nroutes = 0;
}

/* Routes one call (its reference comes along): to the next connection
 * offering the name, or into the wait list of the name (also when every
 * connection offering it is backlogged). */
static void patio__tcp_route_call(patio__tcp_broker *tb, patio_call *call)
{
    const char *name = call->name;
    size_t len = call->name_len;
    patio__tcp_route *r;
    patio__tcp_conn *c;
    if (patio__load(&call->state) != PATIO__CALL_PENDING) {
        patio__call_release(call);
        return;
    }
    if (tb->closing) {
        patio_call_fail_with(call, PATIO_ERR_CLOSED, "RuntimeError", "broker closed");
        patio__call_release(call);
        return;
    }
    r = patio__tcp_route_get(tb, name, len);
    c = r ? patio__tcp_route_next(r) : NULL;
    if (c) {
        patio__tcp_call_to(c, call);
        return;
    }
    if (!r || patio__tcp_grow_ptrs(patio__tcp_hooks(tb), (void ***)&r->waiting, &r->waiting_cap, r->nwaiting + 1) != PATIO_OK) {
        patio_call_fail_with(call, PATIO_ERR_NOMEM, "MemoryError", "out of memory");
        patio__call_release(call);
        if (r) patio__tcp_route_release(tb, r);
        return;
    }
    r->waiting[r->nwaiting++] = call;
}

/* ---- caller side: REQUEST out, RESPONSE / ERROR in ----------------------- */

static void patio__tcp_call_to(patio__tcp_conn *c, patio_call *call)
{
    patio__tcp_broker *tb = c->tb;
    const void *args = NULL, *kwargs = NULL;
    size_t args_len = 0, kwargs_len = 0, mark;
    double timeout = patio_call_timeout(call);
    uint32_t serial = patio__tcp_next_serial(c);
    uint8_t *frame = NULL;
    int rc;
    patio_call_args(call, &args, &args_len, &kwargs, &kwargs_len);
    mark = c->out.len;
    rc = patio__write_call_request_at(&c->out, PATIO__FRAME_HEADER, &frame, call->name, call->name_len, args,
                                      args_len, kwargs, kwargs_len, timeout >= 0, timeout);
    if (rc == PATIO_OK) {
        size_t payload = c->out.len - mark - PATIO__FRAME_HEADER;
        if (payload > tb->cfg.max_frame_size) rc = PATIO_ERR_OVERFLOW;
        else patio__frame_header_put(frame, PATIO__PKT_REQUEST, (uint32_t)payload, serial);
    }
    if (rc == PATIO_OK) rc = patio__tcp_map_put(patio__tcp_hooks(tb), &c->pending, serial, call);
    if (rc != PATIO_OK) {
        if (!c->out.err) c->out.len = mark;
        PATIO__TCP_COUNT(tb, call_errors, 1);
        if (rc == PATIO_ERR_OVERFLOW)
            patio_call_fail_with(call, rc, "OverflowError", "request above the frame size limit");
        else
            patio_call_fail_with(call, rc, "MemoryError", "out of memory");
        patio__call_release(call);
    } else {
        PATIO__TCP_COUNT(tb, calls_sent, 1);
    }
    patio__tcp_mark_dirty(c);
}

/* Like patio_call_succeed, but a small result is copied into the call
 * object itself (the call's task part is unused by this broker), so a
 * call costs no allocation. Only the loop thread finishes pending TCP
 * calls while they have a connection, so nobody else touches it. 1 if it
 * finished the call, taking the pending request's reference along. */
static int patio__tcp_call_succeed(patio_call *call, const uint8_t *value, size_t len)
{
    patio_writer *w = &call->task.result;
    if (patio__load(&call->state) != PATIO__CALL_PENDING) return 0;
    patio_writer_free(w);
    patio__task_small_result(&call->task, call->hooks);
    if (len <= w->cap) {
        patio__copy(w->data, value, len);
        w->len = len;
    } else if (patio_write_raw(w, value, len) != PATIO_OK) {
        patio_call_fail_with(call, w->err, "MemoryError", "out of memory");
        return 0;
    }
    /* on the loop thread, between frames: on_done may start calls at once */
    return patio__call_finish_dropping(call, PATIO_OK, w, 1) == PATIO_OK;
}

static void patio__tcp_on_response(patio__tcp_conn *c, const patio__frame *f)
{
    patio__tcp_broker *tb = c->tb;
    patio_call *call = (patio_call *)patio__tcp_map_del(&c->pending, f->serial);
    if (!call) {
        patio__tcp_protocol_error(c, "RESPONSE for serial %lu, which is not pending", (unsigned long)f->serial);
        return;
    }
    if (!(f->size == 1 && patio__is_tiny(f->payload[0])) && /* a small int, nil or bool needs no check */
        patio_msgpack_check_all(f->payload, f->size, tb->cfg.max_depth) != PATIO_OK) {
        if (patio_call_fail_with(call, PATIO_ERR_DECODE, "patio_msgpack.SerializationError",
                                 "the result does not decode") == PATIO_OK)
            PATIO__TCP_COUNT(tb, call_errors, 1);
    } else if (patio__tcp_call_succeed(call, f->payload, f->size)) {
        return; /* its reference went with the call's */
    }
    patio__call_release(call);
}

static int patio__tcp_is_timeout(const char *t, size_t n)
{
    return (n == 12 && memcmp(t, "TimeoutError", 12) == 0) ||
           (n == 31 && memcmp(t, "asyncio.exceptions.TimeoutError", 31) == 0);
}

static void patio__tcp_on_error(patio__tcp_conn *c, const patio__frame *f)
{
    patio__tcp_broker *tb = c->tb;
    patio_call *call = (patio_call *)patio__tcp_map_del(&c->pending, f->serial);
    const char *type, *msg;
    size_t type_len, msg_len;
    patio_writer w;
    int status;
    if (!call) {
        patio__tcp_protocol_error(c, "ERROR for serial %lu, which is not pending", (unsigned long)f->serial);
        return;
    }
    if (patio__decode_exception(f->payload, f->size, &type, &type_len, &msg, &msg_len) != PATIO_OK) {
        if (patio_call_fail_with(call, PATIO_ERR_PROTOCOL, "ConnectionError", "malformed ERROR from the peer") == PATIO_OK)
            PATIO__TCP_COUNT(tb, call_errors, 1);
        patio__call_release(call);
        patio__tcp_protocol_error(c, "ERROR payload is not an exception");
        return;
    }
    status = patio__tcp_is_timeout(type, type_len) ? PATIO_ERR_TIMEOUT : PATIO_ERR_REMOTE;
    memset(&w, 0, sizeof w);
    w.data = (uint8_t *)(uintptr_t)f->payload;
    w.len = f->size;
    w.fixed = 1;
    if (patio__call_finish(call, status, &w, NULL, NULL) == PATIO_OK) {
        if (status == PATIO_ERR_TIMEOUT) PATIO__TCP_COUNT(tb, timeouts, 1);
        else PATIO__TCP_COUNT(tb, call_errors, 1);
    }
    patio__call_release(call);
}

/* ---- callee side: REQUEST in, RESPONSE / ERROR out ----------------------- */

static void patio__tcp_req_expired(patio__timer *t);

static patio__tcp_req *patio__tcp_req_get(patio__tcp_broker *tb)
{
    patio__tcp_req *req = tb->pool;
    if (req) {
        tb->pool = req->next;
        tb->pool_len--;
    } else {
        const patio_hooks *h = patio__tcp_hooks(tb);
        req = (patio__tcp_req *)patio__calloc(h, sizeof *req);
        if (!req) return NULL;
        req->tb = tb;
        req->timer.fn = patio__tcp_req_expired;
        patio__writer_init_small(&req->in, h, req->in_inline, sizeof req->in_inline);
        patio__writer_init_small(&req->task.result, h, req->out_inline, sizeof req->out_inline);
    }
    req->next = NULL;
    req->conn = NULL;
    req->running = 0;
    req->timer_armed = 0;
    req->lane = NULL;
    return req;
}

static void patio__tcp_req_free(patio__tcp_broker *tb, patio__tcp_req *req)
{
    patio_writer_free(&req->in);
    patio_writer_free(&req->task.result);
    patio__free(patio__tcp_hooks(tb), req);
}

/* Back to the pool; buffers that grew large are released first. */
static void patio__tcp_req_put(patio__tcp_broker *tb, patio__tcp_req *req)
{
    const patio_hooks *h = patio__tcp_hooks(tb);
    if (tb->pool_len >= PATIO__TCP_POOL_MAX) {
        patio__tcp_req_free(tb, req);
        return;
    }
    if (req->in.cap > PATIO__TCP_KEEP_BUF) {
        patio_writer_free(&req->in);
        patio__writer_init_small(&req->in, h, req->in_inline, sizeof req->in_inline);
    }
    if (req->task.result.cap > PATIO__TCP_KEEP_BUF) {
        patio_writer_free(&req->task.result);
        patio__writer_init_small(&req->task.result, h, req->out_inline, sizeof req->out_inline);
    }
    req->next = tb->pool;
    tb->pool = req;
    tb->pool_len++;
}

/* Runs on the task's thread: hands the request back to the loop. */
static void patio__tcp_local_kick(patio__tcp_broker *tb);

static void patio__tcp_task_done(patio_task *t)
{
    patio__tcp_req *req = (patio__tcp_req *)t->owner;
    patio__tcp_broker *tb = req->tb;
    patio__tcp_req *before;
    if (patio_loop_in_loop_thread(tb->base.loop)) {
        req->next = NULL;
        if (tb->local_done_tail) tb->local_done_tail->next = req; else tb->local_done = req;
        tb->local_done_tail = req;
        patio__tcp_local_kick(tb);
        patio__broker_task_ended(&tb->base);
        return;
    }
    before = patio__load_relaxed(&tb->done_stack);
    do req->next = before;
    while (!__atomic_compare_exchange_n(&tb->done_stack, &before, req, 1, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    /* A non-empty stack is covered by the post that its first task queued:
     * the loop takes the stack only after it cleared done_posted. */
    if (!before && !__atomic_exchange_n(&tb->done_posted, 1, __ATOMIC_SEQ_CST))
        patio__loop_post(tb->base.loop, &tb->done_post);
    patio__broker_task_ended(&tb->base);
}

static int patio__tcp_submit(patio__tcp_req *req)
{
    patio__tcp_broker *tb = req->tb;
    int rc;
    patio__broker_task_started(&tb->base);
    req->running = 1;
    rc = tb->base.executor->vt->submit(tb->base.executor, &req->task);
    if (rc != PATIO_OK) {
        req->running = 0;
        patio__broker_task_ended(&tb->base);
    }
    return rc;
}

/* Requests received and not answered: those in the executor (or waiting
 * for room in it) and those held unread (they count towards max_inflight,
 * which so bounds what a backlogged connection holds). */
static size_t patio__tcp_load(const patio__tcp_conn *c) { return c->inflight.count + c->nheld; }

/* 1 if c holds as many requests, or as many of their bytes, as it may. */
static int patio__tcp_full(const patio__tcp_conn *c)
{
    const patio_tcp_config *cfg = &c->tb->cfg;
    return patio__tcp_load(c) >= (size_t)cfg->max_inflight || c->inflight_bytes >= cfg->max_inflight_bytes;
}

static void patio__tcp_release_held(patio__tcp_conn *c);

/* Held requests go on, then reading goes on when no reason to pause is left. */
static void patio__tcp_conn_recheck(patio__tcp_conn *c)
{
    if (!c->nheld && !c->pause && !c->read_deferred && !c->held.len) return; /* the common case: nothing to do */
    patio__tcp_release_held(c);
    if (c->state == PATIO__TC_CLOSED) return;
    if (!c->stalled) patio__tcp_set_pause(c, PATIO__TC_PAUSE_STALLED, 0);
    if (c->state != PATIO__TC_CLOSED && !patio__tcp_full(c)) patio__tcp_set_pause(c, PATIO__TC_PAUSE_INFLIGHT, 0);
}

/* The request is answered (or given up): it leaves its connection. */
static void patio__tcp_req_detach(patio__tcp_req *req)
{
    patio__tcp_conn *c = req->conn;
    patio__tcp_broker *tb = req->tb;
    patio__tcp_map_del(&c->inflight, req->serial);
    c->inflight_bytes -= req->size;
    patio__tcp_req_unwatch(req);
    req->conn = NULL;
    if (c->stalled == req) {
        c->stalled = NULL;
        tb->nstalled--;
    }
    PATIO__TCP_COUNT(tb, calls_served, 1);
}

static void patio__tcp_req_answer(patio__tcp_req *req)
{
    patio__tcp_conn *c = req->conn;
    patio_task *t = &req->task;
    uint32_t serial = req->serial;
    patio__tcp_req_detach(req);
    if (t->status == PATIO_OK) {
        if (patio__tcp_send(c, PATIO__PKT_RESPONSE, serial, t->result.data, t->result.len) == PATIO_ERR_OVERFLOW)
            patio__tcp_send_exception(c, serial, "OverflowError", "result above the frame size limit", 33);
    } else if (t->result.len && !t->result.err) {
        if (patio__tcp_send(c, PATIO__PKT_ERROR, serial, t->result.data, t->result.len) == PATIO_ERR_OVERFLOW)
            patio__tcp_send_exception(c, serial, "OverflowError", "error above the frame size limit", 32);
    } else {
        const char *m = patio_strerror(t->status);
        patio__tcp_send_exception(c, serial, "RuntimeError", m, strlen(m));
    }
    patio__tcp_conn_recheck(c);
}

/* A task finished (on the loop now). */
static void patio__tcp_req_finished(patio__tcp_req *req)
{
    req->running = 0;
    if (req->conn) patio__tcp_req_answer(req);
    patio__tcp_req_put(req->tb, req);
}

/* Its caller's timeout passed: answer TimeoutError (the task, if it
 * runs, finishes unanswered). */
static void patio__tcp_req_time_out(patio__tcp_req *req)
{
    patio__tcp_broker *tb = req->tb;
    patio__tcp_conn *c = req->conn;
    if (c) {
        uint32_t serial = req->serial;
        patio__tcp_req_detach(req); /* stops watching it too */
        PATIO__TCP_COUNT(tb, timeouts, 1);
        patio__tcp_send_exception(c, serial, "TimeoutError", "", 0);
        patio__tcp_conn_recheck(c);
    } else {
        patio__tcp_req_unwatch(req);
    }
    if (!req->running) patio__tcp_req_put(tb, req);
}

static void patio__tcp_req_expired(patio__timer *t)
{
    patio__tcp_req *req = PATIO__CONTAINER(t, patio__tcp_req, timer);
    req->timer_armed = 0;
    patio__tcp_req_time_out(req);
    patio__tcp_tail(req->tb);
}

/* A lane's timer: times out its requests that are due, re-arms for the next. */
static void patio__tcp_lane_fire(patio__timer *t)
{
    patio__tcp_lane *l = PATIO__CONTAINER(t, patio__tcp_lane, timer);
    uint64_t now = patio__now_ns();
    l->armed = 0;
    while (l->head && l->head->deadline_ns <= now) patio__tcp_req_time_out(l->head);
    if (l->head && !l->armed) {
        l->armed = 1;
        patio__timer_start(l->tb->base.loop, &l->timer, l->head->deadline_ns);
    }
    patio__tcp_tail(l->tb);
}

static void patio__tcp_retry_fire(patio__timer *t);

static void patio__tcp_retry_arm(patio__tcp_broker *tb)
{
    if (tb->retry_armed || !tb->nstalled) return;
    tb->retry_armed = 1;
    patio__timer_start(tb->base.loop, &tb->retry_timer, patio__now_ns() + PATIO__TCP_RETRY_NS);
}

/* Submits requests that found the executor full, oldest connection first. */
static void patio__tcp_retry_stalled(patio__tcp_broker *tb)
{
    patio__tcp_conn *c, *next;
    for (c = tb->conns; c && tb->nstalled; c = next) {
        patio__tcp_req *req = c->stalled;
        int rc;
        next = c->next;
        if (!req) continue;
        rc = patio__tcp_submit(req);
        if (rc == PATIO_ERR_FULL) break;
        c->stalled = NULL;
        tb->nstalled--;
        if (rc != PATIO_OK) {
            req->task.status = rc; /* executor closed, ...: answered with an ERROR, as on arrival */
            patio__tcp_req_finished(req);
        }
        patio__tcp_conn_recheck(c);
    }
    patio__tcp_retry_arm(tb);
}

static void patio__tcp_retry_fire(patio__timer *t)
{
    patio__tcp_broker *tb = PATIO__CONTAINER(t, patio__tcp_broker, retry_timer);
    tb->retry_armed = 0;
    patio__tcp_retry_stalled(tb);
    patio__tcp_tail(tb);
}

/* Copies the arguments out of the read buffer and prepares the task. */
static int patio__tcp_req_prepare(patio__tcp_req *req, const patio__entry *e, const patio__call_request *cr)
{
    patio__tcp_broker *tb = req->tb;
    patio_writer keep;
    double timeout = cr->has_timeout && cr->timeout < 1e9 ? cr->timeout : -1;
    size_t kwargs_len = cr->kwargc ? cr->kwargs_len : 0;
    patio_writer_reset(&req->in);
    if (cr->args_len + kwargs_len <= req->in.cap) { /* the usual: they fit the request's own room */
        patio__copy(req->in.data, cr->args, cr->args_len);
        patio__copy(req->in.data + cr->args_len, cr->kwargs, kwargs_len);
        req->in.len = cr->args_len + kwargs_len;
    } else {
        patio_write_raw(&req->in, cr->args, cr->args_len);
        if (kwargs_len) patio_write_raw(&req->in, cr->kwargs, kwargs_len);
        if (req->in.err) return req->in.err;
    }
    keep = req->task.result;
    patio__task_init(&req->task, e, patio__tcp_hooks(tb), req->in.data, cr->args_len,
                     cr->kwargc ? req->in.data + cr->args_len : NULL, cr->kwargc ? cr->kwargs_len : 0);
    req->task.result = keep;
    patio_writer_reset(&req->task.result);
    req->task.result.max_len = tb->cfg.max_frame_size;
    req->task.broker = &tb->base;
    req->task.owner = req;
    req->task.on_done = patio__tcp_task_done;
    req->task.timeout = timeout;
    if (timeout >= 0) patio__tcp_req_watch(req, timeout);
    return PATIO_OK;
}

/* Answers a REQUEST at once, without running anything. */
static void patio__tcp_reject(patio__tcp_conn *c, uint32_t serial, const char *type, const char *msg, size_t len)
{
    PATIO__TCP_COUNT(c->tb, calls_served, 1);
    patio__tcp_send_exception(c, serial, type, msg, len);
}

static void patio__tcp_on_request(patio__tcp_conn *c, const patio__frame *f)
{
    patio__tcp_broker *tb = c->tb;
    patio__call_request cr;
    const patio__entry *e;
    patio__tcp_req *req;
    int rc;
    if (patio__tcp_map_get(&c->inflight, f->serial)) {
        patio__tcp_protocol_error(c, "REQUEST serial %lu is already executing", (unsigned long)f->serial);
        return;
    }
    if (patio__decode_call_request(f->payload, f->size, tb->cfg.max_depth, 1, &cr) != PATIO_OK) {
        patio__tcp_reject(c, f->serial, "patio_msgpack.SerializationError", "REQUEST payload is not a CallRequest", 36);
        return;
    }
    e = patio__registry_find_cached(tb->base.registry, &tb->last_entry, cr.func, cr.func_len);
    if (!e) {
        patio__tcp_reject(c, f->serial, "KeyError", cr.func, cr.func_len);
        return;
    }
    if (cr.has_timeout && !(cr.timeout > 0)) {
        PATIO__TCP_COUNT(tb, timeouts, 1);
        patio__tcp_reject(c, f->serial, "TimeoutError", "", 0);
        return;
    }
    req = patio__tcp_req_get(tb);
    if (!req || patio__tcp_map_put(patio__tcp_hooks(tb), &c->inflight, f->serial, req) != PATIO_OK) {
        if (req) patio__tcp_req_put(tb, req);
        patio__tcp_reject(c, f->serial, "MemoryError", "out of memory", 13);
        return;
    }
    req->conn = c;
    req->serial = f->serial;
    req->size = f->size;
    c->inflight_bytes += f->size;
    if (patio__tcp_req_prepare(req, e, &cr) != PATIO_OK) {
        patio__tcp_req_detach(req);
        patio__tcp_req_put(tb, req);
        patio__tcp_send_exception(c, f->serial, "MemoryError", "out of memory", 13);
        return;
    }
    rc = patio__tcp_submit(req);
    if (rc == PATIO_ERR_FULL) {
        c->stalled = req;
        tb->nstalled++;
        patio__tcp_set_pause(c, PATIO__TC_PAUSE_STALLED, 1);
        patio__tcp_retry_arm(tb);
    } else if (rc != PATIO_OK) {
        req->task.status = rc;
        patio__tcp_req_finished(req);
    }
    if (c->state != PATIO__TC_CLOSED && patio__tcp_full(c)) patio__tcp_set_pause(c, PATIO__TC_PAUSE_INFLIGHT, 1);
}

/* A frame that asks for an answer: a REQUEST or a DISCOVER_REQUEST. */
static void patio__tcp_on_ask(patio__tcp_conn *c, const patio__frame *f)
{
    if (f->type == PATIO__PKT_REQUEST) patio__tcp_on_request(c, f);
    else patio__tcp_answer_discover(c, f->serial);
}

/* While c is backlogged, frames asking for an answer are kept as they came
 * instead of being served, and later ones queue behind them; the answers
 * to our own calls are still handled at once. Held frames count towards
 * max_inflight: at the limit reading pauses, as it does for requests that
 * run (PROTOCOL.md §9). A request's timeout starts when it is served. */
static void patio__tcp_hold(patio__tcp_conn *c, const patio__frame *f)
{
    size_t mark = patio__frame_begin(&c->held);
    patio_write_raw(&c->held, f->payload, f->size);
    if (patio__frame_end(&c->held, mark, f->type, f->serial, UINT32_MAX) != PATIO_OK) {
        patio__tcp_conn_close(c, PATIO_LOG_ERROR, "out of memory for input");
        return;
    }
    c->nheld++;
    c->inflight_bytes += f->size;
    if (patio__tcp_full(c)) patio__tcp_set_pause(c, PATIO__TC_PAUSE_INFLIGHT, 1);
}

/* Serves held frames in the order they came, while the output has room
 * and the executor takes requests. */
static void patio__tcp_release_held(patio__tcp_conn *c)
{
    if (c->releasing) return;
    c->releasing = 1;
    while (c->nheld && c->state != PATIO__TC_CLOSED && !c->stalled && !patio__tcp_backlogged(c)) {
        patio__frame f;
        int rc = patio__frame_parse(c->held.data + c->held_pos, c->held.len - c->held_pos, UINT32_MAX, &f);
        PATIO_ASSERT(rc == 1);
        if (rc != 1) { /* cannot happen: only whole frames are held */
            c->nheld = 0;
            break;
        }
        c->held_pos += PATIO__FRAME_HEADER + f.size; /* f stays valid: nothing is read meanwhile */
        c->nheld--;
        c->inflight_bytes -= f.size;
        patio__tcp_on_ask(c, &f);
    }
    c->releasing = 0;
    if (c->state == PATIO__TC_CLOSED) return;
    if (c->read_deferred) {
        c->read_deferred = 0;
        if (!c->pause) patio__tcp_read(c);
        if (c->state == PATIO__TC_CLOSED) return;
    }
    if (!c->nheld) {
        c->held_pos = 0;
        patio_writer_reset(&c->held);
        if (c->held.cap > PATIO__TCP_KEEP_BUF) patio_writer_free(&c->held);
    } else if (c->held_pos >= PATIO__TCP_KEEP_BUF && c->held_pos * 2 >= c->held.len) {
        memmove(c->held.data, c->held.data + c->held_pos, c->held.len - c->held_pos);
        c->held.len -= c->held_pos;
        c->held_pos = 0;
    }
}

/* c's output is below the mark again: held requests are served and the
 * calls that passed c over are routed anew. */
static void patio__tcp_drained(patio__tcp_conn *c)
{
    size_t i;
    patio__tcp_conn_recheck(c);
    if (!c->passed_over || c->state != PATIO__TC_READY) return;
    c->passed_over = 0;
    for (i = 0; i < c->nroutes && c->state == PATIO__TC_READY; i++)
        if (c->routes[i]->nwaiting) patio__tcp_route_wake(c->tb, c->routes[i]);
}

static void patio__tcp_ready_frame(patio__tcp_conn *c, const patio__frame *f)
{
    switch (f->type) {
    case PATIO__PKT_REQUEST:
    case PATIO__PKT_DISCOVER_REQUEST:
        if (c->nheld || patio__tcp_backlogged(c)) patio__tcp_hold(c, f);
        else patio__tcp_on_ask(c, f);
        break;
    case PATIO__PKT_RESPONSE: patio__tcp_on_response(c, f); break;
    case PATIO__PKT_ERROR: patio__tcp_on_error(c, f); break;
    default:
        patio__tcp_protocol_error(c, "unexpected frame type %d (serial %lu)", f->type, (unsigned long)f->serial);
    }
}

static void patio__tcp_expect(patio__tcp_conn *c, const patio__frame *f, int type, const char *what,
                              void (*fn)(patio__tcp_conn *, const patio__frame *))
{
    if (f->type == type) fn(c, f);
    else patio__tcp_protocol_error(c, "expected %s, got frame type %d", what, f->type);
}

static void patio__tcp_on_frame(patio__tcp_conn *c, const patio__frame *f)
{
    if (f->serial == 0) {
        patio__tcp_protocol_error(c, "frame type %d with serial 0", f->type);
        return;
    }
    switch (c->state) {
    case PATIO__TC_WAIT_AREQ:
        patio__tcp_expect(c, f, PATIO__PKT_AUTH_REQUEST, "AUTH_REQUEST", patio__tcp_on_auth_request);
        break;
    case PATIO__TC_WAIT_DIGEST:
        patio__tcp_expect(c, f, PATIO__PKT_AUTH_DIGEST, "AUTH_DIGEST", patio__tcp_on_auth_digest);
        break;
    case PATIO__TC_WAIT_OK:
        patio__tcp_expect(c, f, PATIO__PKT_AUTH_OK, "AUTH_OK", patio__tcp_on_auth_ok);
        break;
    case PATIO__TC_DISCOVERY: patio__tcp_discovery_frame(c, f); break;
    case PATIO__TC_READY: patio__tcp_ready_frame(c, f); break;
    default: break;
    }
}

/* ---- the broker's doors from other threads ------------------------------- */

/* The work post: finished tasks first (they free slots), then new calls. */
static void patio__tcp_work(patio__post *p)
{
    patio__tcp_broker *tb = PATIO__CONTAINER(p, patio__tcp_broker, work_post);
    patio_call **calls;
    size_t n, cap, i;
    pthread_mutex_lock(&tb->mu);
    calls = tb->inbox;
    cap = tb->inbox_cap;
    n = tb->inbox_len;
    tb->inbox = tb->batch;
    tb->inbox_cap = tb->batch_cap;
    tb->inbox_len = 0;
    tb->batch = calls;
    tb->batch_cap = cap;
    tb->work_posted = 0;
    pthread_mutex_unlock(&tb->mu);
    for (i = 0; i < n; i++) patio__tcp_route_call(tb, calls[i]);
    patio__tcp_tail(tb);
}

/* Takes the stack of tasks other threads finished, oldest first. */
static patio__tcp_req *patio__tcp_take_done(patio__tcp_broker *tb)
{
    patio__tcp_req *req = __atomic_exchange_n(&tb->done_stack, (patio__tcp_req *)NULL, __ATOMIC_SEQ_CST), *fifo = NULL;
    while (req) {
        patio__tcp_req *next = req->next;
        req->next = fifo;
        fifo = req;
        req = next;
    }
    return fifo;
}

/* Answers finished tasks (a list through next), then flushes. */
static void patio__tcp_answer_done(patio__tcp_broker *tb, patio__tcp_req *done)
{
    patio__tcp_req *next;
    for (; done; done = next) {
        next = done->next;
        patio__tcp_req_finished(done);
    }
    if (tb->nstalled) patio__tcp_retry_stalled(tb);
    patio__tcp_tail(tb);
}

/* Answers the tasks other threads finished. */
static void patio__tcp_done_work(patio__post *p)
{
    patio__tcp_broker *tb = PATIO__CONTAINER(p, patio__tcp_broker, done_post);
    __atomic_store_n(&tb->done_posted, 0, __ATOMIC_SEQ_CST);
    patio__tcp_answer_done(tb, patio__tcp_take_done(tb));
}

/* The loop thread's own post: what finished there, then the flush. */
static void patio__tcp_local_work(patio__post *p)
{
    patio__tcp_broker *tb = PATIO__CONTAINER(p, patio__tcp_broker, local_post);
    patio__tcp_req *done = tb->local_done;
    tb->local_done = tb->local_done_tail = NULL;
    tb->local_posted = 0;
    patio__tcp_answer_done(tb, done);
}

/* Loop thread only. */
static void patio__tcp_local_kick(patio__tcp_broker *tb)
{
    if (tb->local_posted) return;
    tb->local_posted = 1;
    patio__loop_post(tb->base.loop, &tb->local_post);
}

/* Makes sure the work post runs soon (it ends with patio__tcp_tail). */
static void patio__tcp_kick(patio__tcp_broker *tb)
{
    int post;
    pthread_mutex_lock(&tb->mu);
    post = !tb->work_posted;
    tb->work_posted = 1;
    pthread_mutex_unlock(&tb->mu);
    if (post) patio__loop_post(tb->base.loop, &tb->work_post);
}

/* vt->send, any thread: the call joins the inbox. On the loop thread it
 * is routed at once, and the frame it wrote leaves with this round's
 * flush. */
static void patio__tcp_vt_send(patio_broker *b, patio_call *call)
{
    patio__tcp_broker *tb = (patio__tcp_broker *)b;
    int post, rc;
    /* the reference the call holds while it waits or is pending was taken
     * at listing (sends_take_ref) */
    if (patio_loop_in_loop_thread(b->loop)) {
        patio__tcp_route_call(tb, call);
        patio__tcp_local_kick(tb);
        return;
    }
    pthread_mutex_lock(&tb->mu);
    rc = patio__tcp_grow_ptrs(patio__tcp_hooks(tb), (void ***)&tb->inbox, &tb->inbox_cap, tb->inbox_len + 1);
    if (rc == PATIO_OK) tb->inbox[tb->inbox_len++] = call;
    post = rc == PATIO_OK && !tb->work_posted;
    if (post) tb->work_posted = 1;
    pthread_mutex_unlock(&tb->mu);
    if (rc != PATIO_OK) {
        patio_call_fail_with(call, PATIO_ERR_NOMEM, "MemoryError", "out of memory");
        patio__call_release(call);
    } else if (post) {
        patio__loop_post(b->loop, &tb->work_post);
    }
}

typedef struct patio__tcp_sync {
    patio__post post;
    patio__tcp_broker *tb;
    void (*fn)(patio__tcp_broker *, void *);
    void *arg;
    int done;
} patio__tcp_sync;

static void patio__tcp_sync_run(patio__post *p)
{
    patio__tcp_sync *s = PATIO__CONTAINER(p, patio__tcp_sync, post);
    patio__tcp_broker *tb = s->tb;
    s->fn(tb, s->arg);
    patio__tcp_tail(tb);
    pthread_mutex_lock(&tb->mu);
    s->done = 1;
    pthread_cond_broadcast(&tb->cv);
    pthread_mutex_unlock(&tb->mu);
}

/* Runs fn on the loop thread and waits for it (pumping a host-driven loop).
 * On the loop thread itself fn runs at once; the flush follows soon. */
static void patio__tcp_run_sync(patio__tcp_broker *tb, void (*fn)(patio__tcp_broker *, void *), void *arg)
{
    patio__tcp_sync s;
    int pump;
    if (patio_loop_in_loop_thread(tb->base.loop)) {
        fn(tb, arg);
        patio__tcp_kick(tb);
        return;
    }
    memset(&s, 0, sizeof s);
    s.post.fn = patio__tcp_sync_run;
    s.tb = tb;
    s.fn = fn;
    s.arg = arg;
    pump = patio__must_pump(tb->base.loop);
    patio__loop_post(tb->base.loop, &s.post);
    pthread_mutex_lock(&tb->mu);
    while (!s.done) {
        if (pump) {
            pthread_mutex_unlock(&tb->mu);
            patio_loop_run_once(tb->base.loop, 10);
            pthread_mutex_lock(&tb->mu);
        } else {
            pthread_cond_wait(&tb->cv, &tb->mu);
        }
    }
    pthread_mutex_unlock(&tb->mu);
}

/* ---- close and destroy --------------------------------------------------- */

static void patio__tcp_close_on_loop(patio__tcp_broker *tb, void *arg)
{
    patio__tcp_listener *l;
    patio__tcp_target *t;
    size_t i;
    PATIO__UNUSED(arg);
    if (tb->closing) return;
    patio__store(&tb->closing, 1);
    while ((l = tb->listeners) != NULL) {
        tb->listeners = l->next;
        patio__io_stop(tb->base.loop, &l->io);
        patio__timer_stop(tb->base.loop, &l->resume);
        close(l->fd);
        patio__free(patio__tcp_hooks(tb), l);
    }
    for (t = tb->targets; t; t = t->next)
        if (t->timer_armed) {
            patio__timer_stop(tb->base.loop, &t->timer);
            t->timer_armed = 0;
        }
    while (tb->conns) patio__tcp_conn_close(tb->conns, PATIO_LOG_DEBUG, "broker closed");
    for (i = 0; i < tb->route_cap; i++) {
        patio__tcp_route *r = tb->routes[i], *next;
        for (; r; r = next) {
            size_t k;
            next = r->next;
            for (k = 0; k < r->nwaiting; k++) {
                patio_call_fail_with(r->waiting[k], PATIO_ERR_CLOSED, "RuntimeError", "broker closed");
                patio__call_release(r->waiting[k]);
            }
            r->nwaiting = 0;
            patio__tcp_route_release(tb, r);
        }
    }
    if (tb->retry_armed) patio__timer_stop(tb->base.loop, &tb->retry_timer);
    tb->retry_armed = 0;
    for (i = 0; i < PATIO__TCP_LANES; i++) { /* emptied with the connections */
        PATIO_ASSERT(!tb->lanes[i].head && !tb->lanes[i].armed);
    }
    pthread_mutex_lock(&tb->mu);
    pthread_cond_broadcast(&tb->cv);
    pthread_mutex_unlock(&tb->mu);
}

static void patio__tcp_vt_close(patio_broker *b)
{
    patio__tcp_run_sync((patio__tcp_broker *)b, patio__tcp_close_on_loop, NULL);
}

/* vt->cancel: only a call still waiting for a route can be taken back, and
 * only on the loop thread (where the timeouts fire). */
static int patio__tcp_vt_cancel(patio_broker *b, patio_call *call)
{
    patio__tcp_broker *tb = (patio__tcp_broker *)b;
    const char *name = patio_call_name(call);
    size_t len = strlen(name), i;
    patio__tcp_route *r;
    if (!patio_loop_in_loop_thread(b->loop)) return PATIO_ERR_STARTED;
    if (!tb->closing && call->timeout >= 0) PATIO__TCP_COUNT(tb, timeouts, 1);
    r = patio__tcp_route_find(tb, name, len, patio__tcp_hash(name, len));
    if (!r) return PATIO_ERR_STARTED;
    for (i = 0; i < r->nwaiting && r->waiting[i] != call; i++) {}
    if (i == r->nwaiting) return PATIO_ERR_STARTED;
    memmove(r->waiting + i, r->waiting + i + 1, (r->nwaiting - i - 1) * sizeof *r->waiting);
    r->nwaiting--;
    patio__call_release(call);
    patio__tcp_route_release(tb, r);
    return PATIO_OK;
}

static void patio__tcp_vt_destroy(patio_broker *b)
{
    patio__tcp_broker *tb = (patio__tcp_broker *)b;
    const patio_hooks *h = patio__tcp_hooks(tb);
    patio__tcp_req *req, *next_req;
    patio__tcp_target *t;
    size_t i;
    while ((req = tb->pool) != NULL) {
        tb->pool = req->next;
        patio__tcp_req_free(tb, req);
    }
    for (req = patio__tcp_take_done(tb); req; req = next_req) {
        next_req = req->next;
        patio__tcp_req_free(tb, req);
    }
    while ((req = tb->local_done) != NULL) {
        tb->local_done = req->next;
        patio__tcp_req_free(tb, req);
    }
    while ((t = tb->targets) != NULL) {
        tb->targets = t->next;
        patio__free(h, t->host);
        patio__free(h, t->addrs);
        patio__free(h, t);
    }
    for (i = 0; i < tb->inbox_len; i++) {
        patio_call_fail_with(tb->inbox[i], PATIO_ERR_CLOSED, "RuntimeError", "broker closed");
        patio__call_release(tb->inbox[i]);
    }
    patio__free(h, tb->inbox);
    patio__free(h, tb->batch);
    patio__free(h, tb->routes);
    patio_writer_free(&tb->names);
    pthread_mutex_destroy(&tb->mu);
    pthread_cond_destroy(&tb->cv);
    patio__free(h, tb);
}

static const patio_broker_vtable patio__tcp_vt = {
    "tcp", patio__tcp_vt_send, patio__tcp_vt_cancel, patio__tcp_vt_close, patio__tcp_vt_destroy
};

/* ---- listening ----------------------------------------------------------- */

#define PATIO__TCP_ACCEPT_PAUSE_NS 100000000u /* after accept fails (out of fds, ...) */

static void patio__tcp_accept_resume(patio__timer *t)
{
    patio__tcp_listener *l = PATIO__CONTAINER(t, patio__tcp_listener, resume);
    patio__io_update(l->tb->base.loop, &l->io, PATIO__READ);
}

/* accept() failed with the connection still queued (EMFILE, ENFILE,
 * ENOBUFS, ...): the listener stays readable, so watching it on would
 * spin the loop. It is set aside for a moment instead, and the connection
 * waits in the kernel's backlog until descriptors free up. The log says so
 * on the first failure and then every 50th (about every 5 s). */
static void patio__tcp_accept_pause(patio__tcp_listener *l, int err)
{
    patio__tcp_broker *tb = l->tb;
    if (l->failures++ % 50 == 0)
        patio__log(patio__tcp_hooks(tb), PATIO_LOG_WARN, "patio tcp: accept on port %d failed: %s; retrying in %u ms",
                   l->port, strerror(err), PATIO__TCP_ACCEPT_PAUSE_NS / 1000000u);
    patio__io_update(tb->base.loop, &l->io, 0);
    patio__timer_start(tb->base.loop, &l->resume, patio__now_ns() + PATIO__TCP_ACCEPT_PAUSE_NS);
}

/* At max_connections, a new connection takes the place of the oldest one
 * accepted that has not authenticated yet: otherwise peers without the key
 * could hold every slot by opening connections and staying silent until the
 * handshake deadline, again and again. An honest peer authenticates within
 * a round trip or two, so it is rarely the oldest one. */
static void patio__tcp_evict_unauthenticated(patio__tcp_broker *tb)
{
    patio__tcp_conn *c, *oldest = NULL;
    for (c = tb->conns; c; c = c->next) /* newest first */
        if (c->is_server && c->counted && c->state != PATIO__TC_CLOSED && !patio__tcp_authenticated(c)) oldest = c;
    if (oldest)
        patio__tcp_conn_close(oldest, PATIO_LOG_WARN, "not authenticated yet while %d connections are open: "
                                                      "its slot goes to a new one", tb->cfg.max_connections);
}

static void patio__tcp_accept_io(patio__io *io, unsigned ev)
{
    patio__tcp_listener *l = PATIO__CONTAINER(io, patio__tcp_listener, io);
    patio__tcp_broker *tb = l->tb;
    int i;
    PATIO__UNUSED(ev);
    for (i = 0; i < 64; i++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        patio__tcp_conn *c;
        int fd = accept(l->fd, (struct sockaddr *)&ss, &sl);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) patio__tcp_accept_pause(l, errno);
            break;
        }
        l->failures = 0;
        if (tb->nopen >= (size_t)tb->cfg.max_connections) patio__tcp_evict_unauthenticated(tb);
        if (tb->nopen >= (size_t)tb->cfg.max_connections) {
            char peer[64];
            patio__tcp_addr_text((struct sockaddr *)&ss, peer, sizeof peer);
            patio__log(patio__tcp_hooks(tb), PATIO_LOG_WARN,
                       "patio tcp: connection from %s refused: %d connections open", peer, tb->cfg.max_connections);
            close(fd);
            continue;
        }
        c = patio__tcp_nonblock(fd) == PATIO_OK ? patio__tcp_conn_new(tb, fd, 1, (struct sockaddr *)&ss) : NULL;
        if (!c) {
            close(fd);
            continue;
        }
        PATIO__TCP_COUNT(tb, connections_accepted, 1);
        patio__tcp_conn_up(c, NULL);
    }
    patio__tcp_tail(tb);
}

typedef struct patio__tcp_listen_job {
    patio__tcp_listener *list;
    int rc;
} patio__tcp_listen_job;

static void patio__tcp_listen_on_loop(patio__tcp_broker *tb, void *arg)
{
    patio__tcp_listen_job *job = (patio__tcp_listen_job *)arg;
    patio__tcp_listener *l, *next;
    for (l = job->list; l; l = next) {
        next = l->next;
        if (tb->closing || patio__io_start(tb->base.loop, &l->io, l->fd, PATIO__READ, patio__tcp_accept_io) != PATIO_OK) {
            job->rc = tb->closing ? PATIO_ERR_CLOSED : PATIO_ERR_IO;
            close(l->fd);
            patio__free(patio__tcp_hooks(tb), l);
            continue;
        }
        l->next = tb->listeners;
        tb->listeners = l;
    }
}

/* One listening socket for ai; port 0 takes *port when another socket of
 * this call already got one. */
static patio__tcp_listener *patio__tcp_bind(patio__tcp_broker *tb, const struct addrinfo *ai, int *port)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    patio__tcp_listener *l;
    char where[80];
    int one = 1, fd;
    if (ai->ai_addrlen > sizeof ss) return NULL;
    memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
    if (*port && ss.ss_family == AF_INET) ((struct sockaddr_in *)(void *)&ss)->sin_port = htons((uint16_t)*port);
    if (*port && ss.ss_family == AF_INET6) ((struct sockaddr_in6 *)(void *)&ss)->sin6_port = htons((uint16_t)*port);
    patio__tcp_addr_text((struct sockaddr *)&ss, where, sizeof where);
    fd = socket(ai->ai_family, SOCK_STREAM, 0);
    if (fd < 0) return NULL;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
#ifdef IPV6_V6ONLY
    if (ai->ai_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
#endif
    if (bind(fd, (struct sockaddr *)&ss, (socklen_t)ai->ai_addrlen) != 0 || listen(fd, SOMAXCONN) != 0 ||
        patio__tcp_nonblock(fd) != PATIO_OK || getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
        patio__log(patio__tcp_hooks(tb), PATIO_LOG_WARN, "patio tcp: cannot listen on %s: %s", where, strerror(errno));
        close(fd);
        return NULL;
    }
    l = (patio__tcp_listener *)patio__calloc(patio__tcp_hooks(tb), sizeof *l);
    if (!l) {
        close(fd);
        return NULL;
    }
    l->tb = tb;
    l->fd = fd;
    l->resume.fn = patio__tcp_accept_resume;
    l->port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)(void *)&ss)->sin6_port)
                                       : ntohs(((struct sockaddr_in *)(void *)&ss)->sin_port);
    *port = l->port;
    patio__log(patio__tcp_hooks(tb), PATIO_LOG_INFO, "patio tcp: listening on %s (port %d)", where, l->port);
    return l;
}

PATIO_API int patio_tcp_listen(patio_broker *b, const char *host, int port, int *bound_port)
{
    patio__tcp_broker *tb = patio__tcp_of(b);
    struct addrinfo hints, *res = NULL, *ai;
    patio__tcp_listen_job job;
    char service[16];
    int got = 0, expected;
    if (bound_port) *bound_port = 0;
    if (!tb || port < 0 || port > 65535) return PATIO_ERR_INVALID;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    snprintf(service, sizeof service, "%d", port);
    if (getaddrinfo(host, service, &hints, &res) != 0 || !res) {
        patio__log(b->hooks, PATIO_LOG_ERROR, "patio tcp: cannot resolve %s", host ? host : "(any)");
        return PATIO_ERR_INVALID;
    }
    memset(&job, 0, sizeof job);
    for (ai = res; ai; ai = ai->ai_next) {
        patio__tcp_listener *l = patio__tcp_bind(tb, ai, &got);
        if (!l) continue;
        l->next = job.list;
        job.list = l;
    }
    freeaddrinfo(res);
    if (!job.list) return PATIO_ERR_IO;
    patio__tcp_run_sync(tb, patio__tcp_listen_on_loop, &job);
    if (job.rc != PATIO_OK) return job.rc;
    expected = -1;
    __atomic_compare_exchange_n(&tb->listen_port, &expected, got, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    if (bound_port) *bound_port = got;
    return PATIO_OK;
}

PATIO_API int patio_tcp_listen_port(patio_broker *b)
{
    patio__tcp_broker *tb = patio__tcp_of(b);
    return tb ? patio__load(&tb->listen_port) : -1;
}

/* ---- connecting, with backoff --------------------------------------------- */

static void patio__tcp_target_try(patio__tcp_target *t);

static void patio__tcp_target_attempt(patio__tcp_target *t)
{
    patio__tcp_broker *tb = t->tb;
    if (tb->closing || t->conn) return;
    if (t->attempts++) PATIO__TCP_COUNT(tb, reconnects, 1);
    t->tried = 0;
    patio__tcp_target_try(t);
}

static void patio__tcp_target_fire(patio__timer *timer)
{
    patio__tcp_target *t = PATIO__CONTAINER(timer, patio__tcp_target, timer);
    t->timer_armed = 0;
    patio__tcp_target_attempt(t);
    patio__tcp_tail(t->tb);
}

/* The connection of t is gone: retry after the reconnect delay, doubled for
 * each failure in a row (PROTOCOL.md §9). */
static void patio__tcp_target_lost(patio__tcp_target *t, int was_ready)
{
    patio__tcp_broker *tb = t->tb;
    double delay = tb->cfg.reconnect_delay;
    unsigned i;
    t->conn = NULL;
    if (tb->closing) return;
    if (was_ready) t->failures = 0;
    for (i = 0; i < t->failures && delay < tb->cfg.reconnect_max_delay; i++) delay *= 2;
    if (delay > tb->cfg.reconnect_max_delay) delay = tb->cfg.reconnect_max_delay;
    if (t->failures < 64) t->failures++;
    patio__log(patio__tcp_hooks(tb), PATIO_LOG_INFO, "patio tcp: reconnecting to %s in %g s", t->host, delay);
    t->timer_armed = 1;
    patio__timer_start(tb->base.loop, &t->timer, patio__deadline_after(delay));
}

/* A connection of t closed. One that never became ready (its connect or
 * handshake hung or failed) leaves its address behind, so the next attempt
 * tries the next one: an address that drops SYNs cannot hold the target for
 * good. One that was ready keeps its address. */
static void patio__tcp_target_conn_closed(patio__tcp_target *t, int was_ready)
{
    if (!was_ready) t->addr_pos = (t->addr_pos + 1) % t->naddrs;
    patio__tcp_target_lost(t, was_ready);
}

/* Drops a connection attempt that failed before TCP was up; the next
 * address of t is tried at once. */
static void patio__tcp_target_next(patio__tcp_conn *c, int err)
{
    patio__tcp_target *t = c->target;
    c->target = NULL;
    t->conn = NULL;
    patio__tcp_conn_close(c, PATIO_LOG_INFO, "connect failed: %s", strerror(err));
    t->addr_pos = (t->addr_pos + 1) % t->naddrs;
    patio__tcp_target_try(t);
}

static void patio__tcp_connect_done(patio__tcp_conn *c)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    if (err) {
        patio__tcp_target_next(c, err);
        return;
    }
    patio__tcp_conn_up(c, c->target->host);
}

static void patio__tcp_target_try(patio__tcp_target *t)
{
    patio__tcp_broker *tb = t->tb;
    while (t->tried < t->naddrs) {
        patio__tcp_addr *a = &t->addrs[t->addr_pos];
        patio__tcp_conn *c;
        int fd = socket(a->ss.ss_family, SOCK_STREAM, 0);
        t->tried++;
        if (fd < 0 || patio__tcp_nonblock(fd) != PATIO_OK) {
            if (fd >= 0) close(fd);
            t->addr_pos = (t->addr_pos + 1) % t->naddrs;
            continue;
        }
        c = patio__tcp_conn_new(tb, fd, 0, (struct sockaddr *)&a->ss);
        if (!c) {
            close(fd);
            break;
        }
        c->target = t;
        t->conn = c;
        if (connect(fd, (struct sockaddr *)&a->ss, a->len) == 0) patio__tcp_conn_up(c, t->host);
        else if (errno != EINPROGRESS && errno != EINTR) patio__tcp_target_next(c, errno);
        return;
    }
    patio__log(patio__tcp_hooks(tb), PATIO_LOG_WARN, "patio tcp: cannot connect to %s", t->host);
    patio__tcp_target_lost(t, 0);
}

static void patio__tcp_target_start(patio__post *p)
{
    patio__tcp_target *t = PATIO__CONTAINER(p, patio__tcp_target, post);
    patio__tcp_broker *tb = t->tb;
    t->next = tb->targets;
    tb->targets = t;
    patio__tcp_target_attempt(t);
    patio__tcp_tail(tb);
}

PATIO_API int patio_tcp_connect(patio_broker *b, const char *host, int port)
{
    patio__tcp_broker *tb = patio__tcp_of(b);
    const patio_hooks *h;
    struct addrinfo hints, *res = NULL, *ai;
    patio__tcp_target *t;
    char service[16];
    size_t n = 0, len;
    if (!tb || port < 0 || port > 65535) return PATIO_ERR_INVALID;
    h = patio__tcp_hooks(tb);
    if (!host) host = "localhost";
    if (!port) port = PATIO_TCP_DEFAULT_PORT;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(service, sizeof service, "%d", port);
    if (getaddrinfo(host, service, &hints, &res) != 0 || !res) {
        patio__log(h, PATIO_LOG_ERROR, "patio tcp: cannot resolve %s", host);
        return PATIO_ERR_INVALID;
    }
    for (ai = res; ai; ai = ai->ai_next) n++;
    t = (patio__tcp_target *)patio__calloc(h, sizeof *t);
    len = strlen(host);
    if (t) t->host = (char *)patio__malloc(h, len + 8);
    if (t) t->addrs = (patio__tcp_addr *)patio__calloc(h, n * sizeof *t->addrs);
    if (!t || !t->host || !t->addrs) {
        freeaddrinfo(res);
        if (t) {
            patio__free(h, t->host);
            patio__free(h, t->addrs);
            patio__free(h, t);
        }
        return PATIO_ERR_NOMEM;
    }
    memcpy(t->host, host, len + 1);
    for (ai = res; ai; ai = ai->ai_next) {
        if (ai->ai_addrlen > sizeof t->addrs[0].ss) continue;
        memcpy(&t->addrs[t->naddrs].ss, ai->ai_addr, ai->ai_addrlen);
        t->addrs[t->naddrs++].len = (socklen_t)ai->ai_addrlen;
    }
    freeaddrinfo(res);
    t->tb = tb;
    t->timer.fn = patio__tcp_target_fire;
    t->post.fn = patio__tcp_target_start;
    if (!t->naddrs) {
        patio__free(h, t->host);
        patio__free(h, t->addrs);
        patio__free(h, t);
        return PATIO_ERR_INVALID;
    }
    patio__loop_post(b->loop, &t->post);
    return PATIO_OK;
}

/* ---- creation and the rest of the API ------------------------------------- */

static int patio__tcp_config_fill(patio_tcp_config *out, const patio_tcp_config *in)
{
    if (in) *out = *in;
    else memset(out, 0, sizeof *out);
    if (out->key_len > 32 || (out->key_len && !out->key)) return PATIO_ERR_INVALID;
    if (!out->max_frame_size) out->max_frame_size = 16777216u;
    if (out->max_frame_size < 64) return PATIO_ERR_INVALID;
    if (!(out->handshake_timeout > 0)) out->handshake_timeout = 10;
    if (out->max_connections <= 0) out->max_connections = 1024;
    if (out->max_inflight <= 0) out->max_inflight = 1024;
    if (!out->max_inflight_bytes) out->max_inflight_bytes = (size_t)64 << 20;
    if (out->keepalive_idle == 0) out->keepalive_idle = 60;
    if (out->keepalive_interval == 0) out->keepalive_interval = 10;
    if (out->keepalive_probes == 0) out->keepalive_probes = 5;
    if (out->keepalive_idle != out->keepalive_idle || out->keepalive_idle > 32767 ||
        !(out->keepalive_interval > 0 && out->keepalive_interval <= 32767) ||
        out->keepalive_probes < 1 || out->keepalive_probes > 127)
        return PATIO_ERR_INVALID;
    if (!(out->reconnect_delay > 0)) out->reconnect_delay = 1;
    if (!(out->reconnect_max_delay > 0)) out->reconnect_max_delay = 30;
    if (out->reconnect_max_delay < out->reconnect_delay) out->reconnect_max_delay = out->reconnect_delay;
    if (out->max_depth <= 0) out->max_depth = PATIO_MAX_DEPTH;
    if (!out->transport) out->transport = &patio__plain_transport;
    if (!out->transport->create || !out->transport->read || !out->transport->write || !out->transport->close ||
        !out->transport->error)
        return PATIO_ERR_INVALID;
    return PATIO_OK;
}

/* The DISCOVER_RESPONSE payload: every registered name, in order. */
static int patio__tcp_names_build(patio__tcp_broker *tb)
{
    const patio_registry *r = tb->base.registry;
    size_t i;
    patio_writer_init(&tb->names, patio__tcp_hooks(tb));
    patio_write_array(&tb->names, (uint32_t)r->count);
    for (i = 0; i < r->count; i++) patio_write_strn(&tb->names, r->entries[i].name, r->entries[i].name_len);
    if (tb->names.err) return tb->names.err;
    return tb->names.len > tb->cfg.max_frame_size ? PATIO_ERR_OVERFLOW : PATIO_OK;
}

PATIO_API patio_broker *patio_tcp_broker_new(patio_executor *ex, const patio_tcp_config *cfg)
{
    patio__tcp_broker *tb;
    patio_tcp_config c;
    int i;
    if (!ex) return NULL;
    if (patio__tcp_config_fill(&c, cfg) != PATIO_OK) {
        patio__log(ex->hooks, PATIO_LOG_ERROR, "patio tcp: invalid configuration (key over 32 bytes?)");
        return NULL;
    }
    tb = (patio__tcp_broker *)patio__calloc(ex->hooks, sizeof *tb);
    if (!tb) return NULL;
    if (c.key_len) memcpy(tb->key, c.key, c.key_len);
    c.key = tb->key;
    tb->cfg = c;
    tb->tr = c.transport;
    tb->listen_port = -1;
    tb->work_post.fn = patio__tcp_work;
    tb->local_post.fn = patio__tcp_local_work;
    tb->done_post.fn = patio__tcp_done_work;
    tb->retry_timer.fn = patio__tcp_retry_fire;
    for (i = 0; i < PATIO__TCP_LANES; i++) {
        tb->lanes[i].tb = tb;
        tb->lanes[i].timer.fn = patio__tcp_lane_fire;
    }
    patio__mutex_init_hot(&tb->mu);
    patio__cond_init(&tb->cv);
    if (patio_broker_init(&tb->base, &patio__tcp_vt, ex, &c.base) != PATIO_OK) {
        pthread_mutex_destroy(&tb->mu);
        pthread_cond_destroy(&tb->cv);
        patio__free(ex->hooks, tb);
        return NULL;
    }
    patio__core(&tb->base)->sends_take_ref = 1; /* no call is started before this returns */
    if (patio__tcp_names_build(tb) != PATIO_OK) {
        patio__log(ex->hooks, PATIO_LOG_ERROR, "patio tcp: the registered names do not fit in a frame");
        patio_broker_free(&tb->base);
        return NULL;
    }
    if (!c.key_len)
        patio__log(ex->hooks, PATIO_LOG_WARN, "patio tcp: no key configured, connections are not authenticated");
    return &tb->base;
}

PATIO_API patio_broker *patio_tcp_server_new(patio_executor *ex, const patio_tcp_config *cfg, const char *host, int port)
{
    patio_broker *b = patio_tcp_broker_new(ex, cfg);
    if (b && patio_tcp_listen(b, host, port, NULL) != PATIO_OK) {
        patio_broker_free(b);
        b = NULL;
    }
    return b;
}

PATIO_API patio_broker *patio_tcp_client_new(patio_executor *ex, const patio_tcp_config *cfg, const char *host, int port)
{
    patio_broker *b = patio_tcp_broker_new(ex, cfg);
    if (b && patio_tcp_connect(b, host, port) != PATIO_OK) {
        patio_broker_free(b);
        b = NULL;
    }
    return b;
}

PATIO_API int patio_tcp_wait_peers(patio_broker *b, int n, double timeout)
{
    patio__tcp_broker *tb = patio__tcp_of(b);
    uint64_t deadline;
    int pump, rc;
    if (!tb || patio_loop_in_loop_thread(b->loop)) return PATIO_ERR_INVALID;
    deadline = timeout < 0 ? UINT64_MAX : patio__deadline_after(timeout);
    pump = patio__must_pump(b->loop);
    pthread_mutex_lock(&tb->mu);
    for (;;) {
        uint64_t now = patio__now_ns(), until;
        if (tb->ready_peers >= n) { rc = PATIO_OK; break; }
        if (patio__load(&tb->closing)) { rc = PATIO_ERR_CLOSED; break; }
        if (now >= deadline) { rc = PATIO_ERR_TIMEOUT; break; }
        until = deadline - now > 100000000u ? now + 100000000u : deadline;
        if (pump) {
            pthread_mutex_unlock(&tb->mu);
            patio_loop_run_once(b->loop, (int)((until - now + 999999u) / 1000000u));
            pthread_mutex_lock(&tb->mu);
        } else {
            patio__cond_wait_until(&tb->cv, &tb->mu, until);
        }
    }
    pthread_mutex_unlock(&tb->mu);
    return rc;
}

PATIO_API int patio_tcp_stats_get(patio_broker *b, patio_tcp_stats *out)
{
    patio__tcp_broker *tb = patio__tcp_of(b);
    if (!tb || !out) return PATIO_ERR_INVALID;
    out->calls_sent = __atomic_load_n(&tb->stats.calls_sent, __ATOMIC_RELAXED);
    out->calls_served = __atomic_load_n(&tb->stats.calls_served, __ATOMIC_RELAXED);
    out->call_errors = __atomic_load_n(&tb->stats.call_errors, __ATOMIC_RELAXED);
    out->timeouts = __atomic_load_n(&tb->stats.timeouts, __ATOMIC_RELAXED);
    out->reconnects = __atomic_load_n(&tb->stats.reconnects, __ATOMIC_RELAXED);
    out->bytes_in = __atomic_load_n(&tb->stats.bytes_in, __ATOMIC_RELAXED);
    out->bytes_out = __atomic_load_n(&tb->stats.bytes_out, __ATOMIC_RELAXED);
    out->connections_open = __atomic_load_n(&tb->stats.connections_open, __ATOMIC_RELAXED);
    out->connections_accepted = __atomic_load_n(&tb->stats.connections_accepted, __ATOMIC_RELAXED);
    out->protocol_errors = __atomic_load_n(&tb->stats.protocol_errors, __ATOMIC_RELAXED);
    out->auth_failures = __atomic_load_n(&tb->stats.auth_failures, __ATOMIC_RELAXED);
    out->read_pauses = __atomic_load_n(&tb->stats.read_pauses, __ATOMIC_RELAXED);
    return PATIO_OK;
}

/* ---- test hook ------------------------------------------------------------ */

typedef struct patio__tcp_serial_job {
    uint32_t set, last;
} patio__tcp_serial_job;

static void patio__tcp_serial_on_loop(patio__tcp_broker *tb, void *arg)
{
    patio__tcp_serial_job *job = (patio__tcp_serial_job *)arg;
    patio__tcp_conn *c;
    for (c = tb->conns; c; c = c->next) {
        if (job->set) {
            c->serial = job->set;
            c->serial_wrapped = 1; /* it may have moved back */
        }
        if (c->state == PATIO__TC_READY) job->last = c->serial;
    }
}

/* For tests: with set != 0, the serial counter of every connection (and
 * of later ones) continues after set. Returns the last serial taken on a
 * ready connection. */
PATIO__MAYBE_UNUSED static uint32_t patio__tcp_test_serial(patio_broker *b, uint32_t set)
{
    patio__tcp_broker *tb = patio__tcp_of(b);
    patio__tcp_serial_job job;
    if (!tb) return 0;
    if (set) patio__store(&tb->test_serial, set);
    job.set = set;
    job.last = 0;
    patio__tcp_run_sync(tb, patio__tcp_serial_on_loop, &job);
    return job.last;
}
#endif /* PATIO_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
This software is available under the MIT License.
------------------------------------------------------------------------------
Copyright (c) 2026 The patio.h authors

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
*/
