#!/usr/bin/env bash
# Benchmarks (issue 6): each figure beside its comparison, measured in the same run.
# Installs what is missing, builds, then runs qemu-tests/bench.py [SECTION...]
# (size, supervisor, guest, fuzz; all by default). About 10 minutes once built.
# Record the printed table in BENCHMARKS.md with the machine it came from.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash qemu-tests/setup-host.sh
bash initramfs/build-cdeps.sh
VAULTGUARD_BIN=$(bash initramfs/build-static.sh | tail -n 1)
export VAULTGUARD_BIN
exec python3 qemu-tests/bench.py "$@"
