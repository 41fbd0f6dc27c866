#!/usr/bin/env python3
"""Enrol, reboot: the TPM unlocks without a prompt; a PCR change falls back to the passphrase.

Boot 1 enrols (the existing passphrase typed on the console). Boot 2 unlocks by TPM
with no prompt: the dm table references a logon key (no hex key), /proc/keys keeps
none, PCR 15 is latched, data is written; after detach a second unseal in the same
boot is refused naming the phase PCR. Boot 3 adds a NIC (its option ROM changes
PCR 2): the TPM refuses naming PCR 2, the typed passphrase opens the vault and the
data written in boot 2 reads back."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

NAME = "secure-ai-vault"
SECRET = "weights shard 17: 3.14159 2.71828 1.41421"
ZERO = "0" * 64


def run(s):
    vault = s.luks_disk("vault", ext4=True)
    cmdline = f"rd.vaultguard.device=/dev/vda"

    s.enroll("--pcrs 0,2,4,7", cmdline=cmdline)  # the device from the kernel command line
    dump = s.luks_dump(vault)
    if "systemd-tpm2" not in dump:
        raise harness.ScenarioFailed(f"no systemd-tpm2 token after enroll:\n{dump}")

    b = s.boot(f"""
        value pcr15-before "$(pcr sha256 15)"
        vg unlock
        value unlock-status $?
        check mapped 'test -b /dev/mapper/{NAME}'
        table=$(dmsetup table --showkeys {NAME})
        echo "dm table: $table"
        check key-via-keyring 'echo "$table" | grep -q " :64:logon:cryptsetup:"'
        check no-hex-key-in-table '! echo "$table" | grep -Eiq "[0-9a-f]{{64}}"'
        check no-volume-key-in-proc-keys '! grep -q "cryptsetup:" /proc/keys'
        value pcr15-after "$(pcr sha256 15)"
        check audit-initrd 'grep -q "\\"tpm2_unseal\\"" /run/vaultguard/audit-initrd.jsonl'
        mkdir -p /mnt/vault
        check mount 'mount -t ext4 /dev/mapper/{NAME} /mnt/vault'
        echo "{SECRET}" > /mnt/vault/shard.txt
        check umount 'umount /mnt/vault'
        check detach 'vg detach {NAME}'
        check unmapped '! test -e /dev/mapper/{NAME}'
        check no-key-after-detach '! grep -q "cryptsetup:" /proc/keys'
        vg unlock --headless
        value second-unlock-status $?
        check_not still-closed 'test -e /dev/mapper/{NAME}'
    """, cmdline=cmdline, dynamic=harness.CRYPTSETUP)
    if b.value("pcr15-before", 90) != ZERO:
        b.fail("PCR 15 was not zero at boot")
    b.expect(rf"vaultguard: {NAME} unlocked with the TPM, phase PCR extended\r?\n", 90)
    if b.value("unlock-status") != "0":
        b.fail("TPM unlock failed")
    b.expect_pass("mapped")
    b.expect(rf"dm table: 0 \d+ crypt aes-xts-plain64 :64:logon:cryptsetup:{vault.uuid}-d0 0 ", 10)
    for c in ("key-via-keyring", "no-hex-key-in-table", "no-volume-key-in-proc-keys"):
        b.expect_pass(c)
    if b.value("pcr15-after") == ZERO:
        b.fail("PCR 15 was not extended after the unlock")
    for c in ("audit-initrd", "mount", "umount", "detach", "unmapped", "no-key-after-detach"):
        b.expect_pass(c)
    b.expect(r"TPM unlock of secure-ai-vault not possible: PCR 15 \(phase\) is already extended", 60)
    if b.value("second-unlock-status") == "0":
        b.fail("a second unlock in the same boot succeeded")
    b.expect_pass("still-closed")
    b.assert_absent(r"Passphrase for", "the TPM unlock should not prompt")
    b.expect_poweroff()
    if vault.contains(SECRET):
        raise harness.ScenarioFailed("the file's plaintext is on the raw disk")

    b = s.boot(f"""
        vg unlock
        value unlock-status $?
        mkdir -p /mnt/vault
        check mount 'mount -t ext4 -o ro /dev/mapper/{NAME} /mnt/vault'
        check data-reads-back 'grep -qx "{SECRET}" /mnt/vault/shard.txt'
        umount /mnt/vault
    """, cmdline=cmdline, nic="virtio")
    b.expect(r"TPM unlock of secure-ai-vault not possible: PCR 2 changed since enrolment", 90)
    b.expect(rf"Passphrase for {NAME} \(/dev/vda\): ", 30)
    b.sendline("not the passphrase")
    b.expect(r"wrong passphrase \(2 tries left\)", 60)
    b.expect(rf"Passphrase for {NAME} \(/dev/vda\): ", 30)
    b.sendline(harness.PASSPHRASE)
    if b.value("unlock-status", 90) != "0":
        b.fail("passphrase unlock failed")
    b.expect_pass("data-reads-back")
    b.assert_absent(harness.PASSPHRASE, "the passphrase was echoed")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
