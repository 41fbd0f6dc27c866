"""QEMU + swtpm harness for vaultguard's boot-path scenarios (Python 3.11 stdlib only).

A Scenario owns qemu-tests/work/<name>/: a fresh copy of the pristine swtpm state,
its disk images, and per boot the initramfs, its file list, the serial log and the
QEMU and swtpm logs. Each boot starts its own swtpm on the scenario's state (swtpm
exits when QEMU disconnects; the state persists across the scenario's boots) and
boots the Debian kernel under TCG with an initramfs built for that boot:

    s = Scenario("enroll_then_tpm_unlock")
    vault = s.luks_disk("vault")                      # LUKS2, passphrase PASSPHRASE
    b = s.boot('''
        vg enroll --device "$(disk vault)" --pcrs 0,2,4,7
        check enrolled 'cryptsetup luksDump "$(disk vault)" | grep -q systemd-tpm2'
    ''', dynamic=["/usr/sbin/cryptsetup"])
    b.expect(r"Passphrase for", 60)
    b.sendline(PASSPHRASE)
    b.expect_poweroff()                               # every check passed, no core dump

The body runs as a shell script after qemu-tests/lib/guest-lib.sh (check, mark,
disk NAME, ...), with the serial console as its controlling terminal. Any failure
raises ScenarioFailed with the last 60 lines of the serial log.
"""

import fcntl
import hashlib
import importlib.util
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

LIB = os.path.dirname(os.path.abspath(__file__))
QEMU_TESTS = os.path.dirname(LIB)
REPO = os.path.dirname(QEMU_TESTS)
WORK = os.environ.get("VG_QEMU_WORK") or os.path.join(QEMU_TESTS, "work")
SCENARIOS = os.path.join(QEMU_TESTS, "scenarios")

sys.dont_write_bytecode = True  # no __pycache__ in initramfs/ or scenarios/
_spec = importlib.util.spec_from_file_location("build_initramfs", os.path.join(REPO, "initramfs",
                                                                               "build-initramfs.py"))
build_initramfs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_initramfs)

PASSPHRASE = "correct horse battery staple"
MEMORY_MB = 512
DEFAULT_BOOT_TIMEOUT = 180  # whole boot, seconds; a TCG boot takes 5-10 s
TAIL_LINES = 60

