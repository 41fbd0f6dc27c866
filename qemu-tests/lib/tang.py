"""A real Tang server on the host's loopback, and the QEMU user network that lets a
guest reach it and nothing else (Python 3.11 stdlib; Debian's tang, socat, jose).

    tang = Tang(s.dir)                         # keys made by tangd-keygen
    tang.start()                               # tangd behind socat on 127.0.0.1:PORT
    b = s.boot(body, modules=NET_MODULES, qemu_args=user_net(tang.port))
    ... the guest reaches tangd at http://10.0.2.100 (GUEST_URL) ...
    tang.stop()

The server is Debian's own /usr/libexec/tangd (it speaks HTTP on stdin/stdout, one
request per connection, as systemd's socket activation runs it), behind
`socat TCP-LISTEN:PORT,bind=127.0.0.1,fork,reuseaddr`: never a server of ours.

QEMU's user network (slirp) with restrict=on gives the guest a DHCP lease
(10.0.2.15, router 10.0.2.2) and no way out: no DNS answers, no connection to any
outside address. The one exception is the guestfwd rule: a TCP connection from the
guest to GUEST_ADDR:80 runs `socat STDIO TCP:127.0.0.1:PORT` on the host (slirp
starts the command once per connection, so each HTTP request gets its own tangd, as
a host client would). All real traffic stays on this machine's loopback.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

GUEST_ADDR = "10.0.2.100"
GUEST_URL = f"http://{GUEST_ADDR}"
TANGD = "/usr/libexec/tangd"
TANGD_KEYGEN = "/usr/libexec/tangd-keygen"
TANGD_ROTATE = "/usr/libexec/tangd-rotate-keys"
# The guest's NIC driver (virtio_net pulls in net_failover and failover), and its
# RNG's: see user_net().
NET_MODULES = ["virtio_net", "virtio_rng"]


class TangError(Exception):
    pass


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_net(port=None, blackhole=False):
    """QEMU arguments for a virtio NIC on a restricted user network. `port`: the
    host's 127.0.0.1 port GUEST_ADDR:80 forwards to. port=None: no forward, so
    nothing answers at GUEST_ADDR (the guest's SYNs go unanswered, as to a server
    that is down behind a firewall dropping packets). blackhole=True with a port is
    refused: use port=None."""
    if blackhole and port is not None:
        raise TangError("user_net: blackhole=True means no forward; give no port")
    netdev = "user,id=n0,restrict=on,ipv6=off"
    if port is not None:
        # -lf: socat's own diagnostics go to a file, never into the guest's stream.
        netdev += (f",guestfwd=tcp:{GUEST_ADDR}:80-cmd:socat -lf /dev/null "
                   f"STDIO TCP:127.0.0.1:{port}")
    # A virtio RNG too: the TCG guest (qemu64, no RDRAND) otherwise seeds its CRNG
    # about 12 s after boot, and getrandom() holds every program that needs it
    # (vaultguard's first run of the boot, ~2.6 s in tang_unlock) until then; real
    # machines seed it from RDRAND or the TPM within the first second.
    return ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci"]


class Tang:
    """One tangd with its own key directory under `directory`."""

    def __init__(self, directory, name="tang"):
        self.name = name
        self.keydir = os.path.join(directory, f"{name}.keys")
        self.log_path = os.path.join(directory, f"{name}.log")
        shutil.rmtree(self.keydir, ignore_errors=True)
        os.makedirs(self.keydir)
        r = subprocess.run([TANGD_KEYGEN, self.keydir], capture_output=True, text=True)
        if r.returncode != 0:
            raise TangError(f"{TANGD_KEYGEN} {self.keydir} failed (apt install tang):\n"
                            f"{r.stdout}{r.stderr}")
        self.port = None
        self.proc = None

    @property
    def host_url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, port=None, any_adv=False):
        """Serve on 127.0.0.1:`port` (a free one by default); return when /adv answers.
        any_adv=True: answer `GET /adv/THP` for any THP with this server's default
        advertisement (the request line rewritten before tangd reads it), i.e. an
        advertisement signed by this server's key, whatever key the client asked
        for; a plain tangd answers 404 for a key it does not hold."""
        if self.proc is not None:
            raise TangError(f"tang {self.name} already running on port {self.port}")
        self.port = port or _free_port()
        serve = f"EXEC:{TANGD} {self.keydir}"
        if any_adv:
            # A script file: socat's address syntax would split a command line.
            wrapper = self.keydir + ".any-adv.sh"
            with open(wrapper, "w") as f:
                f.write(f"#!/bin/sh\nsed -u -e '1s#^GET /adv/[^ ]*#GET /adv#' | "
                        f"exec {TANGD} {self.keydir}\n")
            os.chmod(wrapper, 0o755)
            serve = f"EXEC:{wrapper}"
        self.proc = subprocess.Popen(
            ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr", serve],
            stdin=subprocess.DEVNULL, stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.time() + 10
        while True:
            try:
                self.adv()
                return self
            except OSError as e:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise TangError(f"tangd behind socat on 127.0.0.1:{self.port} did not "
                                    f"answer /adv: {e} (log {self.log_path})") from None
                time.sleep(0.05)

    def stop(self):
        """Stop socat and any tangd it is running."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def adv(self, thp=""):
        """The advertisement (a JWS as a dict), fetched from the running server."""
        url = f"{self.host_url}/adv" + (f"/{thp}" if thp else "")
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)

    def key_files(self, hidden=False):
        """The key files: advertised ones, or with hidden=True the rotated-out
        `.`-prefixed ones tangd still uses for recovery."""
        return sorted(f for f in os.listdir(self.keydir)
                      if f.endswith(".jwk") and f.startswith(".") == hidden)

    def thumbprints(self, hidden=False):
        """S256 thumbprints (jose jwk thp) of the keys, as clevis records them."""
        out = []
        for f in self.key_files(hidden):
            r = subprocess.run(["jose", "jwk", "thp", "-i", os.path.join(self.keydir, f)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise TangError(f"jose jwk thp {f}: {r.stderr.strip()}")
            out.append(r.stdout.strip())
        return out

    def signing_thumbprint(self):
        """The thumbprint of the advertised signing (ES512, key_ops verify) key: what
        `clevis encrypt tang '{"thp": ...}'` trusts."""
        for f in self.key_files():
            with open(os.path.join(self.keydir, f)) as fh:
                jwk = json.load(fh)
            if "sign" in jwk.get("key_ops", []) or jwk.get("alg") == "ES512":
                return f.removesuffix(".jwk")
        raise TangError(f"no signing key in {self.keydir}")

    def rotate(self):
        """tangd-rotate-keys: the current keys become hidden (still used for
        recovery, no longer advertised), a new pair is advertised."""
        r = subprocess.run([TANGD_ROTATE, "-d", self.keydir], capture_output=True, text=True)
        if r.returncode != 0:
            raise TangError(f"{TANGD_ROTATE} -d {self.keydir}: {r.stdout}{r.stderr}")


# clevis in a test guest: Debian's clevis 19 is bash scripts around jose, curl,
# cryptsetup (and tpm2-tools for the tpm2 pin); boot(files=clevis_files(),
# dynamic=CLEVIS_DYNAMIC, libs=CLEVIS_LIBS) carries them and their DT_NEEDED closure
# into the busybox initramfs, so `clevis luks unlock` runs in the same guest, on the
# same kernel, TPM and network as vaultguard.
CLEVIS_SCRIPTS = ["clevis", "clevis-luks-unlock", "clevis-luks-common-functions",
                  "clevis-decrypt", "clevis-decrypt-tang", "clevis-decrypt-sss",
                  "clevis-decrypt-tpm2", "clevis-decrypt-null"]
CLEVIS_DYNAMIC = ["/usr/bin/bash", "/usr/bin/jose", "/usr/bin/curl", "/usr/sbin/cryptsetup",
                  "/usr/sbin/dmsetup", "/usr/bin/tpm2_createprimary", "/usr/bin/tpm2_load",
                  "/usr/bin/tpm2_unseal", "/usr/bin/tpm2_flushcontext"]
# tpm2-tools open the TPM through a TCTI loaded with dlopen.
CLEVIS_LIBS = ["libtss2-tcti-device.so.0"]


def clevis_files():
    import pathlib
    return {f"/usr/bin/{n}": pathlib.Path(f"/usr/bin/{n}") for n in CLEVIS_SCRIPTS}


def bind_tang(image, tang, keyfile, url=GUEST_URL):
    """`clevis luks bind` a tang pin for `url` into a LUKS2 image file on the host,
    with the advertisement fetched from the running `tang` (the host cannot reach
    the guest-side URL; clevis takes the advertisement as "adv" instead and trusts
    it as the guest would after checking its thumbprint)."""
    return bind(image, "tang", {"url": url, "adv": tang.adv()}, keyfile)


def bind(image, pin, cfg, keyfile, env=None):
    """`clevis luks bind -y -d IMAGE -k KEYFILE PIN CFG` (cfg a dict, its "adv"
    values kept as JSON); returns the keyslot clevis added (from luksDump)."""
    r = subprocess.run(["clevis", "luks", "bind", "-y", "-d", image, "-k", keyfile, pin,
                        json.dumps(cfg)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise TangError(f"clevis luks bind {pin} {json.dumps(cfg)[:200]} on {image} failed:\n"
                        f"{r.stdout}{r.stderr}")
    return r


class HostTpm:
    """The scenario's TPM state served on the host (swtpm, unix socket) while clevis
    binds a tpm2 pin to it: `with HostTpm(s.tpm_dir, s.path("host-swtpm")) as t:
    bind(..., env=t.env)`. swtpm saves the state when it stops, and the guest's
    next boot starts its own swtpm on it: the same seeds, so the same primary key."""

    def __init__(self, state_dir, sock_base):
        self.state_dir = state_dir
        # sun_path holds 108 bytes; the control socket is SOCK.ctrl (the swtpm
        # TCTI's convention).
        self.sock = sock_base if len(sock_base) < 90 else f"/tmp/vg-host-swtpm-{os.getpid()}"
        self.proc = None
        self.env = {"TPM2TOOLS_TCTI": f"swtpm:path={self.sock}"}

    def __enter__(self):
        for p in (self.sock, self.sock + ".ctrl"):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
             "--server", f"type=unixio,path={self.sock}",
             "--ctrl", f"type=unixio,path={self.sock}.ctrl",
             "--flags", "not-need-init,startup-clear"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(200):
            if os.path.exists(self.sock + ".ctrl") or self.proc.poll() is not None:
                break
            time.sleep(0.02)
        if not os.path.exists(self.sock + ".ctrl"):
            self.__exit__()
            raise TangError(f"swtpm on {self.state_dir} did not start")
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def expect_clevis_token(image, token_id=0):
    """Fail unless the image's token `token_id` is a clevis token (what bind wrote)."""
    r = subprocess.run(["cryptsetup", "token", "export", "--token-id", str(token_id), image],
                       capture_output=True, text=True)
    try:
        tok = json.loads(r.stdout)
    except ValueError:
        tok = {}
    if tok.get("type") != "clevis":
        raise TangError(f"{image}: token {token_id} is not a clevis token after clevis luks "
                        f"bind: {r.stdout[:200]}{r.stderr[:200]}")
    return tok
