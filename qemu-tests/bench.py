#!/usr/bin/env python3
"""Benchmarks of issue 6, each figure printed beside its comparison from the same run.

Run by qemu-tests/bench.sh (which installs and builds first). Sections:
  size        the static binary, stripped, and what it adds to an initramfs
  supervisor  host: idle RSS and wake-ups over 60 s, status throughput and latency
              with 1 and 32 clients, bad-input sweep; vs the Python watchdog
  guest       QEMU + swtpm: TPM and passphrase unlock latency, vaultguard vs
              systemd-cryptsetup 257 on the same guest, TPM and volume; the same
              for a signed PCR policy (one enrolment, signature made on the host);
              one strace'd run of each TPM path cut into phases; an argon2id
              keyslot at cryptsetup's default cost, vaultguard vs `cryptsetup open`
              (a 1 GiB, 4-vCPU guest of its own); auto-lock
              lateness and the bad-input sweep against a supervisor guarding a
              real, mounted vault
  boot        QEMU appliance guest: kernel start to the vault's mount unit active,
              initramfs-tools + vaultguard vs dracut + systemd-cryptsetup 252
  tang        QEMU + a real tangd through restricted user networking: Tang unlock
              latency, vaultguard vs `clevis luks unlock` (clevis 19) in the same
              guest; time to the passphrase prompt with the Tang server hung or
              unreachable, vs clevis (capped at VG_BENCH_CLEVIS_CAP, 300 s)
  fuzz        cargo-fuzz targets, a bounded time each, from the committed corpus
Usage: bench.py [SECTION...]   (all by default).

Each section's figures, raw numbers and the run that produced them (date, commit,
machine, command) replace that section in BENCHMARKS.json beside BENCHMARKS.md;
sections not run keep their last run. BENCHMARKS.md is then generated from
BENCHMARKS.json and qemu-tests/bench/BENCHMARKS.md.in (qemu-tests/bench/report.py),
so every figure in it traces to a recorded run."""
import calendar
import gzip
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "lib"))
sys.path.insert(0, os.path.join(HERE, "bench"))
import harness  # noqa: E402

import report  # noqa: E402  (qemu-tests/bench/report.py)

REPO = harness.REPO
# Per section measured in this run: {"results": {...}, "rows": [...]}. RESULTS is
# the current section's results (see begin()).
SECTIONS = {}
RESULTS = {}
CURRENT = None
IDLE_WINDOW = int(os.environ.get("VG_BENCH_IDLE_SECONDS", "60"))
FUZZ_SECONDS = int(os.environ.get("VG_BENCH_FUZZ_SECONDS", "60"))
LOAD_SECONDS = 5
UNLOCK_RUNS = int(os.environ.get("VG_BENCH_UNLOCK_RUNS", "9"))  # issue 13: median of 9


def begin(section):
    """Start recording `section`: row() and RESULTS now belong to it."""
    global RESULTS, CURRENT
    CURRENT = section
    # The commit and machine as the section starts; and what else ran meanwhile: on
    # a shared machine the figures move with it.
    run = dict(run_info(section), loadavg_at_start=round(os.getloadavg()[0], 2))
    SECTIONS[section] = {"results": {}, "rows": [], "run": run}
    RESULTS = SECTIONS[section]["results"]


def row(figure, ours, theirs, target, met):
    SECTIONS[CURRENT]["rows"].append([figure, ours, theirs, target, met])
    mark = {True: "met", False: "NOT MET", None: "-"}[met]
    print(f"  {figure:<44} {ours:>18}   {theirs:>18}   {target:<18} {mark}", flush=True)


def header(title, theirs):
    print(f"\n== {title}\n  {'figure':<44} {'vaultguard':>18}   {theirs:>18}   {'target':<18}",
          flush=True)


def cargo_json_executables(args, env=None):
    """Build with cargo and return {target name: executable path}."""
    out = subprocess.run(["cargo", "build", "--release", "--locked", "--message-format=json",
                          *args], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"cargo build {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    exes = {}
    for line in out.stdout.splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") == "compiler-artifact" and m.get("executable"):
            exes[m["target"]["name"]] = m["executable"]
    return exes


# --- size ---------------------------------------------------------------------

def gzip_cpio(root):
    """Bytes of a gzip -9 newc cpio of the tree `root`: what it adds to an initramfs."""
    names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True,
                           check=True).stdout
    cpio = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=root, input=names,
                          capture_output=True, check=True).stdout
    return len(gzip.compress(cpio, 9))