# Disk images formatted on the host: cheap key derivation so boots stay fast.
LUKS_FORMAT = ["--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]

# NIC choices. Each is a different set of option ROMs, so a different PCR 2 (see
# ../shared/notes/qemu.md); none gives the guest a network.
NICS = {
    "none": ["-nic", "none"],
    "virtio": ["-nic", "none", "-device", "virtio-net-pci"],
    "e1000": ["-nic", "none", "-device", "e1000"],
}

# Debian programs that guest checks use, with their shared libraries (boot(dynamic=)).
# Busybox's shell runs its own applets before anything on PATH: call a Debian program
# that busybox also provides (mke2fs, mount, losetup, ...) by its full path.
CRYPTSETUP = ["/usr/sbin/cryptsetup", "/usr/sbin/dmsetup"]
MKFS_EXT4 = ["/usr/sbin/mke2fs"]
TPM2_TOOLS = ["/usr/bin/tpm2_getcap", "/usr/bin/tpm2_pcrread", "/usr/bin/tpm2_nvdefine",
              "/usr/bin/tpm2_nvwrite", "/usr/bin/tpm2_nvread"]
# systemd 252's tools; they dlopen the TPM libraries, libcryptsetup and the token
# plugin, which boot(libs=) must carry: boot(dynamic=SYSTEMD_CRYPT, libs=SYSTEMD_CRYPT_LIBS).
SYSTEMD_CRYPT = ["/usr/bin/systemd-cryptenroll", "/lib/systemd/systemd-cryptsetup"]
SYSTEMD_CRYPT_LIBS = ["libtss2-*.so.0", "libcryptsetup.so.12",
                      "/usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so"]
TPM2_TOOLS_LIBS = ["libtss2-tcti-device.so.0"]


class ScenarioFailed(Exception):
    pass


# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), charset and two-byte escapes.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[()][0-9A-Za-z]|[0-9=>@-Z\\-_a-z])")


def log(msg):
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _tail(path, n=TAIL_LINES):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# --- host-side inputs -------------------------------------------------------

_vaultguard = None


def vaultguard_binary():
    """The static release binary: $VAULTGUARD_BIN, else built (once per run) by
    initramfs/build-static.sh."""
    global _vaultguard
    if _vaultguard:
        return _vaultguard
    path = os.environ.get("VAULTGUARD_BIN")
    if not path:
        log("building the static vaultguard (initramfs/build-static.sh)")
        t = time.time()
        r = subprocess.run(["bash", os.path.join(REPO, "initramfs", "build-static.sh")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ScenarioFailed("initramfs/build-static.sh failed:\n"
                                 + "\n".join((r.stdout + r.stderr).splitlines()[-TAIL_LINES:]))
        path = r.stdout.strip().splitlines()[-1]
        log(f"static vaultguard: {path} ({time.time() - t:.0f} s)")
    if not os.path.isfile(path):
        raise ScenarioFailed(f"vaultguard binary {path} missing (initramfs/build-static.sh)")
    _vaultguard = path
    return path


class _FileLock:
    """flock on a file under WORK: one pristine-TPM build, one QEMU at a time (the
    machine has 2 cores shared with compilers)."""

    def __init__(self, name):
        os.makedirs(WORK, exist_ok=True)
        self.path = os.path.join(WORK, name)
        self.f = None

    def acquire(self, what):
        self.f = open(self.path, "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {what} (lock {self.path})")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def release(self):
        if self.f:
            self.f.close()
            self.f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# How many QEMUs may run at once on this machine (run.sh's lanes raise it; a
# benchmark keeps 1 so that its figures are not shared with another guest).
QEMU_SLOTS = max(1, int(os.environ.get("VG_QEMU_SLOTS", "1")))


def _qemu_slot():
    """One of QEMU_SLOTS flocks (.qemu.lock, .qemu.lock.1 ...), waiting for a free one."""
    locks = [_FileLock(".qemu.lock" if i == 0 else f".qemu.lock.{i}") for i in range(QEMU_SLOTS)]
    said = False
    while True:
        for lk in locks:
            lk.f = open(lk.path, "w")
            try:
                fcntl.flock(lk.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return lk
            except BlockingIOError:
                lk.release()
        if not said:
            log(f"waiting for another QEMU to finish ({QEMU_SLOTS} at a time)")
            said = True
        time.sleep(0.2)


# swtpm_setup options for a TPM as a machine leaves the factory: EK (RSA and ECC)
# with certificates and a platform certificate in NV (locked); no SRK yet (the first
# enrolment creates it at 0x81000001). The PCR banks are added per scenario.
MANUFACTURE = ["--tpm2", "--create-ek-cert", "--create-platform-cert", "--lock-nvram"]


def manufacture_tpm(state_dir, pcr_banks="sha256"):
    """A newly manufactured TPM 2.0 with `pcr_banks` active, in `state_dir`."""
    os.makedirs(state_dir, exist_ok=True)
    r = subprocess.run(["swtpm_setup", *MANUFACTURE, "--pcr-banks", pcr_banks,
                        "--tpmstate", state_dir, "--overwrite"], capture_output=True, text=True)
    if r.returncode != 0:
        raise ScenarioFailed(f"swtpm_setup failed:\n{r.stdout}{r.stderr}")


def pristine_tpm(pcr_banks="sha256"):
    """The pristine TPM state for `pcr_banks`, manufactured once and reused by every
    scenario (each works on its own copy)."""
    recipe = hashlib.sha256(repr(MANUFACTURE).encode()).hexdigest()[:8]
    d = os.path.join(WORK, f"pristine-tpm-{pcr_banks.replace(',', '+')}-{recipe}")
    with _FileLock(".pristine-tpm.lock").acquire("another run manufacturing the TPM"):
        if not os.path.exists(os.path.join(d, "ok")):
            shutil.rmtree(d, ignore_errors=True)
            manufacture_tpm(os.path.join(d, "state"), pcr_banks)
            with open(os.path.join(d, "ok"), "w") as f:
                f.write(f"banks {pcr_banks}\n")
            log(f"manufactured a pristine TPM (banks {pcr_banks}) in {d}")
    return os.path.join(d, "state")


# --- disks ------------------------------------------------------------------

class Disk:
    """A raw image attached as a virtio disk; the guest finds it with `disk NAME`
    (its serial), or as /dev/vdX in attachment order."""

    def __init__(self, name, path, index):
        self.name, self.path, self.index = name, path, index
        self.uuid = None

    @property
    def guest_device(self):
        return "/dev/vd" + "abcdefghijklmnopqrstuvwxyz"[self.index]

    def contains(self, data):
        """True if the raw image holds `data` (e.g. proof that plaintext never
        reached the disk)."""
        needle = data.encode() if isinstance(data, str) else data
        with open(self.path, "rb") as f:
            prev = b""
            while chunk := f.read(1 << 20):
                if needle in prev[-len(needle):] + chunk:
                    return True
                prev = chunk
        return False


# --- one boot ---------------------------------------------------------------

class Boot:
    """A running guest. expect() waits for serial output, send() types on the
    console; the serial log is in `log_path`."""

    def __init__(self, scenario, label, cmd, swtpm_cmd, timeout):
        self.s = scenario
        self.label = label
        self.log_path = scenario.path(f"{label}.serial.log")
        self.qemu_log = scenario.path(f"{label}.qemu.log")
        self.swtpm_log = scenario.path(f"{label}.swtpm.log")
        self.buf = ""  # the serial output without \r and terminal escapes
        self._carry = ""
        self.pos = 0  # expect() has consumed the output up to here
        self.cond = threading.Condition()
        self.eof = False
        self.timed_out = False
        self.ended = False
        self.swtpm = None
        self.lock = _qemu_slot()
        try:
            self._start(cmd, swtpm_cmd, timeout)
        except BaseException:
            self.lock.release()
            raise

    def _start(self, cmd, swtpm_cmd, timeout):
        if swtpm_cmd:
            sock = swtpm_cmd[swtpm_cmd.index("--ctrl") + 1].split("path=", 1)[1]
            if os.path.exists(sock):
                os.unlink(sock)
            self.swtpm = subprocess.Popen(swtpm_cmd, stdin=subprocess.DEVNULL,
                                          stdout=open(self.swtpm_log, "w"), stderr=subprocess.STDOUT)
            for _ in range(200):
                if os.path.exists(sock) or self.swtpm.poll() is not None:
                    break
                time.sleep(0.02)
            if not os.path.exists(sock):
                self._stop_swtpm()
                raise ScenarioFailed(f"{self.s.name}/{self.label}: swtpm did not start:\n"
                                     + _tail(self.swtpm_log))
        self.logf = open(self.log_path, "wb")
        self.start = time.time()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.qemu_log, "w"))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.watchdog = threading.Timer(timeout, self._whole_boot_timeout)
        self.watchdog.daemon = True
        self.watchdog.start()
        self.timeout = timeout

    def _read(self):
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            self.logf.write(chunk)
            self.logf.flush()
            text = self._carry + chunk.decode("utf-8", "replace")
            # Terminal control sequences (SeaBIOS clears the screen, systemd colours
            # its messages) would sit between a line start and a marker: drop them
            # from what expect() sees; carry an escape cut in half to the next read.
            last = text.rfind("\x1b")
            if last >= 0 and len(text) - last < 64 and not _ANSI.match(text, last):
                text, self._carry = text[:last], text[last:]
            else:
                self._carry = ""
            with self.cond:
                self.buf += _ANSI.sub("", text).replace("\r", "")
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def _whole_boot_timeout(self):
        if self.proc.poll() is None:
            self.timed_out = True
            self.proc.kill()

    # -- reading the console --

    @property
    def output(self):
        with self.cond:
            return self.buf

    def tail(self, n=TAIL_LINES):
        return "\n".join(self.output.splitlines()[-n:])

    def fail(self, why):
        """Stop the guest and raise with the serial log's tail (and QEMU's stderr)."""
        self._end(kill=True)
        msg = f"{self.s.name}/{self.label}: {why}\n--- last {TAIL_LINES} lines of {self.log_path} ---\n{self.tail()}"
        qemu_err = _tail(self.qemu_log, 10).strip()
        if qemu_err:
            msg += f"\n--- QEMU stderr ({self.qemu_log}) ---\n{qemu_err}"
        raise ScenarioFailed(msg)

    def _gone_reason(self):
        try:
            rc = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            rc = None
        if self.timed_out:
            return f"whole-boot timeout ({self.timeout} s) reached"
        if re.search(r"Kernel panic", self.buf):
            return "kernel panic"
        if re.search(r"(?m)^VGT:DONE ", self.buf):
            return "the guest finished and powered off"
        return f"QEMU exited (status {rc})"

    def expect(self, pattern, timeout=60):
        """Wait for regex `pattern` in the output not yet consumed; consume up to the
        end of the match and return it. A VGT:FAIL seen on the way fails at once.
        Output arrives in pieces: a pattern that ends in `.*` or `$` can match half a
        line, so end such patterns with `\\n` (prompts, which end without one, are
        fine as they are). Carriage returns are removed from the output."""
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        with self.cond:
            while True:
                m = rx.search(self.buf, self.pos)
                bad = re.search(r"^VGT:FAIL .*$", self.buf[self.pos:m.start() if m else len(self.buf)], re.M)
                if bad:
                    failed_check = bad.group(0)
                    break
                if m:
                    self.pos = m.end()
                    return m
                left = deadline - time.time()
                if self.eof or left <= 0:
                    failed_check = None
                    break
                self.cond.wait(min(left, 0.5))
        if failed_check:
            self.fail(f"guest check failed while waiting for /{pattern}/: {failed_check}")
        if self.eof:
            self.fail(f"{self._gone_reason()} before /{pattern}/ appeared")
        self.fail(f"timed out after {timeout} s waiting for /{pattern}/")

    def expect_mark(self, text, timeout=60):
        """Wait for the guest's `mark TEXT`."""
        return self.expect(r"(?m)^VGT:MARK " + re.escape(text) + r"\n", timeout)

    def expect_pass(self, name, timeout=60):
        """Wait for the guest check `name`; fail if it failed."""
        m = self.expect(r"(?m)^VGT:(PASS|FAIL) " + re.escape(name) + r"(:.*)?\n", timeout)
        if m.group(1) != "PASS":
            self.fail(f"guest check failed: {m.group(0)}")
        return m

    def value(self, key, timeout=60):
        """Wait for `VGT:VALUE key=...` and return the value."""
        return self.expect(r"(?m)^VGT:VALUE " + re.escape(key) + r"=(.*)\n", timeout).group(1)

    def assert_absent(self, pattern, why=None):
        """`pattern` must appear nowhere in the serial log so far."""
        m = re.search(pattern, self.output)
        if m:
            self.fail(f"{why or 'unexpected output'}: /{pattern}/ matched {m.group(0)!r}")

    # -- typing --

    def send(self, text, settle=0.5):
        """Type `text` on the serial console, once the console has been quiet for
        `settle` seconds (at most 10 s of waiting). Prompts print, then turn echo off
        with tcsetattr(TCSAFLUSH), which discards input typed in between: typing
        right after the prompt appears would lose the text."""
        if settle:
            with self.cond:
                seen, quiet_since, limit = len(self.buf), time.time(), time.time() + 10
                while time.time() < limit and not self.eof:
                    if len(self.buf) != seen:
                        seen, quiet_since = len(self.buf), time.time()
                    elif time.time() - quiet_since >= settle:
                        break
                    self.cond.wait(settle / 5)
        try:
            if self.proc.poll() is not None:
                raise BrokenPipeError
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.fail(f"cannot type: {self._gone_reason()}")

    def sendline(self, text, settle=0.5):
        self.send(text + "\n", settle)

    # -- ending --

    # -- the QEMU monitor (boot(qmp=True)) --

    def qmp(self, command, timeout=120, **arguments):
        """Run one QMP command on this boot's monitor and return its "return"
        value; a QMP error fails the scenario. One connection per command (each
        negotiates capabilities), so nothing is left half-read between calls."""
        import json as _json
        import socket as _socket
        if not getattr(self, "qmp_path", None):
            self.fail("qmp(): boot with qmp=True")
        for _ in range(100):
            if os.path.exists(self.qmp_path):
                break
            time.sleep(0.05)
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self.qmp_path)
        f = sock.makefile("rwb")

        def call(cmd, args=None):
            msg = {"execute": cmd}
            if args:
                msg["arguments"] = args
            f.write(_json.dumps(msg).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    self.fail(f"QMP {cmd}: monitor closed")
                reply = _json.loads(line)
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    self.fail(f"QMP {cmd}: {reply['error']}")
                # Asynchronous events (SUSPEND, WAKEUP, ...) are skipped.

        try:
            greeting = _json.loads(f.readline())
            if "QMP" not in greeting:
                self.fail(f"QMP: unexpected greeting {greeting}")
            call("qmp_capabilities")
            return call(command, arguments)
        finally:
            f.close()
            sock.close()

    def wait_run_state(self, state, timeout=60):
        """Wait until QEMU reports the guest's run state as `state` (e.g.
        "suspended" once it sleeps in S3)."""
        end = time.time() + timeout
        while time.time() < end:
            if self.qmp("query-status")["status"] == state:
                return
            time.sleep(0.2)
        self.fail(f"the guest never reached run state {state!r}")

    def dump_memory(self, path):
        """dump-guest-memory of the whole guest RAM (ELF, no paging) into `path`."""
        if os.path.exists(path):
            os.unlink(path)
        self.qmp("dump-guest-memory", paging=False, protocol=f"file:{path}")
        return path

    def expect_poweroff(self, timeout=120, check_done=True):
        """Wait until the guest powers off; then the body must have ended with status
        0, without any failed check and without core dumps. Returns the names of the
        checks that passed. check_done=False for a custom /init (no VGT:DONE)."""
        if check_done:
            m = self.expect(r"(?m)^VGT:DONE rc=(\d+) cores=(\d+).*\n", timeout)
            if m.group(1) != "0":
                self.fail(f"scenario body exited with status {m.group(1)}")
            if m.group(2) != "0":
                self.fail(f"{m.group(2)} core dump(s) in the guest")
        try:
            self.proc.wait(timeout=timeout if not check_done else 30)
        except subprocess.TimeoutExpired:
            self.fail("guest did not power off")
        self.reader.join(5)
        if self.timed_out:
            self.fail(self._gone_reason())
        fails = re.findall(r"(?m)^VGT:FAIL .*$", self.output)
        if fails:
            self.fail("guest checks failed:\n  " + "\n  ".join(fails))
        if re.search(r"Kernel panic", self.output):
            self.fail("kernel panic")
        self._end()
        log(f"{self.label}: powered off after {time.time() - self.start:.1f} s")
        return re.findall(r"(?m)^VGT:PASS (.*)$", self.output)

    def hard_reset(self):
        """Cut the power now (SIGKILL QEMU): no TPM2_Shutdown, no sync; swtpm keeps
        what it had written, as a real TPM would."""
        if self.proc.poll() is not None:
            self.fail(f"no hard reset possible: {self._gone_reason()}")
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._end()
        log(f"{self.label}: hard reset after {time.time() - self.start:.1f} s")

    def _stop_swtpm(self):
        if self.swtpm and self.swtpm.poll() is None:
            t = time.time()
            try:
                self.swtpm.wait(timeout=10)  # it exits by itself once QEMU is gone
                if time.time() - t > 1:
                    log(f"swtpm took {time.time() - t:.1f} s to exit after QEMU")
            except subprocess.TimeoutExpired:
                log("swtpm still running 10 s after QEMU: terminating it")
                self.swtpm.terminate()
                try:
                    self.swtpm.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.swtpm.kill()
                    self.swtpm.wait()

    def _end(self, kill=False):
        if self.ended:
            return
        self.ended = True
        if hasattr(self, "watchdog"):
            self.watchdog.cancel()
        if hasattr(self, "proc"):
            if self.proc.poll() is None:
                if kill:
                    self.proc.kill()
                self.proc.wait()
            self.reader.join(5)
            self.logf.close()
        self._stop_swtpm()
        self.lock.release()
        if self.s.current is self:
            self.s.current = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self._end(kill=True)


def search_dump(path, needle, context=32, limit=20):
    """Every offset of `needle` (bytes) in the file at `path`, with `context`
    bytes either side of each hit (to tell where it lives: a socket buffer, a
    tty ring, a page of a file). Reads in overlapping chunks."""
    hits = []
    seen = set()
    chunk = 64 << 20
    with open(path, "rb") as f:
        base = 0
        tail = b""
        while True:
            data = f.read(chunk)
            if not data:
                break
            buf = tail + data
            start = base - len(tail)
            i = buf.find(needle)
            while i >= 0:
                off = start + i
                if off not in seen:
                    seen.add(off)
                    lo = max(0, i - context)
                    hits.append((off, buf[lo:i + len(needle) + context]))
                    if len(hits) >= limit:
                        return hits
                i = buf.find(needle, i + 1)
            keep = len(needle) - 1 + context
            tail = buf[-keep:] if keep else b""
            base += len(data)
    return hits


def luks_format(path, passphrase=PASSPHRASE, options=()):
    r = subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", *LUKS_FORMAT, *options,
                        "--key-file", "-", path], input=passphrase.encode(), capture_output=True)
    if r.returncode != 0:
        raise ScenarioFailed(f"cryptsetup luksFormat {path}: {r.stderr.decode().strip()}")


