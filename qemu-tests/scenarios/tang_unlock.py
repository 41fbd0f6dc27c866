#!/usr/bin/env python3
"""A clevis tang token bound on the host by the real `clevis luks bind` opens in the guest through a real tangd.

Volume v1 carries one clevis token (tang pin) bound on the host against a tangd on
127.0.0.1; the guest reaches that tangd at http://10.0.2.100 through QEMU's
restricted user network (lib/tang.py) and nothing else.

Boot 1 (the network comes up in the background: vaultguard waits for the route):
v1 opens with no prompt. The host then rotates tang's keys (tangd-rotate-keys: the
old ones stay, hidden, for recovery): v1 still opens. The host puts a server there
that accepts and never answers: the passphrase prompt appears within the deadline
(3 s) + 1 s, the pin's line naming the server. The host puts a second tangd with keys
of its own behind the same address, answering the request for the recorded key's
advertisement with its own (a plain tangd would answer 404): the advertisement is
refused ("wrong thumbprint") and the passphrase cached in the kernel keyring by the
previous prompt opens v1.
Boot 2, nothing at the Tang address (the guest's packets go unanswered): the prompt
appears within the deadline + 1 s, naming the pin.
Both prompt times are measured from vaultguard's line saying the TPM is not used
(the pins start right after it) to the prompt, on the host's clock; the time from the
command's start is logged beside it."""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402
import tang as tanglib  # noqa: E402

DEADLINE = 3
CMDLINE = f"rd.vaultguard.clevis.deadline={DEADLINE}"


def prompt_for(name, dev):
    return rf"Passphrase for {name} \({dev}\): "


def attach(name, dev):
    """Guest shell: attach NAME on DEV (the clevis tokens first), report its status."""
    return f"""
        vg attach {name} {dev} none
        value attach-{name} $?
        check mapped-{name} 'test -b /dev/mapper/{name}'
    """


def time_to_prompt(b, what):
    """After the guest's mark: the seconds from vaultguard's line saying the TPM
    is not used (its pins start right after it) to the passphrase prompt, which
    must be within the deadline + 1 s; logs the whole time from the mark too (it
    adds the process start and, on this shared machine, the guest's starved CPU)."""
    t_mark = time.time()
    b.expect(r"TPM unlock of v1 not possible: [^\n]*\n", 60)
    t_pins = time.time()
    b.expect(r"v1: .*tang.*\n", DEADLINE + 30)
    b.expect(prompt_for("v1", "/dev/vda"), DEADLINE + 30)
    t_prompt = time.time()
    waited = t_prompt - t_pins
    harness.log(f"{what}: prompt {waited:.2f} s after the pins started "
                f"({t_prompt - t_mark:.2f} s after the command; deadline {DEADLINE} s)")
    if waited > DEADLINE + 1:
        b.fail(f"{what}: the prompt came {waited:.2f} s after the pins started, over the "
               f"deadline {DEADLINE} s + 1 s")


def step(b, mark):
    """Let the guest past its `read` after the host changed something."""
    b.expect_mark(mark, 120)


def run(s):
    tang = tanglib.Tang(s.dir, "tang").start()
    other = tanglib.Tang(s.dir, "other")  # keys of its own, started later on tang's port
    hung = None
    keyfile = s.path("passphrase")
    with open(keyfile, "w") as f:
        f.write(harness.PASSPHRASE)
    try:
        v1 = s.luks_disk("v1")
        tanglib.bind_tang(v1.path, tang, keyfile)
        tanglib.expect_clevis_token(v1.path)

        net = tanglib.user_net(tang.port)
        b = s.boot(f"""
            net_up eth0 >/dev/null &
            {attach("v1", "/dev/vda")}
            vg detach v1
            mark rotate; read _
            {attach("v1", "/dev/vda")}
            vg detach v1
            mark hung; read _
            mark hung-start
            vg attach v1 /dev/vda none
            value hung-attach $?
            vg detach v1
            mark other; read _
            vg attach v1 /dev/vda none
            value untrusted-attach $?
        """, cmdline=CMDLINE, modules=tanglib.NET_MODULES, qemu_args=net,
            dynamic=harness.CRYPTSETUP)
        if b.value("attach-v1", 120) != "0":
            b.fail("v1 did not open with its clevis token")
        b.expect_pass("mapped-v1")
        b.assert_absent(r"Passphrase for", "a clevis token with its Tang server answering prompted")

        step(b, "rotate")
        before = set(tang.thumbprints())
        tang.rotate()
        if set(tang.thumbprints(hidden=True)) != before or set(tang.thumbprints()) & before:
            b.fail("tangd-rotate-keys did not hide the old keys and advertise new ones")
        b.sendline("")
        if b.value("attach-v1", 120) != "0":
            b.fail("v1 did not open after the Tang keys were rotated (old key hidden, still served)")
        b.expect_pass("mapped-v1")

        step(b, "hung")
        port = tang.port
        tang.stop()
        hung = subprocess.Popen(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
                                 "EXEC:sleep 600"], start_new_session=True)
        b.sendline("")
        b.expect_mark("hung-start", 30)
        time_to_prompt(b, "hung Tang")
        b.sendline(harness.PASSPHRASE)
        if b.value("hung-attach", 60) != "0":
            b.fail("the passphrase did not open v1")
        os.killpg(hung.pid, 15)
        hung.wait()
        hung = None

        step(b, "other")
        other.start(port, any_adv=True)
        b.sendline("")
        b.expect(r"v1: .*tang.*\n", 60)
        line = b.output[b.output.rfind("v1:", 0, b.pos):b.pos]
        if "wrong thumbprint" not in line:
            b.fail(f"the untrusted advertisement's line does not say so: {line!r}")
        # The passphrase typed above is in the kernel keyring's cache (as systemd
        # caches it): it answers in place of a prompt.
        b.expect(r"v1 unlocked with the passphrase", 60)
        if b.value("untrusted-attach", 60) != "0":
            b.fail("the cached passphrase did not open v1 after the refused advertisement")
        b.expect_poweroff()
        other.stop()

        # Nothing at the Tang address: the guest's SYNs go unanswered.
        b = s.boot("""
            net_up eth0 >/dev/null
            mark blackhole-start
            vg attach v1 /dev/vda none
            value attach-v1 $?
        """, cmdline=CMDLINE, modules=tanglib.NET_MODULES, qemu_args=tanglib.user_net(None),
            dynamic=harness.CRYPTSETUP)
        b.expect_mark("blackhole-start", 120)
        time_to_prompt(b, "unreachable Tang")
        b.sendline(harness.PASSPHRASE)
        if b.value("attach-v1", 60) != "0":
            b.fail("the passphrase did not open v1")
        b.expect_poweroff()
    finally:
        tang.stop()
        other.stop()
        if hung is not None:
            os.killpg(hung.pid, 15)
            hung.wait()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
