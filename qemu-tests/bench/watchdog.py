#!/usr/bin/env python3
"""The comparison: a minimal Python equivalent of the appliance's polling watchdog.

What the appliance ran before vaultguard, without Flask: a thread that wakes every
`--poll` seconds (30 by default), compares the idle time (last keepalive or the
activity file's mtime) with the timeout and locks when it is over; and a control
socket speaking the same JSON lines as vaultguard (status, keepalive, lock), served
by socketserver's thread-per-connection server. It is here only to be measured
side by side with `vaultguard supervise` by qemu-tests/bench.py.

The design under comparison is the 30 s polling thread. socketserver's
serve_forever() also wakes every 0.5 s by default, only to check for its own
shutdown request: that is a default of the library, not the appliance's design, so
the server blocks in select() here unless `--server-poll SECONDS` asks for the
default's behaviour (bench.py measures that variant separately).

--lock-cmd runs a command to lock (e.g. `umount ... && cryptsetup close ...`);
without it the lock is recorded only. Each lock prints `locked late_by=<s>`: how
long after the idle deadline the lock happened."""
import argparse
import json
import os
import socketserver
import subprocess
import threading
import time

state = {"state": "unlocked", "detail": "tpm2_unseal", "last": time.time()}
lock = threading.Lock()


def idle_since(args):
    last = state["last"]
    if args.activity_file:
        try:
            last = max(last, os.stat(args.activity_file).st_mtime)
        except OSError:
            pass
    return last


def do_lock(args, detail):
    if args.lock_cmd:
        subprocess.run(args.lock_cmd, shell=True, check=False)
    state.update(state="locked", detail=detail)


def poller(args):
    while True:
        time.sleep(args.poll)
        with lock:
            if state["state"] != "unlocked":
                continue
            deadline = idle_since(args) + args.timeout
            now = time.time()
            if now >= deadline:
                do_lock(args, "auto_lock_idle")
                print(f"locked late_by={now - deadline:.3f}", flush=True)


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for raw in self.rfile:
            try:
                req = json.loads(raw)
                cmd = req.get("cmd")
            except (ValueError, AttributeError):
                self.reply({"success": False, "error": "invalid JSON"})
                continue
            with lock:
                if cmd == "status":
                    now = time.time()
                    self.reply({"state": state["state"], "detail": state["detail"],
                                "idle_seconds": int(now - idle_since(self.server.args)),
                                "last_activity": idle_since(self.server.args)})
                elif cmd == "keepalive":
                    state["last"] = time.time()
                    self.reply({"success": True})
                elif cmd == "lock":
                    do_lock(self.server.args, "manual_lock")
                    self.reply({"success": True, "state": "locked"})
                else:
                    self.reply({"success": False, "error": "unknown command"})

    def reply(self, obj):
        self.wfile.write((json.dumps(obj) + "\n").encode())


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--timeout", type=float, default=1800, help="idle seconds before the lock")
    p.add_argument("--poll", type=float, default=30)
    p.add_argument("--activity-file")
    p.add_argument("--lock-cmd")
    p.add_argument("--server-poll", type=float, default=None,
                   help="serve_forever's shutdown poll (socketserver's default is 0.5 s); "
                        "by default none: the server sleeps until a client connects")
    args = p.parse_args()
    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass
    server = Server(args.socket, Handler)
    server.args = args
    threading.Thread(target=poller, args=(args,), daemon=True).start()
    print("ready", flush=True)
    # Stopped by a signal (bench.py sends SIGTERM), never by shutdown(): no poll needed.
    server.serve_forever(poll_interval=args.server_poll)


if __name__ == "__main__":
    main()
