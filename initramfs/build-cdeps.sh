#!/usr/bin/env bash
# Build the C libraries vaultguard links statically: tpm2-tss (ESAPI, no FAPI, no
# dlopen), lvm2's libdevmapper and libcryptsetup 2.7 (kernel-keyring linking).
# Debian ships none of them as static archives, so they come from Debian's source
# packages. Their crypto comes from Debian's static libmbedcrypto (tpm2-tss) and
# libgcrypt (libcryptsetup), not OpenSSL: OpenSSL 3's libcrypto linked statically
# is over 3 MiB of a 7.5 MiB binary (5.5 MiB without it). gcrypt, not nettle,
# because cryptsetup's nettle backend has no userspace ciphers (keyslots would need
# AF_ALG, absent on some build hosts). libcryptsetup's Argon2 is its bundled SSE
# implementation, not the reference one: an argon2id passphrase keyslot (the LUKS2
# default) opens as fast as with Debian's cryptsetup, which links libargon2.
# Our fixes to the C libraries are initramfs/patches/*.patch, applied with patch(1).
# The source packages come through a private apt directory; /etc/apt is not touched.
# Idempotent: the prefix carries a stamp of this script and the patches; a second
# run with the same inputs is a no-op.
#
# Usage: initramfs/build-cdeps.sh [PREFIX]   (default: <repo>/.cdeps)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
prefix=${1:-${VG_CDEPS:-$repo/.cdeps}}
stamp="$prefix/.stamp"
patches=$here/patches
want=$(cat "$0" "$patches"/*.patch | sha256sum | cut -c1-16)

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    echo "cdeps: $prefix is up to date"
    exit 0
fi

CRYPTSETUP_VER=2:2.7.5-2
LVM2_VER=2.03.16-2
TSS_VER=4.1.3-1.2

build_pkgs=(autoconf-archive autoconf automake libtool gettext autopoint pkg-config
    libmbedtls-dev libgcrypt20-dev libgpg-error-dev libjson-c-dev uuid-dev libaio-dev
    libltdl-dev libpopt-dev dpkg-dev)
missing=()
for p in "${build_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

work=$(mktemp -d /tmp/vg-cdeps.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

# Debian's deb-src entries (bookworm for lvm2, trixie for tpm2-tss and cryptsetup 2.7),
# in an apt directory of our own: the host's sources and package lists stay as they are.
mkdir -p apt/lists/partial apt/cache/archives/partial
cat >apt/sources.list <<'SRC'
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
SRC
apt_private=(-o "Dir::Etc::sourcelist=$work/apt/sources.list" -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache"
    -o APT::Sandbox::User=root)
apt-get "${apt_private[@]}" update -qq
apt-get "${apt_private[@]}" source -qq --download-only \
    "cryptsetup=$CRYPTSETUP_VER" "lvm2=$LVM2_VER" "tpm2-tss=$TSS_VER"

rm -rf "$prefix"
mkdir -p "$prefix"
jobs=$(nproc)
export CFLAGS="-O2 -fPIC -ffunction-sections -fdata-sections -fstack-protector-strong -D_FORTIFY_SOURCE=2"
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
# cryptsetup's configure looks for libdevmapper.h before asking pkg-config.
export CPPFLAGS="-I$prefix/include"

echo "cdeps: lvm2 (libdevmapper)"
tar xf lvm2_*.orig.tar.xz
(
    cd LVM2.*/ 2>/dev/null || cd lvm2-*/
    ./configure -q --prefix="$prefix" --enable-static_link --disable-selinux \
        --disable-udev_sync --disable-udev_rules --disable-readline --disable-blkid_wiping \
        --with-thin=none --with-cache=none --disable-nls --enable-pkgconfig >/dev/null
    make -s -j"$jobs" device-mapper >/dev/null
    make -s install_device-mapper >/dev/null
    make -s -C libdm install_pkgconfig >/dev/null
)
# Our devmapper.pc (udev disabled) must shadow Debian's, which drags in -ludev.
test -f "$prefix/lib/pkgconfig/devmapper.pc"

