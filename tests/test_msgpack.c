/* tests/test_msgpack.c - the MessagePack writer, reader and validator, the
 * CallRequest / exception codecs, and the golden bytes of PROTOCOL.md §7.6
 * and §10. */
#define PATIO_IMPLEMENTATION
#include "patio.h"
#include "harness.h"

#include <stdlib.h>
#include <math.h>
#include <limits.h>
#include <stdarg.h>

/* ---- helpers ------------------------------------------------------------- */

#define CHECK_HEX(ptr, len, hex) \
    do { unsigned char th_want[1024]; size_t th_wn = th_hex((hex), th_want, sizeof th_want); \
         CHECK_EQ_MEM((ptr), (len), th_want, th_wn); } while (0)

#define CHECK_WRITER_HEX(w, hex) \
    do { CHECK_EQ_INT((w)->err, PATIO_OK); CHECK_HEX((w)->data, (w)->len, hex); } while (0)

static patio_value zero_value(void)
{
    patio_value v;
    memset(&v, 0, sizeof v);
    return v;
}

/* Hex into a fresh exact-size heap block, so ASan catches any read past it. */
static uint8_t *hex_alloc(const char *hex, size_t *len)
{
    size_t n = th_hex(hex, NULL, 0);
    uint8_t *p = (uint8_t *)calloc(1, n ? n : 1);
    th_hex(hex, p, n);
    *len = n;
    return p;
}

static uint8_t *copy_alloc(const void *src, size_t n)
{
    uint8_t *p = (uint8_t *)calloc(1, n ? n : 1);
    if (n) memcpy(p, src, n);
    return p;
}

static int check_hex(const char *hex)
{
    size_t n = 0;
    uint8_t *p = hex_alloc(hex, &n);
    int rc = patio_msgpack_check_all(p, n, 0);
    free(p);
    return rc;
}

static int read_hex_one(const char *hex, patio_value *v)
{
    size_t n = 0;
    uint8_t *p = hex_alloc(hex, &n);
    patio_reader r;
    int rc = 0;
    patio_reader_init(&r, p, n);
    rc = patio_read(&r, v);
    free(p);
    return rc;
}

/* ---- golden encodings, PROTOCOL.md §7.6 ----------------------------------- */

static void test_golden_scalars(void)
{
    patio_writer w;
    patio_writer_init(&w, NULL);
    patio_write_nil(&w);
    CHECK_WRITER_HEX(&w, "c0");
    patio_writer_reset(&w);
    patio_write_int(&w, 6);
    CHECK_WRITER_HEX(&w, "06");
    patio_writer_free(&w);
}

static void test_golden_names(void)
{
    static const char *const names[4] = { "mul", "div", "sleep", "echo" };
    patio_writer w;
    patio_reader r;
    uint32_t n = 0, i = 0;
    patio_writer_init(&w, NULL);
    patio_write_array(&w, 4);
    for (i = 0; i < 4; i++) patio_write_str(&w, names[i]);
    CHECK_WRITER_HEX(&w, "94 a36d756c a3646976 a5736c656570 a46563686f");

    patio_reader_init(&r, w.data, w.len);
    CHECK_EQ_INT(patio_read_array(&r, &n), PATIO_OK);
    CHECK_EQ_INT(n, 4);
    for (i = 0; i < 4 && i < n; i++) {
        const char *s = NULL;
        size_t len = 0;
        CHECK_EQ_INT(patio_read_str(&r, &s, &len), PATIO_OK);
        CHECK_EQ_MEM(s, len, names[i], strlen(names[i]));
    }
    CHECK_EQ_INT(patio_reader_remaining(&r), 0);
    patio_writer_free(&w);
}

static void test_golden_token(void)
{
    static const uint8_t zeros[16] = { 0 };
    patio_writer w;
    patio_reader r;
    const void *p = NULL;
    size_t n = 0;
    patio_writer_init(&w, NULL);
    patio_write_bin(&w, zeros, 16);
    CHECK_WRITER_HEX(&w, "c4 10 00000000000000000000000000000000");
    patio_reader_init(&r, w.data, w.len);
    CHECK_EQ_INT(patio_read_bin(&r, &p, &n), PATIO_OK);
    CHECK_EQ_MEM(p, n, zeros, 16);
    patio_writer_free(&w);
}

/* Encodes a CallRequest, compares with the golden bytes, decodes it back. */
static void check_call_golden(const char *func, const char *args_hex, const char *kwargs_hex, int has_timeout,
                              double timeout, const char *golden, uint32_t argc, uint32_t kwargc)
{
    unsigned char args[64], kwargs[64];
    size_t args_len = args_hex ? th_hex(args_hex, args, sizeof args) : 0;
    size_t kwargs_len = kwargs_hex ? th_hex(kwargs_hex, kwargs, sizeof kwargs) : 0;
    patio_writer w;
    patio__call_request cr;
    uint8_t *copy = NULL;
    patio_writer_init(&w, NULL);
    CHECK_EQ_INT(patio__write_call_request(&w, func, strlen(func), args_hex ? args : NULL, args_len,
                                           kwargs_hex ? kwargs : NULL, kwargs_len, has_timeout, timeout),
                 PATIO_OK);
    CHECK_WRITER_HEX(&w, golden);

    copy = copy_alloc(w.data, w.len);
    CHECK_EQ_INT(patio__decode_call_request(copy, w.len, 0, 1, &cr), PATIO_OK);
    CHECK_EQ_MEM(cr.func, cr.func_len, func, strlen(func));
    CHECK_EQ_INT(cr.argc, argc);
    CHECK_EQ_INT(cr.kwargc, kwargc);
    if (args_hex) CHECK_EQ_MEM(cr.args, cr.args_len, args, args_len);
    else CHECK_HEX(cr.args, cr.args_len, "90");
    if (kwargs_hex) CHECK_EQ_MEM(cr.kwargs, cr.kwargs_len, kwargs, kwargs_len);
    else CHECK_HEX(cr.kwargs, cr.kwargs_len, "80");
    CHECK_EQ_INT(cr.has_timeout, has_timeout);
    if (has_timeout) CHECK(cr.timeout == timeout);
    CHECK_EQ_INT(patio_msgpack_check_all(copy, w.len, 0), PATIO_OK);
    free(copy);
    patio_writer_free(&w);
}

static void test_golden_call_requests(void)
{
    check_call_golden("mul", "93010203", NULL, 0, 0, "c7 0b 01 94 a36d756c 93010203 80 c0", 3, 0);
    check_call_golden("sleep", "91 cb3fe0000000000000", "81 a178 01", 1, 0.1,
                      "c7 1e 01 94 a5736c656570 91 cb3fe0000000000000 81 a178 01 cb3fb999999999999a", 1, 1);
    check_call_golden("kw", "91 01", "81 a161 c0", 0, 0, "c7 0b 01 94 a26b77 91 01 81 a161 c0 c0", 1, 1);
    check_call_golden("abc", NULL, NULL, 0, 0, "d7 01 94 a3616263 90 80 c0", 0, 0);
}

/* The args of the sleep request, built with the writer instead of hex. */
static void test_golden_call_with_written_args(void)
{
    patio_writer args, kwargs, w;
    patio_writer_init(&args, NULL);
    patio_writer_init(&kwargs, NULL);
    patio_writer_init(&w, NULL);
    patio_write_array(&args, 1);
    patio_write_double(&args, 0.5);
    patio_write_map(&kwargs, 1);
    patio_write_str(&kwargs, "x");
    patio_write_int(&kwargs, 1);
    patio__write_call_request(&w, "sleep", 5, args.data, args.len, kwargs.data, kwargs.len, 1, 0.1);
    CHECK_WRITER_HEX(&w, "c7 1e 01 94 a5736c656570 91 cb3fe0000000000000 81 a178 01 cb3fb999999999999a");
    patio_writer_free(&args);
    patio_writer_free(&kwargs);
    patio_writer_free(&w);
}

/* A worker's decoder walks args and kwargs instead of checking them: on
 * valid input it finds the same bytes as the checking one; it lets
 * through what only a check would refuse (an unknown ext type inside the
 * args), which a task's bounds-checked readers then handle. */
static void test_walk_only_call_decoding(void)
{
    patio_writer args, kwargs, w;
    patio__call_request checked, walked;
    patio_writer_init(&args, NULL);
    patio_writer_init(&kwargs, NULL);
    patio_writer_init(&w, NULL);
    patio_pack(&args, "[I[s{sy}]d]", (int64_t)1, "two", "k", "xy", (size_t)2, 3.5);
    patio_pack(&kwargs, "{s[ii]sn}", "a", 1, 2, "b");
    CHECK_EQ_INT(args.err, PATIO_OK);
    CHECK_EQ_INT(kwargs.err, PATIO_OK);
    patio__write_call_request(&w, "f", 1, args.data, args.len, kwargs.data, kwargs.len, 0, 0);
    CHECK_EQ_INT(patio__decode_call_request(w.data, w.len, 0, 1, &checked), PATIO_OK);
    CHECK_EQ_INT(patio__decode_call_request(w.data, w.len, 0, 0, &walked), PATIO_OK);
    CHECK_EQ_MEM(walked.args, walked.args_len, args.data, args.len);
    CHECK_EQ_MEM(walked.kwargs, walked.kwargs_len, kwargs.data, kwargs.len);
    CHECK(walked.args == checked.args && walked.kwargs == checked.kwargs);
    CHECK_EQ_INT((int)walked.argc, 3);
    CHECK_EQ_INT((int)walked.kwargc, 2);
    patio_writer_reset(&w);
    patio__write_call_request(&w, "f", 1, "\x91\xd4\x05\x00", 4, "\x80", 1, 0, 0);
    CHECK_EQ_INT(patio__decode_call_request(w.data, w.len, 0, 1, &checked), PATIO_ERR_DECODE);
    CHECK_EQ_INT(patio__decode_call_request(w.data, w.len, 0, 0, &walked), PATIO_OK);
    patio_writer_free(&args);
    patio_writer_free(&kwargs);
    patio_writer_free(&w);
}

static void check_exception_golden(const char *type, const char *msg, const char *golden)
{
    patio_writer w;
    const char *t = NULL, *m = NULL;
    size_t tl = 99, ml = 99;
    uint8_t *copy = NULL;
    patio_writer_init(&w, NULL);
    CHECK_EQ_INT(patio__write_exception(&w, type, strlen(type), msg, strlen(msg)), PATIO_OK);
    CHECK_WRITER_HEX(&w, golden);
    copy = copy_alloc(w.data, w.len);
    CHECK_EQ_INT(patio__decode_exception(copy, w.len, &t, &tl, &m, &ml), PATIO_OK);
    CHECK_EQ_MEM(t, tl, type, strlen(type));
    CHECK_EQ_MEM(m, ml, msg, strlen(msg));
    CHECK_EQ_INT(patio_msgpack_check_all(copy, w.len, 0), PATIO_OK);
    free(copy);
    patio_writer_free(&w);
}