MAKE_EXT4 = """
    dev=$(disk vault) || exit 1
    check open 'cryptsetup open --key-file /etc/test-passphrase "$dev" prep'
    check mkfs '/usr/sbin/mke2fs -q -t ext4 -b 4096 -L vault /dev/mapper/prep'
    mkdir -p /mnt/vault
    check mount 'mount -t ext4 /dev/mapper/prep /mnt/vault'
    echo "vault made by the qemu-tests harness" > /mnt/vault/README
    check umount 'umount /mnt/vault'
    check close 'cryptsetup close prep'
"""


def _luks_ext4_template(size_mb, passphrase, options):
    """A LUKS2 image with ext4 inside, made in a guest (the host has no
    device-mapper) the first time it is asked for, then reused."""
    key = hashlib.sha256(repr((size_mb, passphrase, options, LUKS_FORMAT, MAKE_EXT4)).encode()).hexdigest()[:16]
    cache = os.path.join(WORK, "cache")
    img = os.path.join(cache, f"luks-ext4-{size_mb}M-{key}.img")
    with _FileLock(".cache.lock").acquire("another run preparing a cached image"):
        if os.path.exists(img):
            return img
        log(f"preparing a LUKS2 + ext4 image ({size_mb} MiB), cached as {img}")
        prep = Scenario(f"cache-luks-ext4-{key}")
        try:
            disk = prep.disk("vault", size_mb)
            luks_format(disk.path, passphrase, options)
            b = prep.boot(MAKE_EXT4, tpm=False, vaultguard=False, dynamic=CRYPTSETUP + MKFS_EXT4,
                          label="prep", files={"/etc/mke2fs.conf": pathlib.Path("/etc/mke2fs.conf"),
                                               "/etc/test-passphrase": passphrase})
            b.expect_poweroff()
            os.makedirs(cache, exist_ok=True)
            os.replace(disk.path, img)
        finally:
            prep.finish()
        shutil.rmtree(prep.dir, ignore_errors=True)
        return img


