#!/usr/bin/env python3
"""UEFI (OVMF) + swtpm: enrol over PCR 7+9, predict a staged initrd, boot it: predicted == actual, the refusal names the initrd record, the passphrase opens; the enrolled initrd unlocks by TPM.

One initramfs (A) runs whatever script the host leaves on the `script` disk, so
every boot of A has the same PCR 9 (the EFI stub measures the initrd and the
command line, both unchanged). B is A with one more cpio member: the staged (or
tampered: nobody enrolled it) initrd.
Boot 1 (A): `vaultguard enroll --pcrs 7,9`, then `vaultguard policy predict
--initrd B --pcrs 7,9 --json`. Boot 2 (B): PCRs 7 and 9 read in the guest equal
the prediction exactly; `vaultguard unlock`: the TPM refuses naming PCR 9 and the
EV_EVENT_TAG "Linux initrd" record with A's and B's SHA-256; the audit holds it;
the typed passphrase opens the vault. Boot 3 (A): the TPM unlocks, no prompt."""
import hashlib
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

NAME = "secure-ai-vault"
CMDLINE = "rd.vaultguard.device=/dev/vda"


def staged_variant(s, a_path):
    """A plus a second (concatenated) newc archive holding one file."""
    d = s.path("staged-extra")
    os.makedirs(os.path.join(d, "etc"), exist_ok=True)
    with open(os.path.join(d, "etc", "staged-initrd"), "w") as f:
        f.write("the staged initrd, built after enrolment\n")
    extra = subprocess.run("find etc | cpio -o -H newc --quiet", shell=True, cwd=d,
                           capture_output=True, check=True).stdout
    b_path = s.path("B.initramfs.cpio")
    with open(a_path, "rb") as f, open(b_path, "wb") as out:
        out.write(f.read() + extra)
    return b_path


def run(s):
    s.luks_disk("vault")  # /dev/vda, as rd.vaultguard.device says
    script = s.disk("script", size_mb=1)
    # The staged initrd, for the guest to read as a file.
    a_path = s.build_initrd("A", """
        mount -t securityfs securityfs /sys/kernel/security
        tr -d '\\000' < "$(disk script)" > /tmp/step.sh
        . /tmp/step.sh
    """)
    b_path = staged_variant(s, a_path)
    b_size = os.path.getsize(b_path)
    staged = s.disk("staged", size_mb=(b_size >> 20) + 2)
    with open(staged.path, "r+b") as f, open(b_path, "rb") as b:
        f.write(b.read())
    sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    a_sha, b_sha = sha(a_path), sha(b_path)

    def step(text):
        with open(script.path, "r+b") as f:
            f.write(harness._dedent(text).encode().ljust(1 << 20, b"\0"))

    # Boot 1 (A): enrol, then predict the staged initrd.
    step("""
        check eventlog 'head -c 64 /sys/kernel/security/tpm0/binary_bios_measurements | od -An | grep -q .'
        vg enroll --pcrs 7,9
        value enroll-status $?
        head -c %d "$(disk staged)" > /tmp/staged.img
        vg policy predict --initrd /tmp/staged.img --pcrs 7,9 --json > /tmp/predicted.json
        value predict-status $?
        value predicted "$(cat /tmp/predicted.json)"
        value pcr9-now "$(pcr sha256 9)"
    """ % b_size)
    b = s.boot(initrd=a_path, cmdline=CMDLINE, ovmf=True, label="boot1-enrol-predict")
    b.expect_pass("eventlog", 120)
    b.expect(rf"Passphrase for {NAME} \(/dev/vda\): ", 90)
    b.sendline(harness.PASSPHRASE)
    if b.value("enroll-status", 120) != "0":
        b.fail("vaultguard enroll --pcrs 7,9 failed")
    if b.value("predict-status", 60) != "0":
        b.fail("vaultguard policy predict failed")
    predicted = json.loads(b.value("predicted"))
    pcr9_a = b.value("pcr9-now")
    b.expect_poweroff()
    if predicted.get("bank") != "sha256" or sorted(predicted.get("pcrs", {})) != ["7", "9"]:
        raise harness.ScenarioFailed(f"predict --json: {predicted}")
    if predicted["pcrs"]["9"] == pcr9_a:
        raise harness.ScenarioFailed("the prediction for another initrd left PCR 9 as it is")
    dump = s.luks_dump(s.disks[0])
    if "systemd-tpm2" not in dump:
        raise harness.ScenarioFailed(f"no systemd-tpm2 token after enroll:\n{dump}")

    # Boot 2 (B): the prediction holds exactly; the TPM refuses and says why.
    step(f"""
        value pcr7 "$(pcr sha256 7)"
        value pcr9 "$(pcr sha256 9)"
        check staged-is-booted 'test -f /etc/staged-initrd'
        vg unlock
        value unlock-status $?
        check mapped 'test -b /dev/mapper/{NAME}'
        check audit-diff 'grep "tpm_refused" /run/vaultguard/audit-initrd.jsonl | grep -q "eventlog_diff"'
    """)
    b = s.boot(initrd=b_path, cmdline=CMDLINE, ovmf=True, label="boot2-staged")
    for p in ("7", "9"):
        got = b.value(f"pcr{p}", 120)
        if got != predicted["pcrs"][p]:
            b.fail(f"PCR {p} is {got} after the reboot, predicted {predicted['pcrs'][p]}")
    b.expect_pass("staged-is-booted")
    b.expect(rf"TPM unlock of {NAME} not possible: PCR 9 changed since enrolment", 90)
    b.expect(r"vaultguard:   PCR 9: EV_EVENT_TAG tag 0x8F3B22EC \"Linux initrd\": "
             rf"{a_sha} -> {b_sha}", 30)
    b.expect(rf"Passphrase for {NAME} \(/dev/vda\): ", 30)
    b.sendline(harness.PASSPHRASE)
    if b.value("unlock-status", 90) != "0":
        b.fail("passphrase unlock failed")
    b.expect_pass("mapped")
    b.expect_pass("audit-diff")
    b.assert_absent(r"vaultguard:   PCR 7", "PCR 7 did not change")
    b.expect_poweroff()

    # Boot 3 (A): the enrolled initrd unlocks with the TPM, no prompt.
    step(f"""
        vg unlock
        value unlock-status $?
        check mapped 'test -b /dev/mapper/{NAME}'
    """)
    b = s.boot(initrd=a_path, cmdline=CMDLINE, ovmf=True, label="boot3-enrolled")
    b.expect(rf"vaultguard: {NAME} unlocked with the TPM, phase PCR extended\r?\n", 120)
    if b.value("unlock-status", 60) != "0":
        b.fail("TPM unlock failed")
    b.expect_pass("mapped")
    b.assert_absent(r"Passphrase for", "the TPM unlock should not prompt")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
