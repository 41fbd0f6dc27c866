#!/usr/bin/env bash
# Build the C libraries vaultguard links statically: tpm2-tss (ESAPI, no FAPI, no
# dlopen), lvm2's libdevmapper and libcryptsetup 2.7 (kernel-keyring linking).
# Debian ships none of them as static archives, so they come from Debian's source
# packages. Their crypto comes from Debian's static libmbedcrypto (tpm2-tss) and
# libgcrypt (libcryptsetup), not OpenSSL: OpenSSL 3's libcrypto linked statically
# is over 3 MiB of a 7.5 MiB binary (5.5 MiB without it). gcrypt, not nettle,
# because cryptsetup's nettle backend has no userspace ciphers (keyslots would need
# AF_ALG, absent on some build hosts). Idempotent: the prefix carries a stamp of this script; a second run with
# the same script is a no-op.
#
# Usage: initramfs/build-cdeps.sh [PREFIX]   (default: <repo>/.cdeps)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
prefix=${1:-${VG_CDEPS:-$repo/.cdeps}}
stamp="$prefix/.stamp"
want=$(sha256sum "$0" | cut -c1-16)

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    echo "cdeps: $prefix is up to date"
    exit 0
fi

CRYPTSETUP_VER=2:2.7.5-2
LVM2_VER=2.03.16-2
TSS_VER=4.1.3-1.2

# Debian's deb-src entries (bookworm for lvm2, trixie for tpm2-tss and cryptsetup 2.7).
src_list=/etc/apt/sources.list.d/vaultguard-src.sources
if [[ ! -f $src_list ]]; then
    cat >"$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq
fi

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
apt-get source -qq --download-only "cryptsetup=$CRYPTSETUP_VER" "lvm2=$LVM2_VER" "tpm2-tss=$TSS_VER" 2>/dev/null

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
    # The mbedTLS backend writes the ECDH secret Z without its leading zero bytes,
    # while the TPM's KDFe uses the full-size x coordinate: about one salted session
    # in 256 gets a different session key and fails. Keep Z at the curve's size.
    grep -q 'Z->size = mbedtls_mpi_size(&ecp_z);' src/tss2-esys/esys_crypto_mbed.c
    sed -i 's|Z->size = mbedtls_mpi_size(&ecp_z);|Z->size = (ecp_group.pbits + 7) / 8;|' \
        src/tss2-esys/esys_crypto_mbed.c
    # Its random callback seeds a fresh CTR_DRBG from the entropy pool on every call,
    # and mbedTLS's ECDH calls it about six times per salted session (blinding):
    # ~45 ms of an emulated guest's unlock. The kernel CSPRNG that pool reads from
    # gives the same randomness directly.
    python3 - src/tss2-esys/esys_crypto_mbed.c <<'PATCH'
import re, sys
path = sys.argv[1]
src = open(path).read()
fn = re.compile(r"static int get_random\(void\* context, unsigned char \* buffer, size_t buf_size\) \{.*?\n\}\n", re.S)
new = '''static int get_random(void* context, unsigned char * buffer, size_t buf_size) {
    UNUSED(context);
    size_t done = 0;
    while (done < buf_size) {
        ssize_t n = getrandom(buffer + done, buf_size - done, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return MBEDTLS_ERR_CTR_DRBG_ENTROPY_SOURCE_FAILED;
        }
        done += (size_t)n;
    }
    return 0;
}
'''
src, n = fn.subn(lambda m: new, src)
assert n == 1, "get_random not found"
src = src.replace("#include <stdlib.h>\n", "#include <stdlib.h>\n#include <errno.h>\n#include <sys/random.h>\n", 1)
open(path, "w").write(src)
PATCH
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
    # The gcrypt backend maps the hash name to an algorithm (gcrypt's name table,
    # case-insensitively) on every hash it starts, and a keyslot's anti-forensic
    # merge starts ~8,000 of them: half the instructions of a TPM unlock went to
    # strcasecmp. Remember the last mapping (per thread).
    python3 - lib/crypto_backend/crypto_gcrypt.c <<'PATCH'
import sys
path = sys.argv[1]
src = open(path).read()
cache = '''/* vaultguard: the last name mapped, per thread */
static int md_map_cached(const char *name, unsigned int *flags)
{
	static __thread char last[32];
	static __thread int last_id;
	static __thread unsigned int last_flags;
	unsigned int f = 0;
	int id;

	if (!name)
		return 0;
	if (last_id && !strcmp(name, last)) {
		if (flags)
			*flags |= last_flags;
		return last_id;
	}
	id = gcry_md_map_name(crypt_hash_compat_name(name, &f));
	if (id && strlen(name) < sizeof(last)) {
		strcpy(last, name);
		last_id = id;
		last_flags = f;
	}
	if (flags)
		*flags |= f;
	return id;
}

/* HASH */
'''
assert src.count("/* HASH */\n") == 1
src = src.replace("/* HASH */\n", cache, 1)
for old, new in (("gcry_md_map_name(crypt_hash_compat_name(name, NULL))", "md_map_cached(name, NULL)"),
                 ("gcry_md_map_name(crypt_hash_compat_name(name, &flags))", "md_map_cached(name, &flags)")):
    assert old in src, old
    src = src.replace(old, new)
open(path, "w").write(src)
PATCH
    [[ -x configure ]] || ./autogen.sh >/dev/null 2>&1
    ./configure -q --prefix="$prefix" --disable-shared --enable-static \
        --with-crypto_backend=gcrypt --disable-ssh-token --disable-udev \
        --disable-selinux --disable-asciidoc --disable-nls --disable-cryptsetup \
        --disable-veritysetup --disable-integritysetup --disable-external-tokens \
        --disable-blkid --disable-hw-opal --disable-fips >/dev/null
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
