#!/usr/bin/env python3
"""Two volumes in crypttab sharing one passphrase: one prompt.

Two LUKS2 disks with the same passphrase, an /etc/crypttab with a line for each,
and `vaultguard attach` called per line in order, as systemd-cryptsetup@.service
would be. The first attach asks on the console and, once the passphrase opened
its volume, caches it in the kernel keyring as systemd does (the `user` key
`cryptsetup` in the user keyring, 150 s); the second attach opens its volume from
that cache without asking. The console shows exactly one prompt, both mappings
exist, and the passphrase never appears on the console."""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

BODY = r"""
    d1=$(disk vol1) || exit 1
    d2=$(disk vol2) || exit 1
    printf 'vol1 %s none luks\nvol2 %s none luks\n' "$d1" "$d2" > /etc/crypttab
    # One attach per crypttab line, in order (the lines on fd 3: stdin stays the console).
    exec 3< /etc/crypttab
    while read -r name dev key opts <&3; do
        vg attach "$name" "$dev" "$key" "$opts"
        value "attach-$name" $?
    done
    exec 3<&-
    check vol1-mapped 'test -b /dev/mapper/vol1'
    check vol2-mapped 'test -b /dev/mapper/vol2'
    check cache-key 'grep -Eq " user +cryptsetup: " /proc/keys'
    check cache-key-expires '! grep -E " user +cryptsetup: " /proc/keys | grep -q " perm "'
    vg detach vol1
    vg detach vol2
"""


def run(s):
    s.luks_disk("vol1")
    s.luks_disk("vol2")
    b = s.boot(BODY)
    b.expect(r"Passphrase for vol1 \(/dev/vd[a-z]\): ", 90)
    b.sendline(harness.PASSPHRASE)
    if b.value("attach-vol1", 120) != "0":
        b.fail("the first attach failed with the right passphrase")
    if b.value("attach-vol2", 120) != "0":
        b.fail("the second attach failed: the cached passphrase did not open it")
    for c in ("vol1-mapped", "vol2-mapped", "cache-key", "cache-key-expires"):
        b.expect_pass(c)
    prompts = re.findall(r"Passphrase for \S+", b.output)
    if prompts != ["Passphrase for vol1"]:
        b.fail(f"expected exactly one prompt (for vol1), saw {prompts}")
    b.assert_absent(harness.PASSPHRASE, "the passphrase reached the console")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
