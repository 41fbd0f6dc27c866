#!/usr/bin/env python3
"""The .deb on a real Debian 12 system with a dracut initrd (systemd in the initrd): the TPM unlocks before switch-root, a changed PCR falls back to the ask-password prompt.

The dracut twin of appliance_initramfs_tools, on the same appliance guest
(qemu-tests/lib/appliance.py). Boot 1 installs the package with `dpkg -i`, writes
/etc/vaultguard/config.json (vault.services: a stand-in ollama.service that
needs the vault's mount), enrols the TPM with `vaultguard enroll` and builds the
initrd with the guest's own `dracut --hostonly --add vaultguard`: systemd runs
vaultguard-unlock.service in the initrd and vaultguard-mount.service mounts the
vault inside /sysroot before initrd-fs.target. Boot 2: the TPM unlocks with no
prompt, systemd reaches multi-user.target with the vault's mount unit active, the
stand-in service and the supervisor running, the unlock line at info priority and
no vaultguard line in `journalctl -b -p warning`. Boot 3 adds a NIC (PCR 2
changes): the refusal is in the journal at warning priority, and the passphrase
answered on the console through systemd's ask-password agent opens and mounts
the vault."""
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402
import appliance  # noqa: E402

NAME = "secure-ai-vault"
MOUNT = "/var/lib/secure-ai"
MOUNT_UNIT = "var-lib-secure\\\\x2dai.mount"  # systemd-escape -p --suffix=mount, for sh
MASKED = NAME.replace("-", "\\x2d")  # the unit name's escaping
SECRET = "weights shard 42: dracut appliance boot"

# A stand-in for the AI workload: it needs the vault mounted and reads from it.
STANDIN = f"""[Unit]
Description=stand-in for ollama: serves models from the AI vault
RequiresMountsFor={MOUNT}

[Service]
ExecStart=/bin/sh -c 'test -d {MOUNT}/lost+found && exec sleep infinity'

[Install]
WantedBy=multi-user.target
"""

# dracut in the guest: hostonly (the appliance's own drivers), uncompressed (under
# TCG compressing is the slowest step; the kernel unpacks it no slower).
DRACUT = ("dracut --force --hostonly --no-hostonly-cmdline --no-compress --add vaultguard "
          "/boot/initrd.img-$(uname -r) $(uname -r)")


def build_deb():
    """The package, built from the static binary the harness boots elsewhere."""
    import subprocess
    r = subprocess.run(["bash", os.path.join(harness.REPO, "packaging", "build-deb.sh"),
                        harness.vaultguard_binary()], capture_output=True, text=True)
    if r.returncode != 0:
        raise harness.ScenarioFailed("packaging/build-deb.sh failed:\n" + r.stdout + r.stderr)
    return r.stdout.strip().splitlines()[-1]


