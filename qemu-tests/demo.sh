#!/usr/bin/env bash
# The README's main command: on a fresh Debian 12 machine, install what is needed,
# build the static vaultguard, and boot a QEMU + swtpm guest twice: enrol the TPM,
# then unlock by TPM without a prompt; then show the idle auto-lock.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
echo "== installing what is missing (Debian packages)"
bash qemu-tests/setup-host.sh
echo "== static C libraries (built once into .cdeps/)"
bash initramfs/build-cdeps.sh
echo "== the static vaultguard"
VAULTGUARD_BIN=$(bash initramfs/build-static.sh | tail -n 1)
export VAULTGUARD_BIN
echo "$VAULTGUARD_BIN: $(file -b "$VAULTGUARD_BIN" | cut -d, -f1-2), $(stat -c %s "$VAULTGUARD_BIN") bytes"
exec python3 qemu-tests/demo.py
