#!/usr/bin/env python3
"""Harness self-check: dm-crypt in the guest, passphrase typed on the console, key in the keyring.

Debian's cryptsetup refuses a wrong passphrase and takes the right one, typed at its
prompt; the dm table references a logon key (no hex key), /proc/keys keeps none;
ext4 data survives close and reopen and never reaches the raw disk in clear; the
harness's cached LUKS2 + ext4 image opens."""
import os
import pathlib
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

SECRET = "model weights v7: 0123456789 attention is all you need"


def run(s):
    vault = s.luks_disk("vault", size_mb=32)
    data = s.luks_disk("data", ext4=True)  # the harness's cached LUKS2 + ext4 image
    b = s.boot(f"""
        dev=$(disk vault) || exit 1
        value device "$dev"
        cryptsetup open "$dev" sanity
        value open-status $?
        check mapping-active 'test -b /dev/mapper/sanity'
        table=$(dmsetup table --showkeys sanity)
        echo "dm table: $table"
        check key-via-keyring 'echo "$table" | grep -q " :64:logon:cryptsetup:"'
        check no-hex-key-in-table '! echo "$table" | grep -Eiq "[0-9a-f]{{64}}"'
        check no-volume-key-in-proc-keys '! grep -q "logon.*cryptsetup:" /proc/keys'
        check mkfs '/usr/sbin/mke2fs -q -t ext4 -b 4096 /dev/mapper/sanity'
        mkdir -p /mnt/vault
        check mount 'mount -t ext4 /dev/mapper/sanity /mnt/vault'
        echo "{SECRET}" > /mnt/vault/hello.txt
        check umount 'umount /mnt/vault'
        check close 'cryptsetup close sanity'
        check mapping-gone '! test -e /dev/mapper/sanity'
        check reopen-with-key-file 'cryptsetup open --key-file /etc/test-passphrase "$dev" sanity'
        check remount 'mount -t ext4 -o ro /dev/mapper/sanity /mnt/vault'
        check data-reads-back 'grep -qx "{SECRET}" /mnt/vault/hello.txt'
        umount /mnt/vault; cryptsetup close sanity
        check cached-ext4-image 'cryptsetup open --key-file /etc/test-passphrase "$(disk data)" data &&
            mount -t ext4 -o ro /dev/mapper/data /mnt/vault && grep -q harness /mnt/vault/README'
        umount /mnt/vault; cryptsetup close data
        mark done-sanity
    """, dynamic=harness.CRYPTSETUP + harness.MKFS_EXT4,
        files={"/etc/mke2fs.conf": pathlib.Path("/etc/mke2fs.conf"),
               "/etc/test-passphrase": harness.PASSPHRASE})
    dev = b.value("device")
    if dev != "/dev/vda":
        b.fail(f"the first disk is {dev}, expected /dev/vda")
    # A wrong passphrase first: cryptsetup must refuse it and ask again.
    b.expect(rf"Enter passphrase for {dev}:", 60)
    b.sendline("not the passphrase")
    b.expect(r"No key available with this passphrase", 60)
    b.expect(rf"Enter passphrase for {dev}:", 30)
    b.sendline(harness.PASSPHRASE)
    if b.value("open-status", 60) != "0":
        b.fail("cryptsetup open failed with the right passphrase")
    b.expect_pass("mapping-active")
    b.expect(rf"dm table: 0 \d+ crypt aes-xts-plain64 :64:logon:cryptsetup:{vault.uuid}-d0 0 ", 10)
    for check in ("key-via-keyring", "no-hex-key-in-table", "no-volume-key-in-proc-keys",
                  "mkfs", "mount", "umount", "close", "mapping-gone", "reopen-with-key-file",
                  "remount", "data-reads-back", "cached-ext4-image"):
        b.expect_pass(check)
    b.expect_mark("done-sanity")
    b.assert_absent(harness.PASSPHRASE, "the passphrase was echoed on the console")
    b.expect_poweroff()
    if vault.contains(SECRET):
        raise harness.ScenarioFailed("the file's plaintext is on the raw disk: not encrypted")
    if not vault.contains(b"LUKS\xba\xbe"):
        raise harness.ScenarioFailed("the LUKS2 header is gone from the disk")


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