# --- a scenario -------------------------------------------------------------

class Scenario:
    """One scenario's state: a work directory, a TPM (a copy of the pristine one),
    disks, and its boots in order."""

    def __init__(self, name, pcr_banks=None):
        self.name = name
        self.dir = os.path.join(WORK, name)
        # Two runs of the same scenario (two engineers, one machine) would share
        # this directory: the second waits.
        self.lock = _FileLock(f".scenario-{name}.lock").acquire(f"another run of {name}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.pcr_banks = pcr_banks or os.environ.get("VG_PCR_BANKS", "sha256")
        self.tpm_dir = self.path("tpm")
        shutil.copytree(pristine_tpm(self.pcr_banks), self.tpm_dir)
        self.disks = []
        self.nboots = 0
        self.current = None
        self.started = time.time()

    def path(self, name):
        return os.path.join(self.dir, name)

    # -- TPM --

    def new_tpm(self):
        """Replace the TPM by a newly manufactured one (new seeds: the old SRK and
        everything sealed under it are gone), as after a TPM clear or a board swap."""
        shutil.rmtree(self.tpm_dir)
        manufacture_tpm(self.tpm_dir, self.pcr_banks)

    # -- disks --

    def disk(self, name, size_mb=64):
        """A zeroed raw disk image (sparse), attached to every later boot."""
        if any(d.name == name for d in self.disks):
            raise ScenarioFailed(f"disk {name} exists")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,20}", name):
            raise ScenarioFailed(f"disk name {name!r}: 1-20 of [A-Za-z0-9_-] (it is the serial)")
        d = Disk(name, self.path(f"{name}.img"), len(self.disks))
        with open(d.path, "wb") as f:
            f.truncate(size_mb << 20)
        self.disks.append(d)
        return d

    def luks_disk(self, name="vault", size_mb=64, passphrase=PASSPHRASE, options=(), ext4=False):
        """A disk holding a LUKS2 header made on the host (cryptsetup works on a file
        without device-mapper), one passphrase keyslot, cheap PBKDF2. Note: LUKS2
        picks 4096-byte sectors, so a file system on the mapping needs 4096-byte
        blocks (mke2fs -b 4096).
        ext4=True: the volume also holds an ext4 file system (label "vault", a file
        /README) made in a guest the first time and cached in qemu-tests/work/cache/;
        scenarios that get it share its LUKS UUID."""
        d = self.disk(name, size_mb)
        if ext4:
            template = _luks_ext4_template(size_mb, passphrase, tuple(options))
            subprocess.run(["cp", "--sparse=always", template, d.path], check=True)
        else:
            luks_format(d.path, passphrase, options)
        d.uuid = subprocess.run(["cryptsetup", "luksUUID", d.path], capture_output=True,
                                text=True, check=True).stdout.strip()
        return d

    def luks_dump(self, disk):
        """`cryptsetup luksDump` of a disk, read on the host between boots."""
        return subprocess.run(["cryptsetup", "luksDump", disk.path], capture_output=True,
                              text=True, check=True).stdout

    # -- booting --

    def enroll(self, args, device="/dev/vda", pin=None, cmdline="", name="secure-ai-vault"):
        """One boot that runs `vaultguard enroll ARGS` (ARGS names the device, or
        cmdline does), types the passphrase at its prompt for `name` on `device` (and `pin`
        twice when given), fails unless it exits 0, and powers off. Returns the
        console output of the boot (the recovery key is printed there)."""
        b = self.boot(f"""
            vg enroll {args}
            value enroll-status $?
        """, cmdline=cmdline)
        b.expect(rf"Passphrase for {re.escape(name)} \({re.escape(device)}\): ", 90)
        b.sendline(PASSPHRASE)
        if pin is not None:
            for prompt in ("New TPM2 PIN: ", "Repeat the TPM2 PIN: "):
                b.expect(prompt, 60)
                b.sendline(pin)
        if b.value("enroll-status", 120) != "0":
            b.fail(f"vaultguard enroll {args} failed")
        b.expect_poweroff()
        return b.output


    def boot(self, body=None, *, init=None, cmdline="", nic="none", files=None, dynamic=(),
             libs=(), trees=(), modules=(), static_only=False, vaultguard=True,
             tpm=True, timeout=DEFAULT_BOOT_TIMEOUT, label=None, qemu_args=(), initrd=None,
             qmp=False, ovmf=False):
        """Build an initramfs and boot it; return the running Boot.

        body:      shell script run by the harness's /init (qemu-tests/lib/init.sh)
                   after guest-lib.sh; or
        init:      a whole /init of your own (bytes or str), e.g. a production-like
                   init; guest-lib.sh is still in the image at /usr/lib/vgtest/lib.sh.
        initrd:    boot this prebuilt image instead (e.g. one made by dracut); body,
                   init and the image options must then be left out.
        cmdline:   appended to the kernel command line (rd.vaultguard.* options).
        nic:       "none" (default), "virtio" or "e1000": each changes PCR 2.
        files:     {guest path: content (str or bytes), or a host file as a
                   pathlib.Path}, e.g. {"/etc/vaultguard/config.json": json.dumps(cfg)}.
        dynamic:   Debian programs to carry with their shared libraries
                   (harness.CRYPTSETUP, harness.MKFS_EXT4, ...).
        libs:      extra libraries loaded with dlopen (sonames, paths or globs).
        trees:     [(host dir, guest dir)] copied as they are.
        modules:   kernel modules beyond the defaults.
        static_only: the image must hold no shared library (the build checks it).
        vaultguard: include the static binary at /usr/bin/vaultguard.
        tpm:       attach the scenario's swtpm (False: a machine without a TPM).
        timeout:   whole-boot limit in seconds; QEMU is killed when it is reached.
        qmp:       open a QMP monitor socket for Boot.qmp() (system_wakeup,
                   dump-guest-memory, query-status).
        ovmf:      boot UEFI firmware (Debian's OVMF, the scenario's own variable
                   store) instead of SeaBIOS: the firmware and the kernel's EFI stub
                   write a TCG event log (kernel in PCR 4, initrd and command line
                   in PCR 9). QEMU's -kernel patches the kernel's setup header
                   (initrd address and size) before OVMF measures it, so PCR 4
                   follows the initrd's size; the command line is in PCR 9.
        """
        if self.current is not None:
            raise ScenarioFailed(f"{self.name}: boot {self.current.label} still running "
                                 "(expect_poweroff() or hard_reset() first)")
        if sum(x is not None for x in (body, init, initrd)) != 1:
            raise ScenarioFailed("boot(): give exactly one of body=, init= or initrd=")
        self.nboots += 1
        label = label or f"boot{self.nboots}"
        if initrd is not None:
            if files or dynamic or libs or trees or modules or static_only:
                raise ScenarioFailed("boot(initrd=): the image options do not apply")
            kver = build_initramfs.kernel_release()
            log(f"{label}: booting the prebuilt {os.path.basename(initrd)} "
                f"({os.path.getsize(initrd) >> 10} KiB)")
            return self._start_qemu(label, initrd, kver, cmdline, nic, tpm, timeout, qemu_args, qmp,
                                    ovmf)
        with open(os.path.join(LIB, "guest-lib.sh"), "rb") as f:
            guest_lib = f.read()
        adds = [(guest_lib, "/usr/lib/vgtest/lib.sh")]
        if body is not None:
            with open(os.path.join(LIB, "init.sh"), "rb") as f:
                init_bytes = f.read()
            script = b"#!/bin/sh\n. /usr/lib/vgtest/lib.sh\n" + _dedent(body).encode()
            adds.append((script, "/scenario.sh"))
        else:
            init_bytes = init.encode() if isinstance(init, str) else init
        for dst, src in (files or {}).items():
            if isinstance(src, os.PathLike):
                adds.append((os.fspath(src), dst))
            else:
                adds.append((src.encode() if isinstance(src, str) else src, dst))
        initrd = self.path(f"{label}.initramfs.cpio")
        t = time.time()
        try:
            info = build_initramfs.build(
                initrd, init_bytes, vaultguard=vaultguard_binary() if vaultguard else None,
                adds=adds, dynamic=list(dynamic), libs=list(libs), trees=list(trees),
                modules=build_initramfs.DEFAULT_MODULES + list(modules),
                static_only=static_only, listing=self.path(f"{label}.initramfs.list"),
                compress=os.environ.get("VG_INITRAMFS_COMPRESS", "none"))
        except build_initramfs.BuildError as e:
            raise ScenarioFailed(f"{self.name}/{label}: initramfs: {e}") from None
        log(f"{label}: booting ({info['size'] >> 10} KiB initramfs in {time.time() - t:.1f} s, "
            f"nic {nic}{', no TPM' if not tpm else ''})")
        return self._start_qemu(label, initrd, info["kernel_release"], cmdline, nic, tpm,
                                timeout, qemu_args, qmp, ovmf)

    def build_initrd(self, label, body, *, files=None, dynamic=(), modules=()):
        """Build a test initramfs running `body` (as boot(body=...) would) and return
        its path, to boot it several times with boot(initrd=...): the same image
        each time, so the same PCR 9 under OVMF."""
        with open(os.path.join(LIB, "guest-lib.sh"), "rb") as f:
            guest_lib = f.read()
        with open(os.path.join(LIB, "init.sh"), "rb") as f:
            init_bytes = f.read()
        script = b"#!/bin/sh\n. /usr/lib/vgtest/lib.sh\n" + _dedent(body).encode()
        adds = [(guest_lib, "/usr/lib/vgtest/lib.sh"), (script, "/scenario.sh")]
        for dst, src in (files or {}).items():
            adds.append((src.encode() if isinstance(src, str) else src, dst))
        path = self.path(f"{label}.initramfs.cpio")
        try:
            build_initramfs.build(
                path, init_bytes, vaultguard=vaultguard_binary(), adds=adds,
                dynamic=list(dynamic), libs=[], trees=[],
                modules=build_initramfs.DEFAULT_MODULES + list(modules),
                static_only=False, listing=self.path(f"{label}.initramfs.list"),
                compress=os.environ.get("VG_INITRAMFS_COMPRESS", "none"))
        except build_initramfs.BuildError as e:
            raise ScenarioFailed(f"{self.name}/{label}: initramfs: {e}") from None
        return path

    def _ovmf_args(self):
        """Debian's OVMF (4 MB build, no secure boot) with this scenario's own copy
        of the variable store (the firmware writes it)."""
        code = "/usr/share/OVMF/OVMF_CODE_4M.fd"
        if not os.path.exists(code):
            raise ScenarioFailed(f"{code} is missing: install Debian's ovmf package "
                                 "(qemu-tests/setup-host.sh)")
        vars_copy = self.path("OVMF_VARS_4M.fd")
        if not os.path.exists(vars_copy):
            shutil.copyfile("/usr/share/OVMF/OVMF_VARS_4M.fd", vars_copy)
        return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]

    def _start_qemu(self, label, initrd, kver, cmdline, nic, tpm, timeout, qemu_args, qmp=False,
                    ovmf=False):
        if nic not in NICS:
            raise ScenarioFailed(f"nic={nic!r}: one of {', '.join(NICS)}")
        append = f"console=ttyS0 panic=-1 quiet vgtest.disks={len(self.disks)} {cmdline}".strip()
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(MEMORY_MB), "-smp", "1",
               "-nographic", "-monitor", "none", "-no-reboot",
               "-chardev", "stdio,id=ser0,signal=off", "-serial", "chardev:ser0",
               "-kernel", build_initramfs.kernel_image(kver), "-initrd", initrd,
               "-append", append, *NICS[nic]]
        if ovmf:
            cmd += self._ovmf_args()
        swtpm_cmd = None
        if tpm:
            sock = self.path("swtpm.ctrl")
            if len(sock) > 100:  # sun_path holds 108 bytes
                sock = os.path.join("/tmp", f"vg-swtpm-{os.getpid()}.ctrl")
            swtpm_cmd = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_dir}",
                         "--ctrl", f"type=unixio,path={sock}", "--terminate"]
            cmd += ["-chardev", f"socket,id=chrtpm,path={sock}",
                    "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"]
        for d in self.disks:
            cmd += ["-drive", f"file={d.path},format=raw,if=none,id={d.name},cache=unsafe",
                    "-device", f"virtio-blk-pci,drive={d.name},serial={d.name}"]
        qmp_path = None
        if qmp:
            qmp_path = self.path(f"{label}.qmp")
            if len(qmp_path) > 100:
                qmp_path = os.path.join("/tmp", f"vg-qmp-{os.getpid()}.sock")
            if os.path.exists(qmp_path):
                os.unlink(qmp_path)
            cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        cmd += list(qemu_args)
        with open(self.path(f"{label}.cmd"), "w") as f:
            f.write(" ".join(cmd) + "\n" + (" ".join(swtpm_cmd) + "\n" if swtpm_cmd else ""))
        b = Boot(self, label, cmd, swtpm_cmd, timeout)
        b.qmp_path = qmp_path
        self.current = b
        return b

    def finish(self):
        """Stop a boot still running and let other runs of this scenario go."""
        if self.current is not None:
            self.current._end(kill=True)
        self.lock.release()


