#!/usr/bin/env python3
"""UEFI (OVMF) + swtpm, the signed update workflow: enrol with a public key over PCR 9 (+ literal 7), predict | sign a staged initrd on the running system, reboot into it: TPM unlock, no prompt; an initrd nobody signed: refused, passphrase.

Needs issue 13's signed policies (`enroll --public-key`, `policy sign`). As in
uefi_eventlog, one initramfs (A) runs the script the host leaves on the `script`
disk; B (staged) and C (tampered) are A plus one different cpio member each. The
signature file lives on the `sigs` disk between boots (never in the initrd, whose
bytes PCR 9 measures) and is restored to /etc/systemd/tpm2-pcr-signature.json,
where systemd-cryptsetup (and vaultguard) look.
Boot 1 (A): enrol (--public-key, --public-key-pcrs 9, --tpm2-pcrs 7); sign this
boot's PCR 9; `policy predict --initrd B --json | policy sign --predicted -
--append`; `policy ticket` keeps the TPM's verification tickets in the file (the
unlocks below send PolicyAuthorize with them; boot 4 shows one does not outlive
revocation). Boot 2 (B): the TPM unlocks, no prompt. Boot 3 (C): refused, naming the
initrd record of PCR 9 (A's and C's SHA-256), the passphrase opens.

Revocation rides along on a second volume (`rvault`), enrolled in boot 1 with the
same key and `--revocation-counter`, its signatures (made with the counter) in the
same file: boot 2 opens it with the TPM too (attached first, without the phase
latch), boot 3 refuses it and, once it is open with the passphrase, runs `policy
revoke-older`. Boot 4 (B again, signed before): the plain volume still opens with
the TPM, the revocable one is refused ("withdrawn") and asks for the passphrase."""
import hashlib
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

NAME = "secure-ai-vault"
CMDLINE = "rd.vaultguard.device=/dev/vda"
KEY = "/etc/vaultguard/policy-key.pem"
PUB = "/etc/vaultguard/policy-pub.pem"
SIG = "/etc/systemd/tpm2-pcr-signature.json"
RVAULT = "rvault"
COUNTER = "0x013fa0d2"
# Its own passphrase: with the vault's, the passphrase cache would open it after
# the vault's prompt and the refusal would never ask.
RPASS = "revocable volume passphrase"
# The revocable volume is attached first, without the phase latch, so that the
# plain one can still unseal in the same boot.
ATTACH_R = f'vg attach {RVAULT} "$(disk {RVAULT})" - tpm2-measure-pcr=no'


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def variant(s, a_path, label, text):
    """A plus a second (concatenated) newc archive holding one file."""
    d = s.path(f"{label}-extra")
    os.makedirs(os.path.join(d, "etc"), exist_ok=True)
    with open(os.path.join(d, "etc", "variant"), "w") as f:
        f.write(text + "\n")
    extra = subprocess.run("find etc | cpio -o -H newc --quiet", shell=True, cwd=d,
                           capture_output=True, check=True).stdout
    out = s.path(f"{label}.initramfs.cpio")
    with open(a_path, "rb") as f, open(out, "wb") as o:
        o.write(f.read() + extra)
    return out


