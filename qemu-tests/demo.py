#!/usr/bin/env python3
"""The main job, shown: a machine with a TPM boots twice and its AI vault unlocks itself.

Run by qemu-tests/demo.sh (which installs and builds first). Each boot is a real
QEMU guest with a software TPM (swtpm) and the static vaultguard in a minimal
initramfs; what the guest prints is shown as it happens, with a word on each step.
Every narrated step is also a check (enrol status, TPM unlock, keyring key, PCR 15,
mount, supervisor, keepalive, auto-lock with unmount, closed mapping and revoked key,
unlock over the socket, audit verdict, TPM anchor): any that fails fails the demo, and
qemu-tests/test.sh runs it as its last test step."""
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import harness  # noqa: E402

NAME = "secure-ai-vault"
IDLE = 10


def say(text):
    print(f"\n==> {text}", flush=True)


def show(b, start, end=None):
    """Print the guest's own lines (vaultguard's and the demo's) between two offsets."""
    for line in b.output[start:end].splitlines():
        line = harness._ANSI.sub("", line).strip()
        if line.startswith(("vaultguard:", "vault", "idle for:", "auto-lock", "demo:")):
            print(f"    guest | {line}", flush=True)


def step(b, pattern, timeout=120):
    start = b.pos
    m = b.expect(pattern, timeout)
    show(b, start, b.pos)
    return m


def checked(b, *names, timeout=120):
    """The guest's checks `names`, in order: each must pass or the demo fails."""
    for name in names:
        start = b.pos
        b.expect_pass(name, timeout)
        show(b, start, b.pos)
        print(f"    check | {name}: passed", flush=True)


# Waits until `vg status --json` contains a text, at most $2 half-seconds.
GUEST_HELPERS = r"""
    state_is() { vg status --json | grep -q "$1"; }
    await_state() {
        _i=0
        until state_is "$1"; do
            _i=$((_i + 1)); [ $_i -le "$2" ] || return 1; sleep 0.5
        done
    }
    # The kernel reaps invalidated keys asynchronously: allow it a moment.
    keys_gone() {
        _i=0
        while grep -q "logon *cryptsetup:" /proc/keys; do
            _i=$((_i + 1)); [ $_i -le 20 ] || return 1; sleep 0.1
        done
    }
"""


