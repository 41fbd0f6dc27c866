#!/usr/bin/env python3
"""vaultguard starts and prints --help in an initramfs with no shared library at all."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402


def run(s):
    # static_only: the build fails if any file in the image is a dynamically linked
    # program or a shared object (PT_INTERP, DT_NEEDED or DT_SONAME).
    b = s.boot("""
        check no-dynamic-loader '! ls /lib64/ld-linux* /lib/x86_64-linux-gnu/ld-linux* 2>/dev/null'
        check no-libc '! find / -xdev -name "libc.so*" | grep -q .'
        check controlling-tty 'test -t 0 && printf "" > /dev/tty'
        vg --help; value help-status $?
        vg version; value version-status $?
    """, static_only=True)
    b.expect_pass("no-dynamic-loader")
    b.expect_pass("no-libc")
    b.expect_pass("controlling-tty")
    b.expect(r"Usage: vaultguard .*<command>", 30)
    b.expect(r"(?m)^\s+unlock\s+open the vault", 10)
    b.expect(r"(?m)^\s+enroll\s+", 10)
    if b.value("help-status") != "0":
        b.fail("vaultguard --help exited non-zero")
    b.expect(r"(?m)^vaultguard \d+\.\d+\.\d+", 10)
    b.expect(r"libcryptsetup 2\.\d+\.\d+ \(static\)", 10)
    b.expect(r"tpm2-tss 4\.\d+\.\d+ \(static", 10)
    if b.value("version-status") != "0":
        b.fail("vaultguard version exited non-zero")
    b.assert_absent(r"error while loading shared libraries|not found", "a program could not start")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