def run(s):
    deb = build_deb()
    a = appliance.Appliance(s)
    vault = s.luks_disk("vault", ext4=True)
    config = {"vault": {"device": f"UUID={vault.uuid}", "name": NAME, "mount": MOUNT,
                        "services": ["ollama.service"]},
              "tpm": {"pcrs": [0, 2, 4, 7]}}

    # --- boot 1: install, configure, enrol, dracut ------------------------------
    b = a.boot(f"""
        dpkg -i /run/vgtest/vaultguard.deb
        value dpkg-status $?
        check dracut-module-installed 'test -x /usr/lib/dracut/modules.d/90vaultguard/module-setup.sh'
        mkdir -p /etc/vaultguard {MOUNT}
        cp /run/vgtest/config.json /etc/vaultguard/config.json
        cp /run/vgtest/ollama.service /etc/systemd/system/ollama.service
        systemctl enable ollama.service
        vaultguard enroll
        value enroll-status $?
        {DRACUT} > /run/dracut.log 2>&1
        rc=$?
        tail -n 15 /run/dracut.log
        value dracut-status $rc
        lsinitrd /boot/initrd.img-$(uname -r) > /run/lsinitrd.txt 2>&1
        # A file, or a symlink (lsinitrd shows "path -> target").
        has() {{ grep -Eq " $1( -> .*)?\\$" /run/lsinitrd.txt; }}
        check initrd-has-systemd 'has usr/lib/systemd/systemd'
        check initrd-has-vaultguard 'has usr/bin/vaultguard'
        check initrd-has-config 'has etc/vaultguard/config.json'
        check initrd-has-unlock-unit 'has usr/lib/systemd/system/initrd.target.wants/vaultguard-unlock.service'
        check initrd-has-mount-unit 'has usr/lib/systemd/system/initrd-fs.target.wants/vaultguard-mount.service'
        check initrd-has-ask-password-agent 'has usr/lib/systemd/system/systemd-ask-password-console.path'
        check initrd-masks-cryptsetup-unit 'grep -qF "etc/systemd/system/systemd-cryptsetup@{MASKED}.service -> /dev/null" /run/lsinitrd.txt'
    """, files={"vaultguard.deb": deb, "config.json": _write(s, "config.json", json.dumps(config)),
                "ollama.service": _write(s, "ollama.service", STANDIN)},
        timeout=1800)
    if b.value("dpkg-status", 240) != "0":
        b.fail("dpkg -i of the package failed")
    b.expect_pass("dracut-module-installed", 30)
    b.expect(rf"Passphrase for {NAME} \([^)]*\): ", 120)
    b.sendline(harness.PASSPHRASE)
    if b.value("enroll-status", 120) != "0":
        b.fail("vaultguard enroll failed")
    t = time.time()
    if b.value("dracut-status", 1200) != "0":
        b.fail("dracut in the guest failed")
    harness.log(f"boot1: dracut in the guest took {time.time() - t:.0f} s")
    for c in ("initrd-has-systemd", "initrd-has-vaultguard", "initrd-has-config",
              "initrd-has-unlock-unit", "initrd-has-mount-unit", "initrd-has-ask-password-agent",
              "initrd-masks-cryptsetup-unit"):
        b.expect_pass(c, 120)
    b.expect_poweroff(60)
    dump = s.luks_dump(vault)
    if "systemd-tpm2" not in dump:
        raise harness.ScenarioFailed(f"no systemd-tpm2 token after enroll:\n{dump}")

    # --- boot 2: the TPM unlocks in the systemd initrd, no prompt ---------------
    b = a.boot(f"""
        check multi-user 'systemctl is-active multi-user.target'
        check vault-mounted 'findmnt -n -o SOURCE {MOUNT} | grep -qx /dev/mapper/{NAME}'
        check vault-mount-options 'findmnt -n -o OPTIONS {MOUNT} | grep -q nosuid,nodev'
        check mount-unit-active 'systemctl is-active {MOUNT_UNIT}'
        check standin-active 'systemctl is-active ollama.service'
        check supervisor-active 'systemctl is-active vaultguard-supervisor.service'
        value status "$(vaultguard status --json)"
        check unlock-ran-in-initrd 'journalctl -b -o cat -u vaultguard-unlock.service | grep -q "{NAME} unlocked with the TPM"'
        check unlock-line-at-info 'journalctl -b -o cat -t vaultguard -p info..info | grep -q "{NAME} unlocked with the TPM"'
        check mount-line-at-info 'journalctl -b -o cat -t vaultguard -p info..info | grep -q "vault mounted on {MOUNT}"'
        journalctl -b -p warning --no-pager -o short-monotonic > /run/warnings.txt
        echo "--- journalctl -b -p warning:"; cat /run/warnings.txt; echo "---"
        check_not no-vaultguard-warning 'grep -i vaultguard /run/warnings.txt'
        echo "{SECRET}" > {MOUNT}/shard.txt
        sync
    """)
    for c in ("multi-user", "vault-mounted", "vault-mount-options", "mount-unit-active",
              "standin-active", "supervisor-active"):
        b.expect_pass(c, 240)
    status = b.value("status")
    if '"state":"unlocked"' not in status or '"detail":"tpm2_unseal"' not in status:
        b.fail(f"vaultguard status does not say unlocked by the TPM: {status}")
    for c in ("unlock-ran-in-initrd", "unlock-line-at-info", "mount-line-at-info",
              "no-vaultguard-warning"):
        b.expect_pass(c, 60)
    b.assert_absent(r"Passphrase for", "the TPM unlock should not prompt")
    b.expect_poweroff(60)
    if vault.contains(SECRET):
        raise harness.ScenarioFailed("the file's plaintext is on the raw disk")

    # --- boot 3: PCR 2 changed; refusal at warning, ask-password fallback --------
    b = a.boot(f"""
        check multi-user 'systemctl is-active multi-user.target'
        check vault-mounted 'findmnt -n -o SOURCE {MOUNT} | grep -qx /dev/mapper/{NAME}'
        check data-reads-back 'grep -qx "{SECRET}" {MOUNT}/shard.txt'
        check standin-active 'systemctl is-active ollama.service'
        check supervisor-active 'systemctl is-active vaultguard-supervisor.service'
        journalctl -b -p warning --no-pager -o short-monotonic > /run/warnings.txt
        echo "--- journalctl -b -p warning:"; cat /run/warnings.txt; echo "---"
        check refusal-at-warning 'journalctl -b -o cat -t vaultguard -p warning | grep -q "TPM unlock of {NAME} not possible: PCR 2 changed"'
        check passphrase-unlock-in-journal 'journalctl -b -o cat -t vaultguard | grep -q "{NAME} unlocked with the passphrase"'
    """, nic="virtio")
    b.expect(rf"TPM unlock of {NAME} not possible: PCR 2 changed since enrolment", 240)
    b.expect(rf"Passphrase for {NAME}", 90)
    b.sendline(harness.PASSPHRASE)
    for c in ("multi-user", "vault-mounted", "data-reads-back", "standin-active",
              "supervisor-active", "refusal-at-warning", "passphrase-unlock-in-journal"):
        b.expect_pass(c, 240)
    b.assert_absent(harness.PASSPHRASE, "the passphrase was echoed")
    b.expect_poweroff(60)


def _write(s, name, text):
    path = s.path(name)
    with open(path, "w") as f:
        f.write(text)
    return path


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
