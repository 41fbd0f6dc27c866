#!/usr/bin/env python3
"""The crypttab options that only device-mapper can show, in a guest that has it.

`vaultguard attach` with discard, same-cpu-crypt, submit-from-crypt-cpus,
no-read-workqueue, no-write-workqueue and read-only: the dm table carries each
flag and the mapping is read-only; the key comes from a key file through
keyfile-offset=/keyfile-size=. `detach` closes it, and `detach` again says the
name is not open (exit 0). The host tests (tests/crypttab_options.rs) cover the
other rows without device-mapper."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

NAME = "vgopts"
OPTIONS = ("discard,same-cpu-crypt,submit-from-crypt-cpus,no-read-workqueue,"
           "no-write-workqueue,read-only,keyfile-offset=7,"
           f"keyfile-size={len(harness.PASSPHRASE)},tpm2-measure-pcr=no,"
           "x-vaultguard.no-tpm,headless")


def run(s):
    s.luks_disk("vault")
    b = s.boot(f"""
        vg attach {NAME} /dev/vda /etc/padded.key {OPTIONS}
        value attach-status $?
        table=$(dmsetup table {NAME})
        echo "dm table: $table"
        for f in allow_discards same_cpu_crypt submit_from_crypt_cpus no_read_workqueue no_write_workqueue; do
            check "flag-$f" "echo \\"$table\\" | grep -qw $f"
        done
        check read-only "dmsetup info {NAME} | grep -q READ-ONLY"
        vg detach {NAME}
        value detach-status $?
        check unmapped '! test -e /dev/mapper/{NAME}'
        vg detach {NAME}
        value detach-again-status $?
        vg --json detach {NAME}
    """, files={"/etc/padded.key": "PADDING" + harness.PASSPHRASE + "junk after the key"},
        dynamic=harness.CRYPTSETUP)
    b.expect(rf"vaultguard: {NAME} unlocked with the key file\r?\n", 90)
    if b.value("attach-status") != "0":
        b.fail("attach with the crypttab options failed")
    for f in ("allow_discards", "same_cpu_crypt", "submit_from_crypt_cpus",
              "no_read_workqueue", "no_write_workqueue"):
        b.expect_pass(f"flag-{f}")
    b.expect_pass("read-only")
    if b.value("detach-status") != "0":
        b.fail("detach failed")
    b.expect_pass("unmapped")
    b.expect(rf"vaultguard: {NAME} is not open; nothing was closed", 30)
    if b.value("detach-again-status") != "0":
        b.fail("detach of a closed name exited non-zero")
    b.expect(r'\{"name":"vgopts","success":true,"was_open":false\}', 30)
    b.assert_absent(r"ignoring", "no option should have been ignored")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
