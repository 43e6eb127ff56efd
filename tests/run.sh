#!/usr/bin/env bash
# tests/run.sh BUILD_DIR
#
# Runs every test program BUILD_DIR/test_* and every executable tests/*.sh
# script (given BUILD_DIR as its argument), each under a timeout, and adds up
# the "<name>: N passed, N failed" line each one prints last. A program that
# crashes, times out, exits nonzero after reporting no failures, or prints no
# summary line counts as one more failure, and the reason is shown.
#
# Ends with exactly one line "N passed, N failed"; exits 1 if anything failed.
#
# Environment:
#   TEST_TIMEOUT       seconds per program (default 120)
#   TEST_FILTER        run only programs whose name contains this string
#   TEST_SCRIPTS       when set (even empty): run only these tests/*.sh scripts
#                      (names, separated by spaces) instead of every one
#   TEST_OUTPUT_LINES  how many output lines to show for a failure (default 400)

set -u
export LC_ALL=C

if [ $# -ne 1 ] || [ ! -d "$1" ]; then
    echo "usage: tests/run.sh BUILD_DIR   (a directory holding test_* programs)" >&2
    echo "0 passed, 1 failed"
    exit 1
fi

build_dir=${1%/}
timeout_s=${TEST_TIMEOUT:-120}
filter=${TEST_FILTER:-}
max_lines=${TEST_OUTPUT_LINES:-400}
tests_dir=$(cd "$(dirname "$0")" && pwd)
self=$(basename "$0")

total_passed=0
total_failed=0
programs=0
failures=()

tmp=$(mktemp -d "${TMPDIR:-/tmp}/patio-run.XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT
out=$tmp/output

now_us() {
    if [ -n "${EPOCHREALTIME:-}" ]; then
        local t=${EPOCHREALTIME/./}
        echo "${t#0}"
    else
        echo $((SECONDS * 1000000))
    fi
}

# Describes a nonzero exit status of `timeout CMD` in words.
describe_status() {
    local rc=$1 elapsed_s=$2
    if [ "$rc" -eq 124 ]; then
        echo "timed out after ${timeout_s} s"
    elif [ "$rc" -eq 137 ] && [ "$elapsed_s" -ge "$timeout_s" ]; then
        echo "timed out after ${timeout_s} s (killed)"
    elif [ "$rc" -eq 125 ]; then
        echo "could not be started (timeout failed)"
    elif [ "$rc" -eq 126 ]; then
        echo "could not be executed"
    elif [ "$rc" -eq 127 ]; then
        echo "not found"
    elif [ "$rc" -gt 128 ]; then
        local sig
        sig=$(kill -l $((rc - 128)) 2>/dev/null) || sig=$((rc - 128))
        echo "killed by SIG${sig#SIG}"
    else
        echo "exit status $rc"
    fi
}

# Prints the captured output of a failed program, indented, cut if long.
show_output() {
    local n
    n=$(wc -l < "$out")
    if [ "$n" -eq 0 ] && [ ! -s "$out" ]; then
        echo "    | (no output)"
        return
    fi
    if [ "$n" -gt "$max_lines" ]; then
        echo "    | ... ($((n - max_lines)) earlier lines not shown)"
        tail -n "$max_lines" "$out" | sed 's/^/    | /'
    else
        sed 's/^/    | /' "$out"
    fi
}

# Prints the names of the passing cases ("ok NAME" lines) on a few lines.
show_ok_cases() {
    local names
    names=$(sed -n 's/^ok \(.*\)$/\1/p' "$out" | tr '\n' ' ')
    [ -n "$names" ] || return 0
    printf '%s\n' "$names" | fold -s -w 92 | sed 's/^/      ok: /; s/ *$//'
}

# run_one LABEL COMMAND...
run_one() {
    local label=$1
    shift
    local start end elapsed_us elapsed_s rc summary passed failed reason=
    programs=$((programs + 1))

    start=$(now_us)
    # The braces with 2>/dev/null keep bash's own "Segmentation fault"
    # notice out of the report; the program's output goes to $out.
    { timeout -k 10 "$timeout_s" "$@" > "$out" 2>&1 < /dev/null; } 2> /dev/null
    rc=$?
    end=$(now_us)
    elapsed_us=$((end - start))
    elapsed_s=$((elapsed_us / 1000000))

    summary=$(grep -E '^[^ ]+: [0-9]+ passed, [0-9]+ failed$' "$out" | tail -n 1)
    if [ -n "$summary" ]; then
        passed=$(printf '%s\n' "$summary" | sed -E 's/^.*: ([0-9]+) passed, ([0-9]+) failed$/\1/')
        failed=$(printf '%s\n' "$summary" | sed -E 's/^.*: ([0-9]+) passed, ([0-9]+) failed$/\2/')
        if [ "$rc" -eq 0 ] || { [ "$rc" -lt 124 ] && [ "$failed" -ne 0 ]; }; then
            [ "$failed" -eq 0 ] || reason="$failed case(s) failed"
        elif [ "$failed" -eq 0 ]; then
            failed=1
            reason="$(describe_status "$rc" "$elapsed_s") after reporting no failures"
        else
            reason="$failed case(s) failed, then $(describe_status "$rc" "$elapsed_s")"
        fi
    else
        passed=0
        failed=1
        if [ "$rc" -ne 0 ]; then
            reason="$(describe_status "$rc" "$elapsed_s"), no summary line"
        else
            reason="exited 0 without a summary line"
        fi
    fi

    total_passed=$((total_passed + passed))
    total_failed=$((total_failed + failed))

    local time_str
    time_str=$(printf '%d.%02ds' $((elapsed_us / 1000000)) $(((elapsed_us / 10000) % 100)))
    if [ "$failed" -eq 0 ] && [ "$rc" -eq 0 ]; then
        printf 'PASS %-28s %4d passed            (%s)\n' "$label" "$passed" "$time_str"
        show_ok_cases
    else
        printf 'FAIL %-28s %4d passed, %d failed (%s): %s\n' \
            "$label" "$passed" "$failed" "$time_str" "$reason"
        show_output
        failures+=("$label: $reason")
    fi
}

wanted() {
    [ -z "$filter" ] && return 0
    case $1 in *"$filter"*) return 0 ;; esac
    return 1
}

echo "== running tests in $build_dir (timeout ${timeout_s} s each)"

for bin in "$build_dir"/test_*; do
    [ -f "$bin" ] && [ -x "$bin" ] || continue
    case $bin in *.d | *.o | *.dSYM) continue ;; esac
    name=$(basename "$bin")
    wanted "$name" || continue
    run_one "$name" "$bin"
done

for script in "$tests_dir"/*.sh; do
    [ -f "$script" ] && [ -x "$script" ] || continue
    name=$(basename "$script")
    [ "$name" = "$self" ] && continue
    if [ -n "${TEST_SCRIPTS+set}" ]; then
        case " $TEST_SCRIPTS " in *" $name "*) ;; *) continue ;; esac
    fi
    wanted "$name" || continue
    run_one "$name" bash "$script" "$build_dir"
done

if [ "$programs" -eq 0 ]; then
    echo "FAIL no test programs found in $build_dir"
    failures+=("no test programs in $build_dir")
    total_failed=$((total_failed + 1))
fi

if [ "${#failures[@]}" -gt 0 ]; then
    echo "== failed:"
    for f in "${failures[@]}"; do
        echo "   $f"
    done
fi

echo "$total_passed passed, $total_failed failed"
[ "$total_failed" -eq 0 ]
