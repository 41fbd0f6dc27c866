#!/usr/bin/env bash
# Install the dracut module (and the initrd unit it carries) into dracut's module
# directory. Usage: dracut/install.sh [DRACUT_MODULES_DIR]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-/usr/lib/dracut/modules.d}/90vaultguard
install -d "$dest"
install -m 0755 "$repo/dracut/90vaultguard/module-setup.sh" "$repo/dracut/90vaultguard/vaultguard-unlock.sh" \
    "$repo/dracut/90vaultguard/vaultguard-mount.sh" "$dest/"
install -m 0644 "$repo/systemd/vaultguard-unlock.service" "$repo/dracut/90vaultguard/vaultguard-mount.service" "$dest/"
echo "installed $dest"
