/* tests/symbols_tu.c - the whole implementation in one translation unit, and
 * nothing else, so tests/check_symbols.sh can list what it exports. */
#define PATIO_IMPLEMENTATION
#include "patio.h"
