#!/usr/bin/env python3
"""The main job, shown: a machine with a TPM boots twice and its AI vault unlocks itself.

Run by qemu-tests/demo.sh (which installs and builds first). Each boot is a real
QEMU guest with a software TPM (swtpm) and the static vaultguard in a minimal
initramfs; what the guest prints is shown as it happens, with a word on each step."""
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
            echo "demo: enroll exit status $?"
        """)
        step(b, rf"Passphrase for {NAME} \(/dev/vda\): ", 120)
        print("    (typing the passphrase; the console does not echo it)")
        b.sendline(harness.PASSPHRASE)
        step(b, r"demo: enroll exit status (\d+)\n")
        b.expect_poweroff()
        print("    the LUKS header now holds: " + ", ".join(
            re.findall(r"^\s+\d+: (systemd-\S+)", s.luks_dump(vault), re.M)))

        say("Boot 2: the initramfs runs `vaultguard unlock`. The TPM releases the key "
            "because the boot measured the same; nobody types anything. The volume key "
            "reaches dm-crypt through the kernel keyring, then PCR 15 is extended so the "
            "TPM will not release it again in this boot.")
        b = s.boot(f"""
            vg unlock --device /dev/vda
            echo "demo: dm table names a keyring key: $(dmsetup table --showkeys {NAME} | grep -o ':64:logon:cryptsetup:[^ ]*')"
            echo "demo: PCR 15 is now $(pcr sha256 15 | cut -c1-16)..."
            mkdir -p /mnt/vault && mount -t ext4 /dev/mapper/{NAME} /mnt/vault
            echo "demo: vault mounted at /mnt/vault: $(ls /mnt/vault | tr '\\n' ' ')"
            mkdir -p /etc/vaultguard
            echo '{{"vault":{{"device":"/dev/vda","mount":"/mnt/vault","fstype":"ext4"}}}}' \\
                > /etc/vaultguard/config.json
            rm /etc/initrd-release
            /usr/bin/vaultguard supervise --auto-lock-seconds {IDLE} 2>/dev/null &
            wait_for /run/vaultguard/control.sock 10
            echo "demo: the supervisor is running (auto-lock after {IDLE} idle seconds)"
            vg status
            sleep 6
            vg keepalive >/dev/null && echo "demo: keepalive at 6 s postpones the lock"
            until vg status --json | grep -q '"state":"locked"'; do sleep 0.5; done
            vg status
            echo "demo: mounted: $(grep -c ' /mnt/vault ' /proc/mounts), mapping present: $(ls /dev/mapper | grep -c {NAME})"
            echo "demo: unlock over the socket with the passphrase:"
            vg unlock --key-file /etc/pass
            vg status
            echo "demo: audit chain: $(vg audit verify 2>&1)"
            kill %1
        """, dynamic=harness.CRYPTSETUP, files={"/etc/pass": harness.PASSPHRASE})
        step(b, rf"vaultguard: {NAME} unlocked with the TPM, phase PCR extended\n", 120)
        step(b, r"demo: vault mounted[^\n]*\n")
        say(f"The system is up; `vaultguard supervise` guards the vault. No activity for "
            f"{IDLE} s locks it (a keepalive postpones that).")
        step(b, r"demo: keepalive[^\n]*\n", 60)
        step(b, r"demo: mounted[^\n]*\n", 60)
        say("Locked: unmounted, dm-crypt mapping closed, key gone. The operator unlocks "
            "it again over the control socket.")
        step(b, r"demo: audit chain[^\n]*\n", 60)
        b.expect_poweroff()
        say(f"Done in {time.time() - t0:.0f} s. Serial logs: {s.dir}/")
        return 0
    except harness.ScenarioFailed as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        s.finish()


if __name__ == "__main__":
    sys.exit(main())