def bench_size(vg):
    begin("size")
    header("static binary", "systemd-cryptsetup 257")
    size = os.path.getsize(vg)
    with tempfile.TemporaryDirectory() as t:
        os.makedirs(os.path.join(t, "usr", "bin"))
        shutil.copy(vg, os.path.join(t, "usr", "bin", "vaultguard"))
        gz = gzip_cpio(t)
    # The comparison: systemd-cryptsetup and systemd-cryptenroll 257 with every
    # library they load, as carried into the guest (qemu-tests/lib/trixie-systemd.sh).
    trixie = os.path.join(REPO, "target", "trixie-systemd")
    r = subprocess.run(["bash", os.path.join(harness.LIB, "trixie-systemd.sh"), trixie],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"trixie-systemd.sh failed:\n{r.stderr[-2000:]}")
    root = os.path.join(trixie, "root")
    sd_bytes = int(subprocess.run(["du", "-sb", root], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
    sd_gz = gzip_cpio(root)
    RESULTS["size"] = {"stripped_bytes": size, "initramfs_gzip_bytes": gz,
                       "systemd_cryptsetup_257_closure_bytes": sd_bytes,
                       "systemd_cryptsetup_257_closure_gzip_bytes": sd_gz}
    row("static binary, stripped", f"{size / 2**20:.2f} MiB", "", "<= 6 MiB",
        size <= 6 * 2**20)
    # Like with like: both unpacked, then both as gzip -9 cpio archives.
    row("unpacked, with everything it loads", f"{size / 2**20:.2f} MiB",
        f"{sd_bytes / 2**20:.2f} MiB", "report", None)
    row("added to a gzip initramfs (gzip -9 cpio)", f"{gz / 2**20:.2f} MiB",
        f"{sd_gz / 2**20:.2f} MiB", "report", None)


# --- supervisor on the host --------------------------------------------------------

def proc_threads_ctxt(pid):
    """Context switches (voluntary + involuntary) summed over all threads of pid."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+)", f.read(), re.M).group(1))


def wait_socket(path, proc, what):
    for _ in range(100):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            sys.exit(f"{what} exited: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.1)
    sys.exit(f"{what}: no socket at {path}")


def load(tool, sock, clients, cpu=None, tokens=None):
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    extra = [tokens] if tokens else []
    r = subprocess.run(pin + [tool, sock, str(clients), str(LOAD_SECONDS)] + extra,
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        sys.exit(f"socket_load failed: {r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# The sweep's attacker: a local user whom control.allow grants `status`. A uid
# granted nothing is closed at accept and never holds a slot, which would leave the
# connection rationing untested; with `status` it holds its share until the read
# timeout and the rest of its flood is refused.
ATTACKER_UID = 65534
ATTACKER_ALLOW = {"status": {"uids": [ATTACKER_UID]}}


def bench_supervisor(vg, tools):
    begin("supervisor")
    tmp = tempfile.mkdtemp(prefix="vg-bench-")
    os.chmod(tmp, 0o755)  # the sweep's attacker is another user: it must reach the socket
    cfg = os.path.join(tmp, "config.json")
    with open(cfg, "w") as f:
        json.dump({"vault": {"name": "vg-bench-none", "mount": os.path.join(tmp, "mnt"),
                             "state_path": os.path.join(tmp, "state.json")},
                   "auth": {"state_path": os.path.join(tmp, "lockout.json")},
                   "control": {"socket": os.path.join(tmp, "vg.sock"), "allow": ATTACKER_ALLOW,
                               "tokens_file": os.path.join(tmp, "tokens.json"),
                               # The token rows measure authentication, not the
                               # limit: each client's bucket is far above its rate.
                               "rate_limit": {"viewer": {"rate": 1000000, "burst": 1000000}}},
                   "audit": {"path": os.path.join(tmp, "audit.jsonl")}}, f)
    vg_sock, py_sock = os.path.join(tmp, "vg.sock"), os.path.join(tmp, "py.sock")
    # 32 bearer tokens, one per load client (each its own identity and bucket).
    tokens = os.path.join(tmp, "bench-tokens")
    with open(tokens, "w") as f:
        for i in range(32):
            f.write(subprocess.run([vg, "-c", cfg, "token", "issue", "--name", f"bench-{i}",
                                    "--role", "viewer"], check=True, capture_output=True,
                                   text=True).stdout)
    sup = subprocess.Popen([vg, "-c", cfg, "supervise"], stderr=subprocess.DEVNULL)
    watchdog = [sys.executable, os.path.join(HERE, "bench", "watchdog.py"), "--timeout", "5",
                "--poll", "30"]
    py = subprocess.Popen(watchdog + ["--socket", py_sock], stdout=subprocess.PIPE, text=True)
    # The same watchdog with socketserver's default 0.5 s shutdown poll, idle only:
    # counted on a row of its own, it is the library's default, not the design.
    py_default_sock = os.path.join(tmp, "py-default.sock")
    py_default = subprocess.Popen(watchdog + ["--socket", py_default_sock, "--server-poll", "0.5"],
                                  stdout=subprocess.DEVNULL)
    py_lines = []
    import threading
    threading.Thread(target=lambda: py_lines.extend(py.stdout), daemon=True).start()
    try:
        wait_socket(vg_sock, sup, "vaultguard supervise")
        wait_socket(py_sock, py, "watchdog.py")
        wait_socket(py_default_sock, py_default, "watchdog.py --server-poll 0.5")
        time.sleep(2)
        header(f"supervisor, host, idle {IDLE_WINDOW} s then load", "Python watchdog")
        rss = (rss_kib(sup.pid), rss_kib(py.pid))
        procs = (sup, py, py_default)
        c0 = [proc_threads_ctxt(p.pid) for p in procs]
        t0 = time.time()
        time.sleep(IDLE_WINDOW)
        c1 = [proc_threads_ctxt(p.pid) for p in procs]
        window = time.time() - t0
        py_default.send_signal(signal.SIGTERM)
        py_default.wait(timeout=10)
        # The watchdog was "unlocked" with a 5 s timeout: its poll finds it late.
        py_late = next((float(m.group(1)) for m in map(re.compile(r"locked late_by=([\d.]+)").match,
                                                        py_lines) if m), None)
        wakeups = [b - a for a, b in zip(c0, c1)]
        row("idle RSS", f"{rss[0] / 1024:.2f} MiB", f"{rss[1] / 1024:.2f} MiB", "<= 2 MiB",
            rss[0] <= 2048)
        row(f"wake-ups in {window:.0f} idle s (ctxt switches, all threads)", str(wakeups[0]),
            f"{wakeups[1]} (30 s poll)", "0", wakeups[0] == 0)
        row("  Python with socketserver's default 0.5 s shutdown poll", "", str(wakeups[2]),
            "report", None)
        RESULTS["supervisor_idle"] = {"rss_kib": rss[0], "python_rss_kib": rss[1],
                                      "wakeups": wakeups[0], "python_wakeups": wakeups[1],
                                      "python_server_poll_wakeups": wakeups[2],
                                      "window_s": round(window, 1),
                                      "python_lock_late_s": py_late}
        # Two placements, the same for both servers: everything free to run on any
        # CPU (the load generator's threads then compete with the server), and the
        # server on CPU 0 with the load generator on the others, as a load test is
        # usually run (the clients' own CPU time is not the server's latency).
        ncpu = os.cpu_count() or 1
        placements = [("shared CPUs", None)]
        if ncpu >= 2:
            placements.append(("server on its own CPU", f"1-{ncpu - 1}"))
        for where, load_cpus in placements:
            for p in (sup, py):
                subprocess.run(["taskset", "-a", "-p", "-c", "0" if load_cpus else f"0-{ncpu - 1}",
                                str(p.pid)], check=True, capture_output=True)
            for clients in (1, 32):
                a = load(tools["socket_load"], vg_sock, clients, load_cpus)
                b = load(tools["socket_load"], py_sock, clients, load_cpus)
                row(f"status/s, {clients} client(s), {where}", f"{a['per_second']:,}",
                    f"{b['per_second']:,}", ">= 20,000/s",
                    a["per_second"] >= 20000 and a["bad_replies"] == 0)
                row(f"status p99, {clients} client(s), {where}", f"{a['p99_us'] / 1000:.3f} ms",
                    f"{b['p99_us'] / 1000:.3f} ms", "< 1 ms", a["p99_us"] < 1000)
                key = f"status_{clients}" + ("_pinned" if load_cpus else "")
                RESULTS[key] = {"vaultguard": a, "python": b}
            # The same 32 clients, each authenticated by its own token on every
            # request (the Python watchdog has no tokens: its column stays empty).
            t = load(tools["socket_load"], vg_sock, 32, load_cpus, tokens)
            row(f"status/s, 32 clients by token, {where}", f"{t['per_second']:,}", "",
                ">= 20,000/s", t["per_second"] >= 20000 and t["bad_replies"] == 0)
            row(f"status p99, 32 clients by token, {where}", f"{t['p99_us'] / 1000:.3f} ms", "",
                "< 1 ms", t["p99_us"] < 1000)
            RESULTS["status_32_token" + ("_pinned" if load_cpus else "")] = {"vaultguard": t}
        for p in (sup, py):
            subprocess.run(["taskset", "-a", "-p", "-c", f"0-{ncpu - 1}", str(p.pid)],
                           check=True, capture_output=True)
        row("auto-lock lateness (Python: host)", "see guest", f"{py_late:.1f} s" if py_late is not None
            else "no lock seen", "< 1 s", None)
        header("bad-input sweep, host (no vault: the timer is shown in the guest)", "")
        r = subprocess.run([tools["bad_input"], vg_sock, "1000", "12", str(ATTACKER_UID)],
                           capture_output=True, text=True)
        sweep = json.loads(r.stdout.strip().splitlines()[-1])
        RESULTS["bad_input_host"] = sweep
        report_sweep(sweep)
        alive = sup.poll() is None
        row("supervisor still running after the sweep", "yes" if alive else "NO", "", "yes", alive)
    finally:
        for p in (sup, py, py_default):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


WATCHERS = int(os.environ.get("VG_BENCH_WATCHERS", "1000"))


def _watchers_in_guest(static_tools):
    s = harness.Scenario("bench_watchers")
    try:
        s.luks_disk("vault", ext4=True)
        cfg = {"vault": {"device": "/dev/vda", "mount": "/mnt/vault", "fstype": "ext4"}}
        body = (WATCH_GUEST_BODY.replace("AUTOLOCK", str(WATCH_AUTOLOCK))
                .replace("WATCHERS", str(WATCHERS)))
        b = s.boot(body, files={"/etc/pass": harness.PASSPHRASE,
                                "/etc/vaultguard/config.json": json.dumps(cfg),
                                "/usr/bin/watch_load":
                                    harness.pathlib.Path(static_tools["watch_load"])},
                   timeout=300)
        got = json.loads(b.value("watch", 240))
        b.expect_pass("unmounted")
        b.expect_poweroff()
    finally:
        s.finish()
    return got


def _watch(sock_path, n, timeout):
    """n connections that sent {"cmd":"watch"} and read their first line."""
    import socket
    socks = []
    for _ in range(n):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(timeout)
        c.connect(sock_path)
        c.sendall(b'{"cmd":"watch"}\n')
        f = c.makefile("rb")
        # One at a time: a connection not yet watching holds a request slot
        # (max_clients), so a burst of a thousand would be refused past 256.
        first = json.loads(f.readline())
        if first.get("event") != "state":
            sys.exit(f"watch: unexpected first line {first}")
        socks.append((c, f))
    return socks


WATCH_AUTOLOCK = 10

WATCH_GUEST_BODY = """
    vg unlock --key-file /etc/pass
    mkdir -p /mnt/vault && mount -t ext4 /dev/mapper/secure-ai-vault /mnt/vault || die mount
    rm /etc/initrd-release
    ulimit -n 8192
    /usr/bin/vaultguard supervise --auto-lock-seconds AUTOLOCK 2>/run/sup.log &
    wait_for /run/vaultguard/control.sock 10 || die "no control socket"
    echo "VGT:VALUE watch=$(/usr/bin/watch_load /run/vaultguard/control.sock WATCHERS AUTOLOCK)"
    check unmounted '! grep -q " /mnt/vault " /proc/mounts'
"""


def bench_watchers(vg, static_tools):
    """The cost of watchers: on the host, the supervisor's RSS idle without
    watchers and with them, and how long one event takes to reach the last of
    them; in a guest guarding a real mounted vault (dm-crypt, which a host
    container may lack), the auto-lock's lateness as the last of the watchers
    hears it (benches/watch_load.rs)."""
    import resource
    header(f"supervisor, host, {WATCHERS} watchers (watch stream)", "")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * WATCHERS + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the supervisor
    tmp = tempfile.mkdtemp(prefix="vg-bench-watch-")
    cfg, sock = os.path.join(tmp, "config.json"), os.path.join(tmp, "vg.sock")
    with open(cfg, "w") as f:
        json.dump({"vault": {"name": "vg-bench-none", "mount": os.path.join(tmp, "mnt"),
                             "state_path": os.path.join(tmp, "state.json")},
                   "auth": {"state_path": os.path.join(tmp, "lockout.json")},
                   "control": {"socket": sock},
                   "audit": {"path": os.path.join(tmp, "audit.jsonl")}}, f)
    sup = subprocess.Popen([vg, "-c", cfg, "supervise"], stderr=subprocess.DEVNULL)
    socks = []
    try:
        wait_socket(sock, sup, "vaultguard supervise")
        time.sleep(2)
        idle_rss = rss_kib(sup.pid)
        t = time.time()
        socks = _watch(sock, WATCHERS, 60)
        connected = time.time() - t
        time.sleep(1)
        watch_rss = rss_kib(sup.pid)
        # One event (an inhibitor taken) to every watcher: until the last has it.
        import socket
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(sock)
        t = time.time()
        c.sendall(b'{"cmd":"inhibit","who":"bench","why":"fan-out","seconds":60,"keep":true}\n')
        heard = 0
        for _, f in socks:
            ev = json.loads(f.readline())
            heard += ev.get("event") == "inhibit"
        fan_out = time.time() - t
        c.close()
        row("idle RSS, no watchers", f"{idle_rss / 1024:.2f} MiB", "", "<= 1 MiB",
            idle_rss <= 1024)
        row(f"RSS with {WATCHERS} watchers", f"{watch_rss / 1024:.2f} MiB", "", "report", None)
        row(f"{WATCHERS} watchers connected in", f"{connected:.2f} s", "", "report", None)
        row(f"one event to all {WATCHERS} watchers", f"{fan_out * 1000:.1f} ms", "",
            f"{WATCHERS}/{WATCHERS} heard", heard == WATCHERS)
        for c, f in socks:
            f.close()
            c.close()
        socks = []
        guest = _watchers_in_guest(static_tools)
        row(f"auto-lock lateness, {WATCHERS} watchers (guest, last watcher)",
            f"{guest['last_late_s']:.3f} s", "", "< 1 s", 0 <= guest["last_late_s"] < 1)
        row("  watchers that heard the lock (guest)", f"{guest['heard']}/{WATCHERS}", "",
            f"{WATCHERS}/{WATCHERS}", guest["heard"] == WATCHERS)
        RESULTS["watchers_guest"] = guest
        RESULTS["watchers_host"] = {"watchers": WATCHERS, "idle_rss_kib": idle_rss,
                                    "watch_rss_kib": watch_rss, "connect_s": round(connected, 3),
                                    "fan_out_ms": round(fan_out * 1000, 2), "heard": heard}
    finally:
        for c, f in socks:
            f.close()
            c.close()
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            sup.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def report_sweep(s):
    row("malformed requests answered with an error", f"{s['malformed_answered']}/{s['malformed']}",
        "", "all", s["malformed_answered"] == s["malformed"])
    row("lines over 64 KiB bounded", f"{s['oversize_bounded']}/{s['oversize']}", "", "all",
        s["oversize_bounded"] == s["oversize"])
    row(f"{s['flood']} conns: refused at connect", str(s["flood_refused"]), "", "", None)
    row(f"{s['flood']} conns + {s['stalled']} stalled: closed by server",
        str(s["held_closed_by_server"]), "", "all", s["held_closed_by_server"] == s["flood"] + s["stalled"])
    why = s.get("closed_why", {})
    row("  of which refused at accept: uid's share taken / all full / uid allowed nothing",
        f"{why.get('uid_share', 0)} / {why.get('full', 0)} / {why.get('no_command', 0)}", "", "", None)
    row("  of which cut off by the read timeout / closed silently",
        f"{why.get('read_timeout', 0)} / {why.get('silent', 0)}", "", "", None)
    row("probe (root) requests lost during the sweep", f"{s['probe_lost']}/{s['probe_requests']}",
        "", "0", s["probe_lost"] == 0)
    row("probe worst latency", f"{s['probe_max_ms']:.1f} ms", "", "", None)


# --- in the guest ------------------------------------------------------------

GUEST_BODY = r"""
    D=/usr/bin/date
    R=/opt/trixie/root
    L=$R/usr/lib/x86_64-linux-gnu
    export SYSTEMD_CRYPTSETUP_TOKEN_PATH=$L/cryptsetup
    # systemd-cryptsetup 257 through trixie's loader; SDC as words, for strace.
    SDC="$R/usr/lib64/ld-linux-x86-64.so.2 --library-path $L/systemd:$L --argv0 systemd-cryptsetup $R/usr/lib/systemd/systemd-cryptsetup"
    sdc() { $SDC "$@"; }
    # Kernel messages (an RCU stall warning under host load) are written to the
    # serial console at once, in the middle of a line being printed: only
    # emergencies (a panic) may interrupt the lines the host parses.
    dmesg -n 1
    # Every VGT:TIME line also goes to /tmp/vgt-times, copied to the results disk
    # at the end: the host reads the runs from there, whole, not from the console.
    timed() { # timed LABEL command...: VGT:TIME LABEL start end status
        _l=$1; shift; _a=$($D +%s.%N); "$@" >/dev/null 2>/tmp/err; _s=$?; _b=$($D +%s.%N)
        test -b /dev/mapper/bench || _s=99
        echo "VGT:TIME $_l $_a $_b $_s" >> /tmp/vgt-times
        echo "VGT:TIME $_l $_a $_b $_s"; [ $_s = 0 ] || cat /tmp/err
    }
    traced() { # traced LABEL command...: one run under strace (not timed), closed after
        _l=$1; shift
        # Only the calls the breakdown reads are traced (--seccomp-bpf: the others
        # run without stopping): a full trace stopped the process some 370 times
        # and more than doubled its time (2026-11-26 02:55: 1,245 ms traced
        # against a median of 500).
        strace -f --seccomp-bpf -e trace=execve,read,write,poll,ppoll,ioctl,exit_group \
            -tt -T -y -o "/tmp/strace.$_l" "$@" >/dev/null 2>/tmp/err
        _s=$?; test -b /dev/mapper/bench || _s=99
        echo "VGT:TRACED $_l $_s" >> /tmp/vgt-times; [ $_s = 0 ] || cat /tmp/err
    }
    vg enroll --device /dev/vda --pcrs 7
    value enroll-status $?
    i=0
    while [ $i -lt RUNS ]; do
        i=$((i + 1))
        timed vg-tpm vg attach bench /dev/vda - tpm2-measure-pcr=no,headless=true; vg detach bench
        timed sd-tpm sdc attach bench /dev/vda - tpm2-device=auto,headless=true; sdc detach bench
        timed vg-tpm0 vaultguard -c /etc/vg-tpm0.json attach bench /dev/vda - tpm2-measure-pcr=no,headless=true
        vg detach bench
        timed sd-pass sdc attach bench /dev/vdb /etc/pass headless=true; sdc detach bench
        timed vg-pass vg attach bench /dev/vdb /etc/pass tpm2-measure-pcr=no,headless=true; vg detach bench
    done

    # Issue 13: one signed enrolment (RSA-2048 public key over PCR 9, and the phase
    # PCR 15 bound literally, as vaultguard enrolls it), opened alternately by
    # vaultguard and systemd-cryptsetup 257 with the signature file the host wrote
    # for PCR 9 = zeros (SeaBIOS measures nothing into PCR 9). The private key
    # stays on the host.
    sig=$(disk signed) || exit 1
    check pcr9-zero '[ "$(pcr sha256 9)" = "PCR9ZERO" ]'
    vg enroll --device "$sig" --public-key /etc/vg-policy-pub.pem --public-key-pcrs 9 \
        --unlock-key-file /etc/pass
    value signed-enroll-status $?
    # Both really use the signed policy: without the signature file neither
    # opens the volume (headless: no passphrase is asked for).
    mv /etc/systemd/tpm2-pcr-signature.json /tmp/sig.json
    check_not vg-signed-needs-signature \
        'vg attach bench "$sig" - tpm2-measure-pcr=no,headless=true || true; test -b /dev/mapper/bench'
    check_not sd-signed-needs-signature \
        'sdc attach bench "$sig" - tpm2-device=auto,headless=true || true; test -b /dev/mapper/bench'
    cryptsetup close bench 2>/dev/null
    mv /tmp/sig.json /etc/systemd/tpm2-pcr-signature.json
    sdone() { timed sd-signed sdc attach bench "$sig" - tpm2-device=auto,headless=true; sdc detach bench; }
    vgone() { timed vg-signed vg attach bench "$sig" - tpm2-measure-pcr=no,headless=true; vg detach bench; }
    i=0
    while [ $i -lt RUNS ]; do
        i=$((i + 1))
        # Alternating which goes first: neither always gets the warmer caches.
        if [ $((i % 2)) = 1 ]; then vgone; sdone; else sdone; vgone; fi
    done
    # The same with this TPM's verification ticket in the entry (`policy ticket`:
    # 7 TPM commands instead of 10); systemd-cryptsetup ignores the ticket and is
    # timed again beside it on the same file.
    vg policy ticket --device "$sig" --json > /tmp/ticket.json
    value ticket-status $?
    check ticket-made 'grep -q "\"tickets\":1" /tmp/ticket.json'
    tkone() { timed vg-signed-ticket vg attach bench "$sig" - tpm2-measure-pcr=no,headless=true; vg detach bench; }
    sdtk() { timed sd-signed-ticket sdc attach bench "$sig" - tpm2-device=auto,headless=true; sdc detach bench; }
    i=0
    while [ $i -lt RUNS ]; do
        i=$((i + 1))
        if [ $((i % 2)) = 1 ]; then tkone; sdtk; else sdtk; tkone; fi
    done

    # Where the time goes: one run of each under strace (-tt: when each system call
    # started; -T: its time; -y: the file behind each descriptor), parsed on the host.
    traced vg-tpm vaultguard attach bench /dev/vda - tpm2-measure-pcr=no,headless=true; vg detach bench
    traced sd-tpm $SDC attach bench /dev/vda - tpm2-device=auto,headless=true; sdc detach bench
    traced vg-signed vaultguard attach bench "$sig" - tpm2-measure-pcr=no,headless=true; vg detach bench
    traced sd-signed $SDC attach bench "$sig" - tpm2-device=auto,headless=true; sdc detach bench
    res=$(disk results) || exit 1
    { cat /tmp/vgt-times; for f in /tmp/strace.*; do echo "VGT:FILE ${f#/tmp/strace.}"; cat "$f"; done
      echo "VGT:END"; } > /tmp/results
    cat /tmp/results > "$res" && sync
    value results-bytes "$(wc -c < /tmp/results)"
    value kernel-warnings "$(dmesg | grep -c -i -E 'stall|lockup|hung task')"
    mark latency-done

    vg attach secure-ai-vault /dev/vda - tpm2-measure-pcr=no,headless=true
    mkdir -p /mnt/vault && mount -t ext4 /dev/mapper/secure-ai-vault /mnt/vault || die mount
    rm /etc/initrd-release
    /usr/bin/vaultguard supervise --auto-lock-seconds AUTOLOCK 2>/run/sup.log &
    wait_for /run/vaultguard/control.sock 10 || die "no control socket"
    echo "VGT:VALUE sweep1=$(/usr/bin/bad_input /run/vaultguard/control.sock 1000 SWEEP ATTACKER)"
    until vg status --json | grep -q '"state":"locked"'; do sleep 0.2; done
    echo "VGT:VALUE status-after-lock=$(vg status --json)"
    echo "VGT:VALUE lock-audit=$(grep '"event":"lock"' /var/log/vaultguard/audit.jsonl | tail -n 1)"
    check unmounted '! grep -q " /mnt/vault " /proc/mounts'
    echo "VGT:VALUE sweep2=$(/usr/bin/bad_input /run/vaultguard/control.sock 1000 SWEEP ATTACKER)"
    check audit-chain 'vg audit verify'
    # The host acknowledges the last line before this shell exits: its exit hangs
    # the console up, which drops what the serial driver has not sent yet.
    mark guest-done; read _
"""


# An argon2id keyslot at cryptsetup's own default cost for a 1 GiB, 4-vCPU guest:
# `cryptsetup luksFormat` with no PBKDF options, in that guest, benchmarks it there
# (memory: half the guest's RAM up to 1 GiB; 4 lanes; time cost for ~2 s), and the
# same header is then opened alternately by Debian's `cryptsetup open` (libargon2)
# and by `vaultguard attach` (libcryptsetup's bundled Argon2, SSE build).
ARGON2_BODY = r"""
    D=/usr/bin/date
    dmesg -n 1  # as in GUEST_BODY: no kernel warning in the middle of a VGT line
    dev=$(disk argon2) || exit 1
    check format 'cryptsetup luksFormat --batch-mode --type luks2 --key-file /etc/pass "$dev"'
    echo "VGT:VALUE argon2-cost=$(cryptsetup luksDump "$dev" | grep -E '^[[:space:]]+(PBKDF|Time cost|Memory|Threads):' | tr -s ' \t\n' ' ')"
    timed() { # timed LABEL command...: VGT:TIME LABEL start end status
        _l=$1; shift; _a=$($D +%s.%N); "$@" >/dev/null 2>/tmp/err; _s=$?; _b=$($D +%s.%N)
        test -b /dev/mapper/bench || _s=99
        echo "VGT:TIME $_l $_a $_b $_s"; [ $_s = 0 ] || cat /tmp/err
    }
    cs() { timed cs-argon2 cryptsetup open --key-file /etc/pass "$dev" bench; cryptsetup close bench; }
    vga() { timed vg-argon2 vg attach bench "$dev" /etc/pass headless=true; vg detach bench; }
    i=0
    while [ $i -lt RUNS ]; do
        i=$((i + 1))
        # Alternating which goes first: neither always gets the warmer caches.
        if [ $((i % 2)) = 1 ]; then cs; vga; else vga; cs; fi
    done
    value argon2-runs "$i"
    value kernel-warnings "$(dmesg | grep -c -i -E 'stall|lockup|hung task')"
    # Twice before (2026-11-26 00:24 and 00:38) the host never saw this guest's
    # last lines, though every run had finished: when this shell (the session
    # leader, the console its controlling terminal) exits, the kernel hangs the
    # console up and drops what the serial driver has not sent yet; with 4 vCPUs
    # that can be the last lines (BENCHMARKS.md says how it was reproduced). The
    # host acknowledges the last line before the shell exits.
    mark argon2-done; read _
"""
ARGON2_RUNS = int(os.environ.get("VG_BENCH_ARGON2_RUNS", "5"))


def bench_argon2():
    """The argon2id row of the guest section (its own 1 GiB, 4-vCPU boot)."""
    s = harness.Scenario("bench-argon2")
    try:
        s.disk("argon2", size_mb=32)
        b = s.boot(ARGON2_BODY.replace("RUNS", str(ARGON2_RUNS)), dynamic=harness.CRYPTSETUP + ["/usr/bin/date"],
                   # libargon2 ends its lane threads with pthread_exit, which dlopens libgcc_s.
                   libs=["libgcc_s.so.1"], files={"/etc/pass": harness.PASSPHRASE}, tpm=False,
                   qemu_args=("-m", "1024", "-smp", "4"), timeout=1800)
        b.expect_pass("format", 600)
        cost = b.value("argon2-cost", 60).strip()
        if b.value("argon2-runs", 1500) != str(ARGON2_RUNS):
            b.fail("the argon2 runs did not all finish")
        warnings = int(b.value("kernel-warnings", 60))
        b.expect_mark("argon2-done", 60)
        b.sendline("")
        b.expect_poweroff()
        times = parse_times(b.output, {"cs-argon2": ARGON2_RUNS, "vg-argon2": ARGON2_RUNS}, s.dir)
    finally:
        s.finish()
    RESULTS["argon2_kernel_warnings"] = warnings
    med = {k: statistics.median(v) for k, v in times.items()}
    RESULTS["argon2_ms"] = {k: {"median": med[k], "runs": v} for k, v in times.items()}
    RESULTS["argon2_cost"] = cost
    header(f"argon2id keyslot open in a 1 GiB, 4-vCPU guest (TCG), median of {ARGON2_RUNS}, "
           "alternating", "cryptsetup open")
    ratio = med["vg-argon2"] / med["cs-argon2"]
    row("argon2id keyslot (cryptsetup's default cost there)", f"{med['vg-argon2']:.0f} ms",
        f"{med['cs-argon2']:.0f} ms", "<= 1.0x", ratio <= 1.0)
    row("  ratio", f"{ratio:.2f}x", "1.00x", "", None)


PCR9_ZERO = "0" * 64
UNLOCK_LABELS = ("vg-tpm", "sd-tpm", "vg-tpm0", "sd-pass", "vg-pass", "vg-signed", "sd-signed",
                 "vg-signed-ticket", "sd-signed-ticket")
TRACED = ("vg-tpm", "sd-tpm", "vg-signed", "sd-signed")


def parse_times(text, want, where):
    """The VGT:TIME lines of `text`: {label: [ms, ...]}. Every run must be there
    and have succeeded: `want` is {label: runs}; a line lost or cut on the way
    fails the section instead of leaving a median of fewer runs."""
    times = {}
    for label, a, z, st in re.findall(r"^VGT:TIME (\S+) ([\d.]+) ([\d.]+) (\d+)$", text, re.M):
        if st != "0":
            raise harness.ScenarioFailed(f"{label} failed in the guest (status {st}); see {where}")
        times.setdefault(label, []).append((float(z) - float(a)) * 1000)
    short = {k: len(times.get(k, [])) for k, n in want.items() if len(times.get(k, [])) != n}
    if short:
        raise harness.ScenarioFailed(f"runs recorded {short}, expected {want}; see {where}")
    return times


# One strace line: [pid] HH:MM:SS.micro syscall(args) = result <seconds>, or the two
# halves of a call another thread interrupted ("<unfinished ...>", "<... x resumed>").
_STRACE = re.compile(r"^(?:(\d+) +)?(\d+):(\d+):(\d+\.\d+) (.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\) += .*<(\d+\.\d+)>$")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)\) += .*<(\d+\.\d+)>$")


def strace_calls(text):
    """[(start s, end s, syscall, args)] of a `strace -f -tt -T -y` log."""
    calls, pending = [], {}
    for line in text.splitlines():
        m = _STRACE.match(line)
        if not m:
            continue
        pid, h, mi, sec, rest = m.groups()
        t = int(h) * 3600 + int(mi) * 60 + float(sec)
        if (c := _CALL.match(rest)):
            calls.append((t, t + float(c.group(3)), c.group(1), c.group(2)))
        elif (u := _UNFINISHED.match(rest)):
            pending[pid] = (t, u.group(1), u.group(2))
        elif (r := _RESUMED.match(rest)) and pid in pending:
            t0, name, args = pending.pop(pid)
            calls.append((t0, t0 + float(r.group(3)), name, args + r.group(2)))
        else:  # exit lines ("+++ exited with 0 +++"), signals: a point in time
            calls.append((t, t, "", rest))
    calls.sort()
    return calls


# TPM 2.0 command codes seen in the traces (TPM 2.0 Part 2, TPM_CC), to name them
# in the timeline.
TPM_CC = {0x120: "EvictControl", 0x131: "CreatePrimary", 0x143: "SelfTest", 0x144: "Startup",
          0x149: "PolicyNV", 0x157: "Load", 0x15E: "Unseal", 0x161: "ContextLoad",
          0x162: "ContextSave", 0x165: "FlushContext", 0x167: "LoadExternal",
          0x16A: "PolicyAuthorize", 0x16B: "PolicyAuthValue", 0x16C: "PolicyCommandCode",
          0x171: "PolicyOR", 0x173: "ReadPublic", 0x176: "StartAuthSession",
          0x177: "VerifySignature", 0x17A: "GetCapability", 0x17B: "GetRandom",
          0x17E: "PCR_Read", 0x17F: "PolicyPCR", 0x180: "PolicyRestart", 0x182: "PCR_Extend",
          0x189: "PolicyGetDigest", 0x18A: "TestParms", 0x18C: "PolicyPassword"}


def _strace_bytes(args):
    """The first string argument of a traced call, as bytes (strace's C escapes)."""
    m = re.search(r'"((?:[^"\\]|\\.)*)"', args)
    if not m:
        return b""
    out, s, i = bytearray(), m.group(1), 0
    while i < len(s):
        if s[i] != "\\":
            out += s[i].encode("latin1", "replace")
            i += 1
            continue
        o = re.match(r"[0-7]{1,3}", s[i + 1:])
        if o:
            out.append(int(o.group(0), 8) & 0xFF)
            i += 1 + len(o.group(0))
        elif s[i + 1] == "x":
            out.append(int(s[i + 2:i + 4], 16))
            i += 4
        else:
            out += {"n": b"\n", "t": b"\t", "r": b"\r", "v": b"\v", "f": b"\f"}.get(
                s[i + 1], s[i + 1].encode("latin1", "replace"))
            i += 2
    return bytes(out)


def _timeline_label(name, args):
    """A traced call as the timeline shows it: the call, the file behind its
    descriptor, and for a TPM command its name, for device-mapper its ioctl."""
    if not name:  # the process's exit, a signal
        return args[:40]
    f = re.match(r"\[?\{?(?:fd=)?\d+<([^>]*)>", args)
    label = f"{name} {f.group(1)}" if f else name
    if name == "write" and f and f.group(1).startswith("/dev/tpm"):
        b = _strace_bytes(args)
        cc = int.from_bytes(b[6:10], "big") if len(b) >= 10 else None
        label += " " + TPM_CC.get(cc, f"cc {cc:#x}" if cc is not None else "?")
    d = re.search(r"\b(DM_[A-Z_]+|BLK[A-Z0-9_]+)\b", args) if name == "ioctl" else None
    if d:
        label += " " + d.group(1)
    return label


def _gaps_before_tpm_commands(calls):
    """{command name (#2, #3 for repeats): ms between the previous traced call's
    end and this command's write}."""
    out, prev_end = {}, None
    for c in calls:
        label = _timeline_label(c[2], c[3])
        if label.startswith("write /dev/tpm") and prev_end is not None:
            name = label.split()[-1]
            key, k = name, 2
            while key in out:
                key, k = f"{name}#{k}", k + 1
            out[key] = round((c[0] - prev_end) * 1000, 1)
        prev_end = c[1]
    return out


def strace_breakdown(text):
    """Where one traced unlock spends its time (ms): start-up until the first TPM
    command; the TPM commands (time inside write/read/poll on the TPM device: the
    kernel's resource manager, the TIS interface and swtpm); the client's own work
    between them (the salted session's ECDH, policy digests, parsing); the keyslot
    (from the last TPM reply before the mapping is created to DM_DEV_CREATE:
    PBKDF2, keyslot decryption, the anti-forensic merge, the digest check);
    dm-crypt activation (DM_DEV_CREATE to the last device-mapper ioctl); the rest
    until the process exits."""
    calls = strace_calls(text)
    if not calls:
        raise harness.ScenarioFailed("empty strace log")
    start, end = calls[0][0], max(c[1] for c in calls)
    create = next((c for c in calls if c[2] == "ioctl" and "DM_DEV_CREATE" in c[3]), None)
    if create is None:
        raise harness.ScenarioFailed("strace log: no DM_DEV_CREATE (the mapping was not made)")
    tpm = [c for c in calls if "</dev/tpm" in c[3] and c[2] in ("write", "read", "poll", "ppoll")
           and c[0] < create[0]]
    if not tpm:
        raise harness.ScenarioFailed("strace log: no TPM command before the mapping was made")
    dm_end = max(c[1] for c in calls if c[2] == "ioctl" and "/dev/mapper/control" in c[3])
    tpm_start, tpm_end = tpm[0][0], max(c[1] for c in tpm)
    in_tpm = sum(c[1] - c[0] for c in tpm)
    ms = lambda x: round(x * 1000, 1)  # noqa: E731
    # strace stops the process at every traced system call (slow under TCG): how
    # many each phase made says how much of its time may be the tracing's.
    n = lambda a, b: sum(a <= c[0] < b for c in calls)  # noqa: E731
    return {"total": ms(end - start), "startup": ms(tpm_start - start),
            "tpm_commands": sum(c[2] == "write" for c in tpm), "tpm": ms(in_tpm),
            "between_tpm": ms(tpm_end - tpm_start - in_tpm),
            "keyslot": ms(create[0] - tpm_end), "activation": ms(dm_end - create[0]),
            "after": ms(end - dm_end), "syscalls": len(calls),
            "calls": {"total": len(calls), "startup": n(start, tpm_start),
                      "tpm": len(tpm), "between_tpm": n(tpm_start, tpm_end) - len(tpm),
                      "keyslot": n(tpm_end, create[0]), "activation": n(create[0], dm_end),
                      "after": n(dm_end, end + 1)},
            # Per TPM command, in order: the process's own work since the previous
            # traced call ended (for StartAuthSession: the salted session's ECDH).
            "before_tpm_command": _gaps_before_tpm_commands(calls),
            # Every traced call (ms from the start, ms inside it, what it was): where
            # the phases' figures, and any gap the prose names, come from.
            "timeline": [[round((c[0] - start) * 1000, 1), round((c[1] - c[0]) * 1000, 1),
                          _timeline_label(c[2], c[3])] for c in calls]}


def read_results(disk, where):
    """The results disk the guest wrote: the VGT:TIME lines, then each strace log
    after a `VGT:FILE LABEL` line, up to `VGT:END`."""
    with open(disk.path, "rb") as f:
        data = f.read(64 << 20).split(b"\0", 1)[0].decode("utf-8", "replace")
    if "\nVGT:END\n" not in data:
        raise harness.ScenarioFailed(f"the guest's results disk has no VGT:END; see {where}")
    data = data.split("\nVGT:END\n", 1)[0] + "\n"
    parts = re.split(r"^VGT:FILE (\S+)\n", data, flags=re.M)
    return parts[0], dict(zip(parts[1::2], parts[2::2]))


def bench_guest(tools, previous):
    begin("guest")
    trixie = os.path.join(REPO, "target", "trixie-systemd")
    r = subprocess.run(["bash", os.path.join(harness.LIB, "trixie-systemd.sh"), trixie],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"trixie-systemd.sh failed:\n{r.stderr[-2000:]}")
    autolock, sweep_s = 20, 12
    s = harness.Scenario("bench")
    try:
        vault = s.luks_disk("vault", ext4=True)
        s.luks_disk("plain", size_mb=32)  # same LUKS2 parameters, no token: the key-file path
        s.luks_disk("signed", size_mb=32)  # the same again, for the signed enrolment
        results = s.disk("results", size_mb=16)  # the runs and strace logs, written at the end
        cfg = {"vault": {"device": "/dev/vda", "mount": "/mnt/vault", "fstype": "ext4"},
               "control": {"allow": ATTACKER_ALLOW}}
        # The signing key of the signed enrolment: RSA-2048 (systemd 257 hands the
        # TPM every policy signature as RSASSA). Made and used on the host; the guest
        # gets the public key and the signature file only.
        key, pub, sig = s.path("policy.pem"), s.path("policy-pub.pem"), s.path("sig.json")
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                        "-out", key], check=True, capture_output=True)
        subprocess.run(["openssl", "pkey", "-in", key, "-pubout", "-out", pub], check=True,
                       capture_output=True)
        predicted = s.path("pcr9.json")
        with open(predicted, "w") as f:
            json.dump({"bank": "sha256", "pcrs": {"9": PCR9_ZERO}}, f)
        r = subprocess.run([harness.vaultguard_binary(), "policy", "sign", "--private-key", key,
                            "--public-key", pub, "--public-key-pcrs", "9", "--predicted", predicted,
                            "--signature", sig], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"vaultguard policy sign failed on the host:\n{r.stderr}")
        body = (GUEST_BODY.replace("RUNS", str(UNLOCK_RUNS)).replace("AUTOLOCK", str(autolock))
                .replace("SWEEP", str(sweep_s)).replace("ATTACKER", str(ATTACKER_UID))
                .replace("PCR9ZERO", PCR9_ZERO))
        b = s.boot(body, dynamic=harness.CRYPTSETUP + ["/usr/bin/date", "/usr/bin/strace"],
                   trees=[(os.path.join(trixie, "root"), "/opt/trixie/root")],
                   files={"/etc/pass": harness.PASSPHRASE,
                          "/etc/vaultguard/config.json": json.dumps(cfg),
                          "/etc/vg-tpm0.json": json.dumps(dict(cfg, tpm={"tcti": "device:/dev/tpm0"})),
                          "/etc/vg-policy-pub.pem": harness.pathlib.Path(pub),
                          "/etc/systemd/tpm2-pcr-signature.json": harness.pathlib.Path(sig),
                          "/usr/bin/bad_input": harness.pathlib.Path(tools["bad_input"])},
                   modules=["af_alg", "algif_skcipher"], timeout=2400)
        b.expect(r"Passphrase for secure-ai-vault \(/dev/vda\): ", 300)
        b.sendline(harness.PASSPHRASE)
        if b.value("enroll-status", 300) != "0":
            b.fail("enroll failed")
        b.expect_pass("pcr9-zero", 1200)
        if b.value("signed-enroll-status", 300) != "0":
            b.fail("the signed enrolment failed")
        b.expect_pass("vg-signed-needs-signature", 300)
        b.expect_pass("sd-signed-needs-signature", 300)
        if b.value("ticket-status", 600) != "0":
            b.fail("policy ticket failed")
        b.expect_pass("ticket-made", 60)
        warnings = int(b.value("kernel-warnings", 1200))
        b.expect_mark("latency-done", 60)
        sweep1 = json.loads(b.value("sweep1", 300))
        status = json.loads(b.value("status-after-lock", 300))
        audit = json.loads(b.value("lock-audit", 60))
        b.expect_pass("unmounted")
        sweep2 = json.loads(b.value("sweep2", 300))
        b.expect_pass("audit-chain")
        b.expect_mark("guest-done", 60)
        b.sendline("")
        b.expect_poweroff()
        runs, straces = read_results(results, s.dir)
        traced = dict(re.findall(r"(?m)^VGT:TRACED (\S+) (\d+)$", runs))
        if traced != {k: "0" for k in TRACED}:
            raise harness.ScenarioFailed(f"traced runs: {traced}, expected all of {TRACED} "
                                         f"with status 0; see {s.dir}")
        times = parse_times(runs, {k: UNLOCK_RUNS for k in UNLOCK_LABELS}, s.dir)
        breakdown = {k: strace_breakdown(straces.get(k, "")) for k in TRACED}
    finally:
        s.finish()
    med = {k: statistics.median(v) for k, v in times.items()}
    RESULTS["unlock_ms"] = {k: {"median": med[k], "runs": v} for k, v in times.items()}
    RESULTS["strace_ms"] = breakdown
    RESULTS["kernel_warnings"] = warnings
    RESULTS["vaultguard_binary"] = {"path": harness.vaultguard_binary(),
                                    "bytes": os.path.getsize(harness.vaultguard_binary())}
    header(f"unlock latency in the guest (TCG), median of {UNLOCK_RUNS}", "systemd-cryptsetup")
    # Issue 13 raised the target from 0.5x to 0.4x.
    row("TPM path: start to mapping ready", f"{med['vg-tpm']:.0f} ms", f"{med['sd-tpm']:.0f} ms",
        "<= 0.4x", med["vg-tpm"] <= 0.4 * med["sd-tpm"])
    row("  ratio", f"{med['vg-tpm'] / med['sd-tpm']:.2f}x", "1.00x", "", None)
    row("  vaultguard with tcti=device:/dev/tpm0 (no kernel resource manager)",
        f"{med['vg-tpm0']:.0f} ms", f"{med['sd-tpm']:.0f} ms", "report", None)
    row("key-file (passphrase) path, same keyslot", f"{med['vg-pass']:.0f} ms",
        f"{med['sd-pass']:.0f} ms", "report", None)
    # Issue 13: the signed policy (PolicyAuthorize), the same enrolment for both.
    row("signed PCR policy (TPM): start to mapping ready", f"{med['vg-signed']:.0f} ms",
        f"{med['sd-signed']:.0f} ms", "<= 0.5x", med["vg-signed"] <= 0.5 * med["sd-signed"])
    row("  ratio", f"{med['vg-signed'] / med['sd-signed']:.2f}x", "1.00x", "", None)
    row("  with this TPM's verification ticket (policy ticket; 7 TPM commands)",
        f"{med['vg-signed-ticket']:.0f} ms", f"{med['sd-signed-ticket']:.0f} ms", "<= 0.5x",
        med["vg-signed-ticket"] <= 0.5 * med["sd-signed-ticket"])
    row("  ratio", f"{med['vg-signed-ticket'] / med['sd-signed-ticket']:.2f}x", "1.00x", "", None)
    for label, what in (("tpm", "literal PCRs"), ("signed", "signed policy")):
        v, d = breakdown[f"vg-{label}"], breakdown[f"sd-{label}"]
        header(f"where the time goes, {what}: one run each under strace "
               "(ms / traced calls)", "systemd-cryptsetup")
        for key, figure in (("total", "start to exit, traced"),
                            ("startup", "  start-up, header, token"),
                            ("tpm", "  inside TPM commands"),
                            ("between_tpm", "  own work between TPM commands"),
                            ("keyslot", "  keyslot (to DM_DEV_CREATE)"),
                            ("activation", "  dm-crypt activation"),
                            ("after", "  after activation, to exit")):
            row(f"{figure} [{what}]", f"{v[key]:.0f} ms / {v['calls'][key]} calls",
                f"{d[key]:.0f} ms / {d['calls'][key]} calls", "report", None)
        row(f"  TPM commands sent [{what}]", str(v["tpm_commands"]), str(d["tpm_commands"]),
            "report", None)
    # Lateness: the lock's audit time against last activity + timeout.
    ts = audit["ts"]
    lock_at = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + float("0" + ts[19:-1])
    late = lock_at - (status["last_activity"] + autolock)
    RESULTS["autolock_late_s"] = late
    RESULTS["bad_input_guest_unlocked"] = sweep1
    RESULTS["bad_input_guest_locked"] = sweep2
    # The Python watchdog's lateness is measured on the host (supervisor section),
    # in this run or the last recorded one.
    host = SECTIONS.get("supervisor") or previous.get("sections", {}).get("supervisor", {})
    py_late = host.get("results", {}).get("supervisor_idle", {}).get("python_lock_late_s")
    header(f"supervisor in the guest, guarding a mounted vault (auto-lock {autolock} s), "
           "under the bad-input sweep", "Python watchdog")
    row("auto-lock done after the deadline", f"{late:.2f} s",
        f"{py_late:.1f} s (host)" if py_late is not None else "-", "< 1 s", 0 <= late < 1)
    report_sweep(sweep1)
    row("wrong passphrases refused (locked vault)", f"{sweep2['wrong_refused']}/20", "", "all",
        sweep2["wrong_refused"] == 20)
    row("lockout engaged (retry_after seen)", str(sweep2["retry_after_seen"]).lower(), "", "true",
        sweep2["retry_after_seen"])
    row("probe lost while locked + lockout", f"{sweep2['probe_lost']}/{sweep2['probe_requests']}",
        "", "0", sweep2["probe_lost"] == 0)
    bench_argon2()


# --- boot to a mounted vault (issue 12) ----------------------------------------

BOOT_RUNS = int(os.environ.get("VG_BENCH_BOOT_RUNS", "3"))
BOOT_NAME = "secure-ai-vault"
BOOT_MOUNT = "/var/lib/secure-ai"
# The baseline's fstab: what a Debian 12 user writes for a data volume that
# systemd-cryptsetup opened (the initrd's rd.luks.* unit); the vaultguard boots have
# none (local-bottom mounts it before switch_root).
BOOT_FSTAB = "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"
BOOT_FSTAB_SD = BOOT_FSTAB + f"/dev/mapper/{BOOT_NAME} {BOOT_MOUNT} ext4 nosuid,nodev 0 2\n"
# Each measured boot reports the mount unit's activation (CLOCK_MONOTONIC, so time
# since the kernel started) and how the vault was opened, then installs the
# fstab of the next boot (the runs alternate).
BOOT_MEASURE = f"""
    u=$(systemd-escape -p --suffix=mount {BOOT_MOUNT})
    check vault-mounted 'findmnt -n -o SOURCE {BOOT_MOUNT} | grep -qx /dev/mapper/{BOOT_NAME}'
    value mount-active-us "$(systemctl show -p ActiveEnterTimestampMonotonic --value "$u")"
    value userspace-us "$(systemctl show -p UserspaceTimestampMonotonic --value)"
    value unlock-lines "$(journalctl -b -o cat -t vaultguard -t systemd-cryptsetup | grep -iE 'unlocked|set up|tpm' | tr '\\n' '|' | cut -c1-300)"
    cp /run/vgtest/fstab.next /etc/fstab
"""


def bench_boot():
    """Kernel start to the vault's mount unit active: initramfs-tools + vaultguard
    against dracut + systemd-cryptsetup 252 with a systemd-cryptenroll 252 keyslot
    (--tpm2-device=auto --tpm2-pcrs=7, transient SRK), on the same appliance guest,
    root and vault; the runs alternate."""
    begin("boot")
    import appliance  # noqa: E402  (qemu-tests/lib/appliance.py)
    r = subprocess.run(["bash", os.path.join(REPO, "packaging", "build-deb.sh"),
                        harness.vaultguard_binary()], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("packaging/build-deb.sh failed:\n" + r.stdout[-2000:] + r.stderr[-2000:])
    deb = r.stdout.strip().splitlines()[-1]
    s = harness.Scenario("bench-boot")
    files = {}
    try:
        a = appliance.Appliance(s)
        vault = s.luks_disk("vault", ext4=True)
        cfg = {"vault": {"device": f"UUID={vault.uuid}", "name": BOOT_NAME, "mount": BOOT_MOUNT},
               "tpm": {"pcrs": [7]}}
        for name, text in (("config.json", json.dumps(cfg)), ("fstab.vg", BOOT_FSTAB),
                           ("fstab.sd", BOOT_FSTAB_SD)):
            files[name] = s.path(name)
            with open(files[name], "w") as f:
                f.write(text)
        kver = a.kver
        # Boot 1: the package, both enrolments (PCR 7 each) and both initrds.
        b = a.boot(f"""
            printf 'MODULES=dep\nCOMPRESSLEVEL=1\n' > /etc/initramfs-tools/conf.d/appliance
            dpkg -i /run/vgtest/vaultguard.deb || die dpkg
            mkdir -p /etc/vaultguard {BOOT_MOUNT}
            cp /run/vgtest/config.json /etc/vaultguard/config.json
            # One enrolment, systemd-cryptenroll 252's, opened by both boot paths: the
            # same keyslot and sealed object (a transient primary, PCR 7), so the two
            # differ only in the initrd and the unlock machinery. Not vaultguard's own
            # enrolment: `vaultguard enroll` refuses beside an existing TPM2 token, and
            # with vaultguard's token (sealed under the persistent SRK, which 252
            # cannot load) as token 0, systemd-cryptsetup 252 stopped at the
            # passphrase prompt instead of going on to its own token 1.
            PASSWORD="$(cat /run/vgtest/pass)" systemd-cryptenroll --tpm2-device=auto --tpm2-pcrs=7 \
                /dev/disk/by-uuid/{vault.uuid}
            value cryptenroll-status $?
            update-initramfs -u > /run/uit.log 2>&1 || {{ tail -n 20 /run/uit.log; die update-initramfs; }}
            mv /boot/initrd.img-{kver} /boot/initrd.itools
            # --add-drivers: a hostonly build installs only the modules loaded now, and the
            # vault was never opened in this boot (without it: "crypt: unknown target
            # type", then the passphrase prompt); the list vaultguard's module adds.
            dracut --force --hostonly --no-hostonly-cmdline --no-compress --omit vaultguard \
                --add "crypt tpm2-tss systemd-ask-password" \
                --add-drivers "dm_crypt xts ecb cbc aes_generic sha256_generic" \
                /boot/initrd.dracut {kver} \
                > /run/dracut.log 2>&1 || {{ tail -n 20 /run/dracut.log; die dracut; }}
            lsinitrd /boot/initrd.dracut | grep -q 'libtss2-esys' || die dracut-has-no-libtss2
            lsinitrd /boot/initrd.dracut | grep -q 'dm-crypt.ko' || die dracut-has-no-dm-crypt
            cp /run/vgtest/fstab.vg /etc/fstab
            mark setup-done
        """, files={"vaultguard.deb": deb, "pass": _pass_file(s), **files}, timeout=1500)
        if b.value("cryptenroll-status", 300) != "0":
            b.fail("systemd-cryptenroll failed")
        b.expect_mark("setup-done", 1200)
        b.expect_poweroff(60)
        sd_cmdline = (f"rd.luks.name={vault.uuid}={BOOT_NAME} "
                      f"rd.luks.options={vault.uuid}=tpm2-device=auto")
        runs = {"vaultguard": [], "systemd": []}
        for i in range(BOOT_RUNS):
            for who in ("vaultguard", "systemd"):
                nxt = "fstab.sd" if who == "vaultguard" else "fstab.vg"
                b = a.boot(BOOT_MEASURE, label=f"{who}{i + 1}",
                           initrd="/boot/initrd.itools" if who == "vaultguard" else "/boot/initrd.dracut",
                           cmdline="" if who == "vaultguard" else sd_cmdline,
                           files={"fstab.next": files[nxt]})
                b.expect_pass("vault-mounted", 300)
                us = int(b.value("mount-active-us", 60))
                user_us = int(b.value("userspace-us", 60))
                lines = b.value("unlock-lines", 60)
                b.assert_absent(r"[Pp]assphrase for", f"{who}: the TPM unlock should not prompt")
                b.expect_poweroff(60)
                if us <= 0:
                    b.fail(f"{who}: the mount unit never became active")
                runs[who].append({"mount_active_s": us / 1e6, "userspace_s": user_us / 1e6,
                                  "journal": lines, "loadavg": round(os.getloadavg()[0], 2)})
                print(f"  {who} run {i + 1}: vault mounted {us / 1e6:.2f} s after kernel start "
                      f"(userspace at {user_us / 1e6:.2f} s, load {os.getloadavg()[0]:.1f})",
                      flush=True)
    finally:
        s.finish()
    med = {k: statistics.median(r["mount_active_s"] for r in v) for k, v in runs.items()}
    ratio = med["vaultguard"] / med["systemd"]
    RESULTS["boot_to_vault_mounted"] = {
        "runs": runs, "median_s": med, "ratio": ratio, "runs_each": BOOT_RUNS,
        # The same runs as flat lists (ms), in boot order, for BENCHMARKS.md.
        "vaultguard_ms": [r["mount_active_s"] * 1000 for r in runs["vaultguard"]],
        "systemd_ms": [r["mount_active_s"] * 1000 for r in runs["systemd"]]}
    header(f"boot to vault mounted (appliance guest, TCG), median of {BOOT_RUNS} alternating runs",
           "dracut+sd-cryptsetup")
    row("kernel start to the vault's mount unit active", f"{med['vaultguard']:.2f} s",
        f"{med['systemd']:.2f} s", "<= 0.8x", ratio <= 0.8)
    row("  ratio", f"{ratio:.2f}x", "1.00x", "", None)


def _pass_file(s):
    p = s.path("pass")
    with open(p, "w") as f:
        f.write(harness.PASSPHRASE)
    return p


# --- Tang (issue 15) ---------------------------------------------------------

TANG_RUNS = int(os.environ.get("VG_BENCH_TANG_RUNS", "3"))
# clevis has no deadline of its own (curl without --max-time): a measurement stops here.
CLEVIS_CAP = int(os.environ.get("VG_BENCH_CLEVIS_CAP", "300"))
TANG_DEADLINE = 10  # vaultguard's default clevis.deadline, seconds

# Alternating, in one guest: vaultguard attach, then clevis luks unlock, of the same
# volume through the same tangd; process start to mapping ready, by Debian's date.
TANG_BODY = r"""
    D=/usr/bin/date
    net_up eth0 >/dev/null
    timed() { # timed LABEL command...: VGT:TIME LABEL start end status
        _l=$1; shift; _a=$($D +%s.%N); "$@" >/dev/null 2>/tmp/err </dev/null; _s=$?; _b=$($D +%s.%N)
        test -b /dev/mapper/bench || _s=99
        echo "VGT:TIME $_l $_a $_b $_s"; [ $_s = 0 ] || cat /tmp/err
        cryptsetup close bench 2>/dev/null
    }
    i=0
    while [ $i -lt RUNS ]; do
        timed vg vaultguard attach bench /dev/vda none
        timed clevis clevis luks unlock -d /dev/vda -n bench
        i=$((i + 1))
    done
    mark online-done; read _
    offline() { # offline MODE: vaultguard to its prompt, then clevis, capped
        mark "vg-$1-start"
        vaultguard attach bench /dev/vda none
        cryptsetup close bench
        _a=$($D +%s.%N)
        timeout CAP clevis luks unlock -d /dev/vda -n bench >/dev/null 2>/tmp/err
        _s=$?; _b=$($D +%s.%N)
        echo "VGT:TIME clevis-$1 $_a $_b $_s"; cat /tmp/err
        cryptsetup close bench 2>/dev/null
        return 0
    }
    offline MODE
"""


def bench_tang(previous):
    """Tang unlock latency, vaultguard vs clevis 19 in the same guest, and the time
    to the passphrase prompt with the Tang server offline, in two ways: a server that
    accepts and never answers (a hung tangd), and nothing at the address (the guest's
    packets go unanswered: a server that is down behind a firewall)."""
    import tang as tanglib
    begin("tang")
    s = harness.Scenario("bench-tang")
    server = tanglib.Tang(s.dir).start()
    hung = None
    times, prompt_s = {}, {}
    try:
        vault = s.luks_disk("vault")
        keyfile = s.path("passphrase")
        with open(keyfile, "w") as f:
            f.write(harness.PASSPHRASE)
        tanglib.bind_tang(vault.path, server, keyfile)
        common = dict(modules=tanglib.NET_MODULES, files=tanglib.clevis_files(),
                      dynamic=tanglib.CLEVIS_DYNAMIC + ["/usr/bin/date"], libs=tanglib.CLEVIS_LIBS,
                      timeout=1800)
        for mode in ("hung", "dropped"):
            body = (TANG_BODY.replace("RUNS", str(TANG_RUNS if mode == "hung" else 0))
                    .replace("CAP", str(CLEVIS_CAP)).replace("MODE", mode))
            b = s.boot(body, qemu_args=tanglib.user_net(server.port if mode == "hung" else None),
                       **common)
            b.expect_mark("online-done", 600)
            port = server.port
            if mode == "hung":
                server.stop()
                hung = subprocess.Popen(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
                                         "EXEC:sleep 3600"], start_new_session=True)
            b.sendline("")
            b.expect_mark(f"vg-{mode}-start", 60)
            t0 = time.time()
            b.expect(r"Passphrase for bench \(/dev/vda\): ", TANG_DEADLINE + 60)
            prompt_s[f"vg-{mode}"] = time.time() - t0
            b.sendline(harness.PASSPHRASE)
            b.expect(r"(?m)^VGT:TIME clevis-", CLEVIS_CAP + 120)
            b.expect_poweroff(timeout=120)
            for label, a, z, st in re.findall(r"^VGT:TIME (\S+) ([\d.]+) ([\d.]+) (\d+)$",
                                              b.output, re.M):
                if label.startswith("clevis-"):
                    secs = float(z) - float(a)
                    # timeout(1) ended it (busybox's reports the signal: 143).
                    capped = st in ("124", "143") or secs >= CLEVIS_CAP
                    prompt_s[label] = None if capped else secs
                    RESULTS.setdefault("clevis_offline_status", {})[label] = int(st)
                    continue
                if st != "0":
                    b.fail(f"{label} failed in the guest (status {st}); see {s.dir}")
                times.setdefault(label, []).append((float(z) - float(a)) * 1000)
            if hung is not None:
                os.killpg(hung.pid, signal.SIGTERM)
                hung.wait()
                hung = None
                server.start(port)
    finally:
        server.stop()
        if hung is not None:
            os.killpg(hung.pid, signal.SIGTERM)
            hung.wait()
        s.finish()
    med = {k: statistics.median(v) for k, v in times.items()}
    RESULTS["unlock_ms"] = {k: {"median": med[k], "runs": v} for k, v in times.items()}
    RESULTS["prompt_s"] = prompt_s
    RESULTS["clevis_cap_s"] = CLEVIS_CAP
    RESULTS["deadline_s"] = TANG_DEADLINE
    header(f"Tang unlock in the guest (TCG), median of {TANG_RUNS}, alternating", "clevis 19")
    row("Tang pin: start to mapping ready", f"{med['vg']:.0f} ms", f"{med['clevis']:.0f} ms",
        "<= clevis", med["vg"] <= med["clevis"])

    def clevis_cell(k):
        v = prompt_s.get(k)
        return f"> {CLEVIS_CAP} s (cap)" if v is None else f"{v:.1f} s (gives up)"

    for mode, what in (("hung", "Tang accepts, never answers"),
                       ("dropped", "Tang unreachable, packets dropped")):
        v = prompt_s[f"vg-{mode}"]
        row(f"{what}: start to passphrase prompt", f"{v:.1f} s", clevis_cell(f"clevis-{mode}"),
            f"<= {TANG_DEADLINE + 1} s", v <= TANG_DEADLINE + 1)


# --- fuzzing -----------------------------------------------------------------

def bench_fuzz():
    begin("fuzz")
    header(f"fuzzing, {FUZZ_SECONDS} s per target (cargo fuzz, libFuzzer + ASan)", "")
    if shutil.which("cargo-fuzz") is None:
        subprocess.run(["cargo", "install", "--locked", "cargo-fuzz"], check=True)
    fuzz = os.path.join(REPO, "fuzz")
    scratch = tempfile.mkdtemp(prefix="vg-fuzz-")
    try:
        for target in ("control_request", "token_json", "config"):
            # New inputs go to the scratch folder; the committed corpus is only read.
            os.makedirs(os.path.join(scratch, target))
            r = subprocess.run(["cargo", "+nightly", "fuzz", "run", "-O", target,
                                os.path.join(scratch, target), os.path.join("corpus", target),
                                "--", f"-max_total_time={FUZZ_SECONDS}", "-print_final_stats=1"],
                               cwd=fuzz, capture_output=True, text=True)
            runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", r.stderr)
            crashed = r.returncode != 0
            art = os.path.join(fuzz, "artifacts", target)
            artifacts = sorted(os.listdir(art)) if os.path.isdir(art) else []
            RESULTS[target] = {"executions": int(runs.group(1)) if runs else None,
                               "seconds": FUZZ_SECONDS, "crashed": crashed,
                               "artifacts": artifacts}
            row(f"{target}: executions / crashes",
                f"{int(runs.group(1)) if runs else 0:,} / {int(crashed)}", "", "0 crashes",
                not crashed)
            if crashed:
                print(r.stderr[-3000:])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_info(section):
    """Where and from what a section's figures come."""
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no")
    cpu = re.search(r"^model name\s*:\s*(.*)$", open("/proc/cpuinfo").read(), re.M)
    mem = int(re.search(r"^MemTotal:\s*(\d+)", open("/proc/meminfo").read(), re.M).group(1))
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": git("rev-parse", "--short=12", "HEAD") + (" (uncommitted changes)" if dirty else ""),
            "machine": f"{os.cpu_count()} CPUs ({cpu.group(1) if cpu else platform.machine()}), "
                       f"{mem / 2**20:.0f} GiB, kernel {platform.release()}",
            "command": f"qemu-tests/bench.py {section}"}


