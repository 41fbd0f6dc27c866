#!/usr/bin/env python3
"""A wiped TPM: the recovery key typed on the console opens the vault, `vaultguard reseal` re-binds it, the next boot unlocks by TPM.

Boot 1 enrols with `--recovery-key` (the key is printed once). The TPM is then
replaced by a newly manufactured one (new seeds, as after a TPM clear). Boot 2: the
TPM refuses with a reason, the recovery key typed at the passphrase prompt opens
the vault, and `vaultguard reseal` (authorised by the recovery key again) seals a
new secret under the new TPM, removing the old token. Boot 3 unlocks with the TPM,
no prompt."""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

NAME = "secure-ai-vault"
CMDLINE = "rd.vaultguard.device=/dev/vda"


def tokens(s, disk):
    return re.findall(r"^\s+(\d+): systemd-(tpm2|recovery)", s.luks_dump(disk), re.M)


def run(s):
    vault = s.luks_disk("vault", ext4=True)
    out = s.enroll("--pcrs 0,7 --recovery-key", cmdline=CMDLINE)
    m = re.search(r"it is shown once, write it down now:\n([a-z-]+)\n", out)
    if not m:
        raise harness.ScenarioFailed("enroll --recovery-key printed no recovery key")
    key = m.group(1)
    harness.log(f"recovery key: {len(key)} characters")
    if len(key.replace("-", "")) < 64:
        raise harness.ScenarioFailed(f"the recovery key is short: {len(key)} characters")
    before = tokens(s, vault)
    if sorted(t for _, t in before) != ["recovery", "tpm2"]:
        raise harness.ScenarioFailed(f"tokens after enroll: {before}")

    s.new_tpm()
    b = s.boot(f"""
        vg unlock
        value unlock-status $?
        check mapped 'test -b /dev/mapper/{NAME}'
        mark reseal
        vg reseal --pcrs 0,7
        value reseal-status $?
    """, cmdline=CMDLINE)
    b.expect(rf"TPM unlock of {NAME} not possible: the TPM has no storage root key at 0x81000001: "
             r"it was cleared or replaced since enrolment\n", 90)
    b.expect(rf"Passphrase for {NAME} \(/dev/vda\): ", 30)
    b.sendline(key)
    if b.value("unlock-status", 90) != "0":
        b.fail("the recovery key did not open the vault")
    b.expect_pass("mapped")
    b.expect_mark("reseal")
    # The missing SRK is named, not the phase PCR the unlock has just extended.
    b.expect(r"the current enrolment cannot unseal \(the TPM has no storage root key", 90)
    b.expect(rf"Passphrase for {NAME} \(/dev/vda\): ", 90)
    b.sendline(key)
    b.expect(r"vaultguard: resealed into TPM2 keyslot \d+ \(token \d+\), bound to PCRs 0,7,15\n", 120)
    b.expect(r"vaultguard: removed old token \d+ and keyslot \d+\n", 30)
    if b.value("reseal-status") != "0":
        b.fail("reseal failed")
    b.assert_absent(key, "the recovery key was echoed when typed")  # printed in boot 1 only
    b.expect_poweroff()
    after = tokens(s, vault)
    if sorted(t for _, t in after) != ["recovery", "tpm2"]:
        raise harness.ScenarioFailed(f"tokens after reseal: {after} (before: {before})")

    b = s.boot(f"""
        vg unlock
        value unlock-status $?
        mkdir -p /mnt/vault
        check mounted 'mount -t ext4 -o ro /dev/mapper/{NAME} /mnt/vault && grep -q harness /mnt/vault/README'
    """, cmdline=CMDLINE)
    b.expect(rf"vaultguard: {NAME} unlocked with the TPM, phase PCR extended\n", 90)
    if b.value("unlock-status") != "0":
        b.fail("TPM unlock after reseal failed")
    b.expect_pass("mounted")
    b.assert_absent(r"Passphrase for", "the resealed TPM enrolment should unlock without a prompt")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
