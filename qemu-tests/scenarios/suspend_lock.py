#!/usr/bin/env python3
"""Lock on suspend: the suspend unit's command locks before S3; after wake-up the TPM does not reopen the vault, the passphrase over the socket does.

Boot 1 enrols. Boot 2 (S3 enabled in QEMU) unlocks by TPM (PCR 15 latched), mounts,
starts a stand-in service (a process whose working directory is in the vault, so
the vault cannot be unmounted until it is stopped; `systemctl` is a stand-in that
stops and starts it) and the supervisor. It then runs the command named by
ExecStart= in systemd/vaultguard-suspend.service (read from the unit, so the unit
is what is tested) and sleeps (`echo mem > /sys/power/state`, mem_sleep `deep`).
The host waits until QEMU reports the guest suspended and wakes it from the QEMU
monitor (`system_wakeup`). Asserted: the lock (reason `suspend`: state file,
audit) completed, the service stopped and the mapping closed before the kernel's
suspend entry; after wake-up the vault is still locked, the TPM refuses to
unseal again (PCR 15 still extended), and the passphrase over the socket opens it
with the data intact."""
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402

NAME = "secure-ai-vault"
SECRET = "lora adapter, rank 16, checkpoint 1200"
ZERO = "0" * 64
UNIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "systemd",
                    "vaultguard-suspend.service")

CONFIG = {
    "vault": {"device": "/dev/vda", "mount": "/mnt/vault", "fstype": "ext4",
              "services": ["model.service"], "lock_on_suspend": True},
    "auth": {"state_path": "/var/lib/vaultguard/lockout.json"},
    "audit": {"path": "/var/log/vaultguard/audit.jsonl"},
}

# `systemctl stop|start model.service` for a guest without systemd: the service
# is a process whose cwd is the vault (so it holds the mount busy).
SYSTEMCTL = r"""#!/bin/sh
echo "$(cut -d' ' -f1 /proc/uptime) systemctl $*" >> /run/systemctl.log
case "$1" in
stop) [ -f /run/model.pid ] && kill "$(cat /run/model.pid)" 2>/dev/null
      while [ -f /run/model.pid ] && kill -0 "$(cat /run/model.pid)" 2>/dev/null; do sleep 0.05; done
      rm -f /run/model.pid ;;
start|--no-block) ;;
esac
exit 0
"""

BODY = f"""
    cp /etc/systemctl.stand-in /usr/bin/systemctl && chmod 0755 /usr/bin/systemctl
    value pcr15-before "$(pcr sha256 15)"
    vg unlock --headless
    value tpm-unlock-rc $?
    value pcr15-after "$(pcr sha256 15)"
    mkdir -p /mnt/vault
    check mount 'mount -t ext4 /dev/mapper/{NAME} /mnt/vault'
    echo "{SECRET}" > /mnt/vault/adapter.txt
    sync
    (cd /mnt/vault && exec sleep 100000) &
    echo $! > /run/model.pid
    rm /etc/initrd-release
    /usr/bin/vaultguard supervise 2>/run/supervisor.log &
    sup=$!
    check socket 'wait_for /run/vaultguard/control.sock 10'
    check unlocked 'vg status --json | grep -q "\\"state\\":\\"unlocked\\""'
    cmd=$(sed -n 's/^ExecStart=//p' /etc/vaultguard-suspend.service)
    echo "suspend unit runs: $cmd"
    $cmd
    value suspend-lock-rc $?
    value lock-done-at "$(cut -d' ' -f1 /proc/uptime)"
    check state-locked-suspend 'grep -q "\\"detail\\":\\"suspend\\"" /run/vaultguard/state.json && grep -q "\\"state\\":\\"locked\\"" /run/vaultguard/state.json'
    check audit-lock-suspend 'grep -q "\\"event\\":\\"lock\\".*\\"reason\\":\\"suspend\\"" /var/log/vaultguard/audit.jsonl'
    check service-stopped '! test -f /run/model.pid && grep -q "systemctl stop model.service" /run/systemctl.log'
    check unmounted '! grep -q " /mnt/vault " /proc/mounts'
    check unmapped '! test -e /dev/mapper/{NAME}'
    cat /sys/power/mem_sleep
    echo deep > /sys/power/mem_sleep
    dmesg -n 1
    mark sleeping
    echo mem > /sys/power/state
    value sleep-rc $?
    mark awake
    value suspend-entry "$(dmesg | sed -n 's/^\\[ *\\([0-9.]*\\)\\] PM: suspend entry.*/\\1/p' | head -n 1)"
    value resumed "$(dmesg | grep -c 'PM: suspend exit')"
    check still-locked-after-wake 'vg status --json | grep -q "\\"state\\":\\"locked\\"" && ! test -e /dev/mapper/{NAME}'
    value pcr15-after-wake "$(pcr sha256 15)"
    vg unlock --local --headless
    value tpm-after-wake-rc $?
    check_not tpm-did-not-reopen 'test -e /dev/mapper/{NAME}'
    vg unlock --json --key-file /etc/test-passphrase
    value passphrase-unlock-rc $?
    check remounted 'grep -q " /mnt/vault " /proc/mounts'
    check data-intact 'grep -qx "{SECRET}" /mnt/vault/adapter.txt'
    check audit-verify 'vg audit verify'
    grep -o '"event":"[a-z_]*"\\|"reason":"[a-z_:]*"' /var/log/vaultguard/audit.jsonl | tr '\\n' ' '; echo
    kill $sup; wait $sup
    value supervisor-exit $?
"""


