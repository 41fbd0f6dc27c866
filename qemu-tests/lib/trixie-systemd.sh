#!/usr/bin/env bash
# A private Debian 13 (trixie) root with systemd-cryptsetup and systemd-cryptenroll
# 257 and everything they load (libsystemd-shared, libcryptsetup, tpm2-tss with the
# device and swtpm TCTIs, glibc), run through trixie's own dynamic loader. systemd
# 252 (Debian 12) cannot open a token sealed under the persistent SRK; 257 can.
# Also systemd-measure 257 (48 KB; trixie ships it in the systemd package, of which
# nothing else is taken), the writer of the tpm2-pcr-signature.json files that
# signed TPM2 policies are opened with.
#
# Usage: qemu-tests/lib/trixie-systemd.sh CACHE_DIR
#   CACHE_DIR/root   the extracted packages, pruned to the DT_NEEDED closure of the
#                    programs, the TPM2 token plugin and the dlopen()ed libraries
#   CACHE_DIR/run    wrapper: CACHE_DIR/run systemd-cryptenroll ARGS...
#                                CACHE_DIR/run /usr/bin/systemd-cryptsetup attach ...
#                                CACHE_DIR/run /usr/lib/systemd/systemd-measure sign ...
#   CACHE_DIR/debs   the downloaded .debs; CACHE_DIR/packages.txt what they are
#   CACHE_DIR/stamp  present when all of the above is complete for this script
#
# The host's apt state is never touched: a private apt configuration under
# CACHE_DIR/apt reads trixie's package index and downloads the .debs only; nothing
# is installed. Idempotent: a second run with a complete stamp does nothing.
# The root is relocatable: copy CACHE_DIR/run and CACHE_DIR/root side by side
# anywhere (an initramfs, e.g. /opt/trixie/{run,root}); the wrapper finds the root
# next to itself, or at $TRIXIE_ROOT.
set -euo pipefail

cache=${1:?usage: $0 CACHE_DIR}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
self=$(readlink -f "${BASH_SOURCE[0]}")
recipe=$(sha256sum "$self" | cut -d' ' -f1)

# Serialise concurrent builds of the same cache (parallel test binaries, CI steps).
exec 9>"$cache/.lock"
flock 9

if [ -f "$cache/stamp" ] && [ "$(cat "$cache/stamp")" = "$recipe" ] &&
    [ -x "$cache/run" ] && [ -d "$cache/root" ]; then
    exit 0
fi
rm -f "$cache/stamp"
t0=$(date +%s)
log() { printf 'trixie-systemd: %s\n' "$*" >&2; }

# What systemd 257 needs: the programs, libsystemd-shared, and the libraries it
# dlopen()s for LUKS2 and TPM2 (libcryptsetup.so.12, libtss2-esys/-rc/-mu.so.0 and
# the TCTI it is pointed at: libtss2-tcti-device.so.0 for /dev/tpmrm0,
# libtss2-tcti-swtpm.so.0 for swtpm on TCP). Their library dependencies are added
# by following Depends between library packages below.
seeds=(
    systemd-cryptsetup libsystemd-shared libc6 systemd
    libcryptsetup12
    libtss2-esys-3.0.2-0t64 libtss2-rc0t64 libtss2-mu-4.0.1-0t64
    libtss2-tcti-device0t64 libtss2-tcti-swtpm0t64
)
# Library packages that appear in Depends but that nothing here loads: other TCTIs
# (tss2-esys depends on all of them, but systemd loads the one it is given),
# configuration-only packages, what only the service manager loads.
skip=" libtss2-tcti-cmd0t64 libtss2-tcti-mssim0t64 libtss2-tcti-spi-helper0t64 \
libaudit-common libapparmor1 libsystemd0 "

apt_dir=$cache/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$cache/debs"
echo 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main' \
    >"$apt_dir/sources.list"
: >"$apt_dir/status"
apt_opts=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::Etc::Preferences=/dev/null" -o Dir::Etc::PreferencesParts=/dev/null
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache" -o "Dir::Cache::Archives=$apt_dir/archives"
    -o "Dir::State::Status=$apt_dir/status"
    -o Debug::NoLocking=1
    -o APT::Architecture=amd64 -o APT::Architectures::=amd64
    # the Packages index only: no translations, no AppStream (DEP-11) metadata
    -o Acquire::Languages=none
    -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
    -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
    -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false
    -o Acquire::IndexTargets::deb::CNF::DefaultEnabled=false
    -o APT::Sandbox::User=root
)
mkdir -p "$apt_dir/cache"

# The index: refreshed when older than a day (a trixie point release replaces
# versions, and old .debs leave the mirror).
if [ -z "$(find "$apt_dir/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null)" ]; then
    log "apt-get update (trixie Packages index)"
    apt-get "${apt_opts[@]}" -q update >&2
