"""A real Debian 12 appliance guest for the QEMU scenarios: systemd as PID 1, the
distribution's own kernel and initramfs-tools initrd, root on one virtio disk.

    from appliance import Appliance
    a = Appliance(s)                            # s: a harness.Scenario
    vault = s.luks_disk("vault", ext4=True)     # second disk
    b = a.boot('''
        dpkg -i /run/vgtest/vaultguard.deb
    ''', files={"vaultguard.deb": deb_path})
    b.expect_poweroff()

dracut-core is in the root too (appliance_dracut, the boot benchmark): the guest
can build a systemd initrd with its own `dracut` beside the initramfs-tools one.
With tpm2-tools (dracut's tpm2-tss module refuses to install without it) the
root image is about 750 MB, and mmdebstrap took 119 s on the 2-CPU build machine
at load ~1 (59 s before these packages, shared/notes/appliance-guest.md) and
346 s at load ~11 (465 s for the whole cached image).

The root file system is built once per machine with mmdebstrap (--variant=minbase
and PACKAGES, from the host's apt sources) into an ext4 image made with
`mke2fs -d` (no loop device, no mount), and cached in qemu-tests/work/cache under
a key over everything that goes into it; each scenario boots a sparse copy.

Each boot reads the kernel and the initrd from the scenario's root image with
debugfs (the guest has no boot loader: SeaBIOS loads them with -kernel/-initrd),
so an `update-initramfs -u` run in the guest is what the next boot uses. The
body of a boot travels on a small extra disk (serial "vgtest") as a tar archive
with the body, qemu-tests/lib/guest-lib.sh and any files given; the unit
vgtest.service extracts it to /run/vgtest after multi-user.target, runs the body
on the serial console (its controlling terminal, so prompts reach the harness),
prints the harness's VGT:DONE line and powers the machine off.
"""

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import time

import harness

SUITE = "bookworm"
PACKAGES = ["systemd-sysv", "udev", "kmod", "cryptsetup-bin", "e2fsprogs", "initramfs-tools",
            "linux-image-amd64",
            # dracut with systemd in the initrd (appliance_dracut, the boot benchmark).
            # dracut-core, not dracut: the latter conflicts with initramfs-tools, and
            # one image serves both generators (each scenario runs its own).
            "dracut-core",
            # systemd 252's TPM2 support (systemd-cryptenroll, systemd-cryptsetup, the
            # libcryptsetup token plugin) dlopens libtss2-esys/-rc/-mu and the device
            # TCTI; dracut's tpm2-tss module refuses to install without the `tpm2`
            # binary, so tpm2-tools (which depends on those libraries) comes too.
            # (libtss2 brings tpm-udev, which vaultguard depends on: /dev/tpmrm0 tss:tss 0660.)
            "tpm2-tools", "libtss2-tcti-device0"]
ROOT_SIZE = "2G"
MEMORY_MB = 1024
BOOT_TIMEOUT = 300