static void test_golden_exceptions(void)
{
    check_exception_golden("ZeroDivisionError", "division by zero",
                           "c7 24 02 92 b15a65726f4469766973696f6e4572726f72 b06469766973696f6e206279207a65726f");
    check_exception_golden("TimeoutError", "", "c7 0f 02 92 ac54696d656f75744572726f72 a0");
    check_exception_golden("KeyError", "nosuch", "c7 11 02 92 a84b65794572726f72 a66e6f73756368");
    check_exception_golden("E", "", "d6 02 92 a145 a0");
}

/* ---- the annotated session, PROTOCOL.md §10 ------------------------------- */

static void test_frame01_and_02_payloads(void)
{
    size_t n01 = 0, n02 = 0, len = 0;
    uint8_t *p01 = hex_alloc("c4 10 00112233445566778899aabbccddeeff", &n01);
    uint8_t *p02 = hex_alloc("93 c4 04 deadbeef"
                             " c4 20 22c645ccb3f208b4ecc95a50091328c0724eadd1fac300148ccb4e4a74f68448"
                             " c4 12 c41000112233445566778899aabbccddeeff",
                             &n02);
    patio_reader r;
    const void *salt = NULL, *digest = NULL, *token = NULL, *tok01 = NULL;
    uint32_t count = 0;
    size_t sl = 0, dl = 0, tl = 0;
    CHECK_EQ_INT(n02, 61);
    CHECK_EQ_INT(patio_msgpack_check_all(p01, n01, 0), PATIO_OK);
    CHECK_EQ_INT(patio_msgpack_check_all(p02, n02, 0), PATIO_OK);

    patio_reader_init(&r, p01, n01);
    CHECK_EQ_INT(patio_read_bin(&r, &tok01, &len), PATIO_OK);
    CHECK_EQ_INT(len, 16);

    patio_reader_init(&r, p02, n02);
    CHECK_EQ_INT(patio_read_array(&r, &count), PATIO_OK);
    CHECK_EQ_INT(count, 3);
    CHECK_EQ_INT(patio_read_bin(&r, &salt, &sl), PATIO_OK);
    CHECK_EQ_INT(patio_read_bin(&r, &digest, &dl), PATIO_OK);
    CHECK_EQ_INT(patio_read_bin(&r, &token, &tl), PATIO_OK);
    CHECK_HEX(salt, sl, "deadbeef");
    CHECK_HEX(digest, dl, "22c645ccb3f208b4ecc95a50091328c0724eadd1fac300148ccb4e4a74f68448");
    CHECK_EQ_MEM(token, tl, p01, n01); /* the raw payload of #01, not the token */
    CHECK_EQ_INT(patio_reader_remaining(&r), 0);

    /* The same through patio_unpack. */
    patio_reader_init(&r, p02, n02);
    CHECK_EQ_INT(patio_unpack(&r, "[yyy]", &salt, &sl, &digest, &dl, &token, &tl), PATIO_OK);
    CHECK_EQ_INT(tl, 18);
    free(p01);
    free(p02);
}

static void test_frame08_request(void)
{
    size_t n = 0;
    uint8_t *p = hex_alloc("c7 0b 01 94 a3 6d756c 93 01 02 03 80 c0", &n);
    patio__call_request cr;
    patio_reader args;
    int64_t a = 0, b = 0, c = 0;
    CHECK_EQ_INT(n, 0x0e);
    CHECK_EQ_INT(patio__decode_call_request(p, n, 0, 1, &cr), PATIO_OK);
    CHECK_EQ_MEM(cr.func, cr.func_len, "mul", 3);
    CHECK_EQ_INT(cr.argc, 3);
    CHECK_EQ_INT(cr.kwargc, 0);
    CHECK_EQ_INT(cr.has_timeout, 0);
    patio_reader_init(&args, cr.args, cr.args_len);
    CHECK_EQ_INT(patio_unpack(&args, "[III]", &a, &b, &c), PATIO_OK);
    CHECK_EQ_INT(a * b * c, 6);
    free(p);
}

static void test_frame11_error(void)
{
    size_t n = 0;
    uint8_t *p = hex_alloc("c7 24 02 92 b1 5a65726f4469766973696f6e4572726f72 b0 6469766973696f6e206279207a65726f",
                           &n);
    const char *t = NULL, *m = NULL;
    size_t tl = 0, ml = 0;
    CHECK_EQ_INT(n, 0x27);
    CHECK_EQ_INT(patio__decode_exception(p, n, &t, &tl, &m, &ml), PATIO_OK);
    CHECK_EQ_MEM(t, tl, "ZeroDivisionError", 17);
    CHECK_EQ_MEM(m, ml, "division by zero", 16);
    /* an ERROR payload that is not an exception */
    CHECK_EQ_INT(patio__decode_exception((const uint8_t *)"\xc0", 1, &t, &tl, &m, &ml), PATIO_ERR_DECODE);
    free(p);
}

/* ---- smallest forms -------------------------------------------------------- */

typedef struct int_case {
    int64_t value;
    const char *hex;
} int_case;

static void test_int_boundaries(void)
{
    static const int_case cases[] = {
        { 0, "00" },
        { 127, "7f" },
        { 128, "cc 80" },
        { 255, "cc ff" },
        { 256, "cd 0100" },
        { 65535, "cd ffff" },
        { 65536, "ce 00010000" },
        { 4294967295LL, "ce ffffffff" },
        { 4294967296LL, "cf 0000000100000000" },
        { INT64_MAX, "cf 7fffffffffffffff" },
        { -1, "ff" },
        { -32, "e0" },
        { -33, "d0 df" },
        { -128, "d0 80" },
        { -129, "d1 ff7f" },
        { -32768, "d1 8000" },
        { -32769, "d2 ffff7fff" },
        { -2147483647LL - 1, "d2 80000000" },
        { -2147483647LL - 2, "d3 ffffffff7fffffff" },
        { INT64_MIN, "d3 8000000000000000" }
    };
    size_t i = 0;
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        patio_writer w;
        patio_reader r;
        patio_value v = zero_value();
        int64_t back = 0;
        memset(&v, 0, sizeof v);
        patio_writer_init(&w, NULL);
        patio_write_int(&w, cases[i].value);
        CHECK_WRITER_HEX(&w, cases[i].hex);
        patio_reader_init(&r, w.data, w.len);
        CHECK_EQ_INT(patio_peek(&r, &v), PATIO_OK);
        CHECK_EQ_INT(v.type, PATIO_INT);
        CHECK_EQ_INT(patio_read_int(&r, &back), PATIO_OK);
        CHECK(back == cases[i].value);
        CHECK_EQ_INT(patio_reader_remaining(&r), 0);
        if (cases[i].value >= 0) {
            /* write_uint picks the same forms */
            patio_writer_reset(&w);
            patio_write_uint(&w, (uint64_t)cases[i].value);
            CHECK_WRITER_HEX(&w, cases[i].hex);
        }
        patio_writer_free(&w);
    }
}

static void test_uint64_above_int64(void)
{
    patio_writer w;
    patio_reader r;
    patio_value v = zero_value();
    uint64_t u = 0;
    int64_t i = 0;
    double d = 0;
    patio_writer_init(&w, NULL);
    patio_write_uint(&w, UINT64_MAX);
    CHECK_WRITER_HEX(&w, "cf ffffffffffffffff");
    patio_reader_init(&r, w.data, w.len);
    CHECK_EQ_INT(patio_peek(&r, &v), PATIO_OK);
    CHECK_EQ_INT(v.type, PATIO_UINT);
    CHECK(v.v.u == UINT64_MAX);
    CHECK_EQ_INT(patio_read_int(&r, &i), PATIO_ERR_OVERFLOW);
    CHECK_EQ_INT(r.err, PATIO_OK);                   /* not sticky */
    CHECK_EQ_INT(patio_reader_remaining(&r), 9);     /* not consumed */
    CHECK_EQ_INT(patio_read_double(&r, &d), PATIO_OK);
    CHECK(d == 18446744073709551615.0);
    patio_reader_init(&r, w.data, w.len);
    CHECK_EQ_INT(patio_read_uint(&r, &u), PATIO_OK);
    CHECK(u == UINT64_MAX);

    patio_writer_reset(&w);
    patio_write_uint(&w, (uint64_t)INT64_MAX + 1);
    CHECK_WRITER_HEX(&w, "cf 8000000000000000");
    patio_reader_init(&r, w.data, w.len);
    CHECK_EQ_INT(patio_peek(&r, &v), PATIO_OK);
    CHECK_EQ_INT(v.type, PATIO_UINT);
    CHECK(v.v.u == (uint64_t)INT64_MAX + 1);
    CHECK_EQ_INT(patio_read_int(&r, &i), PATIO_ERR_OVERFLOW);
    CHECK_EQ_INT(patio_read_uint(&r, &u), PATIO_OK);
    CHECK(u == (uint64_t)1 << 63);
    patio_writer_free(&w);
}

/* Larger-than-needed forms are valid input too. */
static void test_int_non_smallest_forms_decode(void)
{
    patio_value v = zero_value();
    CHECK_EQ_INT(read_hex_one("d0 05", &v), PATIO_OK);
    CHECK(v.type == PATIO_INT && v.v.i == 5);
    CHECK_EQ_INT(read_hex_one("cd 0001", &v), PATIO_OK);
    CHECK(v.type == PATIO_INT && v.v.i == 1);
    CHECK_EQ_INT(read_hex_one("d3 ffffffffffffffff", &v), PATIO_OK);
    CHECK(v.type == PATIO_INT && v.v.i == -1);
    CHECK_EQ_INT(read_hex_one("d1 fffe", &v), PATIO_OK);
    CHECK(v.type == PATIO_INT && v.v.i == -2);
    CHECK_EQ_INT(read_hex_one("ce 80000000", &v), PATIO_OK);
    CHECK(v.type == PATIO_INT && v.v.i == 2147483648LL);
    CHECK_EQ_INT(read_hex_one("cf 0000000000000007", &v), PATIO_OK);
    CHECK(v.type == PATIO_INT && v.v.i == 7);
}

/* A str of n 'x' bytes written and read back; its header must be `head`. */
static void check_str_len(size_t n, const char *head)
{
    patio_writer w;
    patio_reader r;
    unsigned char want[8];
    size_t hn = th_hex(head, want, sizeof want), len = 0;
    const char *s = NULL;
    char *text = (char *)malloc(n + 1);
    memset(text, 'x', n);
    text[n] = '\0';
    patio_writer_init(&w, NULL);
    CHECK_EQ_INT(patio_write_strn(&w, text, n), PATIO_OK);
    CHECK_EQ_INT(w.len, hn + n);
    CHECK_EQ_MEM(w.data, hn, want, hn);
    patio_reader_init(&r, w.data, w.len);
    CHECK_EQ_INT(patio_read_str(&r, &s, &len), PATIO_OK);
    CHECK_EQ_INT(len, n);
    CHECK(s == (const char *)w.data + hn);
    /* and through patio_write_str */
    patio_writer_reset(&w);
    patio_write_str(&w, text);
    CHECK_EQ_INT(w.len, hn + n);
    CHECK_EQ_MEM(w.data, hn, want, hn);
    patio_writer_free(&w);
    free(text);
}

