#!/bin/sh
# Run by vaultguard-mount.service in a systemd initrd (dracut): once the root is
# mounted on /sysroot and vaultguard-unlock.service has opened the vault, mount it
# on vault.mount inside the root with the supervisor's options (nosuid,nodev).
# The mount moves with /sysroot at switch-root, so the booted system starts with
# the vault mounted: the twin of the initramfs-tools local-bottom script.
#
# Why here and not an fstab line: the mapping was made by the static
# libdevmapper without udev synchronisation, so udev's dm rules mark its device
# not ready (SYSTEMD_READY=0) and a mount unit waiting for /dev/mapper/NAME would
# time out. A problem here is one line at journald priority (sd-daemon(3)
# prefixes: <3> the vault cannot be mounted as configured, <4> it can once the
# operator acts), as the supervisor says it again at start, and the boot goes
# on: the vault is data, not the root.
root=${VAULTGUARD_SYSROOT:-/sysroot}
vg_err() {
    echo "<3>vaultguard: $1"
}
vg_warn() {
    echo "<4>vaultguard: $1"
}

[ -x /usr/bin/vaultguard ] && [ -f /etc/vaultguard/config.json ] || exit 0
name=$(/usr/bin/vaultguard config --get vault.name) || exit 0
mnt=$(/usr/bin/vaultguard config --get vault.mount) || exit 0
fstype=$(/usr/bin/vaultguard config --get vault.fstype) || exit 0
dev=/dev/mapper/$name
# Locked (the TPM refused and nobody typed the passphrase): nothing to mount.
[ -b "$dev" ] || exit 0

target=$root$mnt
if [ -L "$target" ]; then
    vg_err "vault not mounted: the mount point $mnt is a symlink; make it a directory (after boot: vaultguard lock, then vaultguard unlock)"
    exit 0
fi
if [ ! -d "$target" ]; then
    vg_warn "vault not mounted: the mount point $mnt does not exist; create it (mkdir -p $mnt), then vaultguard lock and vaultguard unlock"
    exit 0
fi
if [ "$fstype" = auto ]; then
    set --
else
    set -- -t "$fstype"
fi
if ! err=$(mount "$@" -o nosuid,nodev "$dev" "$target" 2>&1); then
    vg_err "vault not mounted on $mnt (type $fstype): $err"
    exit 0
fi
echo "<6>vaultguard: vault mounted on $mnt"
exit 0
