#!/usr/bin/env python3
"""systemd interop in the guest: systemd-cryptsetup opens a vaultguard enrolment; vaultguard opens systemd-cryptenroll's.

Two boots, three LUKS2 volumes, the guest's TPM:
- vda: `vaultguard enroll` (passphrase typed); systemd-cryptsetup 257 (Debian 13)
  attaches it headless from the systemd-tpm2 token alone, with
  tpm2-measure-pcr=yes: the PCR 15 it leaves is read. Boot 2 (PCR 15 zero again):
  `vaultguard attach` opens the same volume under the same name, and the PCR 15
  its latch leaves must be systemd's, bank by bank that systemd measured;
- vdb: systemd-cryptenroll 252 (Debian 12: transient primary key, no PIN);
  `vaultguard attach` opens it without a prompt;
- vdc: systemd-cryptenroll 257 (persistent SRK, tpm2_srk, PIN); `vaultguard attach`
  asks for the PIN on the console and opens it.
Each mapping takes its key through the kernel keyring."""
import os
import pathlib
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

PIN = "4711-0815"
TRIXIE = pathlib.Path(harness.REPO) / "target" / "trixie-systemd"

BODY = f"""
    export SYSTEMD_LOG_TARGET=console
    pw=$(cat /etc/test-passphrase)
    vg enroll --device /dev/vda --pcrs 7
    value enroll-status $?
    value sd-pcr15-before "$(pcr sha256 15)"
    # systemd measures only when a UKI's stub measured the kernel (not so under
    # SeaBIOS); SYSTEMD_FORCE_MEASURE=1 is its documented override.
    SYSTEMD_FORCE_MEASURE=1 \\
    /opt/trixie/run systemd-cryptsetup attach vgenrolled /dev/vda - \
        tpm2-device=auto,headless=true,tpm2-measure-pcr=yes
    value sd257-attach-status $?
    value sd-pcr15-sha256 "$(pcr sha256 15)"
    value sd-pcr15-sha1 "$(pcr sha1 15 2>/dev/null || echo none)"
    check sd257-opened-vaultguard-enrolment 'test -b /dev/mapper/vgenrolled'
    /opt/trixie/run systemd-cryptsetup detach vgenrolled

    PASSWORD=$pw systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs=7 /dev/vdb
    value sd252-enroll-status $?
    PASSWORD=$pw NEWPIN={PIN} /opt/trixie/run systemd-cryptenroll --tpm2-device=auto \\
        --tpm2-pcrs=7 --tpm2-with-pin=yes /dev/vdc
    value sd257-enroll-status $?
    check sd252-token-has-no-srk '! cryptsetup token export --token-id 0 /dev/vdb | grep -q tpm2_srk'
    check sd257-token-has-srk 'cryptsetup token export --token-id 0 /dev/vdc | grep -q tpm2_srk'

    vg attach sd252 /dev/vdb - tpm2-device=auto,headless=true
    value vg-attach-252-status $?
    check vg-opened-sd252-enrolment 'test -b /dev/mapper/sd252'
    check sd252-key-via-keyring 'dmsetup table --showkeys sd252 | grep -q " :64:logon:cryptsetup:"'
    mark type-pin
    vg attach sd257 /dev/vdc - tpm2-device=auto
    value vg-attach-257-status $?
    check vg-opened-sd257-pin-enrolment 'test -b /dev/mapper/sd257'
    check sd257-key-via-keyring 'dmsetup table --showkeys sd257 | grep -q " :64:logon:cryptsetup:"'
    check no-volume-keys-left '! grep -q "logon *cryptsetup:" /proc/keys'
"""

# Boot 2: the same volume, the same name, opened by vaultguard; its latch (the
# measurement systemd makes with tpm2-measure-pcr=yes) from a PCR 15 of zeros.
BODY2 = """
    value vg-pcr15-before "$(pcr sha256 15)"
    vg attach vgenrolled /dev/vda - tpm2-device=auto,headless=true
    value vg-attach-vda-status $?
    check vg-opened-its-enrolment 'test -b /dev/mapper/vgenrolled'
    value vg-pcr15-sha256 "$(pcr sha256 15)"
    value vg-pcr15-sha1 "$(pcr sha1 15 2>/dev/null || echo none)"
    vg detach vgenrolled
"""
ZERO256 = "0" * 64
ZERO1 = "0" * 40