static void test_str_length_boundaries(void)
{
    check_str_len(0, "a0");
    check_str_len(31, "bf");
    check_str_len(32, "d9 20");
    check_str_len(255, "d9 ff");
    check_str_len(256, "da 0100");
    check_str_len(65535, "da ffff");
    check_str_len(65536, "db 00010000");
}

static void check_bin_len(size_t n, const char *head)
{
    patio_writer w;
    patio_reader r;
    unsigned char want[8];
    size_t hn = th_hex(head, want, sizeof want), len = 0;
    const void *p = NULL;
    uint8_t *body = (uint8_t *)calloc(1, n + 1);
    patio_writer_init(&w, NULL);
    CHECK_EQ_INT(patio_write_bin(&w, body, n), PATIO_OK);
    CHECK_EQ_INT(w.len, hn + n);
    CHECK_EQ_MEM(w.data, hn, want, hn);
    patio_reader_init(&r, w.data, w.len);
    CHECK_EQ_INT(patio_read_bin(&r, &p, &len), PATIO_OK);
    CHECK_EQ_INT(len, n);
    patio_writer_free(&w);
    free(body);
}

static void test_bin_length_boundaries(void)
{
    check_bin_len(0, "c4 00");
    check_bin_len(255, "c4 ff");
    check_bin_len(256, "c5 0100");
    check_bin_len(65535, "c5 ffff");
    check_bin_len(65536, "c6 00010000");
}

static void check_container_head(int map, uint32_t count, const char *hex)
{
    patio_writer w;
    patio_reader r;
    uint32_t back = 0;
    patio_writer_init(&w, NULL);
    if (map) patio_write_map(&w, count);
    else patio_write_array(&w, count);
    CHECK_WRITER_HEX(&w, hex);
    patio_reader_init(&r, w.data, w.len);
    if (map) CHECK_EQ_INT(patio_read_map(&r, &back), PATIO_OK);
    else CHECK_EQ_INT(patio_read_array(&r, &back), PATIO_OK);
    CHECK_EQ_INT(back, count);
    patio_writer_free(&w);
}

static void test_array_map_boundaries(void)
{
    check_container_head(0, 0, "90");
    check_container_head(0, 15, "9f");
    check_container_head(0, 16, "dc 0010");
    check_container_head(0, 65535, "dc ffff");
    check_container_head(0, 65536, "dd 00010000");
    check_container_head(1, 0, "80");
    check_container_head(1, 15, "8f");
    check_container_head(1, 16, "de 0010");
    check_container_head(1, 65535, "de ffff");
    check_container_head(1, 65536, "df 00010000");
}

static void test_floats(void)
{
    patio_writer w;
    patio_reader r;
    patio_value v = zero_value();
    double d = 0;
    int64_t i = 0;
    patio_writer_init(&w, NULL);
    patio_write_double(&w, 1.5);
    patio_write_float(&w, 1.5f);
    patio_write_float(&w, 0.1f);
    patio_write_double(&w, -0.0);
    CHECK_WRITER_HEX(&w, "cb 3ff8000000000000 ca 3fc00000 ca 3dcccccd cb 8000000000000000");
    patio_reader_init(&r, w.data, w.len);
    CHECK_EQ_INT(patio_read(&r, &v), PATIO_OK);
    CHECK(v.type == PATIO_FLOAT && v.v.f == 1.5);
    CHECK_EQ_INT(patio_read_int(&r, &i), PATIO_ERR_TYPE);   /* float is not an int */
    CHECK_EQ_INT(patio_read_double(&r, &d), PATIO_OK);
    CHECK(d == 1.5);
    CHECK_EQ_INT(patio_read_double(&r, &d), PATIO_OK);
    CHECK(d == (double)0.1f);
    CHECK_EQ_INT(patio_read_double(&r, &d), PATIO_OK);
    CHECK(d == 0.0 && signbit(d));
    /* integers read as doubles */
    patio_writer_reset(&w);
    patio_write_int(&w, -7);
    patio_reader_init(&r, w.data, w.len);
    CHECK_EQ_INT(patio_read_double(&r, &d), PATIO_OK);
    CHECK(d == -7.0);
    patio_writer_free(&w);
}

static void check_ext_form(const char *hex, int8_t type, size_t body_len)
{
    size_t n = 0;
    uint8_t *p = hex_alloc(hex, &n);
    patio_reader r;
    patio_value v = zero_value();
    size_t i = 0;
    int pattern_ok = 1;
    patio_reader_init(&r, p, n);
    CHECK_EQ_INT(patio_read(&r, &v), PATIO_OK);
    CHECK_EQ_INT(v.type, PATIO_EXT);
    CHECK_EQ_INT(v.v.ext.type, type);
    CHECK_EQ_INT(v.v.ext.len, body_len);
    CHECK(v.v.ext.ptr == p + n - body_len);
    for (i = 0; i < body_len && i < v.v.ext.len; i++)
        if (v.v.ext.ptr[i] != (uint8_t)(i + 1)) pattern_ok = 0;
    CHECK(pattern_ok);
    CHECK_EQ_INT(patio_reader_remaining(&r), 0);
    free(p);
}

/* Every ext form decodes (bodies 01 02 03 ...). */
static void test_ext_forms_decode(void)
{
    check_ext_form("d4 05 01", 5, 1);
    check_ext_form("d5 05 0102", 5, 2);
    check_ext_form("d6 ff 01020304", -1, 4);
    check_ext_form("d7 05 0102030405060708", 5, 8);
    check_ext_form("d8 80 0102030405060708090a0b0c0d0e0f10", -128, 16);
    check_ext_form("c7 00 05", 5, 0);
    check_ext_form("c7 03 7f 010203", 127, 3);
    check_ext_form("c8 0003 05 010203", 5, 3);
    check_ext_form("c9 00000003 05 010203", 5, 3);
}

/* ---- reader robustness ------------------------------------------------------ */

/* A value using most forms, ext 1 and 2 nested inside. */
static void build_complex_value(patio_writer *w)
{
    static const uint8_t bin3[3] = { 1, 2, 3 };
    patio_writer args, kwargs;
    char long_func[300];
    patio_writer_init(&args, NULL);
    patio_writer_init(&kwargs, NULL);
    patio_pack(&args, "[is]", 1, "x");
    patio_pack(&kwargs, "{si}", "k", 2);
    memset(long_func, 'f', sizeof long_func);

    patio_write_map(w, 8);
    patio_write_str(w, "a");
    patio_pack(w, "[i i i i I I U d n b b]", 1, -1, 300, -300, (int64_t)70000, (int64_t)1 << 40,
               UINT64_MAX, 1.5, 1, 0);
    patio_write_str(w, "s");
    patio_write_str(w, "h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80");
    patio_write_str(w, "b");
    patio_write_bin(w, bin3, 3);
    patio_write_str(w, "n");
    patio_pack(w, "{s[[]{}]}", "x");
    patio_write_str(w, "c");
    patio__write_call_request(w, "mul", 3, args.data, args.len, kwargs.data, kwargs.len, 1, 2.5);
    patio_write_str(w, "e");
    patio__write_exception(w, "KeyError", 8, "nosuch", 6);
    patio_write_int(w, 42); /* a key that is not a str */
    patio__write_call_request(w, long_func, sizeof long_func, NULL, 0, NULL, 0, 0, 0); /* ext16 form */
    patio_write_nil(w);
    patio_write_float(w, 2.25f);
    patio_writer_free(&args);
    patio_writer_free(&kwargs);
}

/* Every proper prefix of a valid object is an error for each decoder, and
 * none reads past it (each prefix is its own exact-size heap block). */
static void test_truncation_every_prefix(void)
{
    patio_writer w;
    size_t n = 0, i = 0;
    int wrong = 0;
    patio_writer_init(&w, NULL);
    build_complex_value(&w);
    CHECK_EQ_INT(w.err, PATIO_OK);
    CHECK_EQ_INT(patio_msgpack_check_all(w.data, w.len, 0), PATIO_OK);
    n = w.len;
    CHECK(n > 400);
    for (i = 0; i < n; i++) {
        uint8_t *p = copy_alloc(w.data, i);
        patio_reader r;
        size_t used = 1;
        const void *raw = NULL;
        size_t raw_len = 0;
        if (patio_msgpack_check(p, i, 0, &used) != PATIO_ERR_DECODE || used != 0) wrong++;
        patio_reader_init(&r, p, i);
        if (patio_read_skip(&r) != PATIO_ERR_DECODE) wrong++;
        patio_reader_init(&r, p, i);
        if (patio_read_raw(&r, &raw, &raw_len) != PATIO_ERR_DECODE) wrong++;
        patio_reader_init(&r, p, i);
        if (patio_unpack(&r, "*") != PATIO_ERR_DECODE) wrong++;
        free(p);
    }
    CHECK_EQ_INT(wrong, 0);
    patio_writer_free(&w);
}

static void test_truncated_call_and_exception(void)
{
    patio_writer w;
    size_t i = 0;
    int wrong = 0;
    patio_writer_init(&w, NULL);
    patio__write_call_request(&w, "sleep", 5, "\x91\xcb\x3f\xe0\0\0\0\0\0\0", 10, "\x81\xa1x\x01", 4, 1, 0.1);
    for (i = 0; i < w.len; i++) {
        uint8_t *p = copy_alloc(w.data, i);
        patio__call_request cr;
        if (patio__decode_call_request(p, i, 0, 1, &cr) != PATIO_ERR_DECODE) wrong++;
        if (patio__decode_call_request(p, i, 0, 0, &cr) != PATIO_ERR_DECODE) wrong++; /* walked only */
        free(p);
    }
    patio_writer_reset(&w);
    patio__write_exception(&w, "ValueError", 10, "bad", 3);
    for (i = 0; i < w.len; i++) {
        uint8_t *p = copy_alloc(w.data, i);
        const char *t = NULL, *m = NULL;
        size_t tl = 0, ml = 0;
        if (patio__decode_exception(p, i, &t, &tl, &m, &ml) != PATIO_ERR_DECODE) wrong++;
        free(p);
    }
    CHECK_EQ_INT(wrong, 0);
    patio_writer_free(&w);
}

