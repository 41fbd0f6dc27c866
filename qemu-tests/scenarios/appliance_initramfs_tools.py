#!/usr/bin/env python3
"""The .deb on a real Debian 12 system: dpkg -i, enrol, update-initramfs; the TPM unlocks in the initramfs-tools initrd; a changed PCR falls back to the passphrase.

The appliance guest (qemu-tests/lib/appliance.py: mmdebstrap minbase root, systemd
as PID 1, Debian's kernel and its initramfs-tools initrd; root on /dev/vda, the
LUKS2 vault on /dev/vdb, swtpm). Boot 1 installs the package built by
packaging/build-deb.sh with `dpkg -i`, writes /etc/vaultguard/config.json,
enrols the TPM with `vaultguard enroll` (the passphrase
typed on the console) and runs `update-initramfs -u`. Boot 2: the initrd's
local-top script unlocks with the TPM and no prompt, systemd reaches
multi-user.target with the vault mounted and the supervisor active, and
`journalctl -p warning` holds no vaultguard line. Boot 3 adds a NIC (its option
ROM changes PCR 2): the TPM refuses, the refusal is in `journalctl -p warning`,
and the passphrase typed on the console still opens and mounts the vault."""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402
import appliance  # noqa: E402

NAME = "secure-ai-vault"
MOUNT = "/var/lib/secure-ai"
SECRET = "weights shard 42: appliance boot"


def build_deb():
    """The package, built from the static binary the harness boots elsewhere."""
    r = subprocess.run(["bash", os.path.join(harness.REPO, "packaging", "build-deb.sh"),
                        harness.vaultguard_binary()], capture_output=True, text=True)
    if r.returncode != 0:
        raise harness.ScenarioFailed("packaging/build-deb.sh failed:\n" + r.stdout + r.stderr)
    return r.stdout.strip().splitlines()[-1]


