/* Registry: Python patio's registry tests, in C, plus strict names. */
#define PATIO_IMPLEMENTATION
#include "patio.h"
#include "harness.h"
#include <stdlib.h>
#include "common.h"

static int noop(patio_task *t) { return patio_return_nil(t); }
static int foo(patio_task *t) { return patio_return_int(t, 1); }
static int bar(patio_task *t) { return patio_return_int(t, 2); }
static int baz(patio_task *t) { return patio_return_int(t, 3); }

static void test_properties(void)
{
    patio_registry_config cfg;
    patio_registry *r;
    memset(&cfg, 0, sizeof cfg);
    cfg.project = "foo";
    cfg.no_auto_naming = 1;
    r = patio_registry_new(&cfg);
    CHECK(r != NULL);
    CHECK_EQ_STR(patio_registry_project(r), "foo");
    CHECK(!patio_registry_strict(r));
    CHECK(!patio_registry_auto_naming(r));
    patio_registry_free(r);

    memset(&cfg, 0, sizeof cfg);
    cfg.project = "bar";
    cfg.strict = 1;
    r = patio_registry_new(&cfg);
    CHECK_EQ_STR(patio_registry_project(r), "bar");
    CHECK(patio_registry_strict(r));
    CHECK(patio_registry_auto_naming(r));
    patio_registry_free(r);

    r = patio_registry_new(NULL);
    CHECK(patio_registry_project(r) == NULL);
    patio_registry_free(r);
}

static void test_as_mapping(void)
{
    patio_registry *r = patio_registry_new(NULL);
    CHECK_EQ_INT(patio_register(r, "foo", noop, NULL), PATIO_OK);
    CHECK(patio_registry_contains(r, "foo"));
    CHECK_EQ_INT(patio_registry_count(r), 1);

    CHECK_EQ_INT(patio_unregister(r, "foo"), PATIO_OK);
    CHECK(!patio_registry_contains(r, "foo"));
    CHECK_EQ_INT(patio_registry_count(r), 0);
    CHECK_EQ_INT(patio_unregister(r, "foo"), PATIO_ERR_NOT_FOUND);

    /* add twice */
    CHECK_EQ_INT(patio_register(r, "foo", noop, NULL), PATIO_OK);
    CHECK_EQ_INT(patio_register(r, "foo", bar, NULL), PATIO_ERR_EXISTS);
    CHECK_EQ_INT(patio_unregister(r, "foo"), PATIO_OK);

    /* locked */
    CHECK(!patio_registry_is_locked(r));
    CHECK_EQ_INT(patio_registry_lock(r), PATIO_OK);
    CHECK(patio_registry_is_locked(r));
    CHECK_EQ_INT(patio_registry_lock(r), PATIO_OK); /* idempotent */
    CHECK_EQ_INT(patio_register(r, "foo", noop, NULL), PATIO_ERR_LOCKED);
    CHECK_EQ_INT(patio_unregister(r, "foo"), PATIO_ERR_LOCKED);
    CHECK_EQ_INT(patio_registry_count(r), 0);
    patio_registry_free(r);
}

static void test_lookup_and_iteration(void)
{
    patio_registry *r = patio_registry_new(NULL);
    int tag = 7;
    patio_fn fn = NULL;
    void *user = NULL;
    const char *names[] = { "c", "a", "b", "zz", "m" };
    size_t i;
    for (i = 0; i < 5; i++) CHECK_EQ_INT(patio_register(r, names[i], i == 1 ? foo : noop, i == 1 ? &tag : NULL), PATIO_OK);
    CHECK_EQ_INT(patio_registry_get(r, "a", &fn, &user), PATIO_OK);
    CHECK(fn == foo);
    CHECK(user == &tag);
    CHECK_EQ_INT(patio_registry_get(r, "nope", &fn, &user), PATIO_ERR_NOT_FOUND);
    for (i = 0; i < 5; i++) CHECK_EQ_STR(patio_registry_name_at(r, i, NULL, NULL), names[i]);
    CHECK(patio_registry_name_at(r, 5, NULL, NULL) == NULL);
    /* removal keeps the order of the rest */
    CHECK_EQ_INT(patio_unregister(r, "a"), PATIO_OK);
    CHECK_EQ_STR(patio_registry_name_at(r, 0, NULL, NULL), "c");
    CHECK_EQ_STR(patio_registry_name_at(r, 1, NULL, NULL), "b");
    CHECK_EQ_STR(patio_registry_name_at(r, 3, NULL, NULL), "m");
    CHECK(patio_registry_contains(r, "m"));
    CHECK(patio_registry_name_of(r, foo) == NULL);
    patio_registry_free(r);
}

