#!/usr/bin/env python3
"""A dracut-built initramfs (systemd in the initrd, the vaultguard module) unlocks the vault by TPM before the root mount.

Boot 1 (the harness's image) enrols the vault and puts a tiny root file system in
it. Then dracut (Debian's) builds an image with `--add vaultguard` after
`dracut/install.sh`: systemd runs vaultguard-unlock.service in the initrd, the
generated systemd-cryptsetup unit of the vault is masked, and with
root=/dev/mapper/secure-ai-vault systemd mounts the opened vault and switches into
it. The vault's /sbin/init reports what the real system sees: the root is the
dm-crypt mapping, PCR 15 is latched, no volume key is left in the keyring."""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402
build_initramfs = harness.build_initramfs

NAME = "secure-ai-vault"

# PID 1 after switch_root: the vault's own init (busybox).
VAULT_INIT = r"""#!/bin/busybox sh
b=/bin/busybox
$b mount -t proc proc /proc 2>/dev/null
$b mount -t sysfs sysfs /sys 2>/dev/null
echo "VGT:MARK switched-root"
echo "VGT:VALUE root=$($b awk '$2 == "/" {print $1}' /proc/mounts | $b tail -n 1)"
echo "VGT:VALUE dm-name=$($b cat /sys/block/dm-0/dm/name)"
echo "VGT:VALUE pcr15=$($b cat /sys/class/tpm/tpm0/pcr-sha256/15)"
if $b grep -q "logon *cryptsetup:" /proc/keys; then echo "VGT:FAIL keys-left"; else echo "VGT:PASS no-keys-left"; fi
echo "VGT:VALUE marker=$($b cat /vault-marker)"
$b sync
echo "VGT:DONE rc=0 cores=0"
$b poweroff -f
"""


def run(s):
    vault = s.luks_disk("vault", size_mb=64)
    b = s.boot(f"""
        vg enroll --device /dev/vda --pcrs 7
        value enroll-status $?
        cryptsetup open --key-file /etc/test-passphrase /dev/vda root || die open
        /usr/sbin/mke2fs -q -t ext4 /dev/mapper/root || die mkfs
        mkdir -p /mnt/root && mount -t ext4 /dev/mapper/root /mnt/root || die mount
        cd /mnt/root && mkdir -p bin sbin proc sys dev run tmp etc
        cp /usr/bin/busybox bin/busybox
        cp /etc/vault-init sbin/init && chmod 755 sbin/init
        echo "root file system inside the vault" > vault-marker
        printf 'ID=vaultguard-test\nNAME="vault root"\n' > etc/os-release   # systemd checks for an OS tree
        cd / && umount /mnt/root && cryptsetup close root
        check root-prepared 'true'
    """, dynamic=harness.CRYPTSETUP + harness.MKFS_EXT4,
        files={"/etc/test-passphrase": harness.PASSPHRASE, "/etc/vault-init": VAULT_INIT,
               "/etc/mke2fs.conf": harness.pathlib.Path("/etc/mke2fs.conf")})
    b.expect(rf"Passphrase for {NAME} \(/dev/vda\): ", 90)
    b.sendline(harness.PASSPHRASE)
    if b.value("enroll-status", 120) != "0":
        b.fail("enroll failed")
    b.expect_pass("root-prepared", 120)
    b.expect_poweroff()

    # dracut with the module installed where an operator would install it.
    r = subprocess.run(["bash", os.path.join(harness.REPO, "dracut", "install.sh")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise harness.ScenarioFailed(f"dracut/install.sh failed: {r.stderr}")
    config = s.path("config.json")
    with open(config, "w") as f:
        json.dump({"vault": {"name": NAME}, "tpm": {"pcrs": [7]}}, f)
    image = s.path("dracut.initramfs.img")
    env = dict(os.environ, VAULTGUARD_BIN=harness.vaultguard_binary(), VAULTGUARD_CONFIG=config)
    cmd = ["dracut", "--force", "--no-hostonly", "--no-hostonly-cmdline", "--no-compress",
           "--kver", build_initramfs.kernel_release(),
           "--modules", "systemd systemd-initrd base rootfs-block udev-rules dm vaultguard",
           "--drivers", "virtio_pci virtio_blk ext4 tpm_tis", image]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with open(s.path("dracut.log"), "w") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise harness.ScenarioFailed(f"dracut failed (see dracut.log):\n{r.stderr[-2000:]}")
    listing = subprocess.run(["lsinitrd", image], capture_output=True, text=True).stdout
    for want in ("usr/bin/vaultguard", "initrd.target.wants/vaultguard-unlock.service",
                 "systemd-cryptsetup@secure\\x2dai\\x2dvault.service -> /dev/null"):
        if want not in listing:
            raise harness.ScenarioFailed(f"the dracut image lacks {want}")

    b = s.boot(initrd=image, timeout=300,
               cmdline=f"root=/dev/mapper/{NAME} rootfstype=ext4 rw rd.vaultguard.device=/dev/vda")
    b.expect(rf"vaultguard: {NAME} unlocked with the TPM, phase PCR extended\n", 240)
    b.expect_mark("switched-root", 120)
    root = b.value("root")
    if root not in (f"/dev/mapper/{NAME}", "/dev/dm-0"):
        b.fail(f"the root file system is {root}, not the vault")
    if b.value("dm-name") != NAME:
        b.fail("dm-0 is not the vault's mapping")
    if b.value("pcr15") in ("", "0" * 64):
        b.fail("PCR 15 was not latched")
    b.expect_pass("no-keys-left")
    if b.value("marker") != "root file system inside the vault":
        b.fail("the root is not the vault's file system")
    b.assert_absent(r"Passphrase for|Please enter passphrase", "the TPM should have unlocked")
    b.expect_poweroff()
    if vault.contains(b"root file system inside the vault"):
        raise harness.ScenarioFailed("the vault's plaintext is on the raw disk")


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
