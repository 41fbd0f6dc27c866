#!/usr/bin/env python3
"""Ten boots cut off by a hard reset right after the TPM unlock do not trip the TPM's dictionary-attack lockout.

A TPM counts an unclean shutdown against its dictionary-attack budget when a
DA-protected object was used in that power cycle; vaultguard's PIN-less sealed
objects are noDA, so power cuts (QEMU killed: no TPM2_Shutdown, no sync) leave the
lockout counter at 0 and the eleventh boot still unlocks by TPM. The contrast shows
the counter is read right: one power cut after a PIN unlock (a DA-protected object)
moves it to 1."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

NAME = "secure-ai-vault"
CMDLINE = "rd.vaultguard.device=/dev/vda"
RESETS = 10

LOCKOUT_COUNTER = """
    export TPM2TOOLS_TCTI=device:/dev/tpmrm0
    value lockout-counter "$(tpm2_getcap properties-variable | sed -n 's/^TPM2_PT_LOCKOUT_COUNTER: *//p' | tr -d ' ')"
"""


def run(s):
    s.luks_disk("vault", size_mb=32)
    s.enroll("--pcrs 7", cmdline=CMDLINE)

    for i in range(1, RESETS + 1):
        b = s.boot("""
            vg unlock --headless
            mark unlocked-$?
            sleep 60
        """, cmdline=CMDLINE, label=f"reset{i}")
        b.expect(rf"vaultguard: {NAME} unlocked with the TPM, phase PCR extended\n", 90)
        b.expect_mark("unlocked-0")
        b.hard_reset()

    b = s.boot(LOCKOUT_COUNTER + """
        vg unlock --headless
        value unlock-status $?
    """, cmdline=CMDLINE, dynamic=harness.TPM2_TOOLS, libs=harness.TPM2_TOOLS_LIBS)
    counter = b.value("lockout-counter", 90)
    harness.log(f"TPM lockout counter after {RESETS} hard resets: {counter}")
    if counter != "0x0":
        b.fail(f"the lockout counter is {counter} after {RESETS} power cuts, expected 0x0")
    if b.value("unlock-status", 90) != "0":
        b.fail(f"the TPM unlock failed after {RESETS} power cuts")
    b.expect_poweroff()

    # Contrast: a PIN enrolment is DA-protected; one power cut after using it counts.
    s.luks_disk("pinvault", size_mb=32)
    s.enroll("--device /dev/vdb --pcrs 7 --pin", device="/dev/vdb", pin="2468", cmdline=CMDLINE)
    b = s.boot("""
        vg attach pinvault /dev/vdb
        mark attached-$?
        sleep 60
    """, cmdline=CMDLINE, label="pin-reset")
    b.expect(r"TPM2 PIN for pinvault \(/dev/vd[a-z], \d+ TPM tries left\): ", 90)
    b.sendline("2468")
    b.expect_mark("attached-0")
    b.hard_reset()
    b = s.boot(LOCKOUT_COUNTER, dynamic=harness.TPM2_TOOLS, libs=harness.TPM2_TOOLS_LIBS)
    counter = b.value("lockout-counter", 90)
    harness.log(f"TPM lockout counter after one power cut following a PIN unlock: {counter}")
    if counter != "0x1":
        b.fail(f"the lockout counter is {counter} after a PIN unlock and a power cut, expected 0x1")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