def run(s):
    s.luks_disk("vault")  # /dev/vda, as rd.vaultguard.device says
    s.luks_disk(RVAULT, size_mb=32, passphrase=RPASS)
    script = s.disk("script", size_mb=1)
    s.disk("sigs", size_mb=1)
    key = s.path("policy-key.pem")
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", key], check=True, capture_output=True)
    pub = subprocess.run(["openssl", "pkey", "-in", key, "-pubout"], check=True,
                         capture_output=True).stdout
    a_path = s.build_initrd("A", f"""
        mount -t securityfs securityfs /sys/kernel/security
        mkdir -p /etc/systemd
        tr -d '\\000' < "$(disk sigs)" > {SIG}
        [ -s {SIG} ] || rm -f {SIG}
        tr -d '\\000' < "$(disk script)" > /tmp/step.sh
        . /tmp/step.sh
    """, files={KEY: open(key, "rb").read(), PUB: pub})
    b_path = variant(s, a_path, "B", "the staged initrd, signed before the reboot")
    c_path = variant(s, a_path, "C", "a tampered initrd nobody signed")
    b_size = os.path.getsize(b_path)
    staged = s.disk("staged", size_mb=(b_size >> 20) + 2)
    with open(staged.path, "r+b") as f, open(b_path, "rb") as b:
        f.write(b.read())

    def step(text):
        with open(script.path, "r+b") as f:
            f.write(harness._dedent(text).encode().ljust(1 << 20, b"\0"))

    # Boot 1 (A): enrol with the public key; sign this boot and the staged initrd.
    step(f"""
        vg enroll --public-key {PUB} --public-key-pcrs 9 --tpm2-pcrs 7
        value enroll-status $?
        vg policy sign --private-key {KEY} --public-key-pcrs 9 --signature /tmp/sig.json
        value sign-now-status $?
        head -c {b_size} "$(disk staged)" > /tmp/staged.img
        vg policy predict --initrd /tmp/staged.img --pcrs 9 --json |
            vg policy sign --private-key {KEY} --public-key-pcrs 9 --predicted - \\
                --signature /tmp/sig.json --append
        value sign-staged-status $?
        check two-signatures 'test "$(grep -o "\\"pol\\"" /tmp/sig.json | wc -l)" = 2'
        printf '%s' '{RPASS}' > /tmp/pass
        vg enroll --device "$(disk {RVAULT})" --public-key {PUB} --public-key-pcrs 9 \
            --tpm2-pcrs 7 --revocation-counter {COUNTER} --unlock-passphrase-file /tmp/pass
        value enroll-r-status $?
        rm -f /tmp/pass
        vg policy sign --private-key {KEY} --public-key-pcrs 9 --signature /tmp/sig.json \
            --append --revocation-counter {COUNTER}
        value sign-r-now-status $?
        vg policy predict --initrd /tmp/staged.img --pcrs 9 --json |
            vg policy sign --private-key {KEY} --public-key-pcrs 9 --predicted - \
                --signature /tmp/sig.json --append --revocation-counter {COUNTER}
        value sign-r-staged-status $?
        check four-signatures 'test "$(grep -o "\\"pol\\"" /tmp/sig.json | wc -l)" = 4'
        vg policy ticket --signature /tmp/sig.json --json > /tmp/ticket.json
        value ticket-status $?
        vg policy ticket --device "$(disk {RVAULT})" --signature /tmp/sig.json
        value ticket-r-status $?
        check four-tickets 'grep -q "\\"tickets\\":2" /tmp/ticket.json &&
            test "$(grep -o "\\"vaultguard_ticket\\"" /tmp/sig.json | wc -l)" = 4'
        cat /tmp/sig.json > "$(disk sigs)"
        sync
    """)
    b = s.boot(initrd=a_path, cmdline=CMDLINE, ovmf=True, label="boot1-enrol-sign")
    b.expect(rf"Passphrase for {NAME} \(/dev/vda\): ", 120)
    b.sendline(harness.PASSPHRASE)
    for v in ("enroll-status", "sign-now-status", "sign-staged-status"):
        if b.value(v, 120) != "0":
            b.fail(f"{v} is not 0")
    b.expect_pass("two-signatures")
    for v in ("enroll-r-status", "sign-r-now-status", "sign-r-staged-status"):
        if b.value(v, 120) != "0":
            b.fail(f"{v} is not 0")
    b.expect_pass("four-signatures")
    for v in ("ticket-status", "ticket-r-status"):
        if b.value(v, 60) != "0":
            b.fail(f"{v} is not 0")
    b.expect_pass("four-tickets")
    b.expect_poweroff()

    # Boot 2 (B): signed before the reboot: the TPM opens the vault, no prompt.
    staged_step = f"""
        check staged-is-booted 'grep -q "signed before the reboot" /etc/variant'
        {ATTACH_R}
        value attach-r-status $?
        vg unlock
        value unlock-status $?
        check mapped 'test -b /dev/mapper/{NAME} && test -b /dev/mapper/{RVAULT}'
    """
    step(staged_step)
    b = s.boot(initrd=b_path, cmdline=CMDLINE, ovmf=True, label="boot2-signed")
    b.expect_pass("staged-is-booted", 120)
    b.expect(rf"vaultguard: {RVAULT} unlocked with the TPM\r?\n", 90)
    if b.value("attach-r-status", 30) != "0":
        b.fail("TPM attach of the revocable volume failed")
    b.expect(rf"vaultguard: {NAME} unlocked with the TPM, phase PCR extended\r?\n", 90)
    if b.value("unlock-status", 60) != "0":
        b.fail("TPM unlock of the signed staged initrd failed")
    b.expect_pass("mapped")
    b.assert_absent(r"Passphrase for", "the signed initrd should not prompt")
    b.expect_poweroff()

    # Boot 3 (C): nobody signed it: refused, the passphrase opens.
    step(f"""
        check tampered-is-booted 'grep -q "nobody signed" /etc/variant'
        vg unlock
        value unlock-status $?
        check mapped 'test -b /dev/mapper/{NAME}'
        {ATTACH_R}
        value attach-r-status $?
        vg policy revoke-older --device "$(disk {RVAULT})" --json > /tmp/revoke.json
        value revoke-status $?
        value revoke "$(cat /tmp/revoke.json)"
    """)
    b = s.boot(initrd=c_path, cmdline=CMDLINE, ovmf=True, label="boot3-unsigned")
    b.expect_pass("tampered-is-booted", 120)
    b.expect(rf"TPM unlock of {NAME} not possible: ", 90)
    # Which record made it unsigned: the initrd, A's digest at enrolment, C's now.
    b.expect(r"vaultguard:   PCR 9: EV_EVENT_TAG tag 0x8F3B22EC \"Linux initrd\": "
             rf"{sha(a_path)} -> {sha(c_path)}", 30)
    b.expect(rf"Passphrase for {NAME} \(/dev/vda\): ", 30)
    b.sendline(harness.PASSPHRASE)
    if b.value("unlock-status", 90) != "0":
        b.fail("passphrase unlock failed")
    b.expect_pass("mapped")
    # The vault's unlock extended the phase PCR: that is the reason given.
    b.expect(rf"TPM unlock of {RVAULT} not possible: PCR 15 \(phase\) is already extended", 90)
    b.expect(rf"Passphrase for {RVAULT} \(/dev/vd[a-z]\): ", 90)
    b.sendline(RPASS)
    if b.value("attach-r-status", 90) != "0" or b.value("revoke-status", 60) != "0":
        b.fail("passphrase attach or revoke-older of the revocable volume failed")
    revoke = json.loads(b.value("revoke", 10))
    if revoke.get("new_value") != revoke.get("old_value", -1) + 1 or \
            revoke.get("current_boot_signed") is not False:
        b.fail(f"revoke-older reported {revoke}")
    b.expect_poweroff()

    # Boot 4 (B again, signed before the revocation): the plain enrolment still
    # opens with the TPM; the revocable one is refused as withdrawn, passphrase.
    step(staged_step)
    b = s.boot(initrd=b_path, cmdline=CMDLINE, ovmf=True, label="boot4-revoked")
    b.expect_pass("staged-is-booted", 120)
    b.expect(rf"TPM unlock of {RVAULT} not possible: .*revocation counter {COUNTER} = "
             rf"{revoke['old_value']}.*is at {revoke['new_value']}.*withdrawn", 90)
    b.expect(rf"Passphrase for {RVAULT} \(/dev/vd[a-z]\): ", 30)
    b.sendline(RPASS)
    if b.value("attach-r-status", 60) != "0":
        b.fail("boot 4: the passphrase attach of the revocable volume failed")
    b.expect(rf"vaultguard: {NAME} unlocked with the TPM, phase PCR extended\r?\n", 90)
    if b.value("unlock-status", 60) != "0":
        b.fail("boot 4: the plain signed enrolment did not open with the TPM")
    b.expect_pass("mapped")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