fi
index_bytes=$(du -cb "$apt_dir"/lists/*_InRelease "$apt_dir"/lists/*_Packages* | tail -n1 | cut -f1)

# Follow Depends/Pre-Depends from the seeds, through library packages only (a
# library's Depends are generated from its DT_NEEDED entries by dpkg-shlibdeps).
# One apt-cache call per level of the graph (each call parses the whole index).
declare -A seen=()
wave=("${seeds[@]}")
while [ ${#wave[@]} -gt 0 ]; do
    for p in "${wave[@]}"; do seen[$p]=1; done
    # "PACKAGE DEP DEP ..." for each package of this wave
    graph=$(apt-cache "${apt_opts[@]}" show --no-all-versions "${wave[@]}" |
        awk '/^Package: / { if (p) print p, d; p = $2; d = "" }
             /^(Pre-)?Depends: / { sub(/^[^:]*: /, ""); d = d ", " $0 }
             END { if (p) print p, d }')
    for p in "${wave[@]}"; do
        case $'\n'$graph in *$'\n'"$p "*) ;; *)
            log "package $p is not in trixie"
            exit 1
            ;;
        esac
    done
    next=()
    for d in $(printf '%s\n' "$graph" | cut -d' ' -f2- | tr ',' '\n' |
        sed 's/|.*//; s/(.*)//; s/:any//; s/[[:space:]]//g' | sort -u); do
        case $d in lib* | zlib1g) ;; *) continue ;; esac
        case $skip in *" $d "*) continue ;; esac
        [ -z "${seen[$d]:-}" ] && next+=("$d")
    done
    wave=("${next[@]}")
done
pkgs=$(printf '%s\n' "${!seen[@]}" | sort)

