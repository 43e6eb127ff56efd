#!/usr/bin/env bash
# tests/check_symbols.sh [BUILD_DIR]
#
# Every symbol the implementation exports must start with "patio_": compiles
# (or takes BUILD_DIR/symbols_tu.o, built by the Makefile with that variant's
# flags) tests/symbols_tu.c and lists its defined global symbols with nm.
# In the C++ variant this also proves the API has C linkage: a mangled name
# (_Z...) fails. Counts as one case: prints "check_symbols: 1 passed, 0 failed"
# or lists the offenders.

set -u
export LC_ALL=C

name=check_symbols
build_dir=${1:-build/default}
root=$(cd "$(dirname "$0")/.." && pwd)

fail() {
    echo "$name: $*" >&2
    echo "$name: 0 passed, 1 failed"
    exit 1
}

command -v nm > /dev/null 2>&1 || fail "nm not found (binutils)"

obj=$build_dir/symbols_tu.o
if [ ! -f "$obj" ]; then
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/patio-sym.XXXXXX") || fail "mktemp failed"
    trap 'rm -rf "$tmp"' EXIT
    obj=$tmp/symbols_tu.o
    ${CC:-cc} -std=c99 -Wall -Wextra -Wpedantic -Werror -O2 -pthread \
        -I"$root" -I"$root/tests" -c "$root/tests/symbols_tu.c" -o "$obj" \
        || fail "tests/symbols_tu.c did not compile"
fi

syms=$(nm -g --defined-only "$obj") || fail "nm failed on $obj"
# Third field is the name ("ADDRESS TYPE NAME").
names=$(printf '%s\n' "$syms" | awk 'NF >= 3 { print $3 }')

total=0
offenders=()
while IFS= read -r sym; do
    [ -n "$sym" ] || continue
    total=$((total + 1))
    # Sanitizers add an ODR indicator next to every exported global; it
    # carries the global's own name, which is what is checked.
    base=$sym
    case $base in
        __odr_asan_gen_*) base=${base#__odr_asan_gen_} ;;
        __odr_asan.*) base=${base#__odr_asan.} ;;
    esac
    case $base in
        patio_*) ;;
        *) offenders+=("$sym") ;;
    esac
done <<< "$names"

if [ "$total" -eq 0 ]; then
    fail "$obj exports no symbols at all: is PATIO_IMPLEMENTATION honoured?"
fi

if [ "${#offenders[@]}" -gt 0 ]; then
    echo "$name: ${#offenders[@]} of $total exported symbols lack the patio_ prefix:" >&2
    for sym in "${offenders[@]}"; do
        pretty=$sym
        if command -v c++filt > /dev/null 2>&1; then
            pretty=$(printf '%s\n' "$sym" | c++filt)
        fi
        if [ "$pretty" != "$sym" ]; then
            echo "    $sym  ($pretty)" >&2
        else
            echo "    $sym" >&2
        fi
    done
    echo "$name: 0 passed, 1 failed"
    exit 1
fi

echo "ok all $total exported symbols start with patio_"
echo "$name: 1 passed, 0 failed"
