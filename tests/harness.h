/* tests/harness.h - a tiny test harness: each binary runs its cases in order
 * and ends with "<binary>: N passed, N failed". tests/run.sh adds them up. */
#ifndef PATIO_TEST_HARNESS_H
#define PATIO_TEST_HARNESS_H

#include <stdio.h>
#include <string.h>
#include <stdint.h>

static int th_passed, th_failed, th_case_failures;
static const char *th_case = "";

static inline void th_fail(const char *file, int line, const char *what)
{
    th_case_failures++;
    fprintf(stderr, "  FAIL %s: %s:%d: %s\n", th_case, file, line, what);
}

#define CHECK(cond) \
    do { if (!(cond)) th_fail(__FILE__, __LINE__, #cond); } while (0)

#define CHECK_EQ_INT(a, b) \
    do { long long th_a = (long long)(a), th_b = (long long)(b); \
         if (th_a != th_b) { char th_m[256]; \
             snprintf(th_m, sizeof th_m, "%s == %s (%lld != %lld)", #a, #b, th_a, th_b); \
             th_fail(__FILE__, __LINE__, th_m); } } while (0)

#define CHECK_EQ_STR(a, b) \
    do { const char *th_a = (a), *th_b = (b); \
         if (!th_a || !th_b || strcmp(th_a, th_b) != 0) { char th_m[512]; \
             snprintf(th_m, sizeof th_m, "%s == %s (\"%s\" != \"%s\")", #a, #b, \
                      th_a ? th_a : "(null)", th_b ? th_b : "(null)"); \
             th_fail(__FILE__, __LINE__, th_m); } } while (0)

#define CHECK_EQ_MEM(a, alen, b, blen) \
    do { size_t th_al = (size_t)(alen), th_bl = (size_t)(blen); \
         if (th_al != th_bl || memcmp((a), (b), th_al) != 0) { \
             th_fail(__FILE__, __LINE__, #a " bytes == " #b " bytes"); \
             th_dump("    got ", (const void *)(a), th_al); \
             th_dump("    want", (const void *)(b), th_bl); } } while (0)

static inline void th_dump(const char *label, const void *p, size_t n)
{
    const unsigned char *b = (const unsigned char *)p;
    size_t i;
    fprintf(stderr, "%s:", label);
    for (i = 0; i < n && i < 96; i++) fprintf(stderr, " %02x", b[i]);
    fprintf(stderr, "%s\n", n > 96 ? " ..." : "");
}

/* Decodes a hex string (spaces allowed) into out; returns the byte count. */
static inline size_t th_hex(const char *hex, unsigned char *out, size_t cap)
{
    size_t n = 0;
    int hi = -1;
    for (; *hex; hex++) {
        int v;
        char c = *hex;
        if (c >= '0' && c <= '9') v = c - '0';
        else if (c >= 'a' && c <= 'f') v = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v = c - 'A' + 10;
        else continue;
        if (hi < 0) hi = v;
        else { if (n < cap) out[n] = (unsigned char)(hi * 16 + v); n++; hi = -1; }
    }
    return n;
}

static inline void th_run(const char *name, void (*fn)(void))
{
    th_case = name;
    th_case_failures = 0;
    fn();
    if (th_case_failures) { th_failed++; fprintf(stderr, "not ok %s\n", name); }
    else { th_passed++; printf("ok %s\n", name); }
    fflush(stdout);
}

#define RUN(fn) th_run(#fn, fn)

static inline int th_summary(const char *binary)
{
    printf("%s: %d passed, %d failed\n", binary, th_passed, th_failed);
    return th_failed ? 1 : 0;
}

#endif
