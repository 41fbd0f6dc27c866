#!/usr/bin/env bash
# Run the boot-path scenarios under QEMU + swtpm: qemu-tests/run.sh [SCENARIO...]
# (all of qemu-tests/scenarios/ by default). Prints PASS/FAIL per scenario and
# exits non-zero if any failed. Logs: qemu-tests/work/<scenario>/.
# VAULTGUARD_BIN=path uses that static binary instead of initramfs/build-static.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import harness; sys.exit(harness.main(sys.argv[2:]))' \
    "$here/lib" "$@"