log "downloading $(echo "$pkgs" | wc -l) packages"
rm -f "$cache"/debs/*.deb.tmp
find "$cache/debs" -name '*.deb' -delete
# shellcheck disable=SC2086 # one word per package
(cd "$cache/debs" && apt-get "${apt_opts[@]}" -q download $pkgs >&2)
: >"$cache/packages.txt.new"
for f in "$cache"/debs/*.deb; do
    printf '%s %s %s\n' "$(dpkg-deb -f "$f" Package)" "$(dpkg-deb -f "$f" Version)" \
        "$(stat -c %s "$f")" >>"$cache/packages.txt.new"
done
mv "$cache/packages.txt.new" "$cache/packages.txt"

log "extracting"
tmp=$cache/root.new
rm -rf "$tmp"
mkdir -p "$tmp"
for f in "$cache"/debs/*.deb; do
    case $(dpkg-deb -f "$f" Package) in
    # the service manager's package: systemd-measure only (it links libcrypto and
    # libsystemd-shared, both here already), none of its 200 other files
    systemd) dpkg-deb --fsys-tarfile "$f" | tar -x -C "$tmp" ./usr/lib/systemd/systemd-measure ;;
    *) dpkg-deb -x "$f" "$tmp" ;;
    esac
done
# Nothing here is read at run time; gconv is glibc's iconv modules (unused).
rm -rf "${tmp:?}/usr/share" "$tmp/usr/lib/x86_64-linux-gnu/gconv" "${tmp:?}/etc" \
    "$tmp/usr/lib/systemd/system" "$tmp/usr/lib/x86_64-linux-gnu/security" \
    "$tmp/usr/sbin" "$tmp/sbin"

ld=$tmp/usr/lib64/ld-linux-x86-64.so.2
libpath_dirs=(usr/lib/x86_64-linux-gnu/systemd usr/lib/x86_64-linux-gnu)
command -v readelf >/dev/null || {
    log "readelf (binutils) is needed"
    exit 1
}
# The entry points: the three programs, the TPM2 token plugin libcryptsetup loads,
# and what systemd 257 and tpm2-tss dlopen() (by soname).
entry_files=(usr/bin/systemd-cryptsetup usr/bin/systemd-cryptenroll
    usr/lib/systemd/systemd-measure
    usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so)
dlopen_sonames=(libcryptsetup.so.12 libtss2-esys.so.0 libtss2-rc.so.0 libtss2-mu.so.0
    libtss2-tcti-device.so.0 libtss2-tcti-swtpm.so.0 libgcc_s.so.1)

# Keep the DT_NEEDED closure of the entry points; drop every other ELF file (other
# programs, FIDO2/PKCS#11 plugins, libsystemd-core, ...) and the links to them.
missing=""
declare -A keep=()
todo=()
for f in "${entry_files[@]}"; do
    [ -e "$tmp/$f" ] && todo+=("$(readlink -f "$tmp/$f")") || missing="$missing $f"
done
resolve() { # soname -> file in the root, or nothing
    local d
    for d in "${libpath_dirs[@]}"; do
        [ -e "$tmp/$d/$1" ] && { readlink -f "$tmp/$d/$1"; return; }
    done
}
for n in "${dlopen_sonames[@]}"; do
    r=$(resolve "$n")
    [ -n "$r" ] && todo+=("$r") || missing="$missing dlopen:$n"
done
while [ ${#todo[@]} -gt 0 ]; do
    f=${todo[0]}
    todo=("${todo[@]:1}")
    [ -n "${keep[$f]:-}" ] && continue
    keep[$f]=1
    for n in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        r=$(resolve "$n")
        if [ -n "$r" ]; then
            todo+=("$r")
        else
            missing="$missing ${f#"$tmp"/}:$n"
        fi
    done
done
if [ -n "$missing" ]; then
    log "unresolved libraries:$missing"
    exit 1
fi
keep[$(readlink -f "$ld")]=1
while IFS= read -r -d '' f; do
    head -c4 "$f" | grep -q 'ELF' || continue
    [ -n "${keep[$f]:-}" ] || rm -f "$f"
done < <(find "$tmp" -type f -print0)
find "$tmp" -xtype l -delete
find "$tmp" -depth -type d -empty -delete
libpath() {
    local r=$1 out="" d
    for d in "${libpath_dirs[@]}"; do out=${out:+$out:}$r/$d; done
    printf '%s' "$out"
}

# Closure check: trixie's loader, without ld.so.cache, resolves the programs and
# the dlopen()ed libraries entirely inside the root (nothing from the host).
lp=$(libpath "$tmp")
for f in "${entry_files[@]/#/$tmp/}" $(for n in "${dlopen_sonames[@]}"; do resolve "$n"; done); do
    out=$("$ld" --inhibit-cache --library-path "$lp" --list "$f" 2>&1) || {
        log "ld.so --list ${f#"$tmp"/} failed: $out"
        exit 1
    }
    bad=$(printf '%s\n' "$out" | grep '=>' | grep -v "=> $tmp/" | grep -v 'linux-vdso' || true)
    if [ -n "$bad" ]; then
        log "${f#"$tmp"/} resolves outside the root:"
        printf '%s\n' "$bad" >&2
        exit 1
    fi
done

# The wrapper: POSIX sh with builtins only (busybox ash in an initramfs is enough).
cat >"$cache/run.new" <<'EOF'
#!/bin/sh
# Run a program from the trixie root next to this script with trixie's loader and
# libraries: run NAME|/ABS/PATH/IN/ROOT [ARGS...]
# NAME is looked up in ROOT/usr/bin, then ROOT/usr/lib/systemd.
# ROOT is $TRIXIE_ROOT, or the directory "root" beside this script.
case $0 in */*) here=${0%/*} ;; *) here=. ;; esac
here=$(cd "$here" && pwd) || exit 127
root=${TRIXIE_ROOT:-$here/root}
[ $# -ge 1 ] || { echo "usage: $0 PROGRAM [ARGS...]" >&2; exit 2; }
prog=$1
shift
case $prog in
/*) path=$root$prog ;;
*) path=$root/usr/bin/$prog
   [ -e "$path" ] || path=$root/usr/lib/systemd/$prog ;;
esac
[ -e "$path" ] || { echo "$0: no $prog in $root" >&2; exit 127; }
lib=$root/usr/lib/x86_64-linux-gnu
# libcryptsetup loads token plugins from its compiled-in directory (/usr/lib/...),
# which on the host holds systemd 252's; point it at 257's.
SYSTEMD_CRYPTSETUP_TOKEN_PATH=${SYSTEMD_CRYPTSETUP_TOKEN_PATH:-$lib/cryptsetup}
export SYSTEMD_CRYPTSETUP_TOKEN_PATH
exec "$root/usr/lib64/ld-linux-x86-64.so.2" --inhibit-cache \
    --library-path "$lib/systemd:$lib" \
    --argv0 "${prog##*/}" "$path" "$@"
EOF
chmod 755 "$cache/run.new"

rm -rf "$cache/root.old"
[ -d "$cache/root" ] && mv "$cache/root" "$cache/root.old"
mv "$tmp" "$cache/root"
rm -rf "$cache/root.old"
mv "$cache/run.new" "$cache/run"

# Smoke test through the wrapper.
ver=$("$cache/run" systemd-cryptenroll --version | head -n1)
"$cache/run" systemd-cryptsetup --version >/dev/null
"$cache/run" /usr/lib/systemd/systemd-measure --version >/dev/null

debs_bytes=$(awk '{s+=$3} END {print s}' "$cache/packages.txt")
log "$ver: $(wc -l <"$cache/packages.txt") packages, .debs $((debs_bytes / 1024)) KiB," \
    "index (as stored) $((index_bytes / 1024)) KiB, root $(du -sk "$cache/root" | cut -f1) KiB," \
    "$(($(date +%s) - t0)) s"
echo "$recipe" >"$cache/stamp"