def run(s):
    deb = build_deb()
    a = appliance.Appliance(s)
    vault = s.luks_disk("vault", ext4=True)
    config = {"vault": {"device": f"UUID={vault.uuid}", "name": NAME, "mount": MOUNT},
              "tpm": {"pcrs": [0, 2, 4, 7]}}

    # --- boot 1: install, configure, enrol, rebuild the initramfs -------------
    b = a.boot(f"""
        # An appliance's initramfs carries the modules of its own hardware
        # (MODULES=dep), not most of the kernel's, compressed fast: under TCG
        # update-initramfs is the slowest step of the scenario.
        printf 'MODULES=dep\nCOMPRESSLEVEL=1\n' > /etc/initramfs-tools/conf.d/appliance
        dpkg -i /run/vgtest/vaultguard.deb
        value dpkg-status $?
        check binary-installed 'test -x /usr/bin/vaultguard'
        check hook-installed 'test -x /usr/share/initramfs-tools/hooks/vaultguard'
        check man-page 'test -s /usr/share/man/man8/vaultguard.8.gz'
        check supervisor-enabled 'systemctl is-enabled vaultguard-supervisor.service'
        # Not configured yet: the unit's condition keeps it from running.
        check_not supervisor-inert 'systemctl is-active vaultguard-supervisor.service'
        check_not no-etc-config 'test -e /etc/vaultguard/config.json'
        mkdir -p /etc/vaultguard {MOUNT}
        cp /run/vgtest/config.json /etc/vaultguard/config.json
        vaultguard enroll
        value enroll-status $?
        update-initramfs -u
        value update-initramfs-status $?
        check initrd-has-vaultguard 'lsinitramfs /boot/initrd.img-$(uname -r) | grep -qx usr/bin/vaultguard'
        check initrd-has-local-top 'lsinitramfs /boot/initrd.img-$(uname -r) | grep -qx scripts/local-top/vaultguard'
        check initrd-has-local-bottom 'lsinitramfs /boot/initrd.img-$(uname -r) | grep -qx scripts/local-bottom/vaultguard'
        check initrd-has-config 'lsinitramfs /boot/initrd.img-$(uname -r) | grep -qx etc/vaultguard/config.json'
    """, files={"vaultguard.deb": deb, "config.json": _write(s, "config.json", json.dumps(config))},
        timeout=900)
    if b.value("dpkg-status", 240) != "0":
        b.fail("dpkg -i of the package failed")
    b.expect(rf"Passphrase for {NAME} \([^)]*\): ", 120)
    b.sendline(harness.PASSPHRASE)
    if b.value("enroll-status", 120) != "0":
        b.fail("vaultguard enroll failed")
    t = time.time()
    if b.value("update-initramfs-status", 600) != "0":
        b.fail("update-initramfs -u failed")
    harness.log(f"boot1: update-initramfs -u in the guest took {time.time() - t:.0f} s")
    for c in ("initrd-has-vaultguard", "initrd-has-local-top", "initrd-has-local-bottom",
              "initrd-has-config"):
        b.expect_pass(c, 240)
    b.expect_poweroff(60)
    dump = s.luks_dump(vault)
    if "systemd-tpm2" not in dump:
        raise harness.ScenarioFailed(f"no systemd-tpm2 token after enroll:\n{dump}")

    # --- boot 2: the TPM unlocks in the initramfs, no prompt -------------------
    b = a.boot(f"""
        check multi-user 'systemctl is-active multi-user.target'
        check vault-mounted 'findmnt -n -o SOURCE {MOUNT} | grep -qx /dev/mapper/{NAME}'
        check vault-mount-options 'findmnt -n -o OPTIONS {MOUNT} | grep -q nosuid,nodev'
        check supervisor-active 'systemctl is-active vaultguard-supervisor.service'
        value status "$(vaultguard status --json)"
        journalctl -b -p warning --no-pager -o short-monotonic > /run/warnings.txt
        echo "--- journalctl -p warning:"; cat /run/warnings.txt; echo "---"
        check_not no-vaultguard-warning 'grep -i vaultguard /run/warnings.txt'
        check tpm-unlock-in-journal 'journalctl -b -o cat -t vaultguard | grep -q "unlocked with the TPM"'
        echo "{SECRET}" > {MOUNT}/shard.txt
        sync
    """)
    b.expect(r"vaultguard: .*unlocked with the TPM", 180)
    for c in ("multi-user", "vault-mounted", "vault-mount-options", "supervisor-active"):
        b.expect_pass(c, 180)
    status = b.value("status")
    # The supervisor took over the initramfs's hint: unlocked, by the TPM.
    if '"state":"unlocked"' not in status or '"detail":"tpm2_unseal"' not in status:
        b.fail(f"vaultguard status does not say unlocked by the TPM: {status}")
    b.expect_pass("no-vaultguard-warning")
    b.expect_pass("tpm-unlock-in-journal")
    b.assert_absent(r"Passphrase for", "the TPM unlock should not prompt")
    b.expect_poweroff(60)
    if vault.contains(SECRET):
        raise harness.ScenarioFailed("the file's plaintext is on the raw disk")

    # --- boot 3: PCR 2 changed; refusal in the journal, passphrase fallback -----
    b = a.boot(f"""
        check multi-user 'systemctl is-active multi-user.target'
        check vault-mounted 'findmnt -n -o SOURCE {MOUNT} | grep -qx /dev/mapper/{NAME}'
        check data-reads-back 'grep -qx "{SECRET}" {MOUNT}/shard.txt'
        check supervisor-active 'systemctl is-active vaultguard-supervisor.service'
        journalctl -b -p warning --no-pager -o short-monotonic > /run/warnings.txt
        echo "--- journalctl -p warning:"; cat /run/warnings.txt; echo "---"
        check refusal-in-journal 'grep -q "vaultguard: TPM unlock of {NAME} not possible: PCR 2 changed" /run/warnings.txt'
        # The initrd's --headless first try is no news (the prompt follows).
        # (The supervisor's import of the initrd's audit entries still shows it:
        # that line's priority is the supervisor's.)
        check_not no-headless-noise 'grep -q "vaultguard: cannot ask for a passphrase" /run/warnings.txt'
        check passphrase-unlock-in-journal 'journalctl -b -o cat -t vaultguard | grep -q "vault opened with the passphrase after the TPM refused"'
    """, nic="virtio")
    b.expect(rf"TPM unlock of {NAME} not possible: PCR 2 changed since enrolment", 180)
    b.expect(rf"Passphrase for {NAME} \([^)]*\): ", 60)
    b.sendline(harness.PASSPHRASE)
    for c in ("multi-user", "vault-mounted", "data-reads-back", "supervisor-active",
              "refusal-in-journal", "no-headless-noise", "passphrase-unlock-in-journal"):
        b.expect_pass(c, 180)
    b.assert_absent(harness.PASSPHRASE, "the passphrase was echoed")
    b.expect_poweroff(60)


def _write(s, name, text):
    path = s.path(name)
    with open(path, "w") as f:
        f.write(text)
    return path


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
