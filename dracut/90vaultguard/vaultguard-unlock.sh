#!/bin/sh
# dracut pre-mount hook (initramfs without systemd): devices have settled, the root
# file system is not mounted yet. The console is stdin/stdout here, so a passphrase
# prompt reaches the operator.
if /usr/bin/vaultguard unlock; then
    :
else
    echo "vaultguard: the vault stays locked; the system boots without it" >&2
fi
