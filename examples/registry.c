/* Registry usage, as in patio's README: explicit names, auto-generated names
 * (prefixed by the project), strict names, iteration, look-up, lock.
 *
 *   cc -std=c99 -Wall -Wextra -pthread examples/registry.c -o registry
 */
#define PATIO_IMPLEMENTATION
#include "../patio.h"

#include <stdio.h>

static int mul(patio_task *t)
{
    int64_t a, b;
    if (patio_args(t, "II", &a, &b) != PATIO_OK) return PATIO_ERR_TYPE;
    return patio_return_int(t, a * b);
}

static int div_(patio_task *t)
{
    double a, b;
    if (patio_args(t, "dd", &a, &b) != PATIO_OK) return PATIO_ERR_TYPE;
    if (b == 0) return patio_fail(t, "ZeroDivisionError", "division by zero");
    return patio_return_double(t, a / b);
}

static int power(patio_task *t)
{
    int64_t a, b, r = 1;
    if (patio_args(t, "II", &a, &b) != PATIO_OK) return PATIO_ERR_TYPE;
    while (b-- > 0) r *= a;
    return patio_return_int(t, r);
}

static int sub(patio_task *t)
{
    int64_t a, b;
    if (patio_args(t, "II", &a, &b) != PATIO_OK) return PATIO_ERR_TYPE;
    return patio_return_int(t, a - b);
}

int main(void)
{
    patio_registry_config cfg = {0};
    patio_registry_config strict_cfg = {0};
    patio_registry *rpc, *strict;
    const char *name;
    patio_fn fn;
    size_t i;

    cfg.project = "example";
    rpc = patio_registry_new(&cfg);

    PATIO_REGISTER(rpc, mul, NULL);          /* auto-named: "example.mul" */
    patio_register(rpc, "div", div_, NULL);  /* explicit name */
    PATIO_REGISTER(rpc, power, NULL);        /* "example.power" */
    patio_register(rpc, "sub", sub, NULL);

    printf("%zu functions:\n", patio_registry_count(rpc));
    for (i = 0; (name = patio_registry_name_at(rpc, i, &fn, NULL)) != NULL; i++)
        printf("  %s\n", name);
    printf("mul is known as %s\n", patio_registry_name_of(rpc, mul));

    if (patio_register(rpc, "div", div_, NULL) == PATIO_ERR_EXISTS)
        printf("registering \"div\" twice: %s\n", patio_strerror(PATIO_ERR_EXISTS));

    /* strict: the name carries a hash of a signature both sides must share */
    strict_cfg.project = "example";
    strict_cfg.strict = 1;
    strict = patio_registry_new(&strict_cfg);
    PATIO_REGISTER_SIG(strict, mul, "mul(int a, int b) -> int v1", NULL);
    printf("strict name: %s\n", patio_registry_name_at(strict, 0, NULL, NULL));

    patio_registry_lock(rpc);
    printf("after lock, register: %s\n", patio_strerror(patio_register(rpc, "x", sub, NULL)));

    patio_registry_free(strict);
    patio_registry_free(rpc);
    return 0;
}
