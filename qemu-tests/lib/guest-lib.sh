# Shell helpers for scenario bodies; the harness sources this file before the body.
# Markers the runner reads (qemu-tests/lib/harness.py):
#   VGT:PASS <name> / VGT:FAIL <name> [detail]   one check
#   VGT:MARK <text>                              a point the runner may wait for
#   VGT:VALUE <key>=<value>                      an observation the runner may read

# When the body's shell (the console's session leader) exits, the kernel hangs up
# the console and drops output still queued for the serial line: the last lines of
# a busy body went missing in about one boot in three (measured by hand in a
# throwaway guest printing 300 lines: 4 of 12 lost their tail; with the drain, 8
# of 8 kept everything). busybox stty sets the line with TCSADRAIN, which waits
# until the queue is empty.
trap 'stty onlcr 2>/dev/null' EXIT

# check NAME 'shell code': PASS if the code exits 0, else FAIL (with its output).
check() {
    _name=$1; shift
    if _out=$(eval "$*" 2>&1); then
        echo "VGT:PASS $_name"
    else
        echo "VGT:FAIL $_name: $(printf '%s' "$_out" | tail -n 5 | tr '\n' '|')"
    fi
}

# check_not NAME 'shell code': PASS if the code exits non-zero.
check_not() {
    _name=$1; shift
    if _out=$(eval "$*" 2>&1); then
        echo "VGT:FAIL $_name: succeeded: $(printf '%s' "$_out" | tail -n 5 | tr '\n' '|')"
    else
        echo "VGT:PASS $_name"
    fi
}

pass() { echo "VGT:PASS $*"; }
fail() { echo "VGT:FAIL $*"; }
mark() { echo "VGT:MARK $*"; }
value() { echo "VGT:VALUE $1=$2"; }

# die MESSAGE: a failed check, then end the body (PID 1 powers off).
die() { echo "VGT:FAIL $*"; exit 1; }

# wait_for PATH [SECONDS]: wait until PATH exists.
wait_for() {
    _i=0
    while [ ! -e "$1" ] && [ $_i -lt $((${2:-10} * 10)) ]; do sleep 0.1; _i=$((_i + 1)); done
    [ -e "$1" ]
}

# disk NAME: the /dev node of the disk the harness attached as NAME (its serial).
disk() {
    for _d in /sys/block/vd*; do
        [ "$(cat "$_d/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${_d##*/}"; return 0; }
    done
    echo "VGT:FAIL disk $1: no virtio disk with that serial" >&2
    return 1
}

# kernel_arg KEY: value of KEY= on the kernel command line.
kernel_arg() {
    for _w in $(cat /proc/cmdline); do
        case "$_w" in "$1="*) echo "${_w#*=}"; return 0 ;; esac
    done
    return 1
}

# pcr BANK N: the PCR's value as the kernel reads it (lowercase hex).
pcr() { tr 'A-F' 'a-f' < "/sys/class/tpm/tpm0/pcr-$1/$2"; }

vg() { /usr/bin/vaultguard "$@"; }

# net_up [IFACE]: lease an address by DHCP with busybox udhcpc and the image's
# /usr/share/udhcpc/default.script (QEMU user networking leases 10.0.2.15, router
# 10.0.2.2). Needs the NIC's driver in the image (boot(modules=["virtio_net"])).
# Run it in the background (`net_up &`) to let vaultguard's own wait for a route
# be what the unlock waits on.
net_up() {
    _if=${1:-eth0}
    wait_for "/sys/class/net/$_if" 10 || { echo "VGT:FAIL net-up: no interface $_if"; return 1; }
    udhcpc -i "$_if" -n -q -t 5 -T 1 -s /usr/share/udhcpc/default.script
}

# uptime_s: seconds since the guest kernel started (the console's clock for
# measuring how long something took inside the guest).
uptime_s() { cut -d' ' -f1 /proc/uptime; }
