#!/usr/bin/env bash
# Benchmarks (issue 6): each figure beside its comparison, measured in the same run.
# Installs what is missing, builds, then runs qemu-tests/bench.py [SECTION...]
# (size, supervisor, guest, fuzz; all by default). About 15 minutes once built.
# The sections run are recorded in BENCHMARKS.json (with date, commit, machine) and
# BENCHMARKS.md is regenerated from it: commit both.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash qemu-tests/setup-host.sh
bash initramfs/build-cdeps.sh
VAULTGUARD_BIN=$(bash initramfs/build-static.sh | tail -n 1)
export VAULTGUARD_BIN
exec python3 qemu-tests/bench.py "$@"
