#!/usr/bin/env bash
# Install what building and testing vaultguard needs on a fresh Debian 12 machine:
# the QEMU + swtpm boot harness (qemu-tests/), the host tests, the Rust build.
# Idempotent: installs only the packages that are missing (a second run only checks).
set -euo pipefail

harness=(
    qemu-system-x86 ipxe-qemu     # TCG guest; ipxe-qemu: NIC option ROMs (PCR 2 changes)
    swtpm swtpm-tools             # software TPM 2.0; swtpm_setup manufactures it
    ovmf                          # UEFI firmware: OVMF boots write a TCG event log (PCRs 4/9)
    tpm2-tools                    # TPM checks, on the host and carried into guests
    cryptsetup-bin dmsetup        # LUKS2 images made on the host; guest-side checks
    busybox-static                # the test initramfs's userland
    linux-image-amd64 kmod        # the guest kernel; modprobe/depmod for its modules
    e2fsprogs                     # mke2fs, carried into guests
    libc-bin file cpio python3    # ldd/ldconfig for dynamic programs; inspection; runner
    python3-prometheus-client     # tests/metrics.rs parses the metrics with Prometheus's own parser
    keyutils                      # keyctl: host tests read systemd's passphrase cache key
    tang socat                    # a real tangd on 127.0.0.1 behind socat (qemu-tests/lib/tang.py)
    clevis clevis-luks clevis-tpm2 jose  # clevis tokens bound on the host; clevis in guests (bench)
)
build=(
    clang libclang-dev pkg-config # Rust build: bindgen (libcryptsetup-rs-sys)
    dpkg-dev                      # static C libraries from Debian sources (build-cdeps.sh)
    dracut-core                   # the dracut-built initramfs scenario
    systemd                       # systemd-cryptenroll/-cryptsetup 252 (interop); dracut's systemd initrd
    mmdebstrap                    # the appliance guest's Debian root (qemu-tests/lib/appliance.py)
    lintian                       # the Debian package's check (packaging/build-deb.sh)
)

missing=()
for p in "${harness[@]}" "${build[@]}"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done

if ((${#missing[@]})); then
    echo "setup-host: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The host never boots the kernel it installs for the guests, so skip the
    # initramfs-tools initrd its postinst would build (about 20 s): the kernel hook
    # /etc/kernel/postinst.d/initramfs-tools exits early when INITRD=No.
    export INITRD=No
    apt-get update -qq
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "setup-host: all ${#harness[@]} harness and ${#build[@]} build packages present"
fi

# What the harness relies on, checked so that a broken host fails here, not mid-boot.
kver=$(ls /boot/vmlinuz-* 2>/dev/null | sed 's,.*/vmlinuz-,,' | sort -V | tail -n 1)
[ -n "$kver" ] && [ -d "/lib/modules/$kver" ] || {
    echo "setup-host: no kernel with modules in /boot and /lib/modules" >&2; exit 1; }
file -L /bin/busybox | grep -q 'statically linked' || {
    echo "setup-host: /bin/busybox is not the static one (busybox-static)" >&2; exit 1; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup-host: the harness needs Python 3.11 or newer" >&2; exit 1; }
echo "setup-host: guest kernel $kver"
