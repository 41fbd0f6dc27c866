#!/usr/bin/env python3
"""Harness self-check: TPM state survives a hard reset; a NIC change moves PCR 2 only.

SeaBIOS measures PCRs 0-7; the NIC's option ROM goes into PCR 2. The TPM's NV is
written before the hard reset and read after it, and the active PCR banks are the
ones the pristine TPM was manufactured with."""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

NV_INDEX = "0x1500016"

READ_PCRS = """
    export TPM2TOOLS_TCTI=device:/dev/tpmrm0
    check tpm-device 'test -c /dev/tpmrm0'
    for n in 0 1 2 3 4 5 6 7 15; do value pcr$n "$(pcr sha256 $n)"; done
    echo "sysfs banks: $(ls -d /sys/class/tpm/tpm0/pcr-* | sed 's,.*/pcr-,,' | tr '\\n' ' ')"
    tpm2_getcap pcrs | tr -d ' \\n'; echo
    value lockout-counter "$(tpm2_getcap properties-variable | sed -n 's/^TPM2_PT_LOCKOUT_COUNTER: *//p' | tr -d ' ')"
"""


def pcrs(b):
    return {n: b.value(f"pcr{n}") for n in (0, 1, 2, 3, 4, 5, 6, 7, 15)}


def run(s):
    b = s.boot(READ_PCRS + f"""
        check nv-define 'tpm2_nvdefine {NV_INDEX} -C o -s 8 -a "ownerread|ownerwrite"'
        check nv-write 'printf harness1 | tpm2_nvwrite {NV_INDEX} -C o -i -'
        mark nv-written
        sleep 60
    """, dynamic=harness.TPM2_TOOLS, libs=harness.TPM2_TOOLS_LIBS, nic="none", vaultguard=False)
    b.expect_pass("tpm-device")
    first = pcrs(b)
    banks = b.expect(r"selected-pcrs:(\S*)\n").group(1)
    active = sorted(set(re.findall(r"-(sha\w+):\[[0-9,]+\]", banks)))
    harness.log(f"active PCR banks: {', '.join(active)} (tpm2_getcap: {banks})")
    if s.pcr_banks.split(",") != active:
        b.fail(f"active banks {active}, manufactured with {s.pcr_banks}")
    b.expect_pass("nv-write")
    b.expect_mark("nv-written")
    b.hard_reset()  # power cut: no TPM2_Shutdown; the NV write must still be there

    b = s.boot(READ_PCRS + f"""
        value nv "$(tpm2_nvread {NV_INDEX} -C o -s 8)"
    """, dynamic=harness.TPM2_TOOLS, libs=harness.TPM2_TOOLS_LIBS, nic="virtio", vaultguard=False)
    second = pcrs(b)
    harness.log(f"TPM lockout counter after the hard reset: {b.value('lockout-counter')}")
    if b.value("nv") != "harness1":
        b.fail("the NV index written before the hard reset is gone: the TPM state did not persist")
    b.expect_poweroff()

    if any(not re.fullmatch(r"[0-9a-f]{64}", v) for v in first.values()):
        raise harness.ScenarioFailed(f"unreadable sha256 PCRs: {first}")
    if first[2] == second[2]:
        raise harness.ScenarioFailed(f"PCR 2 did not change with the NIC: {first[2]}")
    same = [n for n in (0, 1, 3, 4, 5, 6, 7) if first[n] != second[n]]
    if same:
        raise harness.ScenarioFailed(f"PCRs {same} changed with the NIC; only PCR 2 should")
    if first[15] != "0" * 64 or second[15] != "0" * 64:
        raise harness.ScenarioFailed("PCR 15 is not zero at boot")
    if first[0] == "0" * 64 or first[4] == "0" * 64:
        raise harness.ScenarioFailed("PCRs 0 and 4 are zero: the firmware measured nothing")


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
