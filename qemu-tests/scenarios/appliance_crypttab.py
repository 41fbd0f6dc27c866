#!/usr/bin/env python3
"""crypttab, late unlock: the generated vaultguard-attach@ unit opens the vault in the main system; auto-lock and unlock under systemd; package upgrade and purge keep the vault and its header.

The appliance guest (qemu-tests/lib/appliance.py: Debian 12, systemd as PID 1,
root on /dev/vda, the LUKS2 vault on the disk with serial "vault", swtpm). No
initrd involvement: the root is not encrypted and the initramfs is never rebuilt
(update_initramfs=no). Boot 1 installs the package with `dpkg -i`, writes the
configuration, an /etc/crypttab line for the vault with `x-vaultguard` and
`tpm2-device=auto`, a second `x-vaultguard,nofail` line for a device that does
not exist (x-systemd.device-timeout=5s), a mount unit for the vault ordered after
the attach, and a stand-in ollama.service the supervisor stops and starts; then
`vaultguard enroll`. Boot 2 checks, in one boot: the attach unit active and exited
0, systemd-cryptsetup@ taken over, the mount, ollama and the supervisor active;
the unknown device's timeout at priority err and the boot going on; `dpkg -i` of
a rebuilt package (same binary, higher version) with the vault unlocked (still
unlocked and mounted, supervisor restarted, header unchanged); the idle auto-lock
under systemd (ollama stopped by systemd, unmounted, the mapping closed) and the
unlock over the socket (mounted, ollama running); whether a daemon-reload keeps
the supervisor's remount (reported); `dpkg --purge` (the first
16 MiB of the vault disk byte-identical, the vault still open)."""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402
import appliance  # noqa: E402

NAME = "secure-ai-vault"
UNIT = r"vaultguard-attach@secure\x2dai\x2dvault.service"
MOUNT = "/var/lib/secure-ai"
MOUNT_UNIT = r"var-lib-secure\x2dai.mount"
MISSING = "00000000-0000-4000-8000-000000000000"
IDLE = 20
REBUILD = "+rebuild1"


