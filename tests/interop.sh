#!/usr/bin/env bash
# tests/interop.sh BUILD_DIR
#
# Wire-protocol interoperability: builds the TCP examples with plain cc into
# BUILD_DIR/interop/, then runs tests/interop/test_interop.py, a Python peer
# written from PROTOCOL.md (python3 + Debian's python3-msgpack, nothing
# else), against them: exact handshake bytes, calls both ways, errors, bad
# frames, the C client against a Python server, and the Python serializer
# example (examples/python/patio_msgpack.py).
#
# Ends with one line "interop: N passed, M failed"; exits 1 if anything
# failed. Environment: CC (default cc), INTEROP_TIMEOUT (seconds for the
# Python run, default 100), INTEROP_FILTER (only cases whose name contains it),
# INTEROP_TLS_FLAGS (compiler flags that build the TLS examples with mbedTLS,
# default -lmbedtls -lmbedx509 -lmbedcrypto).

set -u
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

if [ $# -ne 1 ]; then
    echo "usage: tests/interop.sh BUILD_DIR" >&2
    echo "interop: 0 passed, 1 failed"
    exit 1
fi
mkdir -p "$1/interop" || { echo "interop: 0 passed, 1 failed"; exit 1; }
out=$(cd "$1/interop" && pwd)
cc=${CC:-cc}
py_timeout=${INTEROP_TIMEOUT:-100}
tls_flags=${INTEROP_TLS_FLAGS:--lmbedtls -lmbedx509 -lmbedcrypto}

# ---- a Python with msgpack: Debian's first (a pyenv python3 may lack it)
python=
for candidate in /usr/bin/python3 python3; do
    if command -v "$candidate" > /dev/null 2>&1 &&
        "$candidate" -c 'import msgpack' > /dev/null 2>&1; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    echo "interop: python3 with the msgpack module is missing"
    echo "         (Debian: apt-get install -y python3 python3-msgpack)"
    echo "interop: 0 passed, 1 failed"
    exit 1
fi

# ---- build the examples the tests run, in parallel
examples="tcp_server tcp_client tcp_server_caller tcp_client_worker mesh"
build_failed=0
pids=()
for name in $examples; do
    rm -f "$out/$name"
    "$cc" -std=c99 -Wall -Wextra -pthread "$root/examples/$name.c" -o "$out/$name" \
        > "$out/$name.log" 2>&1 &
    pids+=($!)
done
i=0
for name in $examples; do
    if ! wait "${pids[$i]}"; then
        echo "FAIL build $name:"
        sed 's/^/    | /' "$out/$name.log" | head -n 40
        build_failed=$((build_failed + 1))
    fi
    i=$((i + 1))
done

# ---- the TLS examples (mbedTLS) and the test certificates
for name in tls_server tls_client; do
    rm -f "$out/$name"
    # shellcheck disable=SC2086
    if ! "$cc" -std=c99 -Wall -Wextra -pthread "$root/examples/$name.c" -o "$out/$name" \
            $tls_flags > "$out/$name.log" 2>&1; then
        echo "FAIL build $name:"
        sed 's/^/    | /' "$out/$name.log" | head -n 40
        build_failed=$((build_failed + 1))
    fi
done
certs=$out/certs
rm -rf "$certs"
if ! sh "$root/tests/tls/make_certs.sh" "$certs" > "$out/certs.log" 2>&1; then
    echo "FAIL making test certificates:"
    sed 's/^/    | /' "$out/certs.log" | head -n 40
    build_failed=$((build_failed + 1))
fi
export INTEROP_CERTS=$certs

# ---- run the Python side; it stops every process it starts
log=$out/test_interop.out
pid_file=$out/children.pids
: > "$pid_file"
filter=()
[ -n "${INTEROP_FILTER:-}" ] && filter=(--filter "$INTEROP_FILTER")
timeout -k 5 "$py_timeout" "$python" "$here/interop/test_interop.py" --bin "$out" \
    --pid-file "$pid_file" "${filter[@]}" > "$log" 2>&1 < /dev/null
rc=$?
cat "$log"

# If the Python run was killed before it could stop its children, stop the
# ones still alive: only pids it recorded, and only if they still run one of
# the programs built above.
while read -r pid; do
    [ -n "$pid" ] || continue
    exe=$(readlink "/proc/$pid/exe" 2> /dev/null) || continue
    case $exe in
    "$out"/*)
        echo "interop: stopping leftover process $pid ($exe)"
        kill -KILL "$pid" 2> /dev/null
        ;;
    esac
done < "$pid_file"

summary=$(grep -E '^cases: [0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1)
if [ -n "$summary" ]; then
    passed=$(printf '%s\n' "$summary" | sed -E 's/^cases: ([0-9]+) passed.*/\1/')
    failed=$(printf '%s\n' "$summary" | sed -E 's/.* ([0-9]+) failed$/\1/')
    if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
        echo "interop: the Python run exited with status $rc"
        failed=1
    fi
else
    passed=0
    failed=1
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "interop: the Python run timed out after $py_timeout s"
    else
        echo "interop: the Python run ended (status $rc) without a summary"
    fi
fi
failed=$((failed + build_failed))
echo "interop: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