def exec_start():
    with open(UNIT) as f:
        text = f.read()
    m = re.search(r"^ExecStart=(.+)$", text, re.M)
    if not m:
        raise harness.ScenarioFailed("no ExecStart= in systemd/vaultguard-suspend.service")
    for want in ("Before=sleep.target", "WantedBy=sleep.target", "Type=oneshot"):
        if want not in text:
            raise harness.ScenarioFailed(f"vaultguard-suspend.service lacks {want}")
    return text, m.group(1)


def run(s):
    unit, cmd = exec_start()
    harness.log(f"the suspend unit runs: {cmd}")
    s.luks_disk("vault", ext4=True)
    cmdline = "rd.vaultguard.device=/dev/vda"
    s.enroll("--pcrs 0,2,4,7", cmdline=cmdline)
    b = s.boot(BODY, cmdline=cmdline, qmp=True,
               qemu_args=["-global", "PIIX4_PM.disable_s3=0"],
               files={"/etc/vaultguard/config.json": json.dumps(CONFIG),
                      "/etc/test-passphrase": harness.PASSPHRASE,
                      "/etc/systemctl.stand-in": SYSTEMCTL,
                      "/etc/vaultguard-suspend.service": unit})
    if b.value("pcr15-before", 90) != ZERO:
        b.fail("PCR 15 was not zero at boot")
    if b.value("tpm-unlock-rc", 90) != "0":
        b.fail("the TPM did not unlock at boot")
    if b.value("pcr15-after") == ZERO:
        b.fail("PCR 15 was not extended by the TPM unlock")
    for c in ("mount", "socket", "unlocked"):
        b.expect_pass(c, 60)
    b.expect(rf"suspend unit runs: {re.escape(cmd)}\n", 30)
    if b.value("suspend-lock-rc", 90) != "0":
        b.fail("the suspend unit's command failed")
    lock_done = float(b.value("lock-done-at"))
    for c in ("state-locked-suspend", "audit-lock-suspend", "service-stopped", "unmounted",
              "unmapped"):
        b.expect_pass(c, 30)
    b.expect_mark("sleeping", 30)
    b.wait_run_state("suspended", 60)
    harness.log("guest suspended (S3); waking it from the QEMU monitor")
    b.qmp("system_wakeup")
    b.expect_mark("awake", 60)
    entry = b.value("suspend-entry", 30)
    if not entry:
        b.fail("no 'PM: suspend entry' in the kernel log: the guest did not suspend")
    if not lock_done <= float(entry):
        b.fail(f"the lock finished at {lock_done} s, after the suspend entry at {entry} s")
    harness.log(f"locked at {lock_done} s, kernel suspend entry at {entry} s")
    if b.value("resumed") == "0":
        b.fail("no 'PM: suspend exit': the guest did not resume from S3")
    b.expect_pass("still-locked-after-wake", 30)
    if b.value("pcr15-after-wake") == ZERO:
        b.fail("PCR 15 was reset by the suspend: the TPM could unseal again")
    b.expect(r"TPM unlock of secure-ai-vault not possible: PCR 15 \(phase\) is already extended", 60)
    if b.value("tpm-after-wake-rc") == "0":
        b.fail("the TPM reopened the vault after wake-up")
    b.expect_pass("tpm-did-not-reopen")
    if b.value("passphrase-unlock-rc", 90) != "0":
        b.fail("the passphrase over the socket did not reopen the vault")
    for c in ("remounted", "data-intact", "audit-verify"):
        b.expect_pass(c, 30)
    events = b.expect(r'("(event|reason)":"[a-z_:]+" )+\n', 10).group(0)
    order = re.findall(r'"event":"([a-z_]+)"', events)
    if "lock" not in order or "unlock" not in order or order.index("lock") > order.index("unlock"):
        b.fail(f"audit order: expected lock (suspend) before the unlock: {events}")
    if '"reason":"suspend"' not in events:
        b.fail(f"no lock with reason suspend audited: {events}")
    if b.value("supervisor-exit") != "0":
        b.fail("the supervisor did not stop cleanly")
    b.assert_absent(harness.PASSPHRASE, "the passphrase reached the console")
    b.expect_poweroff()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
