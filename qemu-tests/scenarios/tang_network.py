#!/usr/bin/env python3
"""Tang through QEMU user networking: the guest reaches tangd's /adv at 10.0.2.100 and nothing else.

One boot with a virtio NIC on a restricted user network (restrict=on) whose one
guestfwd leads to a real tangd behind socat on the host's 127.0.0.1. The guest leases
10.0.2.15 by udhcpc (restrict=on: the lease names no router and no DNS server, so
the guest's one route is 10.0.2.0/24, which covers the Tang address), fetches /adv
with busybox wget (the payload matches what the host reads from the same tangd), and
fails to reach anything else, at once (slirp resets the connection or the kernel has
no route): the host's loopback through the gateway (10.0.2.2:PORT, the very port
tangd listens on), an outside address, the user network's DNS."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
import harness  # noqa: E402
import tang as tanglib  # noqa: E402


def run(s):
    tang = tanglib.Tang(s.dir).start()
    try:
        want = tang.adv()["payload"]
        b = s.boot(f"""
            t0=$(uptime_s)
            net_up eth0; check net-up "test $? = 0"
            value lease-took "$(echo "$(uptime_s) $t0" | awk '{{printf "%.2f", $1 - $2}}')"
            check lease 'ip -4 addr show dev eth0 | grep -q "inet 10.0.2.15/24"'
            check subnet-route 'grep -Eq "^eth0[[:space:]]+0002000A[[:space:]]+00000000[[:space:]].*00FFFFFF" /proc/net/route'
            check_not no-default-route 'grep -Eq "^[^[:space:]]+[[:space:]]+00000000[[:space:]]" /proc/net/route'
            check adv 'timeout 10 wget -q -O /tmp/adv {tanglib.GUEST_URL}/adv'
            value adv-payload "$(sed 's/.*"payload": *"\\([^"]*\\)".*/\\1/' /tmp/adv)"
            for target in 10.0.2.2:{tang.port} 1.1.1.1:80 10.0.2.2:22; do
                t0=$(uptime_s)
                if timeout 4 wget -q -O /tmp/out "http://$target/adv"; then
                    fail "unreachable-$target: wget reached it: $(head -c 100 /tmp/out)"
                else
                    pass "unreachable-$target"
                fi
                value "took-$target" "$(echo "$(uptime_s) $t0" | awk '{{printf "%.2f", $1 - $2}}')"
            done
            check_not no-dns 'timeout 4 nslookup tang.example 10.0.2.3'
        """, modules=tanglib.NET_MODULES, qemu_args=tanglib.user_net(tang.port))
        b.expect_pass("net-up", 60)
        harness.log(f"DHCP lease took {b.value('lease-took')} s")
        b.expect_pass("lease")
        b.expect_pass("subnet-route")
        b.expect_pass("no-default-route")
        b.expect_pass("adv", 30)
        got = b.value("adv-payload")
        if got != want:
            b.fail(f"the guest's /adv payload differs from the host's:\n{got[:80]}...\n{want[:80]}...")
        for target in (f"10.0.2.2:{tang.port}", "1.1.1.1:80", "10.0.2.2:22"):
            b.expect_pass(f"unreachable-{target}", 30)
            harness.log(f"{target}: refused after {b.value(f'took-{target}')} s")
        b.expect_pass("no-dns", 30)
        b.expect_poweroff()
    finally:
        tang.stop()
    with open(tang.log_path) as f:
        served = f.read()
    if "GET /adv => 200" not in served:
        raise harness.ScenarioFailed(f"tangd's log shows no /adv served:\n{served[-2000:]}")


if __name__ == "__main__":
    sys.exit(harness.main([__file__]))