static void test_many_names(void)
{
    patio_registry *r = patio_registry_new(NULL);
    char name[32];
    int i, ok = 1;
    for (i = 0; i < 1000; i++) {
        snprintf(name, sizeof name, "fn%d", i);
        ok &= patio_register(r, name, noop, NULL) == PATIO_OK;
    }
    CHECK(ok);
    CHECK_EQ_INT(patio_registry_count(r), 1000);
    for (i = 0; i < 1000; i += 7) {
        snprintf(name, sizeof name, "fn%d", i);
        ok &= patio_registry_contains(r, name);
    }
    CHECK(ok);
    CHECK(!patio_registry_contains(r, "fn1000"));
    patio_registry_free(r);
}

static void test_auto_naming_enabled(void)
{
    patio_registry_config cfg;
    patio_registry *r;
    const char *auto_name;
    patio_fn a = NULL, b = NULL;
    memset(&cfg, 0, sizeof cfg);
    cfg.project = "test";
    r = patio_registry_new(&cfg);
    CHECK_EQ_INT(patio_registry_get(r, "bar", NULL, NULL), PATIO_ERR_NOT_FOUND);
    CHECK_EQ_INT(PATIO_REGISTER(r, foo, NULL), PATIO_OK);
    auto_name = patio_registry_name_of(r, foo);
    CHECK_EQ_STR(auto_name, "test.foo");
    CHECK(patio_registry_contains(r, auto_name));
    /* resolving by name and by function gives the same function */
    CHECK_EQ_INT(patio_registry_get(r, auto_name, &a, NULL), PATIO_OK);
    CHECK_EQ_INT(patio_registry_get(r, patio_registry_name_of(r, foo), &b, NULL), PATIO_OK);
    CHECK(a == b && a == foo);
    patio_registry_free(r);

    /* without a project the name is the bare function name */
    r = patio_registry_new(NULL);
    CHECK_EQ_INT(PATIO_REGISTER(r, bar, NULL), PATIO_OK);
    CHECK_EQ_STR(patio_registry_name_of(r, bar), "bar");
    patio_registry_free(r);
}

static void test_auto_naming_disabled(void)
{
    patio_registry_config cfg;
    patio_registry *r;
    patio_fn fn = NULL;
    char out[64];
    memset(&cfg, 0, sizeof cfg);
    cfg.project = "test";
    cfg.no_auto_naming = 1;
    r = patio_registry_new(&cfg);
    CHECK_EQ_INT(PATIO_REGISTER(r, foo, NULL), PATIO_ERR_INVALID);
    CHECK_EQ_INT(patio_registry_count(r), 0);
    CHECK_EQ_INT(patio_registry_make_name(r, "foo", NULL, out, sizeof out), PATIO_ERR_INVALID);
    CHECK_EQ_INT(patio_register(r, "spam", bar, NULL), PATIO_OK);
    CHECK_EQ_INT(patio_registry_get(r, "spam", &fn, NULL), PATIO_OK);
    CHECK(fn == bar);
    patio_registry_free(r);
}

