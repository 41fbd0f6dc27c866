#!/usr/bin/env python3
"""Supervisor: keepalive postpones the idle auto-lock, which then really locks; lockout; unlock over the socket.

The vault is opened at boot (key file), mounted, data written; the initramfs is left
(/etc/initrd-release removed) and `vaultguard supervise` runs with an 8 s idle
timeout. A keepalive postpones the lock; after 8 idle seconds the vault is
unmounted, closed and its keys revoked. Wrong passphrases over the socket lead to a
lockout with retry_after; after it the passphrase typed at `vaultguard unlock`
reopens and remounts the vault, the data reads back, `vaultguard lock` locks it
again, and the audit chain verifies."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

NAME = "secure-ai-vault"
SECRET = "embedding index, 4096 dims, do not leak"
IDLE = 8
LOCKOUT = 6

CONFIG = {
    "vault": {"device": "/dev/vda", "mount": "/mnt/vault", "fstype": "ext4"},
    "auth": {"max_failed_attempts": 3, "lockout_duration": LOCKOUT, "escalated_lockout": 30,
             "state_path": "/var/lib/vaultguard/lockout.json"},
    "audit": {"path": "/var/log/vaultguard/audit.jsonl"},
}

BODY = f"""
    # The kernel reaps invalidated keys asynchronously: allow it a moment.
    keys_gone() {{
        i=0; while grep -q "logon *cryptsetup:" /proc/keys; do
            i=$((i + 1)); [ $i -gt 20 ] && {{ grep cryptsetup: /proc/keys; return 1; }}; sleep 0.1
        done
    }}
    vg unlock --key-file /etc/test-passphrase
    mkdir -p /mnt/vault
    check mount 'mount -t ext4 /dev/mapper/{NAME} /mnt/vault'
    echo "{SECRET}" > /mnt/vault/index.txt
    sync
    rm /etc/initrd-release          # switch_root done: unlock now asks the supervisor
    /usr/bin/vaultguard supervise --auto-lock-seconds {IDLE} 2>/run/supervisor.log &
    sup=$!
    check socket 'wait_for /run/vaultguard/control.sock 10'
    check status-unlocked 'vg status --json | grep -q "\\"state\\":\\"unlocked\\""'
    vg status
    sleep 5
    check keepalive 'vg keepalive'
    t0=$(cut -d' ' -f1 /proc/uptime)
    sleep 5
    check still-unlocked-after-keepalive 'vg status --json | grep -q "\\"state\\":\\"unlocked\\""'
    check still-mounted 'grep -q " /mnt/vault " /proc/mounts'
    i=0
    until vg status --json | grep -q '"state":"locked"'; do
        i=$((i + 1)); [ $i -gt 200 ] && break; sleep 0.1
    done
    value idle-lock-after "$(awk -v t0=$t0 '{{printf "%.1f", $1 - t0}}' /proc/uptime)"
    vg status
    check auto-locked 'vg status --json | grep -q "\\"detail\\":\\"auto_lock_idle\\""'
    check unmounted '! grep -q " /mnt/vault " /proc/mounts'
    check unmapped '! test -e /dev/mapper/{NAME}'
    check no-keys 'keys_gone'
    check state-file 'grep -q "\\"state\\":\\"locked\\"" /run/vaultguard/state.json'
    printf 'wrong\\n' > /tmp/wrong
    for n in 1 2 3; do vg unlock --key-file /tmp/wrong; echo "wrong-$n rc=$?"; done
    vg unlock --json --key-file /etc/test-passphrase
    value refused-rc $?
    vg status --json
    check_not still-locked-in-lockout 'test -e /dev/mapper/{NAME}'
    sleep {LOCKOUT + 1}
    mark type-passphrase
    vg unlock
    value unlock-rc $?
    check remounted 'grep -q " /mnt/vault " /proc/mounts'
    check data-reads-back 'grep -qx "{SECRET}" /mnt/vault/index.txt'
    check no-key-left-in-the-supervisor 'keys_gone'
    check unlocked-by-passphrase 'vg status --json | grep -q "\\"detail\\":\\"passphrase\\""'
    check lock 'vg lock'
    check locked-manually 'vg status --json | grep -q "\\"detail\\":\\"manual_lock\\""'
    check closed '! test -e /dev/mapper/{NAME}'
    check audit-verify 'vg audit verify'
    check audit-auto-lock 'grep -q "event.:.lock.,.reason.:.auto_lock_idle" /var/log/vaultguard/audit.jsonl'
    grep -o '"event":"[a-z_]*"' /var/log/vaultguard/audit.jsonl | tr '\\n' ' '; echo
    kill $sup; wait $sup
    value supervisor-exit $?
    cat /run/supervisor.log
"""


def run(s):
    s.luks_disk("vault", ext4=True)
    b = s.boot(BODY, files={"/etc/vaultguard/config.json": json.dumps(CONFIG),
                            "/etc/test-passphrase": harness.PASSPHRASE})
    for c in ("mount", "socket", "status-unlocked", "keepalive",
              "still-unlocked-after-keepalive", "still-mounted"):
        b.expect_pass(c, 90)
    late = float(b.value("idle-lock-after", 60))
    harness.log(f"auto-lock {late:.1f} s after the last keepalive (timeout {IDLE} s)")
    if not IDLE - 0.5 <= late <= IDLE + 1.5:
        b.fail(f"auto-lock {late} s after the keepalive, expected {IDLE} s (+1 s, +polling)")
    for c in ("auto-locked", "unmounted", "unmapped", "no-keys", "state-file"):
        b.expect_pass(c)
    for n in (1, 2):
        b.expect(r"unlock failed: incorrect passphrase[^\n]*\n", 30)
        b.expect(rf"wrong-{n} rc=1\n", 10)
    b.expect(r"unlock failed: [^\n]*\(locked out: retry in \d+s\)\n", 30)
    # Exit status 4: locked out (README, "Exit statuses").
    b.expect(r"wrong-3 rc=4\n", 10)
    m = b.expect(r'\{"success":false,[^\n]*"retry_after":(\d+)[^\n]*\}\n', 30)
    if not 1 <= int(m.group(1)) <= LOCKOUT:
        b.fail(f"retry_after {m.group(1)}, expected 1..{LOCKOUT}")
    if b.value("refused-rc") != "4":
        b.fail("the right passphrase was not refused as locked out (exit 4) during the lockout")
    b.expect(r'"lockout_seconds":\d+', 10)
    b.expect_pass("still-locked-in-lockout")
    b.expect_mark("type-passphrase", 30)
    b.expect(r"Vault passphrase: ", 30)
    b.sendline(harness.PASSPHRASE)
    if b.value("unlock-rc", 60) != "0":
        b.fail("unlock over the socket failed after the lockout expired")
    for c in ("remounted", "data-reads-back", "no-key-left-in-the-supervisor", "unlocked-by-passphrase", "lock",
              "locked-manually", "closed", "audit-verify", "audit-auto-lock"):
        b.expect_pass(c)
    events = b.expect(r'("event":"[a-z_]+" )+\n', 10).group(0)
    for e in ("initrd_unlocked", "supervisor_start", "unlock_failed", "lockout", "unlock_refused",
              "unlock", "lock"):
        if f'"event":"{e}"' not in events:
            b.fail(f"audit event {e} missing: {events}")
    if b.value("supervisor-exit") != "0":
        b.fail("the supervisor did not stop cleanly on SIGTERM")
    b.assert_absent(harness.PASSPHRASE, "the passphrase reached the console")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