# Files written into the root before the image is made: {path: (mode, content)}.
RUNNER = r"""#!/bin/sh
# Runs the qemu-tests harness's body for this boot (see qemu-tests/lib/appliance.py).
set -u
mkdir -p /run/vgtest
dev=/dev/disk/by-id/virtio-vgtest
udevadm settle -t 30 || true
if ! tar -xf "$dev" -C /run/vgtest; then
    echo "VGT:FAIL vgtest-disk: cannot read the body from $dev"
    rc=1
else
    echo "VGT:READY up $(cut -d' ' -f1 /proc/uptime) s"
    sh -c '. /run/vgtest/lib.sh; . /run/vgtest/body.sh'
    rc=$?
fi
cores=$(ls /var/lib/systemd/coredump 2>/dev/null | wc -l)
sync
echo "VGT:DONE rc=$rc cores=$cores up $(cut -d' ' -f1 /proc/uptime) s"
systemctl --no-block poweroff
"""
UNIT = """[Unit]
Description=qemu-tests harness: run this boot's body from the vgtest disk
After=multi-user.target
ConditionPathExists=/dev/disk/by-id/virtio-vgtest

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vgtest-run
StandardInput=tty-force
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TTYReset=yes
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""
ROOT_FILES = {
    "/etc/fstab": (0o644, "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"),
    "/etc/hostname": (0o644, "appliance\n"),
    "/usr/local/sbin/vgtest-run": (0o755, RUNNER),
    "/etc/systemd/system/vgtest.service": (0o644, UNIT),
    # No login on the serial console: the body owns it.
    "/etc/systemd/system/serial-getty@ttyS0.service": (None, "/dev/null"),
    "/etc/systemd/system/getty@tty1.service": (None, "/dev/null"),
    "/etc/systemd/system/multi-user.target.wants/vgtest.service": (None, "/etc/systemd/system/vgtest.service"),
    # A guest without a network or a clock source worth syncing: no timers that
    # would start apt or man-db in the middle of a boot being measured.
    "/etc/systemd/system/apt-daily.timer": (None, "/dev/null"),
    "/etc/systemd/system/apt-daily-upgrade.timer": (None, "/dev/null"),
    "/etc/systemd/system/man-db.timer": (None, "/dev/null"),
    "/etc/systemd/system/e2scrub_all.timer": (None, "/dev/null"),
    "/etc/systemd/system/fstrim.timer": (None, "/dev/null"),
}
MKE2FS = ["mke2fs", "-q", "-t", "ext4", "-L", "root", "-E", "root_owner=0:0"]


def _cache_key():
    recipe = repr((SUITE, PACKAGES, sorted(ROOT_FILES.items()), MKE2FS, ROOT_SIZE))
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _build(dest):
    """mmdebstrap a root into dest/root.d, customise it, make dest/root.img."""
    tree = os.path.join(dest, "root.d")
    t = time.time()
    r = subprocess.run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
                        SUITE, tree], capture_output=True, text=True)
    if r.returncode != 0:
        raise harness.ScenarioFailed("mmdebstrap failed:\n"
                                     + "\n".join((r.stdout + r.stderr).splitlines()[-40:]))
    harness.log(f"appliance root: mmdebstrap {time.time() - t:.0f} s")
    for path, (mode, content) in ROOT_FILES.items():
        p = tree + path
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if os.path.lexists(p):
            os.unlink(p)
        if mode is None:
            os.symlink(content, p)
        else:
            with open(p, "w") as f:
                f.write(content)
            os.chmod(p, mode)
    kvers = sorted(f[len("vmlinuz-"):] for f in os.listdir(os.path.join(tree, "boot"))
                   if f.startswith("vmlinuz-"))
    if not kvers:
        raise harness.ScenarioFailed(f"appliance root: no kernel in {tree}/boot")
    img = os.path.join(dest, "root.img")
    r = subprocess.run([*MKE2FS, "-d", tree, img, ROOT_SIZE], capture_output=True, text=True)
    if r.returncode != 0:
        raise harness.ScenarioFailed(f"mke2fs -d failed: {r.stderr.strip()}")
    with open(os.path.join(dest, "kernel-release"), "w") as f:
        f.write(kvers[-1] + "\n")
    shutil.rmtree(tree)
    harness.log(f"appliance root: {img} in {time.time() - t:.0f} s (kernel {kvers[-1]})")


def cached_root():
    """(root image, kernel release) of the cached appliance root, built if missing."""
    d = os.path.join(harness.WORK, "cache", f"appliance-{SUITE}-{_cache_key()}")
    with harness._FileLock(".appliance.lock").acquire("another run building the appliance root"):
        if not os.path.exists(os.path.join(d, "ok")):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            harness.log(f"building the appliance root (mmdebstrap {SUITE}), cached in {d}")
            _build(d)
            with open(os.path.join(d, "ok"), "w") as f:
                f.write(repr(PACKAGES) + "\n")
    with open(os.path.join(d, "kernel-release")) as f:
        return os.path.join(d, "root.img"), f.read().strip()


def debugfs_dump(image, path, out):
    """Copy `path` out of the ext4 image `image` (read-only, no mount)."""
    if os.path.exists(out):
        os.unlink(out)
    r = subprocess.run(["debugfs", "-R", f"dump {path} {out}", image], capture_output=True,
                       text=True)
    if r.returncode != 0 or not os.path.exists(out) or os.path.getsize(out) == 0:
        raise harness.ScenarioFailed(f"debugfs: cannot read {path} from {image}: {r.stderr.strip()}")
    return out


class Appliance:
    """The appliance guest of one scenario: its root disk (first disk, /dev/vda)
    and the per-boot body disk."""

    def __init__(self, scenario):
        if scenario.disks:
            raise harness.ScenarioFailed("Appliance(s): create it before the scenario's other disks"
                                         " (the root must be /dev/vda)")
        self.s = scenario
        cached, self.kver = cached_root()
        self.root = scenario.disk("root", 1)
        subprocess.run(["cp", "--sparse=always", cached, self.root.path], check=True)

    def boot(self, body, *, files=None, nic="none", label=None, cmdline="", timeout=BOOT_TIMEOUT,
             initrd=None):
        """Boot the appliance with its own kernel and current initrd; the vgtest
        unit runs `body` (after guest-lib.sh) once multi-user.target is reached.
        files: {name: host path} put next to the body in /run/vgtest.
        initrd: the initrd's path inside the root (default /boot/initrd.img-KVER),
        so one root can carry an initramfs-tools and a dracut image side by side."""
        s = self.s
        if s.current is not None:
            raise harness.ScenarioFailed(f"{s.name}: boot {s.current.label} still running")
        s.nboots += 1
        label = label or f"boot{s.nboots}"
        kernel = debugfs_dump(self.root.path, f"/boot/vmlinuz-{self.kver}", s.path(f"{label}.vmlinuz"))
        initrd_path = initrd or f"/boot/initrd.img-{self.kver}"
        initrd = debugfs_dump(self.root.path, initrd_path, s.path(f"{label}.initrd.img"))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            def add(name, data):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode = len(data), 0o644
                tar.addfile(ti, io.BytesIO(data))
            with open(os.path.join(harness.LIB, "guest-lib.sh"), "rb") as f:
                add("lib.sh", f.read())
            add("body.sh", harness._dedent(body).encode())
            for name, path in (files or {}).items():
                with open(path, "rb") as f:
                    add(name, f.read())
        data = buf.getvalue()
        body_disk = s.path(f"{label}.vgtest.tar")
        with open(body_disk, "wb") as f:
            f.write(data)
            f.truncate(-(-len(data) // (1 << 20)) << 20)  # whole MiB: a disk size QEMU takes
        if nic not in harness.NICS:
            raise harness.ScenarioFailed(f"nic={nic!r}: one of {', '.join(harness.NICS)}")
        # No floppy driver: QEMU's pc machine has a floppy controller without a
        # disk, and udev's probes of /dev/fd0 under TCG (I/O errors, a udev worker
        # in a soft lockup for a minute) held a dracut boot past multi-user.target's
        # timeout; a hostonly dracut would also carry the module into the initrd.
        append = f"root=/dev/vda rw console=ttyS0 panic=-1 quiet modprobe.blacklist=floppy {cmdline}".strip()
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(MEMORY_MB), "-smp", "1",
               "-nographic", "-monitor", "none", "-no-reboot",
               "-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0",
               "-kernel", kernel, "-initrd", initrd, "-append", append, *harness.NICS[nic]]
        sock = s.path("swtpm.ctrl")
        if len(sock) > 100:
            sock = os.path.join("/tmp", f"vg-swtpm-{os.getpid()}.ctrl")
        swtpm_cmd = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={s.tpm_dir}",
                     "--ctrl", f"type=unixio,path={sock}", "--terminate"]
        cmd += ["-chardev", f"socket,id=chrtpm,path={sock}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"]
        for d in s.disks:
            cmd += ["-drive", f"file={d.path},format=raw,if=none,id={d.name},cache=unsafe",
                    "-device", f"virtio-blk-pci,drive={d.name},serial={d.name}"]
        cmd += ["-drive", f"file={body_disk},format=raw,if=none,id=vgtest,readonly=on",
                "-device", "virtio-blk-pci,drive=vgtest,serial=vgtest"]
        with open(s.path(f"{label}.cmd"), "w") as f:
            f.write(" ".join(cmd) + "\n" + " ".join(swtpm_cmd) + "\n")
        harness.log(f"{label}: booting the appliance ({os.path.getsize(initrd) >> 10} KiB "
                    f"initrd {initrd_path}, nic {nic})")
        b = harness.Boot(s, label, cmd, swtpm_cmd, timeout)
        s.current = b
        return b