def run(s):
    s.luks_disk("vault", size_mb=32)
    s.luks_disk("sd252", size_mb=32)
    s.luks_disk("sd257", size_mb=32)
    r = harness.subprocess.run(["bash", os.path.join(harness.LIB, "trixie-systemd.sh"),
                                str(TRIXIE)], capture_output=True, text=True)
    if r.returncode != 0:
        raise harness.ScenarioFailed(f"trixie-systemd.sh failed:\n{r.stderr[-3000:]}")
    b = s.boot(BODY, dynamic=harness.SYSTEMD_CRYPT + harness.CRYPTSETUP,
               libs=harness.SYSTEMD_CRYPT_LIBS,
               trees=[(str(TRIXIE / "root"), "/opt/trixie/root")],
               files={"/opt/trixie/run": TRIXIE / "run",
                      "/etc/test-passphrase": harness.PASSPHRASE},
               modules=["af_alg", "algif_skcipher"], timeout=300)
    b.expect(r"Passphrase for secure-ai-vault \(/dev/vda\): ", 90)
    b.sendline(harness.PASSPHRASE)
    if b.value("enroll-status", 120) != "0":
        b.fail("vaultguard enroll failed")
    if b.value("sd-pcr15-before", 60) != ZERO256:
        b.fail("PCR 15 was not zero before systemd-cryptsetup attached")
    if b.value("sd257-attach-status", 120) != "0":
        b.fail("systemd-cryptsetup 257 could not attach the vaultguard enrolment")
    sd256 = b.value("sd-pcr15-sha256")
    sd1 = b.value("sd-pcr15-sha1")
    if sd256 == ZERO256:
        b.fail("systemd-cryptsetup 257 with tpm2-measure-pcr=yes did not extend PCR 15 (sha256)")
    b.expect_pass("sd257-opened-vaultguard-enrolment")
    if b.value("sd252-enroll-status", 120) != "0":
        b.fail("systemd-cryptenroll 252 failed")
    if b.value("sd257-enroll-status", 120) != "0":
        b.fail("systemd-cryptenroll 257 failed")
    b.expect_pass("sd252-token-has-no-srk")
    b.expect_pass("sd257-token-has-srk")
    if b.value("vg-attach-252-status", 120) != "0":
        b.fail("vaultguard could not open the systemd-cryptenroll 252 enrolment")
    b.expect_pass("vg-opened-sd252-enrolment")
    b.expect_pass("sd252-key-via-keyring")
    b.expect_mark("type-pin")
    b.expect(r"TPM2 PIN for sd257 \(/dev/vd[a-z], \d+ TPM tries left\): ", 90)
    b.sendline(PIN)
    if b.value("vg-attach-257-status", 120) != "0":
        b.fail("vaultguard could not open the systemd-cryptenroll 257 PIN enrolment")
    for c in ("vg-opened-sd257-pin-enrolment", "sd257-key-via-keyring", "no-volume-keys-left"):
        b.expect_pass(c)
    b.assert_absent(PIN, "the PIN was echoed")
    b.expect_poweroff()

    b = s.boot(BODY2, dynamic=harness.CRYPTSETUP, timeout=300)
    if b.value("vg-pcr15-before", 90) != ZERO256:
        b.fail("PCR 15 was not zero at boot 2")
    if b.value("vg-attach-vda-status", 120) != "0":
        b.fail("vaultguard could not attach its own enrolment in boot 2")
    b.expect_pass("vg-opened-its-enrolment")
    vg256 = b.value("vg-pcr15-sha256")
    vg1 = b.value("vg-pcr15-sha1")
    print(f"PCR 15 sha256: systemd-cryptsetup 257 {sd256}, vaultguard {vg256}")
    print(f"PCR 15 sha1:   systemd-cryptsetup 257 {sd1}, vaultguard {vg1}")
    if vg256 != sd256:
        b.fail(f"PCR 15 (sha256) after vaultguard's latch is {vg256}; "
               f"systemd-cryptsetup 257 left {sd256} on the same volume under the same name")
    # systemd measures the banks it judges good; where it measured sha1 too, the
    # values must agree there as well.
    if sd1 not in (ZERO1, "none") and vg1 != sd1:
        b.fail(f"PCR 15 (sha1) after vaultguard's latch is {vg1}; systemd left {sd1}")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
