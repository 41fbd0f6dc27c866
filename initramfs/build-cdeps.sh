#!/usr/bin/env bash
# Build the C libraries vaultguard links statically: tpm2-tss (ESAPI, no FAPI, no
# dlopen), lvm2's libdevmapper and libcryptsetup 2.7 (kernel-keyring linking), and
# the crypto under them. Debian ships none of the first three as static archives,
# so everything comes from Debian's source packages. The crypto is mbedTLS 3.6
# (tpm2-tss) and libgcrypt (libcryptsetup), not OpenSSL: OpenSSL 3's libcrypto
# linked statically is over 3 MiB of a 7.5 MiB binary (5.5 MiB without it). Both
# are built with only what their user calls. mbedTLS is trixie's 3.6: its P-256
# ECDH (the salted session) takes 30 % fewer instructions than bookworm's 2.28
# (11.9 M against 16.8 M per exchange, callgrind). libgcrypt is bookworm's 1.10.1
# with only the algorithms libcryptsetup needs for the LUKS2 volumes vaultguard
# opens (AES; SHA-1, SHA-2, SHA-3; PBKDF2; and what gcrypt itself needs to link):
# Debian's libgcrypt.a carries every cipher, digest and public-key algorithm, and
# its algorithm tables keep all of them in the binary (~0.6 MB). gcrypt, not nettle,
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
GCRYPT_VER=1.10.1-3+deb12u1
MBEDTLS_VER=3.6.6-0.1~deb13u1