def _dedent(text):
    import textwrap
    return textwrap.dedent(text).strip("\n") + "\n"


# --- running scenarios ------------------------------------------------------

def scenario_names():
    return sorted(f[:-3] for f in os.listdir(SCENARIOS) if f.endswith(".py") and not f.startswith("_"))


def load(name):
    """A scenario module by name, or by path (a scenario file anywhere)."""
    path = name if name.endswith(".py") else os.path.join(SCENARIOS, name + ".py")
    spec = importlib.util.spec_from_file_location(f"scenario_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not callable(getattr(mod, "run", None)):
        raise ScenarioFailed(f"{path}: no run(s) function")
    return mod


def run_one(name):
    """Run one scenario; print PASS/FAIL; return True if it passed."""
    t = time.time()
    s = None
    mod = name
    if name.endswith(".py"):
        name = os.path.basename(name)[:-3]
    try:
        mod = load(mod)
        doc = (mod.__doc__ or "").strip().splitlines()
        print(f"--- {name}: {doc[0] if doc else ''}", flush=True)
        s = Scenario(name, pcr_banks=getattr(mod, "PCR_BANKS", None))
        mod.run(s)
        if s.current is not None:
            raise ScenarioFailed(f"{name}: boot {s.current.label} left running "
                                 "(end it with expect_poweroff() or hard_reset())")
        print(f"PASS {name} ({time.time() - t:.1f} s, {s.nboots} boot(s))", flush=True)
        return True
    except ScenarioFailed as e:
        print(f"FAIL {name} ({time.time() - t:.1f} s)\n{e}", flush=True)
    except Exception:  # a harness or scenario bug fails the scenario too
        import traceback
        print(f"FAIL {name} ({time.time() - t:.1f} s): harness error\n{traceback.format_exc()}", flush=True)
    finally:
        if s is not None:
            s.finish()
    return False


def main(argv=None):
    """qemu-tests/run.sh [SCENARIO...]: run the named scenarios (all by default).
    With VG_QEMU_LANES=2 (test.sh sets it on a machine with 2 CPUs or more) the
    scenarios run in two lanes, one QEMU each: the appliance guests (minutes each,
    one cached root built by the first) in one, the rest in the other; each line is
    prefixed with its lane."""
    argv = sys.argv[1:] if argv is None else argv
    names = scenario_names()
    wanted = [os.path.abspath(a) if a.endswith(".py") else a for a in argv]
    unknown = [w for w in wanted if w not in names and not os.path.isfile(w)]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; have: {', '.join(names)}", file=sys.stderr)
        return 2
    todo = wanted or names
    t = time.time()
    lanes = max(1, int(os.environ.get("VG_QEMU_LANES", "1")))
    if lanes > 1 and len(todo) > 1:
        failed = _run_lanes(todo, lanes)
    else:
        failed = [os.path.basename(n).removesuffix(".py") for n in todo if not run_one(n)]
    print(f"\n{len(todo) - len(failed)}/{len(todo)} scenarios passed in {time.time() - t:.0f} s"
          + (f"; FAILED: {' '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def _run_lanes(todo, lanes):
    """Run `todo` in `lanes` child harnesses (one QEMU slot each); the appliance
    scenarios share a lane. Returns the names of the scenarios that failed."""
    heavy = [n for n in todo if os.path.basename(n).removesuffix(".py").startswith("appliance_")]
    light = [n for n in todo if n not in heavy]
    # Measured in CI (2026-11-26): the appliance lane 1,433 s, the other 1,094 s;
    # moving the third appliance scenario to the other lane would make it 1,441 s.
    groups = [heavy, light] if heavy and light else [todo[i::lanes] for i in range(lanes)]
    env = dict(os.environ, VG_QEMU_SLOTS=str(lanes), VG_QEMU_LANES="1", PYTHONUNBUFFERED="1")
    here = os.path.dirname(os.path.abspath(__file__))
    procs = []
    for k, group in enumerate(g for g in groups if g):
        p = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                              "import harness; sys.exit(harness.main(sys.argv[2:]))", here, *group],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        procs.append((chr(ord("A") + k), group, p))
    failed = []

    def pump(tag, p):
        for line in p.stdout:
            print(f"[{tag}] {line}", end="", flush=True)
            m = re.match(r"FAIL (\S+) \(", line)
            if m:
                failed.append(m.group(1))

    threads = [threading.Thread(target=pump, args=(tag, p)) for tag, _, p in procs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for tag, group, p in procs:
        if p.wait() != 0 and not any(os.path.basename(n).removesuffix(".py") in failed for n in group):
            failed.append(f"lane-{tag}")
    return failed
