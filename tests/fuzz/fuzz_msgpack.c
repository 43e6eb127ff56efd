/* tests/fuzz/fuzz_msgpack.c - libFuzzer target for every decoder of
 * MessagePack that sees network bytes: the validator, the reader (item by
 * item and object by object), patio_unpack, and the CallRequest / exception
 * decoders. Besides "never crash, never read past the input" it checks that
 * the decoders agree with each other, and aborts when they do not. */
#define PATIO_IMPLEMENTATION
#include "patio.h"

#include <stdlib.h>

/* Within [base, base + len): pointers handed out must point into the input. */
static void must_be_inside(const void *p, size_t n, const uint8_t *base, size_t len)
{
    const uint8_t *q = (const uint8_t *)p;
    if (n == 0) return;
    if (q < base || q > base + len || n > (size_t)(base + len - q)) abort();
}

/* patio_read over every item in order; strings, binaries and ext bodies are
 * touched byte by byte so that ASan sees any bad pointer. */
static void walk_items(const uint8_t *data, size_t size)
{
    patio_reader r;
    patio_value v;
    volatile uint8_t sink = 0;
    uint32_t i;
    patio_reader_init(&r, data, size);
    while (patio_reader_remaining(&r) > 0 && patio_read(&r, &v) == PATIO_OK) {
        if (v.type == PATIO_STR) {
            must_be_inside(v.v.str.ptr, v.v.str.len, data, size);
            for (i = 0; i < v.v.str.len; i++) sink = (uint8_t)(sink ^ (uint8_t)v.v.str.ptr[i]);
        } else if (v.type == PATIO_BIN) {
            must_be_inside(v.v.bin.ptr, v.v.bin.len, data, size);
            for (i = 0; i < v.v.bin.len; i++) sink = (uint8_t)(sink ^ v.v.bin.ptr[i]);
        } else if (v.type == PATIO_EXT) {
            must_be_inside(v.v.ext.ptr, v.v.ext.len, data, size);
            for (i = 0; i < v.v.ext.len; i++) sink = (uint8_t)(sink ^ v.v.ext.ptr[i]);
        }
    }
    if (r.pos > r.end) abort();
    (void)sink;
}

/* patio_read_skip over whole objects; returns the bytes of the first one
 * (0 if it does not skip). */
static size_t skip_objects(const uint8_t *data, size_t size, int max_depth)
{
    patio_reader r;
    size_t first = 0;
    int n = 0;
    patio_reader_init(&r, data, size);
    r.max_depth = max_depth;
    while (patio_reader_remaining(&r) > 0 && patio_read_skip(&r) == PATIO_OK) {
        if (n++ == 0) first = size - patio_reader_remaining(&r);
    }
    if (r.pos > r.end) abort();
    return first;
}

static void try_unpack(const uint8_t *data, size_t size)
{
    patio_reader r;
    const char *s;
    const void *y, *v;
    size_t sl, yl, vl;
    int i, b;
    int64_t I;
    uint64_t U;
    unsigned u;
    double d;
    patio_reader_init(&r, data, size);
    if (patio_unpack(&r, "[s[*v]{s*}d]", &s, &sl, &v, &vl, &s, &sl, &d) == PATIO_OK) {
        must_be_inside(s, sl, data, size);
        must_be_inside(v, vl, data, size);
    }
    patio_reader_init(&r, data, size);
    if (patio_unpack(&r, "[yyy]", &y, &yl, &y, &yl, &y, &yl) == PATIO_OK) must_be_inside(y, yl, data, size);
    patio_reader_init(&r, data, size);
    patio_unpack(&r, "i b I U u n d *", &i, &b, &I, &U, &u, &d);
}

static int same_double(double a, double b)
{
    return a == b || (a != a && b != b);
}

/* A decoded CallRequest encodes again and decodes to the same fields. */
static void reencode_call(const patio__call_request *cr)
{
    patio_writer w;
    patio__call_request again;
    patio_writer_init(&w, NULL);
    if (patio__write_call_request(&w, cr->func, cr->func_len, cr->args, cr->args_len, cr->kwargs,
                                  cr->kwargs_len, cr->has_timeout, cr->timeout) != PATIO_OK)
        abort();
    if (patio__decode_call_request(w.data, w.len, 0, 1, &again) != PATIO_OK) abort();
    if (again.func_len != cr->func_len || memcmp(again.func, cr->func, cr->func_len) != 0) abort();
    if (again.args_len != cr->args_len || memcmp(again.args, cr->args, cr->args_len) != 0) abort();
    if (again.kwargs_len != cr->kwargs_len || memcmp(again.kwargs, cr->kwargs, cr->kwargs_len) != 0) abort();
    if (again.argc != cr->argc || again.kwargc != cr->kwargc) abort();
    if (again.has_timeout != cr->has_timeout) abort();
    if (cr->has_timeout && !same_double(again.timeout, cr->timeout)) abort();
    patio_writer_free(&w);
}

static void try_protocol_decoders(const uint8_t *data, size_t size, int check_all_rc)
{
    patio__call_request cr;
    const char *t, *m;
    size_t tl, ml;
    int checked_rc = patio__decode_call_request(data, size, 0, 1, &cr);
    if (checked_rc == PATIO_OK) {
        if (check_all_rc != PATIO_OK) abort(); /* the decoder is no laxer than the validator */
        must_be_inside(cr.func, cr.func_len, data, size);
        must_be_inside(cr.args, cr.args_len, data, size);
        must_be_inside(cr.kwargs, cr.kwargs_len, data, size);
        reencode_call(&cr);
    }
    /* The walk-only decoder (for a pool worker's trusted input) stays in
     * bounds on anything, and agrees on the boundaries of what is valid. */
    {
        patio__call_request walked;
        if (patio__decode_call_request(data, size, 0, 0, &walked) == PATIO_OK) {
            must_be_inside(walked.func, walked.func_len, data, size);
            must_be_inside(walked.args, walked.args_len, data, size);
            must_be_inside(walked.kwargs, walked.kwargs_len, data, size);
            if (checked_rc == PATIO_OK &&
                (walked.args != cr.args || walked.args_len != cr.args_len || walked.kwargs_len != cr.kwargs_len))
                abort();
        } else if (checked_rc == PATIO_OK) {
            abort(); /* walking is never stricter than checking */
        }
    }
    if (patio__decode_exception(data, size, &t, &tl, &m, &ml) == PATIO_OK) {
        patio_writer w;
        if (check_all_rc != PATIO_OK) abort();
        must_be_inside(t, tl, data, size);
        must_be_inside(m, ml, data, size);
        patio_writer_init(&w, NULL);
        patio__write_exception(&w, t, tl, m, ml);
        if (patio_msgpack_check_all(w.data, w.len, 0) != PATIO_OK) abort();
        patio_writer_free(&w);
    }
}

#ifdef __cplusplus
extern "C"
#endif
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t used = 0;
    int rc = patio_msgpack_check(data, size, 0, &used);
    int rc_all = patio_msgpack_check_all(data, size, 0);
    if (rc == PATIO_OK) {
        if (used == 0 || used > size) abort();
        /* whatever the validator accepts, the (weaker) skip accepts too, and
         * measures the object the same */
        if (skip_objects(data, size, 0) != used) abort();
        if ((rc_all == PATIO_OK) != (used == size)) abort();
    } else if (rc_all == PATIO_OK) {
        abort();
    }
    patio_msgpack_check(data, size, 3, NULL);
    walk_items(data, size);
    skip_objects(data, size, 2);
    try_unpack(data, size);
    try_protocol_decoders(data, size, rc_all);
    return 0;
}