ALL_SECTIONS = ["size", "supervisor", "guest", "boot", "tang", "fuzz"]


def main(argv):
    unknown = [a for a in argv if a not in ALL_SECTIONS]
    if unknown:
        print(f"usage: bench.py [{'|'.join(ALL_SECTIONS)}]... (all by default); "
              f"not a section: {' '.join(unknown)}", file=sys.stderr)
        return 2
    sections = argv or ALL_SECTIONS
    print(f"vaultguard benchmarks, {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()}: "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"kernel {platform.release()}", flush=True)
    previous = report.load()
    vg = harness.vaultguard_binary()
    static_env = dict(os.environ,
                      CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static")
    host_tools = cargo_json_executables(["--benches"]) if "supervisor" in sections else {}
    guest_tools = cargo_json_executables(["--benches", "--target", "x86_64-unknown-linux-gnu"],
                                         env=static_env) if {"guest", "supervisor"} & set(sections) else {}
    if "size" in sections:
        bench_size(vg)
    if "supervisor" in sections:
        bench_supervisor(vg, host_tools)
        bench_watchers(vg, guest_tools)
    if "guest" in sections:
        bench_guest(guest_tools, previous)
    if "boot" in sections:
        bench_boot()
    if "tang" in sections:
        bench_tang(previous)
    if "fuzz" in sections:
        bench_fuzz()
    # This run's sections replace their last run; the others keep theirs.
    for name, sec in SECTIONS.items():
        previous.setdefault("sections", {})[name] = sec
    report.save(previous)
    report.write_markdown(previous)
    rows = [r for sec in SECTIONS.values() for r in sec["rows"]]
    missed = [r[0] for r in rows if r[4] is False]
    print(f"\n{len(rows)} figures; targets not met: {', '.join(missed) if missed else 'none'}")
    print(f"recorded in {report.JSON} and {report.MARKDOWN}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
