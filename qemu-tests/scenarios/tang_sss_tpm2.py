#!/usr/bin/env python3
"""clevis sss tokens of the TPM and a Tang server, bound on the host by `clevis luks bind`: t=2 needs both, t=1 either.

v2 carries sss t=2 {tpm2, tang}, v3 sss t=1 {tpm2, tang}, both bound on the host by
clevis 19 against a tangd on 127.0.0.1 (reached by the guest at http://10.0.2.100,
lib/tang.py) and against the scenario's own swtpm state, served on the host for the
bind (lib/tang.py HostTpm): the guest boots with that same TPM. The tpm2 pins are
sealed to PCR 7 as the guest's firmware leaves it (read in a first boot).

Boot 1: both open with no prompt (the tpm2 and tang pins at once).
Boot 2, the TPM wiped (a newly manufactured one: new seeds): v3 opens through Tang
alone; v2 cannot (one share of two) and prompts, the tpm2 pin's line saying why."""
import base64
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402
import tang as tanglib  # noqa: E402

CMDLINE = "rd.vaultguard.clevis.deadline=5"


def run(s):
    tang = tanglib.Tang(s.dir).start()
    keyfile = s.path("passphrase")
    with open(keyfile, "w") as f:
        f.write(harness.PASSPHRASE)
    try:
        v2 = s.luks_disk("v2")
        v3 = s.luks_disk("v3")
        net = tanglib.user_net(tang.port)
        # The tpm2 pin is sealed to PCR 7 as the guest's firmware leaves it (vaultguard
        # refuses a pin bound to no PCR): read it in a boot of the same machine, and
        # give clevis the value (pcr_digest), as the host's TPM holds other values.
        b = s.boot('value pcr7 "$(pcr sha256 7)"', modules=tanglib.NET_MODULES, qemu_args=net)
        pcr7 = bytes.fromhex(b.value("pcr7", 120))
        b.expect_poweroff()
        tpm2_cfg = {"pcr_bank": "sha256", "pcr_ids": "7",
                    "pcr_digest": base64.urlsafe_b64encode(pcr7).decode().rstrip("=")}
        tang_cfg = {"url": tanglib.GUEST_URL, "adv": tang.adv()}
        with tanglib.HostTpm(s.tpm_dir, s.path("host-swtpm")) as tpm:
            for d, t in ((v2, 2), (v3, 1)):
                tanglib.bind(d.path, "sss", {"t": t, "pins": {"tpm2": tpm2_cfg, "tang": tang_cfg}},
                             keyfile, env=tpm.env)
        for d in (v2, v3):
            tanglib.expect_clevis_token(d.path)

        b = s.boot("""
            net_up eth0 >/dev/null
            for n in v2 v3; do
                vg attach $n "$(disk $n)" none
                value attach-$n $?
                check mapped-$n "test -b /dev/mapper/$n"
            done
        """, cmdline=CMDLINE, modules=tanglib.NET_MODULES, qemu_args=net,
            dynamic=harness.CRYPTSETUP)
        for n in ("v2", "v3"):
            # A prompt here means the pins did not open it: fail with their lines
            # rather than wait on the prompt.
            m = b.expect(rf"(?m)^VGT:VALUE attach-{n}=(\d+)\n|Passphrase for {n} ", 120)
            if m.group(1) != "0":
                lines = "\n".join(l for l in b.output.splitlines() if l.startswith(f"vaultguard: {n}:"))
                b.fail(f"{n} did not open with its sss token (tpm2 + tang):\n{lines}")
            b.expect_pass(f"mapped-{n}")
        b.assert_absent(r"Passphrase for", "an sss token with both pins available prompted")
        b.expect_poweroff()

        s.new_tpm()
        b = s.boot("""
            net_up eth0 >/dev/null
            vg attach v3 "$(disk v3)" none
            value attach-v3 $?
            check mapped-v3 'test -b /dev/mapper/v3'
            vg attach v2 "$(disk v2)" none
            value attach-v2 $?
        """, cmdline=CMDLINE, modules=tanglib.NET_MODULES, qemu_args=net,
            dynamic=harness.CRYPTSETUP)
        if b.value("attach-v3", 120) != "0":
            b.fail("v3 (sss t=1 of tpm2, tang) did not open through Tang with the TPM wiped")
        b.expect_pass("mapped-v3")
        b.assert_absent(r"Passphrase for v3", "v3 prompted though its Tang server answered")
        b.expect(r"v2: .*tpm2.*\n", 60)
        b.expect(r"Passphrase for v2 \(/dev/vd[a-z]\): ", 60)
        b.sendline(harness.PASSPHRASE)
        if b.value("attach-v2", 60) != "0":
            b.fail("the passphrase did not open v2")
        b.expect_poweroff()
    finally:
        tang.stop()


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