build_pkgs=(autoconf-archive autoconf automake libtool gettext autopoint pkg-config
    libgcrypt20-dev libgpg-error-dev libjson-c-dev uuid-dev libaio-dev
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
    "cryptsetup=$CRYPTSETUP_VER" "lvm2=$LVM2_VER" "tpm2-tss=$TSS_VER" \
    "libgcrypt20=$GCRYPT_VER" "mbedtls=$MBEDTLS_VER"

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

echo "cdeps: mbedtls (libmbedcrypto)"
# Debian's patches applied. The configuration replaces mbedTLS's default one (the
# installed header is this file, so tpm2-tss compiles against the same options): the
# modules esys_crypto_mbed.c calls and nothing else. Hashes and HMAC (SHA-1, SHA-2),
# AES-CFB (parameter encryption), ECDH on NIST P-256/P-384 (salted sessions; the
# curves vaultguard's and systemd's SRKs use), RSA PKCS#1 v1.5/OAEP (RSA salt keys).
# No CTR_DRBG/entropy: our patch has tpm2-tss read getrandom() instead. Compiled -O2:
# the ECDH is on the unlock path.
dpkg-source -q --no-check -x mbedtls_*.dsc mbedtls-src >/dev/null
(
    cd mbedtls-src
    cat >include/mbedtls/mbedtls_config.h <<'CFG'
/* vaultguard (initramfs/build-cdeps.sh): what tpm2-tss's ESYS mbedTLS backend uses. */
#define MBEDTLS_HAVE_ASM
#define MBEDTLS_AESNI_C
#define MBEDTLS_AES_C
#define MBEDTLS_CIPHER_MODE_CFB
#define MBEDTLS_MD_C
#define MBEDTLS_SHA1_C
#define MBEDTLS_SHA224_C
#define MBEDTLS_SHA256_C
#define MBEDTLS_SHA384_C
#define MBEDTLS_SHA512_C
#define MBEDTLS_BIGNUM_C
#define MBEDTLS_ECP_C
#define MBEDTLS_ECDH_C
#define MBEDTLS_ECP_NIST_OPTIM
#define MBEDTLS_ECP_DP_SECP256R1_ENABLED
#define MBEDTLS_ECP_DP_SECP384R1_ENABLED
#define MBEDTLS_RSA_C
#define MBEDTLS_OID_C
#define MBEDTLS_PKCS1_V15
#define MBEDTLS_PKCS1_V21
CFG
    make -s -j"$jobs" -C library CFLAGS="$CFLAGS" libmbedcrypto.a >/dev/null
    mkdir -p "$prefix/lib" "$prefix/include"
    cp library/libmbedcrypto.a "$prefix/lib/"
    cp -r include/mbedtls include/psa "$prefix/include/"
)

echo "cdeps: tpm2-tss"
tar xf tpm2-tss_*.orig.tar.gz
(
    cd tpm2-tss-*/
    echo "${TSS_VER%-*}" >VERSION
    sed -i '/git describe/d' bootstrap
    ./bootstrap >/dev/null
    patch -s -p1 <"$patches"/tpm2-tss-mbed-ecdh-z-size-and-getrandom.patch
    # -Os: ESYS/SYS/MU marshal a few commands per unlock; the crypto is mbedTLS's.
    CFLAGS="${CFLAGS/-O2/-Os}" ./configure -q --prefix="$prefix" --enable-static --disable-shared --enable-nodl \
        --disable-fapi --disable-policy --with-crypto=mbed --disable-unit \
        --disable-integration --disable-doxygen-doc --disable-tcti-mssim \
        --disable-tcti-cmd --disable-tcti-pcap --disable-tcti-libtpms \
        --disable-tcti-spi-helper --disable-tcti-spi-ltt2go --disable-tcti-spi-ftdi \
        --disable-tcti-i2c-helper --disable-tcti-i2c-ftdi \
        --disable-tcti-spidev --disable-log-file --with-maxloglevel=none >/dev/null
    make -s -j"$jobs" >/dev/null
    make -s install >/dev/null
)

echo "cdeps: libgcrypt"
# Debian's patches applied (dpkg-source -x); none touches configure.ac or Makefile.am.
# Algorithms: libcryptsetup's gcrypt backend maps the LUKS2 cipher and hash names to
# gcrypt's. Ciphers: only AES (ECB/CBC/XTS) for the keyslot areas; a keyslot area in
# another cipher (serpent, twofish...) falls back to the kernel's AF_ALG, as with
# Debian's cryptsetup when gcrypt lacks it. Digests: SHA-1 (always built: gcrypt's
# random pool uses it), SHA-224/256 and SHA-384/512 (LUKS2 header checksums, digests
# and PBKDF2; systemd-cryptenroll's keyslots use SHA-512), SHA-3. KDF: PBKDF2 (Argon2
# is libcryptsetup's own SSE implementation). What gcrypt's always-built code needs
# to link: ChaCha20 (the Poly1305 AEAD mode), BLAKE2 (gcrypt's Argon2), ECC (the
# public gcry_mpi_ec_* API); configure refuses an empty public-key list anyway.
# apt-get source checked the files against the signed Release; dpkg-source has no
# keyring for the uploader's signature.
dpkg-source -q --no-check -x libgcrypt20_*.dsc gcrypt-src >/dev/null
(
    cd gcrypt-src
    ./configure -q --prefix="$prefix" --enable-static --disable-shared \
        --enable-ciphers="aes chacha20" --enable-digests="sha1 sha256 sha512 sha3 blake2" \
        --enable-kdfs=pkdf2 --enable-pubkey-ciphers=ecc --disable-jent-support \
        --disable-doc --disable-large-data-tests >/dev/null
    # The library and its headers, pkg-config file and libgcrypt-config; no docs, tests.
    make -s -j"$jobs" SUBDIRS="compat mpi cipher random src" >/dev/null 2>&1
    make -s SUBDIRS="compat mpi cipher random src" install >/dev/null
)
test -f "$prefix/lib/pkgconfig/libgcrypt.pc"

echo "cdeps: cryptsetup (libcryptsetup)"
tar xf cryptsetup_*.orig.tar.gz
(
    cd cryptsetup-*/
    patch -s -p1 <"$patches"/cryptsetup-gcrypt-hash-name-cache.patch
    patch -s -p1 <"$patches"/cryptsetup-af-one-hash-context.patch
    [[ -x configure ]] || ./autogen.sh >/dev/null 2>&1
    ./configure -q --prefix="$prefix" --disable-shared --enable-static \
        --with-crypto_backend=gcrypt --with-libgcrypt-prefix="$prefix" --disable-ssh-token --disable-udev \
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
