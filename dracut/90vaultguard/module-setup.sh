#!/bin/bash
# dracut module "vaultguard": unlock the AI vault in the initramfs (TPM2 unseal,
# passphrase fallback, PCR 15 latch) in place of systemd-cryptsetup for that volume.
#
# Build with:  dracut --add vaultguard ...
# The binary comes from $VAULTGUARD_BIN (default: vaultguard in PATH) and the
# configuration from $VAULTGUARD_CONFIG (default: /etc/vaultguard/config.json).

vg_bin() {
    echo "${VAULTGUARD_BIN:-$(command -v vaultguard)}"
}

check() {
    [[ -x "$(vg_bin)" ]] || return 1
    # Only when asked for, or on a host that has a vaultguard configuration.
    [[ -f "${VAULTGUARD_CONFIG:-/etc/vaultguard/config.json}" ]] && return 0
    return 255
}

depends() {
    # With systemd in the initrd the passphrase prompt is an ask-password request:
    # without the console agent nobody would answer it (the crypt module that
    # carries the agent is left out of a hostonly image whose root is not
    # encrypted). Without systemd on the host, dm alone (the pre-mount hook).
    if command -v systemd-tty-ask-password-agent >/dev/null; then
        echo dm systemd-ask-password
    else
        echo dm
    fi
    return 0
}

installkernel() {
    # dm-crypt with the LUKS2 defaults (aes-xts-plain64) and the TPM drivers, in case
    # the kernel has them as modules.
    hostonly='' instmods dm_mod dm_crypt xts ecb cbc aes_generic sha256_generic \
        crc32c_generic tpm_tis tpm_crb
}

install() {
    local bin conf name
    bin=$(vg_bin)
    conf=${VAULTGUARD_CONFIG:-/etc/vaultguard/config.json}
    inst_simple "$bin" /usr/bin/vaultguard
    [[ -f $conf ]] && inst_simple "$conf" /etc/vaultguard/config.json

    if dracut_module_included "systemd"; then
        inst_simple "$moddir/vaultguard-unlock.service" \
            "$systemdsystemunitdir/vaultguard-unlock.service"
        mkdir -p "$initdir$systemdsystemunitdir/initrd.target.wants"
        ln_r "$systemdsystemunitdir/vaultguard-unlock.service" \
            "$systemdsystemunitdir/initrd.target.wants/vaultguard-unlock.service"
        # The mount inside /sysroot before switch-root (initramfs-tools does it
        # in local-bottom): see vaultguard-mount.sh.
        inst_simple "$moddir/vaultguard-mount.sh" /usr/lib/vaultguard/vaultguard-mount.sh
        inst_simple "$moddir/vaultguard-mount.service" \
            "$systemdsystemunitdir/vaultguard-mount.service"
        mkdir -p "$initdir$systemdsystemunitdir/initrd-fs.target.wants"
        ln_r "$systemdsystemunitdir/vaultguard-mount.service" \
            "$systemdsystemunitdir/initrd-fs.target.wants/vaultguard-mount.service"
        # A crypttab entry for the same volume would race us with its own prompt:
        # mask the unit the cryptsetup generator would make for it.
        name=$("$bin" -c "$conf" config --get vault.name 2>/dev/null || echo secure-ai-vault)
        mkdir -p "$initdir/etc/systemd/system"
        ln -sf /dev/null "$initdir/etc/systemd/system/systemd-cryptsetup@$(systemd-escape "$name").service"
        # The crypttab generator (src/generator.rs) for the crypttab dracut's crypt
        # module puts in the initrd: its x-vaultguard lines get vaultguard's unit
        # there too. The configured vault itself stays vaultguard-unlock.service's
        # (the generator's alias sits in the early dir, which outranks the mask
        # above, only for a line in the initrd's crypttab).
        mkdir -p "$initdir$systemdutildir/system-generators"
        ln_r /usr/bin/vaultguard "$systemdutildir/system-generators/vaultguard-generator"
    else
        inst_hook pre-mount 10 "$moddir/vaultguard-unlock.sh"
    fi
}
