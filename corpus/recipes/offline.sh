#!/usr/bin/env bash
# Builds a multi-domain byte corpus (~45 MB) with no network but the Debian package mirror:
#   corpus/recipes/offline.sh OUT.bin
# Domains: KJV bible, GCIDE dictionary (first GCIDE_MAX bytes), FOLDOC computing dictionary,
# Jargon File, English and German fortunes, the Python 3 documentation sources, the Debian
# Reference, and this project's own C/Lua sources and docs.
#
# Packages are fetched with `apt-get download` and unpacked into a cache beside OUT (or used
# in place when already installed) rather than installed: the dictionary packages depend on
# the dictd server, and installing them would start a daemon and needs root. A package that
# cannot be had is skipped with a note; the build goes on as long as some text remains.
#
# Every domain is split 90/10 by lines: the heads go to main/, the tails to tail/, and the
# builder walks main/ before tail/. So the corpus's last 10% - its validation split - holds
# a held-out slice of every domain instead of the tail end of whichever came last.
#
# Environment: REALM (default build/realm), REALM_DEB_CACHE (default OUT's dir/offline-debs),
# GCIDE_MAX (default 16000000 bytes).
set -euo pipefail
export LC_ALL=C

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
if [ $# -eq 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; }; then usage; exit 0; fi
if [ $# -ne 1 ]; then usage >&2; exit 2; fi
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$1
mkdir -p "$(dirname "$OUT")"
OUT_ABS=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")
REALM=${REALM:-$ROOT/build/realm}
case $REALM in /*) ;; *) REALM=$PWD/$REALM ;; esac
CACHE=${REALM_DEB_CACHE:-$(dirname "$OUT_ABS")/offline-debs}
GCIDE_MAX=${GCIDE_MAX:-16000000}

note() { echo "offline.sh: $*" >&2; }

if [ ! -x "$REALM" ]; then
    note "$REALM not built; running make"
    make -C "$ROOT" >&2 || true
fi
[ -x "$REALM" ] || { note "cannot find $REALM (run make first, or set REALM)"; exit 1; }

mkdir -p "$CACHE"
# pkg_dir PKG: prints the root its files live under ("" = installed on this system), fetching
# and unpacking it into the cache the first time. Fails if the mirror does not have it.
pkg_dir() {
    local pkg=$1
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        echo ""; return 0
    fi
    if [ -f "$CACHE/$pkg/.unpacked" ]; then echo "$CACHE/$pkg"; return 0; fi
    command -v apt-get >/dev/null || return 1
    local try
    for try in 1 2; do
        rm -f "$CACHE/${pkg}"_*.deb
        if (cd "$CACHE" && apt-get download -q "$pkg") >"$CACHE/$pkg.log" 2>&1; then break; fi
        # A fresh machine may have no package lists yet: refresh once (needs root), retry.
        # (pkg_dir runs in a subshell, so the once-only mark is a file.)
        if [ "$try" = 1 ] && [ ! -e "$STAGE/apt-updated" ] && [ "$(id -u)" = 0 ]; then
            touch "$STAGE/apt-updated"
            DEBIAN_FRONTEND=noninteractive apt-get update -q >"$CACHE/apt-update.log" 2>&1 || true
            continue
        fi
        return 1
    done
    rm -rf "$CACHE/$pkg"
    dpkg-deb -x "$CACHE/${pkg}"_*.deb "$CACHE/$pkg" || return 1
    rm -f "$CACHE/${pkg}"_*.deb
    touch "$CACHE/$pkg/.unpacked"
    echo "$CACHE/$pkg"
}

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/realm-offline.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/main" "$STAGE/tail"
NDOM=0

# add_domain NAME: text on stdin -> main/NAME.txt (first 90% of lines by bytes) and
# tail/NAME.txt (the rest). Invalid UTF-8 is dropped so the builder never rejects a domain.
add_domain() {
    local name=$1 all="$STAGE/$1.all"
    iconv -c -f UTF-8 -t UTF-8 > "$all" || true
    local n
    n=$(stat -c %s "$all")
    if [ "$n" -lt 1000 ]; then note "$name: no text, skipped"; rm -f "$all"; return 0; fi
    awk -v cut=$((n - n / 10)) -v m="$STAGE/main/$name.txt" -v t="$STAGE/tail/$name.txt" \
        '{ b += length($0) + 1; if (b <= cut) print > m; else print > t }' "$all"
    rm -f "$all"
    NDOM=$((NDOM + 1))
    note "$name: $n bytes"
}

# cat_files FILE...: files joined by a blank line, so one file's end never runs into the next.
cat_files() { local f; for f in "$@"; do cat "$f"; printf '\n\n'; done; }

domain() {   # domain NAME FUNCTION: runs FUNCTION, skipping the domain with a note on failure
    local name=$1 fn=$2
    if ! "$fn" > "$STAGE/$name.raw" 2>"$STAGE/$name.err"; then
        note "$name: unavailable, skipped ($(tail -n 1 "$STAGE/$name.err" 2>/dev/null))"
        rm -f "$STAGE/$name.raw"
        return 0
    fi
    add_domain "$name" < "$STAGE/$name.raw"
    rm -f "$STAGE/$name.raw" "$STAGE/$name.err"
}

bible() {
    local b t
    b=$(pkg_dir bible-kjv) || { echo "package bible-kjv unavailable" >&2; return 1; }
    t=$(pkg_dir bible-kjv-text) || { echo "package bible-kjv-text unavailable" >&2; return 1; }
    "$b/usr/bin/bible" -f -p "$t/usr/lib" "Gen1:1-Rev22:21"
}
gcide() {
    local d
    d=$(pkg_dir dict-gcide) || { echo "package dict-gcide unavailable" >&2; return 1; }
    # Whole lines only: a byte cut could split a UTF-8 character.
    { zcat "$d/usr/share/dictd/gcide.dict.dz" || true; } | head -c "$GCIDE_MAX" | sed '$d'
}
foldoc() {
    local d
    d=$(pkg_dir dict-foldoc) || { echo "package dict-foldoc unavailable" >&2; return 1; }
    zcat "$d/usr/share/dictd/foldoc.dict.dz"
}
jargon() {
    local d
    d=$(pkg_dir jargon-text) || { echo "package jargon-text unavailable" >&2; return 1; }
    zcat "$d/usr/share/doc/jargon-text/jargon.txt.gz"
}
fortunes_en() {
    local a b
    a=$(pkg_dir fortunes-min) || { echo "package fortunes-min unavailable" >&2; return 1; }
    b=$(pkg_dir fortunes) || b=$a
    # Cookie files only: not the .dat indexes, not the .u8 links to the same files.
    find "$a/usr/share/games/fortunes" "$b/usr/share/games/fortunes" -maxdepth 1 -type f \
        ! -name '*.*' | sort -u | { mapfile -t f; cat_files "${f[@]}"; }
}
fortunes_de() {
    local d
    d=$(pkg_dir fortunes-de) || { echo "package fortunes-de unavailable" >&2; return 1; }
    find "$d/usr/share/games/fortunes/de" -maxdepth 1 -type f ! -name '*.*' | sort \
        | { mapfile -t f; cat_files "${f[@]}"; }
}
python_docs() {
    local v d
    # python3-doc only depends on the versioned package that holds the files.
    v=$(apt-cache depends python3-doc 2>/dev/null | sed -n 's/.*Depends: \(python3\.[0-9]*-doc\).*/\1/p' | head -n 1)
    [ -n "$v" ] || { echo "package python3-doc unavailable" >&2; return 1; }
    d=$(pkg_dir "$v") || { echo "package $v unavailable" >&2; return 1; }
    # Only the real directory: python3.X-doc/html is a link to the same files.
    find "$d/usr/share/doc/${v%-doc}/html/_sources" -type f -name '*.txt' | sort \
        | { mapfile -t f; [ ${#f[@]} -gt 0 ] && cat_files "${f[@]}"; }
}
debian_reference() {
    local d
    d=$(pkg_dir debian-reference-en) || { echo "package debian-reference-en unavailable" >&2; return 1; }
    zcat "$d/usr/share/debian-reference/debian-reference.en.txt.gz"
}
project() {
    local p roots=()
    for p in README.md docs runtime gen backends models tests corpus bench; do
        [ -e "$ROOT/$p" ] && roots+=("$p")
    done
    [ ${#roots[@]} -gt 0 ] || { echo "no project sources found" >&2; return 1; }
    (cd "$ROOT" && find "${roots[@]}" -type f \( -name '*.c' -o -name '*.h' -o -name '*.lua' -o -name '*.md' -o -name '*.sh' \) \
        2>/dev/null | sort | { mapfile -t f; cat_files "${f[@]}"; })
}

domain bible-kjv bible
domain gcide gcide
domain foldoc foldoc
domain jargon jargon
domain fortunes-en fortunes_en
domain fortunes-de fortunes_de
domain python-docs python_docs
domain debian-reference debian_reference
domain realm-source project

if [ "$NDOM" = 0 ]; then note "no text could be gathered; nothing to build"; exit 1; fi
note "$NDOM domains staged; building $OUT"
# Relative source paths keep the manifest free of the random staging directory's name.
(cd "$STAGE" && "$REALM" corpus build "$OUT_ABS" main tail)
"$REALM" corpus info "$OUT_ABS"