def build_deb(suffix=""):
    """The package from the static binary the harness uses; `suffix`: the same
    binary under a higher version (VAULTGUARD_DEB_VERSION_SUFFIX)."""
    env = dict(os.environ, VAULTGUARD_DEB_VERSION_SUFFIX=suffix)
    r = subprocess.run(["bash", os.path.join(harness.REPO, "packaging", "build-deb.sh"),
                        harness.vaultguard_binary()], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise harness.ScenarioFailed("packaging/build-deb.sh failed:\n" + r.stdout + r.stderr)
    return r.stdout.strip().splitlines()[-1]


MOUNT_UNIT_TEXT = f"""[Unit]
Description=The AI vault
Requires={UNIT}
After={UNIT}

[Mount]
What=/dev/mapper/{NAME}
Where={MOUNT}
Type=ext4
Options=nosuid,nodev

[Install]
WantedBy=multi-user.target
"""

OLLAMA = f"""[Unit]
Description=stand-in for ollama (reads the vault)
After={MOUNT_UNIT}

[Service]
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
"""


def run(s):
    deb = build_deb()
    deb2 = build_deb(REBUILD)
    if os.path.basename(deb) == os.path.basename(deb2):
        raise harness.ScenarioFailed(f"the rebuilt package has the same name: {deb2}")
    a = appliance.Appliance(s)
    vault = s.luks_disk("vault", ext4=True)
    config = {"vault": {"device": f"UUID={vault.uuid}", "name": NAME, "mount": MOUNT,
                        "services": ["ollama.service"]},
              "tpm": {"pcrs": [0, 2, 4, 7]}}
    crypttab = (f"# vaultguard's lines (x-vaultguard): vaultguard-generator\n"
                f"{NAME} UUID={vault.uuid} none x-vaultguard,tpm2-device=auto\n"
                f"spare /dev/disk/by-uuid/{MISSING} none x-vaultguard,nofail,x-systemd.device-timeout=5s\n")
    files = {
        "vaultguard.deb": deb,
        "config.json": _write(s, "config.json", json.dumps(config)),
        "crypttab": _write(s, "crypttab", crypttab),
        "vault.mount": _write(s, "vault.mount", MOUNT_UNIT_TEXT),
        "ollama.service": _write(s, "ollama.service", OLLAMA),
    }

    # --- boot 1: install, configure, enrol ------------------------------------
    b = a.boot(f"""
        # The root is not encrypted and the vault is attached late: the initramfs
        # is never involved (and not rebuilt by the package's scripts).
        echo update_initramfs=no > /etc/initramfs-tools/update-initramfs.conf
        dpkg -i /run/vgtest/vaultguard.deb
        value dpkg-status $?
        check generator-installed 'test "$(readlink -f /usr/lib/systemd/system-generators/vaultguard-generator)" = /usr/bin/vaultguard'
        mkdir -p /etc/vaultguard {MOUNT}
        cp /run/vgtest/config.json /etc/vaultguard/config.json
        cp /run/vgtest/crypttab /etc/crypttab
        cp /run/vgtest/vault.mount '/etc/systemd/system/{MOUNT_UNIT}'
        cp /run/vgtest/ollama.service /etc/systemd/system/ollama.service
        systemctl enable '{MOUNT_UNIT}' ollama.service
        vaultguard enroll
        value enroll-status $?
    """, files=files, timeout=600)
    if b.value("dpkg-status", 240) != "0":
        b.fail("dpkg -i of the package failed")
    b.expect_pass("generator-installed", 30)
    b.expect(rf"Passphrase for {NAME} \([^)]*\): ", 120)
    b.sendline(harness.PASSPHRASE)
    if b.value("enroll-status", 120) != "0":
        b.fail("vaultguard enroll failed")
    b.expect_poweroff(60)
    if "systemd-tpm2" not in s.luks_dump(vault):
        raise harness.ScenarioFailed("no systemd-tpm2 token after enroll")

    # --- boot 2: late attach, auto-lock, unlock, upgrade, purge -----------------
    b = a.boot(f"""
        disk=/dev/disk/by-id/virtio-vault
        blk=$(basename "$(readlink -f $disk)")
        header() {{ dd if=$disk bs=1M count=16 status=none | sha256sum | cut -d' ' -f1; }}
        state() {{ vaultguard status --json | grep -o '"state":"[a-z_]*"' | head -n 1 | cut -d'"' -f4; }}
        check multi-user 'systemctl is-active multi-user.target'
        echo "--- systemctl status {UNIT}:"
        systemctl status --no-pager '{UNIT}'; echo "---"
        check attach-active 'test "$(systemctl show -p ActiveState --value "{UNIT}")" = active'
        check attach-exit-0 'test "$(systemctl show -p Result --value "{UNIT}")" = success && test "$(systemctl show -p ExecMainStatus --value "{UNIT}")" = 0'
        check attach-by-tpm 'journalctl -b -o cat -u "{UNIT}" | grep -q "unlocked with the TPM"'
        check cryptsetup-unit-taken-over 'test "$(systemctl show -p Id --value "systemd-cryptsetup@secure\\x2dai\\x2dvault.service")" = "{UNIT}"'
        echo "--- cryptsetup.target:"; systemctl show -p Requires -p Wants -p RequiredBy cryptsetup.target
        systemctl show -p Names -p RequiredBy -p WantedBy "{UNIT}"
        ls -l /run/systemd/generator/cryptsetup.target.requires/ /run/systemd/generator.early/; echo "---"
        # Reported at the end of the body, so that a failure shows all the rest.
        if systemctl show -p RequiredBy --value "{UNIT}" | grep -qw cryptsetup.target \
            || systemctl show -p Requires --value cryptsetup.target | grep -qF "{UNIT}"; then
            in_target=yes
        else
            in_target=no
        fi
        check mount-active 'systemctl is-active "{MOUNT_UNIT}"'
        check vault-mounted 'findmnt -n -o SOURCE {MOUNT} | grep -qx /dev/mapper/{NAME}'
        check ollama-active 'systemctl is-active ollama.service'
        check supervisor-active 'systemctl is-active vaultguard-supervisor.service'
        value state0 "$(state)"
        # Bad input: the nofail line's device never appears.
        journalctl -b -p err --no-pager -o short-monotonic > /run/errors.txt
        echo "--- journalctl -p err:"; cat /run/errors.txt; echo "---"
        check spare-timeout-at-err 'grep -q "Timed out waiting for device.*{MISSING}" /run/errors.txt'
        check_not spare-not-attached 'systemctl is-active vaultguard-attach@spare.service'

        # --- package lifecycle: upgrade with the vault unlocked (by the attach) --
        h0=$(header)
        pid0=$(systemctl show -p MainPID --value vaultguard-supervisor.service)
        t0=$(systemctl show -p ActiveEnterTimestampMonotonic --value vaultguard-supervisor.service)
        dpkg -i /run/vgtest/vaultguard2.deb
        value upgrade-status $?
        value version "$(dpkg-query -W -f '${{Version}}' vaultguard)"
        check upgrade-still-mounted 'findmnt -n -o SOURCE {MOUNT} | grep -qx /dev/mapper/{NAME}'
        check upgrade-supervisor-active 'systemctl is-active vaultguard-supervisor.service'
        value state-upgraded "$(state)"
        check supervisor-restarted 'test "$(systemctl show -p MainPID --value vaultguard-supervisor.service)" != "$pid0" && test "$(systemctl show -p ActiveEnterTimestampMonotonic --value vaultguard-supervisor.service)" != "$t0"'
        check header-same-after-upgrade 'test "$(header)" = "$h0"'
        # --- auto-lock under systemd: an {IDLE} s idle timeout (a drop-in, as an
        # operator would), supervisor restarted (a restart never locks).
        mkdir -p /etc/systemd/system/vaultguard-supervisor.service.d
        printf '[Service]\\nExecStart=\\nExecStart=/usr/bin/vaultguard supervise --auto-lock-seconds {IDLE}\\n' \\
            > /etc/systemd/system/vaultguard-supervisor.service.d/idle.conf
        systemctl daemon-reload
        systemctl restart vaultguard-supervisor.service
        value state-after-restart "$(state)"
        i=0; while [ "$(state)" != locked ] && [ $i -lt 120 ]; do sleep 1; i=$((i + 1)); done
        value state-idle "$(state)"
        check ollama-stopped-by-systemd 'test "$(systemctl show -p ActiveState --value ollama.service)" = inactive'
        check unmounted '! findmnt {MOUNT}'
        check mount-unit-inactive '! systemctl is-active --quiet "{MOUNT_UNIT}"'
        check mapping-closed 'test ! -e /dev/mapper/{NAME} && test -z "$(ls /sys/block/$blk/holders)"'

        # --- unlock over the socket (the passphrase from a file) ---------------
        printf '%s' '{harness.PASSPHRASE}' > /run/pass
        vaultguard unlock --key-file /run/pass
        value unlock-rc $?
        value state-unlocked "$(state)"
        check remounted 'findmnt -n -o SOURCE {MOUNT} | grep -qx /dev/mapper/{NAME}'
        check ollama-running-again 'systemctl is-active ollama.service'
        # What systemd makes of the mapping the supervisor re-created, and
        # whether a daemon-reload (as every dpkg run makes) keeps the mount.
        echo "--- after the unlock over the socket:"
        systemctl show -p ActiveState -p SubState "dev-mapper-secure\\x2dai\\x2dvault.device"
        udevadm info --query=property /dev/mapper/{NAME} | grep -E '^(SYSTEMD_READY|DM_UDEV|DM_ACTIVATION|DM_NAME)'
        echo "---"
        vaultguard keepalive >/dev/null
        rm /etc/systemd/system/vaultguard-supervisor.service.d/idle.conf
        systemctl daemon-reload
        sleep 2
        if findmnt {MOUNT} >/dev/null; then value mounted-after-reload yes; else value mounted-after-reload no; fi
        journalctl -b -o short-monotonic --no-pager -u '{MOUNT_UNIT}' | tail -n 5
        # The default idle timeout again (no lock during the purge).
        systemctl restart vaultguard-supervisor.service

        dpkg --purge vaultguard
        value purge-status $?
        check purged '! dpkg-query -W -f "\\${{Status}}" vaultguard 2>/dev/null | grep -q installed'
        check header-same-after-purge 'test "$(header)" = "$h0"'
        check purge-vault-still-open 'test -e /dev/mapper/{NAME} && test -n "$(ls /sys/block/$blk/holders)"'
        if findmnt {MOUNT} >/dev/null; then value mounted-after-purge yes; else value mounted-after-purge no; fi
        check generator-gone 'test ! -e /usr/lib/systemd/system-generators/vaultguard-generator'
        value header "$h0"
        check in-cryptsetup-target 'test $in_target = yes'
    """, files={"vaultguard2.deb": deb2}, timeout=600)
    for c in ("multi-user", "attach-active", "attach-exit-0", "attach-by-tpm",
              "cryptsetup-unit-taken-over", "mount-active",
              "vault-mounted", "ollama-active", "supervisor-active"):
        b.expect_pass(c, 240)
    if b.value("state0", 60) != "unlocked":
        b.fail("the supervisor does not say unlocked after the late attach")
    b.expect_pass("spare-timeout-at-err", 60)
    b.expect_pass("spare-not-attached", 30)
    if b.value("upgrade-status", 300) != "0":
        b.fail("dpkg -i of the rebuilt package failed")
    if b.value("version", 30) != "0.1.0" + REBUILD:
        b.fail("the upgrade did not install the rebuilt version")
    for c in ("upgrade-still-mounted", "upgrade-supervisor-active"):
        b.expect_pass(c, 60)
    if b.value("state-upgraded", 30) != "unlocked":
        b.fail("the vault is not unlocked after the upgrade")
    for c in ("supervisor-restarted", "header-same-after-upgrade"):
        b.expect_pass(c, 30)
    b.value("state-after-restart", 60)
    if b.value("state-idle", 240) != "locked":
        b.fail(f"no idle auto-lock within 120 s of a {IDLE} s timeout")
    for c in ("ollama-stopped-by-systemd", "unmounted", "mount-unit-inactive", "mapping-closed"):
        b.expect_pass(c, 60)
    if b.value("unlock-rc", 120) != "0":
        b.fail("vaultguard unlock over the socket failed")
    if b.value("state-unlocked", 30) != "unlocked":
        b.fail("the supervisor does not say unlocked after the unlock")
    for c in ("remounted", "ollama-running-again"):
        b.expect_pass(c, 60)
    harness.log("mounted after a daemon-reload following the socket unlock: "
                + b.value("mounted-after-reload", 60))
    if b.value("purge-status", 300) != "0":
        b.fail("dpkg --purge failed")
    for c in ("purged", "header-same-after-purge", "purge-vault-still-open"):
        b.expect_pass(c, 60)
    harness.log("mounted after the purge: " + b.value("mounted-after-purge", 30))
    b.expect_pass("generator-gone", 30)
    b.value("header", 30)
    # Last, so that a failure here still shows all the rest.
    b.expect_pass("in-cryptsetup-target", 30)
    b.assert_absent(harness.PASSPHRASE, "the passphrase was echoed")
    b.expect_poweroff(60)


def _write(s, name, text):
    path = s.path(name)
    with open(path, "w") as f:
        f.write(text)
    return path


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
