#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine:
#   1. host packages (swtpm, tpm2-tools, cryptsetup, QEMU, kernel, busybox, clang)
#   2. the static C libraries (built once into .cdeps, then cached)
#   3. cargo test with the root tier (--features root-tests): unit tests and host
#      integration tests (swtpm on loopback, LUKS2 headers in files, the control
#      socket with a fake vault, tmpfs mounts and mount namespaces)
#   4. the static release binary, checked static
#   5. the Debian package from it (packaging/build-deb.sh), checked by lintian
#   6. the QEMU + swtpm boot scenarios (appliance_initramfs_tools installs that
#      package in a real Debian guest), then the demo
# Usage: qemu-tests/test.sh [SCENARIO...]   (scenarios default to all)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
step() { printf '\n== %s\n' "$*"; }
# The root tier's tests fail without root (they mount, unshare and change uid);
# say so once here rather than through a dozen failures.
if [ "$(id -u)" != 0 ]; then
    echo "test.sh: run as root: the root tier (cargo test --features root-tests) and the" >&2
    echo "         package installation need it" >&2
    exit 1
fi

step "host packages"
bash qemu-tests/setup-host.sh

step "static C libraries (.cdeps)"
bash initramfs/build-cdeps.sh

step "cargo test, root tier included"
cargo test --locked --features root-tests

step "static release binary"
bin=$(bash initramfs/build-static.sh | tail -n 1)
echo "$bin: $(file -b "$bin" | cut -d, -f1-3), $(stat -c %s "$bin") bytes"

step "Debian package and lintian"
deb=$(bash packaging/build-deb.sh "$bin" | tail -n 1)
# No errors and no warnings; packaging/lintian-overrides says why each override.
lintian --fail-on error,warning "$deb"
echo "$deb: $(stat -c %s "$deb") bytes, lintian clean"
bash packaging/check-docs.sh "$bin"

step "QEMU boot scenarios"
# Two QEMUs at a time where there are two CPUs (TCG runs a guest on one): the
# appliance guests in one lane, the initramfs guests in the other.
lanes=1
[ "$(nproc)" -ge 2 ] && lanes=2
VG_QEMU_LANES=${VG_QEMU_LANES:-$lanes} VAULTGUARD_BIN=$bin bash qemu-tests/run.sh "$@"

if [ $# -eq 0 ]; then
    step "the README's demo (qemu-tests/demo.sh without its install and build steps)"
    VAULTGUARD_BIN=$bin python3 qemu-tests/demo.py
fi
