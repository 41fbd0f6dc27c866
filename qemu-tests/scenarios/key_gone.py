#!/usr/bin/env python3
"""Key gone: after a lock, a dump of the guest's whole memory holds neither the volume key nor the passphrase.

The host makes a LUKS2 volume with a passphrase used nowhere else and reads its
volume key with `cryptsetup luksDump --dump-volume-key` (batch mode, passphrase
from a file). The guest runs the supervisor; the passphrase is typed at
`vaultguard unlock` (it travels over the control socket), the vault is mounted and
used. The host dumps the guest's memory from the QEMU monitor (dump-guest-memory
over QMP) and searches it for the key (whole, and each XTS half, which is how the
kernel's cipher contexts hold it) and for the passphrase: the key must be found
(so the search is real). Then `vaultguard lock`, a second dump: zero hits for
each. Any hit is reported with its offset and surrounding bytes, to tell where it
lives. (A control: the text just written to the vault is found in the first dump,
so a string search that finds nothing is not blind.) Runs without init_on_free:
nothing of ours or the kernel's was left behind on this path."""
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

NAME = "secure-ai-vault"
# Used by no other scenario, so that a hit can only come from this boot.
PASSPHRASE = "kg-Quokka-7f3a9c-ledger-harbour"
SECRET = "retrieval corpus shard 3 of 9"

CONFIG = {
    "vault": {"device": "/dev/vda", "mount": "/mnt/vault", "fstype": "ext4"},
    "auth": {"state_path": "/var/lib/vaultguard/lockout.json"},
    "audit": {"path": "/var/log/vaultguard/audit.jsonl"},
}

# After each dump the host types `go` to let the body continue.
BODY = f"""
    rm /etc/initrd-release
    /usr/bin/vaultguard supervise --auto-lock-seconds 600 2>/run/supervisor.log &
    sup=$!
    check socket 'wait_for /run/vaultguard/control.sock 10'
    mark type-passphrase
    vg unlock
    value unlock-rc $?
    mkdir -p /mnt/vault
    check mounted 'grep -q " /mnt/vault " /proc/mounts'
    echo "{SECRET}" > /mnt/vault/shard.txt
    sync
    check reads-back 'grep -qx "{SECRET}" /mnt/vault/shard.txt'
    mark dump-unlocked
    read -r go
    vg lock
    value lock-rc $?
    check unmapped '! test -e /dev/mapper/{NAME}'
    check state-locked 'vg status --json | grep -q "\\"state\\":\\"locked\\""'
    mark dump-locked
    read -r go
    kill $sup; wait $sup
    value supervisor-exit $?
"""


def volume_key(disk, passphrase):
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write(passphrase)
        pf = f.name
    try:
        out = subprocess.run(["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode",
                              "--key-file", pf, disk.path],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(pf)
    m = re.search(r"MK dump:\s*((?:[0-9a-f]{2}\s+)+)", out)
    if not m:
        raise harness.ScenarioFailed(f"no MK dump in luksDump output:\n{out}")
    key = bytes.fromhex("".join(m.group(1).split()))
    if len(key) != 64:
        raise harness.ScenarioFailed(f"expected a 512-bit XTS key, got {len(key) * 8} bits")
    return key


def search(path, needles):
    """{label: [(offset, context)]} for each needle."""
    return {label: harness.search_dump(path, n) for label, n in needles.items()}


def report(found):
    lines = []
    for label, hits in found.items():
        for off, ctx in hits:
            lines.append(f"  {label} at 0x{off:x}: {ctx.hex()} {ctx!r}")
    return "\n".join(lines)


def run(s):
    vault = s.luks_disk("vault", ext4=True, passphrase=PASSPHRASE)
    key = volume_key(vault, PASSPHRASE)
    needles = {
        "volume key": key,
        "key half 1": key[:32],
        "key half 2": key[32:],
        "passphrase": PASSPHRASE.encode(),
    }
    b = s.boot(BODY, qmp=True, files={"/etc/vaultguard/config.json": json.dumps(CONFIG)})
    b.expect_pass("socket", 90)
    b.expect_mark("type-passphrase", 30)
    b.expect(r"Vault passphrase: ", 30)
    b.sendline(PASSPHRASE)
    if b.value("unlock-rc", 90) != "0":
        b.fail("unlock over the socket failed")
    for c in ("mounted", "reads-back"):
        b.expect_pass(c, 30)
    b.expect_mark("dump-unlocked", 30)
    dump = s.path("memory.elf")
    b.dump_memory(dump)
    before = search(dump, needles)
    # A control for the text search: the file just written is in the page cache.
    control = harness.search_dump(dump, SECRET.encode(), limit=1)
    os.unlink(dump)
    if not control:
        b.fail("the text written to the vault is not in memory either: the dump or the search is broken")
    harness.log("unlocked: " + ", ".join(f"{k} {len(v)} hit(s)" for k, v in before.items()))
    if not (before["key half 1"] or before["key half 2"] or before["volume key"]):
        b.fail("the volume key is not in the memory of an unlocked vault: the search is not real")
    b.sendline("go")
    if b.value("lock-rc", 90) != "0":
        b.fail("vaultguard lock failed")
    for c in ("unmapped", "state-locked"):
        b.expect_pass(c, 30)
    b.expect_mark("dump-locked", 30)
    b.dump_memory(dump)
    after = search(dump, needles)
    os.unlink(dump)
    harness.log("locked: " + ", ".join(f"{k} {len(v)} hit(s)" for k, v in after.items()))
    if any(after.values()):
        b.fail("after the lock the memory still holds:\n" + report(after))
    b.sendline("go")
    if b.value("supervisor-exit", 30) != "0":
        b.fail("the supervisor did not stop cleanly")
    b.assert_absent(PASSPHRASE, "the passphrase reached the console")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
