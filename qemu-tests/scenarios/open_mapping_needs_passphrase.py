#!/usr/bin/env python3
"""Refusal: a mapping left open but unmounted does not let any passphrase through.

The vault is opened at boot (key file) but never mounted, as after a boot-time mount
failure or a lock whose close failed. The supervisor starts on it (state `unknown`,
detail `mapping_open_not_mounted`). An unlock with a wrong passphrase over the socket
is refused as a wrong passphrase, counted and audited as such, and nothing is mounted;
the right passphrase then mounts the vault (state `unlocked`), the data reads back,
and the same holds for an already-unlocked vault: a wrong passphrase is refused and
does not count as activity."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

NAME = "secure-ai-vault"
SECRET = "tokenizer merges, version 7"

CONFIG = {
    "vault": {"device": "/dev/vda", "mount": "/mnt/vault", "fstype": "ext4"},
    "auth": {"max_failed_attempts": 5, "state_path": "/var/lib/vaultguard/lockout.json"},
    "audit": {"path": "/var/log/vaultguard/audit.jsonl"},
}

BODY = f"""
    vg unlock --key-file /etc/test-passphrase
    mkdir -p /mnt/vault
    check seed 'mount -t ext4 /dev/mapper/{NAME} /mnt/vault && echo "{SECRET}" > /mnt/vault/data.txt && umount /mnt/vault'
    check mapped-not-mounted 'test -b /dev/mapper/{NAME} && ! grep -q " /mnt/vault " /proc/mounts'
    rm /etc/initrd-release
    /usr/bin/vaultguard supervise --auto-lock-seconds 600 2>/run/supervisor.log &
    sup=$!
    check socket 'wait_for /run/vaultguard/control.sock 10'
    check state-open-not-mounted 'vg status --json | grep -q "\\"detail\\":\\"mapping_open_not_mounted\\""'
    printf 'not-the-passphrase\\n' > /tmp/wrong
    vg unlock --json --key-file /tmp/wrong
    value wrong-rc $?
    check not-mounted-after-wrong '! grep -q " /mnt/vault " /proc/mounts'
    check not-unlocked-after-wrong '! vg status --json | grep -q "\\"state\\":\\"unlocked\\""'
    check audited-as-wrong 'grep -q "unlock_failed.*wrong_passphrase" /var/log/vaultguard/audit.jsonl'
    check no-unlock-audited '! grep -q "\\"event\\":\\"unlock\\"" /var/log/vaultguard/audit.jsonl'
    vg unlock --json --key-file /etc/test-passphrase
    value right-rc $?
    check mounted-after-right 'grep -q " /mnt/vault " /proc/mounts'
    check unlocked-after-right 'vg status --json | grep -q "\\"state\\":\\"unlocked\\""'
    check data-reads-back 'grep -qx "{SECRET}" /mnt/vault/data.txt'
    vg unlock --json --key-file /tmp/wrong
    value wrong-on-unlocked-rc $?
    check two-failures-audited 'test "$(grep -c "unlock_failed.*wrong_passphrase" /var/log/vaultguard/audit.jsonl)" = 2'
    check audit-verify 'vg audit verify'
    kill $sup; wait $sup
    value supervisor-exit $?
"""


def run(s):
    s.luks_disk("vault", ext4=True)
    b = s.boot(BODY, files={"/etc/vaultguard/config.json": json.dumps(CONFIG),
                            "/etc/test-passphrase": harness.PASSPHRASE})
    for c in ("seed", "mapped-not-mounted", "socket", "state-open-not-mounted"):
        b.expect_pass(c, 90)
    b.expect(r'\{"success":false,"error":"incorrect passphrase or device error"\}\n', 60)
    if b.value("wrong-rc", 30) == "0":
        b.fail("a wrong passphrase unlocked a vault whose mapping was open")
    for c in ("not-mounted-after-wrong", "not-unlocked-after-wrong", "audited-as-wrong",
              "no-unlock-audited"):
        b.expect_pass(c)
    if b.value("right-rc", 60) != "0":
        b.fail("the right passphrase did not mount the open mapping")
    for c in ("mounted-after-right", "unlocked-after-right", "data-reads-back"):
        b.expect_pass(c)
    if b.value("wrong-on-unlocked-rc", 60) == "0":
        b.fail("a wrong passphrase was accepted by an unlocked vault")
    for c in ("two-failures-audited", "audit-verify"):
        b.expect_pass(c)
    if b.value("supervisor-exit") != "0":
        b.fail("the supervisor did not stop cleanly on SIGTERM")
    b.assert_absent(harness.PASSPHRASE, "the passphrase reached the console")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
