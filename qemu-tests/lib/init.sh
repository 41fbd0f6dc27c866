#!/bin/sh
# PID 1 of the harness's test initramfs (qemu-tests/lib/harness.py puts it at /init).
# Sets up what a boot-time initramfs has (API file systems, the modules listed in
# /etc/modules, the virtio disks), runs the scenario's body (/scenario.sh) in a new
# session whose controlling terminal is the serial console (so programs that open
# /dev/tty to prompt find it), then reports how the body ended and powers off.
# Every line the runner asserts on starts with "VGT:".
export PATH=/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mkdir -p /run/cryptsetup /run/vaultguard /run/lock

vgt_arg() { # value of vgtest.$1= on the kernel command line
    for w in $(cat /proc/cmdline); do
        case "$w" in "vgtest.$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

echo "VGT:BOOT kernel $(uname -r) up $(cut -d' ' -f1 /proc/uptime) s"
modules=$(grep -v '^#' /etc/modules)
[ -z "$modules" ] || modprobe -a $modules || echo "VGT:FAIL modules: modprobe -a $modules"

# The disks QEMU attached (vgtest.disks=N) must all be there before the body runs.
want=$(vgt_arg disks || echo 0)
i=0
while [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -lt "$want" ] && [ $i -lt 100 ]; do
    sleep 0.1; i=$((i + 1))
done
have=$(ls -d /sys/block/vd* 2>/dev/null | wc -l)
[ "$have" -ge "$want" ] || echo "VGT:FAIL disks: $have virtio disks, expected $want"

# Core dumps land in /run; the harness fails the boot if any appear.
echo '/run/core.%e.%p' > /proc/sys/kernel/core_pattern
ulimit -c unlimited

echo "VGT:READY up $(cut -d' ' -f1 /proc/uptime) s"
setsid -c /bin/sh /scenario.sh <>/dev/ttyS0 >&0 2>&0
rc=$?
cores=$(ls /run/core.* 2>/dev/null | wc -l)
sync
echo "VGT:DONE rc=$rc cores=$cores up $(cut -d' ' -f1 /proc/uptime) s"
poweroff -f
