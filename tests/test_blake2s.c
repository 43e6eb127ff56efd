/* tests/test_blake2s.c - BLAKE2s (RFC 7693, PROTOCOL.md §6.1/§6.4), base64
 * (RFC 4648) and the constant-time compare. */
#define PATIO_IMPLEMENTATION
#include "patio.h"
#include "harness.h"

#include <stdlib.h>

static void check_digest(const uint8_t *got, size_t n, const char *hex)
{
    unsigned char want[64];
    size_t wn = th_hex(hex, want, sizeof want);
    CHECK_EQ_MEM(got, n, want, wn);
}

/* One PROTOCOL.md §6.1 row: key, 4-byte salt, data, digest (hex). */
static void check_handshake_vector(const void *key, size_t keylen, const char *salt4_hex, const void *data,
                                   size_t len, const char *digest_hex)
{
    uint8_t salt[8] = { 0 }, out[32];
    th_hex(salt4_hex, salt, 4);
    patio__blake2s(out, 32, key, keylen, salt, NULL, data, len);
    check_digest(out, 32, digest_hex);
}

static void test_rfc7693_abc(void)
{
    uint8_t out[32];
    patio__blake2s(out, 32, NULL, 0, NULL, NULL, "abc", 3);
    check_digest(out, 32, "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982");
}

/* RFC 7693 Appendix E: a deterministic input sequence. */
static void selftest_sequence(uint8_t *out, size_t len, uint32_t seed)
{
    uint32_t a = 0xDEAD4BADu * seed, b = 1, t;
    size_t i;
    for (i = 0; i < len; i++) {
        t = a + b;
        a = b;
        b = t;
        out[i] = (uint8_t)(t >> 24);
    }
}

/* RFC 7693 Appendix E self-test: digests of many lengths, keyed and
 * unkeyed, hashed together; covers output lengths 16..32 and block edges. */
static void test_rfc7693_selftest(void)
{
    static const size_t outlens[4] = { 16, 20, 28, 32 };
    static const size_t inlens[6] = { 0, 3, 64, 65, 255, 1024 };
    patio__blake2s_state all;
    uint8_t in[1024], key[32], md[32], result[32];
    size_t i, j;
    patio__blake2s_init(&all, 32, NULL, 0, NULL, NULL);
    for (i = 0; i < 4; i++) {
        size_t outlen = outlens[i];
        for (j = 0; j < 6; j++) {
            size_t inlen = inlens[j];
            selftest_sequence(in, inlen, (uint32_t)inlen);
            patio__blake2s(md, outlen, NULL, 0, NULL, NULL, in, inlen);
            patio__blake2s_update(&all, md, outlen);
            selftest_sequence(key, outlen, (uint32_t)outlen);
            patio__blake2s(md, outlen, key, outlen, NULL, NULL, in, inlen);
            patio__blake2s_update(&all, md, outlen);
        }
    }
    patio__blake2s_final(&all, result);
    check_digest(result, 32, "6a411f08ce25adcdfb02aba641451cec53c598b24f4fc787fbdc88797f4c1dfe");
}

static void test_protocol_digest_vectors(void)
{
    static const uint8_t p01[18] = { 0xc4, 0x10, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66,
                                     0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff };
    uint8_t key32[32], data100[100];
    int i;
    for (i = 0; i < 32; i++) key32[i] = (uint8_t)i;
    for (i = 0; i < 100; i++) data100[i] = (uint8_t)i;
    check_handshake_vector("secret-key", 10, "deadbeef", p01, sizeof p01,
                           "22c645ccb3f208b4ecc95a50091328c0724eadd1fac300148ccb4e4a74f68448");
    check_handshake_vector(NULL, 0, "deadbeef", p01, sizeof p01,
                           "18d0c4a9b6d9df006ed89055fdc89578c571c89c14801061f33e950eab6265eb");
    check_handshake_vector(key32, 32, "01020304", NULL, 0,
                           "3bc2c8760b1159536adbdac58f3b7d5af9dc59abd8fdd32663ab49a2ae278df1");
    check_handshake_vector("k", 1, "00000000", data100, sizeof data100,
                           "7165d196c9b27d426ef7a9ee375f78b569df99ca0ead1e829fe1ca514fd3d14f");
}

/* §6.4: the server proof over frame #02's 61-byte AUTH_REQUEST payload. */
static void test_protocol_proof_vector(void)
{
    unsigned char areq[128];
    uint8_t salt[8] = { 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0 }, out[32];
    size_t n = th_hex("93 c4 04 deadbeef"
                      " c4 20 22c645ccb3f208b4ecc95a50091328c0724eadd1fac300148ccb4e4a74f68448"
                      " c4 12 c41000112233445566778899aabbccddeeff",
                      areq, sizeof areq);
    CHECK_EQ_INT(n, 61);
    patio__blake2s(out, 32, "secret-key", 10, salt, (const uint8_t *)"patio-ok", areq, n);
    check_digest(out, 32, "93b1f39a8508f1e39412064f90d5ee4d72e3d00a561106760a5609ad0d2885b8");
}