static void test_reserved_c1(void)
{
    size_t n = 0;
    uint8_t *p = hex_alloc("c1", &n);
    patio_reader r;
    patio_value v = zero_value();
    patio_reader_init(&r, p, n);
    CHECK_EQ_INT(patio_read(&r, &v), PATIO_ERR_DECODE);
    CHECK_EQ_INT(r.err, PATIO_ERR_DECODE);
    CHECK_EQ_INT(patio_read_nil(&r), PATIO_ERR_DECODE);  /* sticky */
    CHECK_EQ_INT(check_hex("c1"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_hex("92 01 c1"), PATIO_ERR_DECODE);
    free(p);
}

static void test_utf8_direct(void)
{
    static const char *const good[] = {
        "", "plain ascii text, longer than eight bytes", "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80",
        "\xf4\x8f\xbf\xbf", "\xef\xbf\xbf", "\xed\x9f\xbf", "\xee\x80\x80", "\xc2\x80", "\xe0\xa0\x80",
        "\xf0\x90\x80\x80"
    };
    static const char *const bad[] = {
        "\xc0\x80", "\xc1\xbf", "\xe0\x80\x80", "\xe0\x9f\xbf", "\xed\xa0\x80", "\xed\xbf\xbf",
        "\xf0\x80\x80\x80", "\xf0\x8f\xbf\xbf", "\xf4\x90\x80\x80", "\xf5\x80\x80\x80", "\xff", "\x80",
        "\xe2\x82", "\xf0\x9f\x98", "\xc3", "\xc3\x28", "\xe2\x28\xac", "\xf0\x9f\x28\x80"
    };
    char buf[64];
    size_t i = 0, at = 0;
    for (i = 0; i < sizeof good / sizeof good[0]; i++)
        CHECK(patio__utf8_valid((const uint8_t *)good[i], strlen(good[i])));
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK(!patio__utf8_valid((const uint8_t *)bad[i], strlen(bad[i])));
    /* one bad byte at every position of an ASCII run (the 8-byte fast path) */
    for (at = 0; at < 40; at++) {
        memset(buf, 'a', 40);
        buf[at] = (char)0xff;
        CHECK(!patio__utf8_valid((const uint8_t *)buf, 40));
        buf[at] = 'a';
        CHECK(patio__utf8_valid((const uint8_t *)buf, 40));
    }
    /* and in every short string (names: the two-load path), at every position */
    {
        size_t n;
        int misses = 0;
        for (n = 1; n <= 12; n++)
            for (at = 0; at < n; at++) {
                memset(buf, 'a', n);
                buf[at] = (char)0x80;
                misses += patio__utf8_valid((const uint8_t *)buf, n) != 0;
                buf[at] = 'a';
                misses += patio__utf8_valid((const uint8_t *)buf, n) != 1;
            }
        CHECK_EQ_INT(misses, 0);
    }
}

static void test_invalid_utf8_in_str(void)
{
    CHECK_EQ_INT(check_hex("a2 c0 80"), PATIO_ERR_DECODE);         /* overlong '\0' */
    CHECK_EQ_INT(check_hex("a3 e0 80 af"), PATIO_ERR_DECODE);      /* overlong '/' */
    CHECK_EQ_INT(check_hex("a3 ed a0 80"), PATIO_ERR_DECODE);      /* surrogate U+D800 */
    CHECK_EQ_INT(check_hex("a2 e2 82"), PATIO_ERR_DECODE);         /* cut 3-byte sequence */
    CHECK_EQ_INT(check_hex("a4 f4 90 80 80"), PATIO_ERR_DECODE);   /* above U+10FFFF */
    CHECK_EQ_INT(check_hex("d9 01 80"), PATIO_ERR_DECODE);         /* str8, lone continuation */
    CHECK_EQ_INT(check_hex("a3 e2 82 ac"), PATIO_OK);
    /* the reader refuses it too, while bin takes any bytes */
    {
        patio_value v = zero_value();
        CHECK_EQ_INT(read_hex_one("a2 c0 80", &v), PATIO_ERR_DECODE);
        CHECK_EQ_INT(read_hex_one("c4 02 c0 80", &v), PATIO_OK);
    }
}

static void test_map_keys(void)
{
    CHECK_EQ_INT(check_hex("81 91 01 02"), PATIO_ERR_DECODE);  /* array key */
    CHECK_EQ_INT(check_hex("81 80 02"), PATIO_ERR_DECODE);     /* map key */
    CHECK_EQ_INT(check_hex("82 a1 61 01 90 02"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_hex("81 c0 01"), PATIO_OK);             /* nil key */
    CHECK_EQ_INT(check_hex("83 01 01 cb 3ff8000000000000 02 c3 03"), PATIO_OK);
    CHECK_EQ_INT(check_hex("81 a1 61 91 91 01"), PATIO_OK);    /* containers as values */
}

/* n nested one-element arrays around 0x00 (n == 0: just 0x00). */
static uint8_t *nested_arrays(int n, size_t *len)
{
    uint8_t *p = (uint8_t *)malloc((size_t)n + 1);
    memset(p, 0x91, (size_t)n);
    p[n] = 0x00;
    *len = (size_t)n + 1;
    return p;
}

static void test_depth_limit(void)
{
    size_t n = 0;
    uint8_t *ok = nested_arrays(64, &n);
    uint8_t *deep = nested_arrays(65, &n);
    patio_reader r;
    const void *raw = NULL;
    size_t raw_len = 0;

    CHECK_EQ_INT(patio_msgpack_check_all(ok, 65, 0), PATIO_OK);
    CHECK_EQ_INT(patio_msgpack_check_all(deep, 66, 0), PATIO_ERR_DECODE);
    CHECK_EQ_INT(patio_msgpack_check_all(deep, 66, 65), PATIO_OK);
    CHECK_EQ_INT(patio_msgpack_check_all(ok, 65, 63), PATIO_ERR_DECODE);

    patio_reader_init(&r, ok, 65);
    CHECK_EQ_INT(patio_read_skip(&r), PATIO_OK);
    CHECK_EQ_INT(patio_reader_remaining(&r), 0);
    patio_reader_init(&r, deep, 66);
    CHECK_EQ_INT(patio_read_skip(&r), PATIO_ERR_DECODE);
    CHECK_EQ_INT(r.err, PATIO_ERR_DECODE);
    patio_reader_init(&r, deep, 66);
    CHECK_EQ_INT(patio_read_raw(&r, &raw, &raw_len), PATIO_ERR_DECODE);
    patio_reader_init(&r, deep, 66);
    r.max_depth = 100;
    CHECK_EQ_INT(patio_read_raw(&r, &raw, &raw_len), PATIO_OK);
    CHECK_EQ_INT(raw_len, 66);
    /* empty containers count as a level too */
    ok[63] = 0x90;
    CHECK_EQ_INT(patio_msgpack_check_all(ok, 64, 0), PATIO_OK);
    deep[64] = 0x80;
    CHECK_EQ_INT(patio_msgpack_check_all(deep, 65, 0), PATIO_ERR_DECODE);
    free(ok);
    free(deep);
    /* maps count like arrays */
    {
        uint8_t m[2 * 65 + 1];
        int i = 0;
        for (i = 0; i < 65; i++) { m[2 * i] = 0x81; m[2 * i + 1] = 0x00; }
        m[130] = 0x00;
        CHECK_EQ_INT(patio_msgpack_check_all(m + 2, 129, 0), PATIO_OK);
        CHECK_EQ_INT(patio_msgpack_check_all(m, 131, 0), PATIO_ERR_DECODE);
    }
}

/* prefix ++ ext(type, body) ++ suffix, all hex, with the ext header
 * computed by the writer; returns patio_msgpack_check_all of it. */
static int check_wrapped(const char *prefix, int8_t type, const char *body_hex, const char *suffix)
{
    unsigned char body[256], more[64];
    patio_writer w;
    uint8_t *copy = NULL;
    int rc = 0;
    size_t n = th_hex(body_hex, body, sizeof body);
    patio_writer_init(&w, NULL);
    patio_write_raw(&w, more, th_hex(prefix, more, sizeof more));
    patio_write_ext(&w, type, body, n);
    patio_write_raw(&w, more, th_hex(suffix, more, sizeof more));
    copy = copy_alloc(w.data, w.len);
    rc = patio_msgpack_check_all(copy, w.len, 0);
    free(copy);
    patio_writer_free(&w);
    return rc;
}

static int check_ext(int8_t type, const char *body_hex)
{
    return check_wrapped("", type, body_hex, "");
}

/* Decodes ext 1 over body_hex as a REQUEST payload. */
static int decode_call_body(const char *body_hex, patio__call_request *cr)
{
    unsigned char body[256];
    patio_writer w;
    uint8_t *copy = NULL;
    int rc = 0;
    size_t n = th_hex(body_hex, body, sizeof body);
    patio_writer_init(&w, NULL);
    patio_write_ext(&w, 1, body, n);
    copy = copy_alloc(w.data, w.len);
    rc = patio__decode_call_request(copy, w.len, 0, 1, cr);
    free(copy);
    patio_writer_free(&w);
    return rc;
}

static void test_ext_types_checked(void)
{
    patio_value v = zero_value();
    CHECK_EQ_INT(check_hex("d6 ff 00000000"), PATIO_ERR_DECODE);   /* timestamp (-1) */
    CHECK_EQ_INT(read_hex_one("d6 ff 00000000", &v), PATIO_OK);    /* the plain reader does not judge */
    CHECK_EQ_INT(check_ext(-1, "00000000 00000000"), PATIO_ERR_DECODE);
    /* the type decides, not the body: well-shaped bodies under other types */
    CHECK_EQ_INT(check_ext(-1, "92 a145 a0"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_ext(3, "94 a166 90 80 c0"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_ext(2, "94 a166 90 80 c0"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_ext(1, "92 a145 a0"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_ext(3, "92 a145 a0"), PATIO_ERR_DECODE);     /* unknown type */
    CHECK_EQ_INT(check_ext(0, "c0"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_ext(1, "c0"), PATIO_ERR_DECODE);            /* ext 1 body not a CallRequest */
    CHECK_EQ_INT(check_ext(1, ""), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_ext(2, "92 a145 a0"), PATIO_OK);
    CHECK_EQ_INT(check_hex("d6 02 92 a145 a0"), PATIO_OK);
    CHECK_EQ_INT(check_ext(2, "91 a145"), PATIO_ERR_DECODE);       /* [str] only */
    CHECK_EQ_INT(check_ext(2, "93 a145 a0 a0"), PATIO_ERR_DECODE); /* three */
    CHECK_EQ_INT(check_ext(2, "92 a145 01"), PATIO_ERR_DECODE);    /* [str, int] */
    CHECK_EQ_INT(check_ext(2, "92 c0 a0"), PATIO_ERR_DECODE);      /* [nil, str] */
    CHECK_EQ_INT(check_ext(2, "92 a145 a0 c0"), PATIO_ERR_DECODE); /* a byte after the body's object */
    CHECK_EQ_INT(check_ext(2, "92 a145"), PATIO_ERR_DECODE);       /* body cut short */
    CHECK_EQ_INT(check_ext(2, "92 a2c080 a0"), PATIO_ERR_DECODE);  /* bad UTF-8 in the type */
    /* an ext header claiming one byte more than there is */
    CHECK_EQ_INT(check_hex("c7 05 02 92 a1 45 a0"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_hex("c7 04 02 92 a1 45 a0"), PATIO_OK);
}

static void test_call_request_shape(void)
{
    patio__call_request cr;
    CHECK_EQ_INT(check_ext(1, "94 a166 90 80 c0"), PATIO_OK);
    CHECK_EQ_INT(check_hex("c7 06 01 94 a1 66 90 80 c0"), PATIO_OK);
    CHECK_EQ_INT(check_ext(1, "94 a166 90 80 c3"), PATIO_ERR_DECODE);   /* bool timeout */
    CHECK_EQ_INT(check_ext(1, "94 a166 90 80 c2"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_ext(1, "94 a166 90 80 a131"), PATIO_ERR_DECODE); /* str timeout */
    CHECK_EQ_INT(check_ext(1, "94 a166 90 80 90"), PATIO_ERR_DECODE);   /* array timeout */
    CHECK_EQ_INT(check_ext(1, "94 a166 90 80 c40100"), PATIO_ERR_DECODE); /* bin timeout */
    CHECK_EQ_INT(check_ext(1, "94 01 90 80 c0"), PATIO_ERR_DECODE);     /* func not str */
    CHECK_EQ_INT(check_ext(1, "94 c40166 90 80 c0"), PATIO_ERR_DECODE); /* func bin */
    CHECK_EQ_INT(check_ext(1, "94 a166 80 80 c0"), PATIO_ERR_DECODE);   /* args not array */
    CHECK_EQ_INT(check_ext(1, "94 a166 c0 80 c0"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_ext(1, "94 a166 90 90 c0"), PATIO_ERR_DECODE);   /* kwargs not map */
    CHECK_EQ_INT(check_ext(1, "94 a166 90 81 01 02 c0"), PATIO_ERR_DECODE); /* int kwarg key */
    CHECK_EQ_INT(check_ext(1, "94 a166 90 81 a161 02 c0"), PATIO_OK);
    CHECK_EQ_INT(check_ext(1, "94 a166 90 81 a161 c1 c0"), PATIO_ERR_DECODE); /* bad kwarg value */
    CHECK_EQ_INT(check_ext(1, "93 a166 90 80"), PATIO_ERR_DECODE);      /* 3 elements */
    CHECK_EQ_INT(check_ext(1, "95 a166 90 80 c0 c0"), PATIO_ERR_DECODE); /* 5 elements */
    CHECK_EQ_INT(check_ext(1, "94 a166 90 80 c0 c0"), PATIO_ERR_DECODE); /* trailing in body */
    CHECK_EQ_INT(check_ext(1, "94 a166 91 c1 80 c0"), PATIO_ERR_DECODE); /* bad arg */
    CHECK_EQ_INT(check_ext(1, "94 a166 91 a2c080 80 c0"), PATIO_ERR_DECODE); /* bad UTF-8 arg */
    CHECK_EQ_INT(check_ext(1, "94 a166 91 d6ff00000000 80 c0"), PATIO_ERR_DECODE); /* timestamp arg */

    /* int, uint and float32 timeouts are seconds */
    CHECK_EQ_INT(decode_call_body("94 a166 90 80 05", &cr), PATIO_OK);
    CHECK(cr.has_timeout == 1 && cr.timeout == 5.0);
    CHECK_EQ_INT(decode_call_body("94 a166 90 80 cf ffffffffffffffff", &cr), PATIO_OK);
    CHECK(cr.has_timeout == 1 && cr.timeout > 1e19);
    CHECK_EQ_INT(decode_call_body("94 a166 90 80 ca 3fc00000", &cr), PATIO_OK);
    CHECK(cr.has_timeout == 1 && cr.timeout == 1.5);
    CHECK_EQ_INT(decode_call_body("94 a166 90 80 ff", &cr), PATIO_OK);
    CHECK(cr.has_timeout == 1 && cr.timeout == -1.0);
    CHECK_EQ_INT(decode_call_body("94 a166 90 80 c0", &cr), PATIO_OK);
    CHECK_EQ_INT(cr.has_timeout, 0);
    CHECK_EQ_INT(decode_call_body("94 a166 90 80 c3", &cr), PATIO_ERR_DECODE);

    /* trailing bytes after the ext, and payloads that are not ext 1 */
    {
        size_t n = 0;
        uint8_t *p = hex_alloc("c7 06 01 94 a1 66 90 80 c0 c0", &n);
        CHECK_EQ_INT(patio__decode_call_request(p, n, 0, 1, &cr), PATIO_ERR_DECODE);
        CHECK_EQ_INT(patio__decode_call_request(p, n - 1, 0, 1, &cr), PATIO_OK);
        free(p);
    }
    CHECK_EQ_INT(patio__decode_call_request((const uint8_t *)"\x90", 1, 0, 1, &cr), PATIO_ERR_DECODE);
    CHECK_EQ_INT(patio__decode_call_request((const uint8_t *)"\xd6\x02\x92\xa1\x45\xa0", 6, 0, 1, &cr),
                 PATIO_ERR_DECODE);
}

/* A long function name needs the ext16 form; it round-trips. */
static void test_call_request_ext16(void)
{
    char func[300];
    patio_writer w;
    patio__call_request cr;
    memset(func, 'g', sizeof func);
    patio_writer_init(&w, NULL);
    patio__write_call_request(&w, func, sizeof func, NULL, 0, NULL, 0, 1, 2.5);
    CHECK_HEX(w.data, 4, "c8 013b 01");  /* body: 1 + 3 + 300 + 1 + 1 + 9 = 315 */
    CHECK_EQ_INT(patio__decode_call_request(w.data, w.len, 0, 1, &cr), PATIO_OK);
    CHECK_EQ_MEM(cr.func, cr.func_len, func, sizeof func);
    CHECK(cr.has_timeout && cr.timeout == 2.5);
    patio_writer_free(&w);
}

/* A CallRequest is an ext 1 whose head takes the smallest form for its
 * body (fixext for 8 and 16 bytes, ext 8 up to 255, ext 16 above): built
 * here from its parts with the general writers, it must come out the same
 * from the request encoder, for names and arguments of every size around
 * those limits, with and without kwargs and a timeout. */
static void test_call_request_sizes_agree(void)
{
    char func[40];
    uint8_t args[200], kwargs[3][70];
    size_t kwargs_len[3] = { 1, 3, 64 }, flen, alen, k;
    int bad = 0, t;
    memset(func, 'f', sizeof func);
    memset(kwargs, 0, sizeof kwargs);
    kwargs[0][0] = 0x80;                   /* {} */
    kwargs[1][0] = 0xde;                   /* {} as a map 16 */
    kwargs[2][0] = 0x81;                   /* {"kkk...": 0}, 64 bytes */
    kwargs[2][1] = 0xd9;
    kwargs[2][2] = 60;
    memset(kwargs[2] + 3, 'k', 60);
    for (flen = 0; flen <= 33; flen++)
        for (alen = 1; alen <= 190; alen++)
            for (k = 0; k < 3; k++)
                for (t = 0; t < 2; t++) {
                    patio_writer body, want, got;
                    /* args: an array of zeros, alen bytes in all */
                    memset(args, 0, sizeof args);
                    if (alen - 1 < 16) {
                        args[0] = (uint8_t)(0x90 | (alen - 1));
                    } else {
                        args[0] = 0xdc;
                        args[2] = (uint8_t)(alen - 3);
                    }
                    patio_writer_init(&body, NULL);
                    patio_write_array(&body, 4);
                    patio_write_strn(&body, func, flen);
                    patio_write_raw(&body, args, alen);
                    patio_write_raw(&body, kwargs[k], kwargs_len[k]);
                    if (t) patio_write_double(&body, 1.5);
                    else patio_write_nil(&body);
                    patio_writer_init(&want, NULL);
                    patio_write_ext(&want, 1, body.data, body.len);
                    patio_writer_init(&got, NULL);
                    patio__write_call_request(&got, func, flen, args, alen, kwargs[k], kwargs_len[k], t, 1.5);
                    if (got.err || want.err || got.len != want.len || memcmp(got.data, want.data, got.len) != 0)
                        bad++;
                    patio_writer_free(&body);
                    patio_writer_free(&want);
                    patio_writer_free(&got);
                }
    CHECK_EQ_INT(bad, 0);
}

/* Decodes [name, rest...] as a REQUEST with the name as a fixstr (the form
 * the byte-by-byte path reads) or as a str 8 (the form only the general
 * path reads). */
static int decode_named(const char *name, const char *rest_hex, int long_name, int max_depth,
                        int check, patio__call_request *cr, uint8_t **bytes)
{
    unsigned char body[300];
    size_t n = 0, len = strlen(name);
    patio_writer w;
    uint8_t *copy;
    int rc;
    body[n++] = 0x94;
    if (long_name) { body[n++] = 0xd9; body[n++] = (unsigned char)len; }
    else body[n++] = (unsigned char)(0xa0 | len);
    memcpy(body + n, name, len);
    n += len;
    n += th_hex(rest_hex, body + n, sizeof body - n);
    patio_writer_init(&w, NULL);
    patio_write_ext(&w, 1, body, n);
    copy = copy_alloc(w.data, w.len);
    rc = patio__decode_call_request(copy, w.len, max_depth, check, cr);
    *bytes = copy; /* cr points into them: the caller frees them */
    patio_writer_free(&w);
    return rc;
}

/* The usual request shape is read by a byte-by-byte path; every request,
 * usual or not, valid or not, must decode exactly as when the general
 * path reads it (at every depth limit, checked or only walked). */
static void test_call_request_fast_path_agrees(void)
{
    static const char *const names[] = { "mul", "", "caf\xc3\xa9", "bad\xc3", "x\xed\xa0\x80" };
    static const char *const rests[] = {
        "93 01 02 03 80 c0", "90 80 c0", "93 c0 c2 c3 80 c0", "92 ff e0 80 c0",
        "93 01 02 03 80 cb 3ff8000000000000", "91 01 80 05", "91 01 80 ca 3fc00000",
        "91 d0 05 80 c0", "91 a1 61 80 c0", "91 01 81 a1 61 02 c0", "91 c1 80 c0",
        "91 01 80 c0 c0", "91 01 80 cb 3ff80000", "91 01 80 c3", "92 01 80 c0", "9f 01 80 c0",
        "91 01 90 c0", "91 01 80", "98 01 02 03 04 05 06 07 08 80 c0", "9f 01 80 c0 00 00 00 00 00 00 00 00 00 00 00 00 00",
    };
    size_t i, k, d;
    for (i = 0; i < sizeof names / sizeof *names; i++) {
        char name[16];
        size_t len = 0;
        const char *s = names[i];
        while (*s) { /* the \x escapes above, as bytes */
            if (s[0] == '\\' && s[1] == 'x') {
                unsigned v;
                sscanf(s + 2, "%2x", &v);
                name[len++] = (char)v;
                s += 4;
            } else {
                name[len++] = *s++;
            }
        }
        name[len] = 0;
        for (k = 0; k < sizeof rests / sizeof *rests; k++) {
            for (d = 0; d < 4; d++) {
                static const int depths[4] = { 0, 1, 2, 3 };
                patio__call_request a, b;
                uint8_t *abytes, *bbytes;
                int check = (int)(d & 1), ra, rb;
                memset(&a, 0x5a, sizeof a);
                memset(&b, 0xa5, sizeof b);
                ra = decode_named(name, rests[k], 0, depths[d], check, &a, &abytes);
                rb = decode_named(name, rests[k], 1, depths[d], check, &b, &bbytes);
                if (ra != rb)
                    fprintf(stderr, "    name %zu rest '%s' depth %d check %d: %d vs %d\n", i, rests[k],
                            depths[d], check, ra, rb);
                CHECK_EQ_INT(ra, rb);
                if (ra == PATIO_OK && rb == PATIO_OK) {
                    CHECK_EQ_MEM(a.func, a.func_len, b.func, b.func_len);
                    CHECK_EQ_MEM(a.args, a.args_len, b.args, b.args_len);
                    CHECK_EQ_MEM(a.kwargs, a.kwargs_len, b.kwargs, b.kwargs_len);
                    CHECK_EQ_INT(a.argc, b.argc);
                    CHECK_EQ_INT(a.kwargc, b.kwargc);
                    CHECK_EQ_INT(a.has_timeout, b.has_timeout);
                    CHECK(a.timeout == b.timeout);
                }
                free(abytes);
                free(bbytes);
            }
        }
    }
}

/* Ext 1/2 anywhere inside a value are checked there (args of a request,
 * a map value, an array element). */
static void test_nested_ext_checked(void)
{
    CHECK_EQ_INT(check_wrapped("92 01", 2, "92 a145 a0", ""), PATIO_OK);
    CHECK_EQ_INT(check_wrapped("81 a165", 2, "92 a145 a0", ""), PATIO_OK);
    CHECK_EQ_INT(check_wrapped("91", 1, "94 a166 90 80 c0", ""), PATIO_OK);
    CHECK_EQ_INT(check_wrapped("91", 1, "94 a166 90 80 c3", ""), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_wrapped("81 a165", -1, "00000000", ""), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_wrapped("92", 2, "92 a145 01", "c0"), PATIO_ERR_DECODE);
    /* a request whose args hold an exception, good or bad */
    CHECK_EQ_INT(check_ext(1, "94 a166 91 d6 02 92 a145 a0 80 c0"), PATIO_OK);
    CHECK_EQ_INT(check_ext(1, "94 a166 91 d6 02 92 a145 01 80 c0"), PATIO_ERR_DECODE);
    /* an ext as a map key is not a container: allowed */
    CHECK_EQ_INT(check_wrapped("81", 2, "92 a145 a0", "01"), PATIO_OK);
    /* a request inside the args of a request; the depth counts through ext:
     * outer body 1, outer args 2, inner body 3, inner args 4 */
    {
        patio_writer inner, args, outer;
        patio__call_request cr;
        patio_writer_init(&inner, NULL);
        patio_writer_init(&args, NULL);
        patio_writer_init(&outer, NULL);
        patio__write_call_request(&inner, "g", 1, NULL, 0, NULL, 0, 0, 0);
        patio_write_array(&args, 1);
        patio_write_raw(&args, inner.data, inner.len);
        patio__write_call_request(&outer, "f", 1, args.data, args.len, NULL, 0, 0, 0);
        CHECK_EQ_INT(patio__decode_call_request(outer.data, outer.len, 0, 1, &cr), PATIO_OK);
        CHECK_EQ_INT(cr.argc, 1);
        CHECK_EQ_MEM(cr.args, cr.args_len, args.data, args.len);
        CHECK_EQ_INT(patio__decode_call_request(outer.data, outer.len, 3, 1, &cr), PATIO_ERR_DECODE);
        CHECK_EQ_INT(patio__decode_call_request(outer.data, outer.len, 4, 1, &cr), PATIO_OK);
        CHECK_EQ_INT(patio_msgpack_check_all(outer.data, outer.len, 3), PATIO_ERR_DECODE);
        CHECK_EQ_INT(patio_msgpack_check_all(outer.data, outer.len, 4), PATIO_OK);
        patio_writer_free(&inner);
        patio_writer_free(&args);
        patio_writer_free(&outer);
    }
}

static void test_trailing_bytes(void)
{
    size_t used = 0;
    CHECK_EQ_INT(check_hex("c0 c0"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(patio_msgpack_check("\xc0\xc0", 2, 0, &used), PATIO_OK);
    CHECK_EQ_INT(used, 1);
    CHECK_EQ_INT(patio_msgpack_check("\x92\x01\x02\x03", 4, 0, &used), PATIO_OK);
    CHECK_EQ_INT(used, 3);
    CHECK_EQ_INT(patio_msgpack_check(NULL, 0, 0, &used), PATIO_ERR_DECODE);
    CHECK_EQ_INT(patio_msgpack_check(NULL, 5, 0, &used), PATIO_ERR_INVALID);
}

/* Length fields that claim far more than the input holds. */
static void test_huge_length_claims(void)
{
    patio_reader r;
    size_t n = 0;
    uint8_t *p = NULL;
    CHECK_EQ_INT(check_hex("db ffffffff 61"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_hex("c6 ffffffff 00"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_hex("c9 ffffffff 01 00"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_hex("dd ffffffff 01 02"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_hex("df ffffffff 01 02"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_hex("c5 ffff 00"), PATIO_ERR_DECODE);
    CHECK_EQ_INT(check_hex("d8 01 00"), PATIO_ERR_DECODE);
    /* the header of a 4 G-element array reads fine; its elements do not */
    p = hex_alloc("dd ffffffff 01 02", &n);
    patio_reader_init(&r, p, n);
    {
        uint32_t count = 0;
        CHECK_EQ_INT(patio_read_array(&r, &count), PATIO_OK);
        CHECK(count == 0xffffffffu);
    }
    patio_reader_init(&r, p, n);
    CHECK_EQ_INT(patio_read_skip(&r), PATIO_ERR_DECODE);
    free(p);
}

static void test_reader_empty_and_null(void)
{
    patio_reader r;
    patio_value v = zero_value();
    patio_reader_init(&r, NULL, 0);
    CHECK_EQ_INT(patio_reader_remaining(&r), 0);
    CHECK_EQ_INT(patio_read(&r, &v), PATIO_ERR_DECODE);
    CHECK_EQ_INT(patio_peek(&r, &v), PATIO_ERR_DECODE);
}

static void test_typed_reads_do_not_consume(void)
{
    size_t n = 0;
    uint8_t *p = hex_alloc("a1 78 ff c3 c0 92 01 02", &n);
    patio_reader r;
    int64_t i = 0;
    uint64_t u = 0;
    int b = 0;
    const void *bin = NULL;
    const char *s = NULL;
    size_t len = 0;
    uint32_t count = 0;
    patio_value v = zero_value();
    patio_reader_init(&r, p, n);
    CHECK_EQ_INT(patio_read_int(&r, &i), PATIO_ERR_TYPE);
    CHECK_EQ_INT(patio_read_bin(&r, &bin, &len), PATIO_ERR_TYPE);
    CHECK_EQ_INT(patio_read_nil(&r), PATIO_ERR_TYPE);
    CHECK_EQ_INT(patio_read_array(&r, &count), PATIO_ERR_TYPE);
    CHECK_EQ_INT(r.err, PATIO_OK);
    CHECK_EQ_INT(patio_reader_remaining(&r), n);
    CHECK_EQ_INT(patio_peek(&r, &v), PATIO_OK);
    CHECK_EQ_INT(v.type, PATIO_STR);
    CHECK_EQ_INT(patio_reader_remaining(&r), n);     /* peek does not advance */
    CHECK_EQ_INT(patio_read_str(&r, &s, &len), PATIO_OK);
    CHECK_EQ_MEM(s, len, "x", 1);
    CHECK_EQ_INT(patio_read_uint(&r, &u), PATIO_ERR_TYPE); /* -1 */
    CHECK_EQ_INT(patio_read_int(&r, &i), PATIO_OK);
    CHECK_EQ_INT(i, -1);
    CHECK_EQ_INT(patio_read_int(&r, &i), PATIO_ERR_TYPE);
    CHECK_EQ_INT(patio_read_bool(&r, &b), PATIO_OK);
    CHECK_EQ_INT(b, 1);
    CHECK_EQ_INT(patio_read_bool(&r, &b), PATIO_ERR_TYPE);
    CHECK_EQ_INT(patio_read_nil(&r), PATIO_OK);
    CHECK_EQ_INT(patio_read_map(&r, &count), PATIO_ERR_TYPE);
    CHECK_EQ_INT(patio_read_array(&r, &count), PATIO_OK);
    CHECK_EQ_INT(count, 2);
    CHECK_EQ_INT(patio_read_skip(&r), PATIO_OK);
    CHECK_EQ_INT(patio_read_uint(&r, &u), PATIO_OK);
    CHECK_EQ_INT(u, 2);
    CHECK_EQ_INT(patio_reader_remaining(&r), 0);
    free(p);
}

static void test_read_raw(void)
{
    size_t n = 0;
    uint8_t *p = hex_alloc("92 91 01 a1 78 c3", &n);
    patio_reader r;
    const void *raw = NULL;
    size_t len = 0;
    patio_reader_init(&r, p, n);
    CHECK_EQ_INT(patio_read_raw(&r, &raw, &len), PATIO_OK);
    CHECK(raw == p);
    CHECK_HEX(raw, len, "92 91 01 a1 78");
    CHECK_EQ_INT(patio_read_raw(&r, &raw, &len), PATIO_OK);
    CHECK_HEX(raw, len, "c3");
    free(p);
}

/* ---- writer ---------------------------------------------------------------- */

static void test_fixed_overflow_sticky(void)
{
    uint8_t buf[4];
    patio_writer w;
    patio_writer_init_fixed(&w, buf, sizeof buf);
    CHECK_EQ_INT(patio_write_int(&w, 1), PATIO_OK);
    CHECK_EQ_INT(patio_write_str(&w, "hello"), PATIO_ERR_OVERFLOW);
    CHECK_EQ_INT(w.len, 1);
    CHECK_EQ_INT(patio_write_nil(&w), PATIO_ERR_OVERFLOW);  /* would fit, but the error sticks */
    CHECK_EQ_INT(w.len, 1);
    CHECK_EQ_INT(w.err, PATIO_ERR_OVERFLOW);
    CHECK_EQ_INT(patio_pack(&w, "n"), PATIO_ERR_OVERFLOW);
    patio_writer_reset(&w);
    CHECK_EQ_INT(patio_write_str(&w, "abc"), PATIO_OK);
    CHECK_HEX(w.data, w.len, "a3 616263");
    CHECK(w.data == buf);
    CHECK_EQ_INT(patio_write_nil(&w), PATIO_ERR_OVERFLOW);
    patio_writer_free(&w); /* does not free the caller's buffer */
}

typedef struct counting_alloc {
    int allocs, reallocs, frees, live;
} counting_alloc;

static void *count_alloc(size_t n, void *user)
{
    counting_alloc *c = (counting_alloc *)user;
    c->allocs++;
    c->live++;
    return malloc(n);
}

static void *count_realloc(void *p, size_t n, void *user)
{
    counting_alloc *c = (counting_alloc *)user;
    c->reallocs++;
    return realloc(p, n);
}

static void count_free(void *p, void *user)
{
    counting_alloc *c = (counting_alloc *)user;
    c->frees++;
    c->live--;
    free(p);
}

static void test_growable_uses_hooks(void)
{
    counting_alloc c;
    patio_hooks hooks;
    patio_writer w;
    patio_reader r;
    int i = 0;
    int64_t x = 0;
    memset(&c, 0, sizeof c);
    memset(&hooks, 0, sizeof hooks);
    hooks.alloc = count_alloc;
    hooks.realloc = count_realloc;
    hooks.free = count_free;
    hooks.alloc_user = &c;
    patio_writer_init(&w, &hooks);
    CHECK_EQ_INT(c.allocs, 0);   /* nothing until the first write */
    patio_write_array(&w, 10000);
    for (i = 0; i < 10000; i++) patio_write_int(&w, i * 1000);
    CHECK_EQ_INT(w.err, PATIO_OK);
    CHECK_EQ_INT(c.allocs, 1);
    CHECK(c.reallocs > 0);
    CHECK(c.reallocs < 20);      /* geometric growth */
    patio_reader_init(&r, w.data, w.len);
    CHECK_EQ_INT(patio_read_array(&r, NULL), PATIO_OK);
    for (i = 0; i < 9999; i++) patio_read_skip(&r);
    CHECK_EQ_INT(patio_read_int(&r, &x), PATIO_OK);
    CHECK_EQ_INT(x, 9999000);
    patio_writer_reset(&w);      /* keeps the memory */
    patio_write_nil(&w);
    CHECK_EQ_INT(c.allocs, 1);
    patio_writer_free(&w);
    CHECK_EQ_INT(c.frees, 1);
    CHECK_EQ_INT(c.live, 0);
    patio_writer_free(&w);       /* twice is harmless */
    CHECK_EQ_INT(c.frees, 1);
    {
        patio_writer zero;
        memset(&zero, 0, sizeof zero);
        patio_writer_free(&zero);
        CHECK_EQ_INT(patio_write_int(&zero, 5), PATIO_OK); /* a zeroed writer grows with libc */
        patio_writer_free(&zero);
    }
}

static void test_max_len(void)
{
    patio_writer w;
    static const uint8_t ten[10] = { 0 };
    patio_writer_init(&w, NULL);
    w.max_len = 10;
    CHECK_EQ_INT(patio_write_str(&w, "hello"), PATIO_OK);    /* 6 bytes */
    CHECK_EQ_INT(patio_write_bin(&w, ten, 2), PATIO_OK);     /* 4 more: exactly 10 */
    CHECK_EQ_INT(w.len, 10);
    CHECK_EQ_INT(patio_write_nil(&w), PATIO_ERR_OVERFLOW);
    CHECK_EQ_INT(w.len, 10);
    CHECK(w.cap <= 10);
    patio_writer_reset(&w);
    CHECK_EQ_INT(patio_write_bin(&w, ten, 10), PATIO_ERR_OVERFLOW);
    CHECK_EQ_INT(w.len, 0);
    /* a limit set after the buffer grew larger still holds */
    patio_writer_free(&w);
    patio_writer_init(&w, NULL);
    patio_write_bin(&w, NULL, 0);
    CHECK(w.cap > 4);
    w.max_len = 4;
    CHECK_EQ_INT(patio_write_int(&w, 1000), PATIO_ERR_OVERFLOW);
    CHECK_EQ_INT(w.len, 2);
    patio_writer_free(&w);
}

static void test_huge_sizes_overflow(void)
{
    uint8_t buf[16];
    patio_writer w;
    patio_writer_init_fixed(&w, buf, sizeof buf);
    CHECK_EQ_INT(patio_writer_reserve(&w, SIZE_MAX), PATIO_ERR_OVERFLOW);
#if SIZE_MAX > 0xffffffffu
    patio_writer_reset(&w);
    CHECK_EQ_INT(patio_write_strn(&w, "x", (size_t)UINT32_MAX + 1), PATIO_ERR_OVERFLOW);
    patio_writer_reset(&w);
    CHECK_EQ_INT(patio_write_bin(&w, "x", (size_t)UINT32_MAX + 1), PATIO_ERR_OVERFLOW);
    patio_writer_reset(&w);
    CHECK_EQ_INT(patio_write_ext(&w, 1, "x", (size_t)UINT32_MAX + 1), PATIO_ERR_OVERFLOW);
#endif
    CHECK_EQ_INT(w.len, 0);
}

/* ext_begin/ext_end and write_ext choose the same smallest header. */
static void check_ext_size(size_t n, const char *head)
{
    patio_writer a, b;
    unsigned char want[8];
    size_t hn = th_hex(head, want, sizeof want), i, mark;
    uint8_t *body = (uint8_t *)malloc(n ? n : 1);
    patio_reader r;
    patio_value v = zero_value();
    for (i = 0; i < n; i++) body[i] = (uint8_t)(i * 31 + 1);
    patio_writer_init(&a, NULL);
    patio_writer_init(&b, NULL);
    patio_write_array(&a, 2);           /* something before the mark */
    patio_write_int(&a, 7);
    mark = patio_write_ext_begin(&a);
    CHECK_EQ_INT(mark, 2);
    patio_write_raw(&a, body, n);
    CHECK_EQ_INT(patio_write_ext_end(&a, 7, mark), PATIO_OK);
    CHECK_EQ_INT(a.len, 2 + hn + n);
    CHECK_HEX(a.data, 2, "92 07");
    CHECK_EQ_MEM(a.data + 2, hn, want, hn);
    CHECK_EQ_MEM(a.data + 2 + hn, n, body, n);

    patio_write_ext(&b, 7, body, n);
    CHECK_EQ_MEM(b.data, b.len, a.data + 2, a.len - 2);

    patio_reader_init(&r, a.data, a.len);
    CHECK_EQ_INT(patio_read_skip(&r), PATIO_OK);
    CHECK_EQ_INT(patio_reader_remaining(&r), 0);
    patio_reader_init(&r, a.data + 2, a.len - 2);
    CHECK_EQ_INT(patio_read(&r, &v), PATIO_OK);
    CHECK_EQ_INT(v.type, PATIO_EXT);
    CHECK_EQ_INT(v.v.ext.type, 7);
    CHECK_EQ_MEM(v.v.ext.ptr, v.v.ext.len, body, n);
    patio_writer_free(&a);
    patio_writer_free(&b);
    free(body);
}

static void test_ext_begin_end_sizes(void)
{
    check_ext_size(0, "c7 00 07");
    check_ext_size(1, "d4 07");
    check_ext_size(2, "d5 07");
    check_ext_size(3, "c7 03 07");
    check_ext_size(4, "d6 07");
    check_ext_size(8, "d7 07");
    check_ext_size(16, "d8 07");
    check_ext_size(17, "c7 11 07");
    check_ext_size(255, "c7 ff 07");
    check_ext_size(256, "c8 0100 07");
    check_ext_size(65535, "c8 ffff 07");
    check_ext_size(65536, "c9 00010000 07");
}

/* An exception written in place with ext_begin/end equals the direct one. */
static void test_ext_end_builds_exception(void)
{
    patio_writer w;
    size_t mark = 0;
    patio_writer_init(&w, NULL);
    mark = patio_write_ext_begin(&w);
    patio_pack(&w, "[ss]", "KeyError", "nosuch");
    patio_write_ext_end(&w, 2, mark);
    CHECK_WRITER_HEX(&w, "c7 11 02 92 a84b65794572726f72 a66e6f73756368");
    CHECK_EQ_INT(patio_write_ext_end(&w, 2, w.len + 1), PATIO_ERR_INVALID);
    patio_writer_free(&w);
}

/* ---- pack / unpack ---------------------------------------------------------- */

static void test_pack_every_char(void)
{
    static const uint8_t raw[3] = { 0x92, 0x01, 0x02 };
    patio_writer w;
    patio_writer_init(&w, NULL);
    CHECK_EQ_INT(patio_pack(&w, "n b b i I u U d s s S y v", 1, 0, -5, (int64_t)-70000, 200u,
                            (uint64_t)UINT64_MAX, 0.5, "hi", (const char *)NULL, "abcdef", (size_t)3,
                            "\x01\x02", (size_t)2, raw, sizeof raw),
                 PATIO_OK);
    CHECK_WRITER_HEX(&w, "c0 c3 c2 fb d2fffeee90 ccc8 cfffffffffffffffff cb3fe0000000000000"
                         " a26869 c0 a3616263 c4020102 920102");
    patio_writer_free(&w);
}

static void test_pack_brackets(void)
{
    patio_writer w;
    patio_writer_init(&w, NULL);
    patio_pack(&w, "[is]", 1, "x");
    CHECK_WRITER_HEX(&w, "92 01 a178");
    patio_writer_reset(&w);
    patio_pack(&w, "{si}", "a", 1);
    CHECK_WRITER_HEX(&w, "81 a161 01");
    patio_writer_reset(&w);
    patio_pack(&w, "[[i]{}[]]", 5);
    CHECK_WRITER_HEX(&w, "93 91 05 80 90");
    patio_writer_reset(&w);
    patio_pack(&w, "{ s[i{si}] s{} }", "k", 1, "z", 2, "e");
    CHECK_WRITER_HEX(&w, "82 a16b 92 01 81 a17a 02 a165 80");
    patio_writer_reset(&w);
    patio_pack(&w, "[iiiiiiiiiiiiiiii]", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16);
    CHECK_HEX(w.data, 3, "dc 0010");
    CHECK_EQ_INT(w.len, 19);
    patio_writer_reset(&w);
    CHECK_EQ_INT(patio_pack(&w, ""), PATIO_OK);
    CHECK_EQ_INT(w.len, 0);
    patio_writer_free(&w);
}

static void check_bad_pack_format(const char *fmt)
{
    patio_writer w;
    patio_writer_init(&w, NULL);
    CHECK_EQ_INT(patio_pack(&w, fmt, 1, 2, 3), PATIO_ERR_INVALID);
    CHECK_EQ_INT(w.len, 0);                       /* nothing written */
    CHECK_EQ_INT(patio_write_nil(&w), PATIO_ERR_INVALID); /* sticky */
    patio_writer_free(&w);
}

/* patio__pack_array through a va_list, as a call encodes its arguments. */
static int pack_args(patio_writer *w, const char *fmt, ...)
{
    va_list ap;
    int rc;
    va_start(ap, fmt);
    rc = patio__pack_array(w, fmt, ap);
    va_end(ap);
    return rc;
}

/* A run of ints packs as the same array patio_write_int builds value by
 * value: every width, around each form's edges, in a buffer with room and
 * in fixed buffers too small by any number of bytes (an overflow error,
 * nothing written past the end). */
static void test_pack_int_runs(void)
{
    static const int v[6][4] = {
        { 1, 2, 3, 0 }, { -32, -33, 127, 128 }, { -1, 0, -128, -129 },
        { 255, 256, 65535, 65536 }, { INT_MIN, INT_MAX, -32768, -32769 }, { 0x7fff, 0x8000, -31, 32 },
    };
    size_t i, cap;
    for (i = 0; i < 6; i++) {
        patio_writer want, got;
        int k;
        patio_writer_init(&want, NULL);
        patio_write_array(&want, 4);
        for (k = 0; k < 4; k++) patio_write_int(&want, v[i][k]);
        patio_writer_init(&got, NULL);
        CHECK_EQ_INT(pack_args(&got, "iiii", v[i][0], v[i][1], v[i][2], v[i][3]), PATIO_OK);
        CHECK_EQ_MEM(got.data, got.len, want.data, want.len);
        for (cap = 0; cap < want.len; cap++) {
            uint8_t room[32];
            patio_writer fixed;
            memset(room, 0xee, sizeof room);
            patio_writer_init_fixed(&fixed, room, cap);
            CHECK_EQ_INT(pack_args(&fixed, "iiii", v[i][0], v[i][1], v[i][2], v[i][3]), PATIO_ERR_OVERFLOW);
            CHECK(room[cap] == 0xee);
        }
        patio_writer_free(&want);
        patio_writer_free(&got);
    }
}

static void test_pack_invalid_formats(void)
{
    patio_writer w;
    uint8_t room[16];
    /* a buffer with room: the small ints are stored before the bad letter is seen */
    patio_writer_init_fixed(&w, room, sizeof room);
    CHECK_EQ_INT(patio_pack(&w, "iii x", 1, 2, 3), PATIO_ERR_INVALID);
    CHECK_EQ_INT(w.len, 0);
    /* a bad format is reported as such even when the buffer fills first */
    patio_writer_init_fixed(&w, room, 2);
    CHECK_EQ_INT(patio_pack(&w, "iii x", 1, 2, 3), PATIO_ERR_INVALID);
    CHECK_EQ_INT(w.len, 0);
    check_bad_pack_format("x");
    check_bad_pack_format("i x");
    check_bad_pack_format("[");
    check_bad_pack_format("]");
    check_bad_pack_format("[i}");
    check_bad_pack_format("{i}");
    check_bad_pack_format("{iii}");
    check_bad_pack_format("[{]}");
    check_bad_pack_format("[i]]");
    check_bad_pack_format("*");
    check_bad_pack_format(NULL);
    /* 'v' must be exactly one valid object */
    patio_writer_init(&w, NULL);
    CHECK_EQ_INT(patio_pack(&w, "v", "\x92\x01", (size_t)2), PATIO_ERR_INVALID);
    patio_writer_free(&w);
    patio_writer_init(&w, NULL);
    CHECK_EQ_INT(patio_pack(&w, "v", "\x01\x02", (size_t)2), PATIO_ERR_INVALID);
    patio_writer_free(&w);
}

static void test_unpack_every_char(void)
{
    static const uint8_t raw[3] = { 0x92, 0x01, 0x02 };
    patio_writer w;
    patio_reader r;
    int b1 = -1, b0 = -1, i = 0;
    int64_t I = 0;
    unsigned u = 0;
    uint64_t U = 0;
    double d = 0, d2 = 0;
    const char *s = NULL;
    size_t sl = 0, yl = 0, vl = 0;
    const void *y = NULL, *v = NULL;
    patio_writer_init(&w, NULL);
    patio_pack(&w, "n b b i I u U d s y v i [i s] {s i} d", 1, 0, -5, (int64_t)-70000, 200u, (uint64_t)UINT64_MAX,
               0.5, "hi", "\x01\x02", (size_t)2, raw, sizeof raw, 99, 1, "x", "k", 2, 3.0);
    CHECK_EQ_INT(w.err, PATIO_OK);
    patio_reader_init(&r, w.data, w.len);
    {
        int ai = 0, ki = 0, not_int = 0;
        const char *as = NULL, *ks = NULL;
        size_t asl = 0, ksl = 0;
        CHECK_EQ_INT(patio_unpack(&r, "n b b i I u U d s y v * [i s] {s i} i", &b1, &b0, &i, &I, &u, &U, &d, &s,
                                  &sl, &y, &yl, &v, &vl, &ai, &as, &asl, &ks, &ksl, &ki, &not_int),
                     PATIO_ERR_TYPE); /* the last 'i' meets a float */
        CHECK_EQ_INT(patio_reader_remaining(&r), w.len); /* nothing consumed */
        CHECK_EQ_INT(patio_unpack(&r, "n b b i I u U d s y v * [i s] {s i} d", &b1, &b0, &i, &I, &u, &U, &d, &s,
                                  &sl, &y, &yl, &v, &vl, &ai, &as, &asl, &ks, &ksl, &ki, &d2),
                     PATIO_OK);
        CHECK_EQ_INT(ai, 1);
        CHECK_EQ_MEM(as, asl, "x", 1);
        CHECK_EQ_MEM(ks, ksl, "k", 1);
        CHECK_EQ_INT(ki, 2);
    }
    CHECK_EQ_INT(b1, 1);
    CHECK_EQ_INT(b0, 0);
    CHECK_EQ_INT(i, -5);
    CHECK_EQ_INT(I, -70000);
    CHECK_EQ_INT(u, 200);
    CHECK(U == UINT64_MAX);
    CHECK(d == 0.5);
    CHECK_EQ_MEM(s, sl, "hi", 2);
    CHECK_EQ_MEM(y, yl, "\x01\x02", 2);
    CHECK_EQ_MEM(v, vl, raw, sizeof raw);
    CHECK(d2 == 3.0);
    CHECK_EQ_INT(patio_reader_remaining(&r), 0);
    patio_writer_free(&w);
}

static void test_unpack_mismatch_does_not_consume(void)
{
    size_t n = 0;
    uint8_t *p = hex_alloc("92 01 a1 78 ce 80000000 ff", &n);
    patio_reader r;
    int a = 0, b = 0;
    unsigned u = 0;
    const char *s = NULL;
    size_t sl = 0;
    patio_reader_init(&r, p, n);
    CHECK_EQ_INT(patio_unpack(&r, "[ii]", &a, &b), PATIO_ERR_TYPE);
    CHECK_EQ_INT(patio_reader_remaining(&r), n);
    CHECK_EQ_INT(patio_unpack(&r, "[i]", &a), PATIO_ERR_TYPE);      /* count differs */
    CHECK_EQ_INT(patio_unpack(&r, "[iss]", &a, &s, &sl, &s, &sl), PATIO_ERR_TYPE);
    CHECK_EQ_INT(patio_unpack(&r, "{}", &a), PATIO_ERR_TYPE);
    CHECK_EQ_INT(patio_reader_remaining(&r), n);
    CHECK_EQ_INT(r.err, PATIO_OK);
    CHECK_EQ_INT(patio_unpack(&r, "[is]", &a, &s, &sl), PATIO_OK);
    CHECK_EQ_INT(a, 1);
    /* 2^31 does not fit an int, but fits an unsigned */
    CHECK_EQ_INT(patio_unpack(&r, "i", &a), PATIO_ERR_OVERFLOW);
    CHECK_EQ_INT(patio_reader_remaining(&r), 6);
    CHECK_EQ_INT(patio_unpack(&r, "u", &u), PATIO_OK);
    CHECK(u == 2147483648u);
    CHECK_EQ_INT(patio_unpack(&r, "u", &u), PATIO_ERR_TYPE);          /* -1 */
    CHECK_EQ_INT(patio_unpack(&r, "b", &a), PATIO_ERR_TYPE);
    CHECK_EQ_INT(patio_unpack(&r, "n"), PATIO_ERR_TYPE);
    CHECK_EQ_INT(patio_unpack(&r, "i", &a), PATIO_OK);
    CHECK_EQ_INT(a, -1);
    /* at the end: truncated, and that is sticky */
    CHECK_EQ_INT(patio_unpack(&r, "i", &a), PATIO_ERR_DECODE);
    CHECK_EQ_INT(r.err, PATIO_ERR_DECODE);
    free(p);
}

static void test_unpack_invalid_formats(void)
{
    patio_reader r;
    int a = 0;
    patio_reader_init(&r, "\x01", 1);
    CHECK_EQ_INT(patio_unpack(&r, "S", &a), PATIO_ERR_INVALID);   /* pack-only */
    CHECK_EQ_INT(patio_unpack(&r, "[i", &a), PATIO_ERR_INVALID);
    CHECK_EQ_INT(patio_unpack(&r, "{i}", &a), PATIO_ERR_INVALID);
    CHECK_EQ_INT(patio_unpack(&r, "q", &a), PATIO_ERR_INVALID);
    CHECK_EQ_INT(patio_unpack(&r, NULL), PATIO_ERR_INVALID);
    CHECK_EQ_INT(r.err, PATIO_OK);
    CHECK_EQ_INT(patio_reader_remaining(&r), 1);
    CHECK_EQ_INT(patio_unpack(&r, "*"), PATIO_OK);
}

/* Reads all top-level items with patio_read only (no skip), as a caller
 * walking a stream would. */
static void test_read_walk_items(void)
{
    patio_writer w;
    patio_reader r;
    patio_value v = zero_value();
    int items = 0;
    patio_writer_init(&w, NULL);
    build_complex_value(&w);
    patio_reader_init(&r, w.data, w.len);
    while (patio_reader_remaining(&r) > 0 && patio_read(&r, &v) == PATIO_OK) items++;
    CHECK_EQ_INT(r.err, PATIO_OK);
    CHECK(items > 30);
    patio_writer_free(&w);
}

static void test_type_names(void)
{
    CHECK_EQ_STR(patio_type_name(PATIO_NIL), "nil");
    CHECK_EQ_STR(patio_type_name(PATIO_UINT), "uint");
    CHECK_EQ_STR(patio_type_name(PATIO_EXT), "ext");
}

int main(void)
{
    RUN(test_golden_scalars);
    RUN(test_golden_names);
    RUN(test_golden_token);
    RUN(test_golden_call_requests);
    RUN(test_golden_call_with_written_args);
    RUN(test_walk_only_call_decoding);
    RUN(test_golden_exceptions);
    RUN(test_frame01_and_02_payloads);
    RUN(test_frame08_request);
    RUN(test_frame11_error);
    RUN(test_int_boundaries);
    RUN(test_uint64_above_int64);
    RUN(test_int_non_smallest_forms_decode);
    RUN(test_str_length_boundaries);
    RUN(test_bin_length_boundaries);
    RUN(test_array_map_boundaries);
    RUN(test_floats);
    RUN(test_ext_forms_decode);
    RUN(test_truncation_every_prefix);
    RUN(test_truncated_call_and_exception);
    RUN(test_reserved_c1);
    RUN(test_utf8_direct);
    RUN(test_invalid_utf8_in_str);
    RUN(test_map_keys);
    RUN(test_depth_limit);
    RUN(test_ext_types_checked);
    RUN(test_call_request_shape);
    RUN(test_call_request_ext16);
    RUN(test_call_request_sizes_agree);
    RUN(test_pack_int_runs);
    RUN(test_call_request_fast_path_agrees);
    RUN(test_nested_ext_checked);
    RUN(test_trailing_bytes);
    RUN(test_huge_length_claims);
    RUN(test_reader_empty_and_null);
    RUN(test_typed_reads_do_not_consume);
    RUN(test_read_raw);
    RUN(test_fixed_overflow_sticky);
    RUN(test_growable_uses_hooks);
    RUN(test_max_len);
    RUN(test_huge_sizes_overflow);
    RUN(test_ext_begin_end_sizes);
    RUN(test_ext_end_builds_exception);
    RUN(test_pack_every_char);
    RUN(test_pack_brackets);
    RUN(test_pack_invalid_formats);
    RUN(test_unpack_every_char);
    RUN(test_unpack_mismatch_does_not_consume);
    RUN(test_unpack_invalid_formats);
    RUN(test_read_walk_items);
    RUN(test_type_names);
    return th_summary("test_msgpack");
}