static void test_strict_names(void)
{
    patio_registry_config cfg;
    patio_registry *r;
    const char *name_bar, *name_baz;
    char expect[128], b64[64];
    uint8_t digest[32];
    const char *sig = "int bar(void) v1";
    memset(&cfg, 0, sizeof cfg);
    cfg.project = "test";
    cfg.strict = 1;
    r = patio_registry_new(&cfg);
    CHECK_EQ_INT(PATIO_REGISTER_SIG(r, bar, sig, NULL), PATIO_OK);
    CHECK_EQ_INT(PATIO_REGISTER(r, foo, NULL), PATIO_ERR_INVALID); /* strict needs a signature */
    name_bar = patio_registry_name_of(r, bar);
    CHECK(name_bar != NULL);
    /* "test.bar." + unpadded base64 of BLAKE2s-256(signature), as patio names
     * strict functions after a hash of their source */
    patio__blake2s(digest, 32, NULL, 0, NULL, NULL, sig, strlen(sig));
    patio__base64(b64, digest, 32, 0);
    snprintf(expect, sizeof expect, "test.bar.%s", b64);
    CHECK_EQ_STR(name_bar, expect);
    CHECK_EQ_INT(strlen(b64), 43);
    CHECK(strchr(name_bar, '=') == NULL);
    CHECK(patio_registry_name_of(r, baz) == NULL);
    CHECK_EQ_INT(PATIO_REGISTER_SIG(r, baz, "int baz(void) v1", NULL), PATIO_OK);
    name_baz = patio_registry_name_of(r, baz);
    CHECK(strncmp(name_baz, "test.baz.", 9) == 0);
    /* another signature gives another name: callers built from other code miss */
    CHECK_EQ_INT(patio_registry_make_name(r, "bar", "int bar(void) v2", expect, sizeof expect), PATIO_OK);
    CHECK(strcmp(expect, name_bar) != 0);
    CHECK_EQ_INT(patio_registry_make_name(r, "bar", sig, expect, sizeof expect), PATIO_OK);
    CHECK_EQ_STR(expect, name_bar);
    CHECK_EQ_INT(patio_registry_make_name(r, "bar", sig, expect, 10), PATIO_ERR_OVERFLOW);
    patio_registry_free(r);
}

static void test_invalid_arguments(void)
{
    patio_registry *r = patio_registry_new(NULL);
    patio_hooks half;
    patio_registry_config cfg;
    CHECK_EQ_INT(patio_register(r, NULL, noop, NULL), PATIO_ERR_INVALID);
    CHECK_EQ_INT(patio_register(r, "", noop, NULL), PATIO_ERR_INVALID);
    CHECK_EQ_INT(patio_register(r, "x", NULL, NULL), PATIO_ERR_INVALID);
    CHECK_EQ_INT(patio_register(NULL, "x", noop, NULL), PATIO_ERR_INVALID);
    patio_registry_free(r);
    /* allocator hooks are all-or-none */
    memset(&half, 0, sizeof half);
    half.alloc = count_alloc;
    memset(&cfg, 0, sizeof cfg);
    cfg.hooks = &half;
    CHECK(patio_registry_new(&cfg) == NULL);
}

static void test_hooks_release_everything(void)
{
    alloc_count counts = { 0, 0 };
    patio_hooks h = counting_hooks(&counts);
    patio_registry_config cfg;
    patio_registry *r;
    memset(&cfg, 0, sizeof cfg);
    cfg.hooks = &h;
    cfg.project = "p";
    r = patio_registry_new(&cfg);
    PATIO_REGISTER(r, foo, NULL);
    patio_register(r, "x", bar, NULL);
    patio_unregister(r, "x");
    patio_registry_free(r);
    CHECK(counts.allocs > 0);
    CHECK_EQ_INT(counts.allocs, counts.frees);
}

int main(void)
{
    RUN(test_properties);
    RUN(test_as_mapping);
    RUN(test_lookup_and_iteration);
    RUN(test_many_names);
    RUN(test_auto_naming_enabled);
    RUN(test_auto_naming_disabled);
    RUN(test_strict_names);
    RUN(test_invalid_arguments);
    RUN(test_hooks_release_everything);
    return th_summary("test_registry");
}