def main():
    t0 = time.time()
    s = harness.Scenario("demo")
    try:
        say("A 64 MiB disk with a LUKS2 vault (ext4 inside), protected by the passphrase "
            f"'{harness.PASSPHRASE}'. The TPM is a fresh swtpm.")
        vault = s.luks_disk("vault", ext4=True)
        print(f"    LUKS UUID {vault.uuid}")

        say("Boot 1: the operator enrols the TPM. vaultguard asks for the existing "
            "passphrase (typed here by the demo), seals a new secret to PCRs 0,2,4,7 "
            "(+ PCR 15 = zeros), checks the TPM can unseal it, and adds it as a keyslot.")
        b = s.boot("""
            vg enroll --device /dev/vda --pcrs 0,2,4,7
            rc=$?
            echo "demo: enroll exit status $rc"
            check enrolled "[ $rc = 0 ]"
        """)
        step(b, rf"Passphrase for {NAME} \(/dev/vda\): ", 120)
        print("    (typing the passphrase; the console does not echo it)")
        b.sendline(harness.PASSPHRASE)
        step(b, r"demo: enroll exit status (\d+)\n")
        checked(b, "enrolled")
        b.expect_poweroff()
        tokens = re.findall(r"^\s+\d+: (systemd-\S+)", s.luks_dump(vault), re.M)
        print("    the LUKS header now holds: " + ", ".join(tokens))
        if "systemd-tpm2" not in tokens:
            raise harness.ScenarioFailed(f"no systemd-tpm2 token in the LUKS header: {tokens}")

        say("Boot 2: the initramfs runs `vaultguard unlock`. The TPM releases the key "
            "because the boot measured the same; nobody types anything. The volume key "
            "reaches dm-crypt through the kernel keyring, then PCR 15 is extended so the "
            "TPM will not release it again in this boot.")
        zeros = "0" * 64
        b = s.boot(GUEST_HELPERS + f"""
            vg unlock --device /dev/vda
            check tpm-unlock "[ $? = 0 ]"
            key=$(dmsetup table --showkeys {NAME} | grep -o ':64:logon:cryptsetup:[^ ]*')
            echo "demo: dm table names a keyring key: $key"
            check keyring-key '[ -n "$key" ]'
            p15=$(pcr sha256 15)
            echo "demo: PCR 15 is now $(echo $p15 | cut -c1-16)..."
            check pcr15-extended '[ -n "$p15" ] && [ "$p15" != {zeros} ]'
            mkdir -p /mnt/vault && mount -t ext4 /dev/mapper/{NAME} /mnt/vault
            echo "demo: vault mounted at /mnt/vault: $(ls /mnt/vault | tr '\\n' ' ')"
            check mounted 'grep -q " /mnt/vault " /proc/mounts'
            mkdir -p /etc/vaultguard
            echo '{{"vault":{{"device":"/dev/vda","mount":"/mnt/vault","fstype":"ext4"}}}}' \\
                > /etc/vaultguard/config.json
            rm /etc/initrd-release
            /usr/bin/vaultguard supervise --auto-lock-seconds {IDLE} 2>/dev/null &
            check supervisor-running 'wait_for /run/vaultguard/control.sock 10'
            echo "demo: the supervisor is running (auto-lock after {IDLE} idle seconds)"
            vg status
            check status-unlocked 'state_is "\\"state\\":\\"unlocked\\""'
            sleep 6
            check keepalive 'vg keepalive'
            echo "demo: keepalive at 6 s postpones the lock"
            sleep 5
            check still-unlocked-at-11s 'state_is "\\"state\\":\\"unlocked\\""'
            check auto-locked 'await_state "\\"detail\\":\\"auto_lock_idle\\"" 120'
            vg status
            echo "demo: mounted: $(grep -c ' /mnt/vault ' /proc/mounts), mapping present: $(ls /dev/mapper | grep -c {NAME})"
            check unmounted '! grep -q " /mnt/vault " /proc/mounts'
            check mapping-closed '! test -e /dev/mapper/{NAME}'
            check key-gone 'keys_gone'
            echo "demo: unlock over the socket with the passphrase:"
            check socket-unlock 'vg unlock --key-file /etc/pass'
            vg status
            check unlocked-by-passphrase 'state_is "\\"detail\\":\\"passphrase\\""'
            check remounted 'grep -q " /mnt/vault " /proc/mounts'
            verdict=$(vg audit verify 2>&1); rc=$?
            echo "demo: audit chain: $verdict"
            check audit-verified "[ $rc = 0 ]"
            anchor=$(vg audit verify --tpm 2>&1); rc=$?
            echo "demo: against the TPM: $anchor"
            check audit-anchored '[ $rc = 0 ] && printf "%s" "$anchor" | grep -q "nothing anchored was rewritten"'
            kill %1
        """, dynamic=harness.CRYPTSETUP, files={"/etc/pass": harness.PASSPHRASE})
        step(b, rf"vaultguard: {NAME} unlocked with the TPM, phase PCR extended\n", 120)
        checked(b, "tpm-unlock", "keyring-key", "pcr15-extended", "mounted")
        say(f"The system is up; `vaultguard supervise` guards the vault. No activity for "
            f"{IDLE} s locks it (a keepalive postpones that).")
        checked(b, "supervisor-running", "status-unlocked", "keepalive", "still-unlocked-at-11s",
                timeout=60)
        checked(b, "auto-locked", "unmounted", "mapping-closed", "key-gone", timeout=90)
        say("Locked: unmounted, dm-crypt mapping closed, key gone. The operator unlocks "
            "it again over the control socket.")
        checked(b, "socket-unlock", "unlocked-by-passphrase", "remounted", "audit-verified",
                timeout=60)
        say("The audit chain also replays to the TPM's anchor, which only ever moves "
            "forward: a rewritten log would not.")
        checked(b, "audit-anchored", timeout=30)
        b.expect_poweroff()
        say(f"Done in {time.time() - t0:.0f} s: every step above was checked. "
            f"Serial logs: {s.dir}/")
        return 0
    except harness.ScenarioFailed as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        s.finish()


if __name__ == "__main__":
    sys.exit(main())