echo "cdeps: tpm2-tss"
tar xf tpm2-tss_*.orig.tar.gz
(
    cd tpm2-tss-*/
    echo "${TSS_VER%-*}" >VERSION
    sed -i '/git describe/d' bootstrap
    ./bootstrap >/dev/null
    patch -s -p1 <"$patches"/tpm2-tss-mbed-ecdh-z-size-and-getrandom.patch
    ./configure -q --prefix="$prefix" --enable-static --disable-shared --enable-nodl \
        --disable-fapi --disable-policy --with-crypto=mbed --disable-unit \
        --disable-integration --disable-doxygen-doc --disable-tcti-mssim \
        --disable-tcti-cmd --disable-tcti-pcap --disable-tcti-libtpms \
        --disable-tcti-spi-helper --disable-tcti-spi-ltt2go --disable-tcti-spi-ftdi \
        --disable-tcti-i2c-helper --disable-tcti-i2c-ftdi \
        --disable-tcti-spidev --disable-log-file --with-maxloglevel=none >/dev/null
    make -s -j"$jobs" >/dev/null
    make -s install >/dev/null
)

echo "cdeps: cryptsetup (libcryptsetup)"
tar xf cryptsetup_*.orig.tar.gz
(
    cd cryptsetup-*/
    patch -s -p1 <"$patches"/cryptsetup-gcrypt-hash-name-cache.patch
    [[ -x configure ]] || ./autogen.sh >/dev/null 2>&1
    ./configure -q --prefix="$prefix" --disable-shared --enable-static \
        --with-crypto_backend=gcrypt --disable-ssh-token --disable-udev \
        --disable-selinux --disable-asciidoc --disable-nls --disable-cryptsetup \
        --disable-veritysetup --disable-integritysetup --disable-external-tokens \
        --disable-blkid --disable-hw-opal --disable-fips --enable-internal-sse-argon2 >/dev/null
    # configure quietly falls back to the reference Argon2 when SSE2 does not link.
    grep -qx "CRYPTO_INTERNAL_SSE_ARGON2_TRUE=''" config.log
    make -s -j"$jobs" libcryptsetup.la >/dev/null 2>&1
    make -s install-libLTLIBRARIES install-includeHEADERS install-pkgconfigDATA >/dev/null
)

# rustc refuses glibc's libm.a/libdl.a/librt.a linker scripts when a static .pc lists
# them: drop those flags (the Rust std already links libm/libdl/librt as needed).
for pc in "$prefix"/lib/pkgconfig/*.pc; do
    sed -i -E 's/(^|[[:space:]])-l(m|dl|rt|pthread)([[:space:]]|$)/ /g; s/(^|[[:space:]])-l(m|dl|rt|pthread)([[:space:]]|$)/ /g' "$pc"
done
rm -rf "$prefix"/lib/*.la "$prefix"/lib/*.so* "$prefix"/lib/udev

echo "$want" >"$stamp"
echo "cdeps: installed into $prefix"
# The sys crates cache the link flags pkg-config gave them; the path is the same,
# so cargo would not notice that the libraries behind it changed.
if [[ $prefix == "$repo/.cdeps" && -d $repo/target ]] && command -v cargo >/dev/null; then
    for args in "" "--release" "--release --target x86_64-unknown-linux-gnu"; do
        # shellcheck disable=SC2086
        (cd "$repo" && cargo clean -q $args -p libcryptsetup-rs -p libcryptsetup-rs-sys \
            -p tss-esapi -p tss-esapi-sys -p vaultguard 2>/dev/null) || true
    done
    rm -rf "$repo/fuzz/target" # the fuzz targets' own build (qemu-tests/bench.py rebuilds it)
fi
