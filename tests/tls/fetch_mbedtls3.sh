#!/bin/sh
# tests/tls/fetch_mbedtls3.sh PREFIX
#
# Puts Debian 13's mbedTLS 3.6 (headers, shared and static libraries) under
# PREFIX without installing it: the system's mbedTLS (Debian 12: 2.28) stays
# the default. `make test-tls3` builds the TLS tests and examples against it.
#
# Downloads the four .deb packages with curl (retrying), checks that each
# one is a package dpkg-deb can read, unpacks them with `dpkg-deb -x` into
# PREFIX and adds two links, so that
#
#   PREFIX/include   -> usr/include                  (-isystem PREFIX/include)
#   PREFIX/lib       -> usr/lib/<multiarch>          (-L and -Wl,-rpath)
#
# The packages are kept in PREFIX/debs/; a second run with the same version
# already unpacked does nothing. When the pinned version is gone from the
# mirror, the current 3.x file names are looked up in the trixie package
# index. Prints PREFIX on success; exits nonzero with a message otherwise.
#
# Environment: MBEDTLS3_VERSION (Debian version of the packages, default
# below), MBEDTLS3_MIRROR (default http://deb.debian.org/debian).
set -eu

prefix=${1:-}
if [ -z "$prefix" ] || [ $# -ne 1 ]; then
    echo "usage: tests/tls/fetch_mbedtls3.sh PREFIX" >&2
    exit 2
fi

version=${MBEDTLS3_VERSION:-3.6.6-0.1~deb13u1}
mirror=${MBEDTLS3_MIRROR:-http://deb.debian.org/debian}
packages="libmbedtls-dev libmbedtls21 libmbedx509-7 libmbedcrypto16"

die() {
    echo "fetch_mbedtls3: $*" >&2
    exit 1
}

for tool in curl dpkg-deb; do
    command -v "$tool" > /dev/null 2>&1 || die "$tool is missing (Debian: apt-get install $tool)"
done
arch=$(dpkg --print-architecture 2> /dev/null) || die "cannot tell the Debian architecture (dpkg)"

mkdir -p "$prefix/debs" || die "cannot create $prefix"
prefix=$(cd "$prefix" && pwd)
debs=$prefix/debs
stamp=$prefix/.fetched

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$version $arch" ] &&
    [ -f "$prefix/include/mbedtls/build_info.h" ] && [ -e "$prefix/lib/libmbedtls.so" ]; then
    echo "$prefix"
    exit 0
fi

# fetch URL FILE: curl with retries; FILE only appears when complete.
# Returns curl's status (22: the server answered with an HTTP error).
fetch() {
    rm -f "$2.part"
    status=0
    curl -fsSL --retry 4 --retry-delay 3 --retry-connrefused --connect-timeout 20 \
        --max-time 300 -o "$2.part" "$1" || status=$?
    if [ "$status" -eq 0 ]; then
        mv "$2.part" "$2"
    else
        rm -f "$2.part"
    fi
    return "$status"
}

# fetch_debs PATH...: downloads the packages not yet in $debs. Returns 22
# when one is not on the mirror; stops the script on other failures.
fetch_debs() {
    for path in "$@"; do
        file=$debs/${path##*/}
        [ -f "$file" ] && dpkg-deb --info "$file" > /dev/null 2>&1 && continue
        status=0
        fetch "$mirror/$path" "$file" || status=$?
        [ "$status" -eq 0 ] || [ "$status" -eq 22 ] ||
            die "cannot download $mirror/$path (curl status $status)"
        [ "$status" -eq 0 ] || return 22
    done
}

# The pool path of every package: the pinned version or, when that is no
# longer on the mirror, the 3.x version the distribution's index names.
paths=
for p in $packages; do
    paths="$paths pool/main/m/mbedtls/${p}_${version}_${arch}.deb"
done
# shellcheck disable=SC2086
if ! fetch_debs $paths; then
    echo "fetch_mbedtls3: mbedTLS $version is not on $mirror; looking the packages up in the trixie index" >&2
    index=$debs/Packages
    fetch "$mirror/dists/trixie/main/binary-$arch/Packages.xz" "$index.xz" ||
        die "cannot download the trixie package index from $mirror"
    if command -v xz > /dev/null 2>&1; then
        xz -dc "$index.xz" > "$index" || die "cannot unpack the package index"
    else
        python3 -c 'import lzma, sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())' \
            "$index.xz" > "$index" || die "cannot unpack the package index (no xz, no python3)"
    fi
    paths=
    for p in $packages; do
        path=$(awk -v want="$p" '
            /^Package: / { pkg = $2 }
            /^Version: / { ver = $2 }
            /^Filename: / && pkg == want && ver ~ /^3\./ { print $2; exit }' "$index")
        [ -n "$path" ] || die "no mbedTLS 3.x package $p in the trixie index"
        paths="$paths $path"
    done
    rm -f "$index" "$index.xz"
    # shellcheck disable=SC2086
    fetch_debs $paths || die "the packages the trixie index names are not on $mirror"
fi

# Check and unpack into a fresh tree.
tree=$prefix/.tree.new
rm -rf "$tree"
mkdir -p "$tree"
unpacked=
for path in $paths; do
    file=$debs/${path##*/}
    dpkg-deb --info "$file" > /dev/null 2>&1 || die "$file is not a Debian package"
    dpkg-deb -x "$file" "$tree" || die "cannot unpack $file"
    unpacked="$unpacked ${file##*/}"
done

header=$tree/usr/include/mbedtls/build_info.h
[ -f "$header" ] || die "the packages hold no mbedtls/build_info.h: not mbedTLS 3.x"
found=$(sed -n 's/^#define MBEDTLS_VERSION_STRING *"\(.*\)"$/\1/p' "$header")
case $found in
3.*) ;;
*) die "the packages hold mbedTLS '$found', not 3.x" ;;
esac
libdir=$(find "$tree/usr/lib" -name libmbedtls.so -print | head -n 1)
[ -n "$libdir" ] || die "the packages hold no libmbedtls.so"
libdir=${libdir%/libmbedtls.so}
for lib in libmbedtls libmbedx509 libmbedcrypto; do
    [ -e "$libdir/$lib.so" ] || die "the packages hold no $lib.so"
done

rm -rf "$prefix/usr" "$prefix/include" "$prefix/lib"
mv "$tree/usr" "$prefix/usr"
rm -rf "$tree"
ln -s usr/include "$prefix/include"
ln -s "usr${libdir#"$tree"/usr}" "$prefix/lib"
echo "$version $arch" > "$stamp"
echo "fetch_mbedtls3: mbedTLS $found from$unpacked" >&2
echo "$prefix"