/* Salt and personalization both set, short output (computed with Python's
 * hashlib.blake2s(..., digest_size=20, key=, salt=, person=)). */
static void test_salt_person_short_output(void)
{
    char data[111];
    uint8_t out[20];
    int i;
    for (i = 0; i < 10; i++) memcpy(data + 11 * i, "hello world", 11);
    patio__blake2s(out, 20, "0123456789abcdef0123456789abcdef", 32, (const uint8_t *)"saltsalt",
                   (const uint8_t *)"personal", data, 110);
    check_digest(out, 20, "acb5cc2694734829516454c45c4eac7d9d6661e6");
}

/* Feeding the data in pieces gives the one-shot digest, for every split. */
static void test_streaming_equals_one_shot(void)
{
    uint8_t data[300], whole[32], parts[32];
    size_t len, split;
    int mismatches = 0;
    for (len = 0; len < sizeof data; len++) data[len] = (uint8_t)(len * 7 + 3);
    for (len = 0; len <= 200; len += 13) {
        patio__blake2s(whole, 32, "key", 3, NULL, NULL, data, len);
        for (split = 0; split <= len; split++) {
            patio__blake2s_state s;
            patio__blake2s_init(&s, 32, "key", 3, NULL, NULL);
            patio__blake2s_update(&s, data, split);
            patio__blake2s_update(&s, data + split, len - split);
            patio__blake2s_final(&s, parts);
            if (memcmp(whole, parts, 32) != 0) mismatches++;
        }
    }
    CHECK_EQ_INT(mismatches, 0);
}

static void check_base64(const char *in, int pad, const char *want)
{
    char out[64];
    size_t n = patio__base64(out, (const uint8_t *)in, strlen(in), pad);
    CHECK_EQ_STR(out, want);
    CHECK_EQ_INT(n, strlen(want));
}

/* RFC 4648 §10 test vectors, padded and unpadded. */
static void test_base64_rfc4648(void)
{
    static const char *const in[7] = { "", "f", "fo", "foo", "foob", "fooba", "foobar" };
    static const char *const padded[7] = { "", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy" };
    static const char *const bare[7] = { "", "Zg", "Zm8", "Zm9v", "Zm9vYg", "Zm9vYmE", "Zm9vYmFy" };
    int i;
    for (i = 0; i < 7; i++) {
        check_base64(in[i], 1, padded[i]);
        check_base64(in[i], 0, bare[i]);
    }
}

/* The standard alphabet's last two digits are '+' and '/'. */
static void test_base64_alphabet_ends(void)
{
    static const uint8_t bytes[3] = { 0xfb, 0xef, 0xff };
    char out[8];
    CHECK_EQ_INT(patio__base64(out, bytes, 3, 1), 4);
    CHECK_EQ_STR(out, "++//");
    CHECK_EQ_INT(patio__base64(out, bytes, 2, 1), 4);
    CHECK_EQ_STR(out, "++8=");
}

/* A 32-byte digest, as strict registry names use: 43 characters unpadded. */
static void test_base64_digest_length(void)
{
    uint8_t digest[32];
    char out[4 * ((32 + 2) / 3) + 1];
    patio__blake2s(digest, 32, NULL, 0, NULL, NULL, "abc", 3);
    CHECK_EQ_INT(patio__base64(out, digest, 32, 0), 43);
    CHECK_EQ_INT(patio__base64(out, digest, 32, 1), 44);
    CHECK_EQ_INT(out[43], '=');
    CHECK_EQ_INT(out[44], '\0');
}

static void test_consttime_equal(void)
{
    uint8_t a[32], b[32];
    int i;
    for (i = 0; i < 32; i++) a[i] = b[i] = (uint8_t)(i * 11);
    CHECK(patio__consttime_equal(a, b, 32));
    CHECK(patio__consttime_equal(a, b, 0));
    b[0] ^= 1;
    CHECK(!patio__consttime_equal(a, b, 32));
    b[0] ^= 1;
    b[31] ^= 0x80;
    CHECK(!patio__consttime_equal(a, b, 32));
    CHECK(patio__consttime_equal(a, b, 31));
}

int main(void)
{
    RUN(test_rfc7693_abc);
    RUN(test_rfc7693_selftest);
    RUN(test_protocol_digest_vectors);
    RUN(test_protocol_proof_vector);
    RUN(test_salt_person_short_output);
    RUN(test_streaming_equals_one_shot);
    RUN(test_base64_rfc4648);
    RUN(test_base64_alphabet_ends);
    RUN(test_base64_digest_length);
    RUN(test_consttime_equal);
    return th_summary("test_blake2s");
}
