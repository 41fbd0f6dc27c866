#!/usr/bin/env bash
# Build the Debian package of vaultguard from the static binary:
#   bash packaging/build-deb.sh [STATIC_BINARY]      (prints the .deb's path last)
# Without an argument it builds the binary with initramfs/build-static.sh.
#
# A staging directory packed with dpkg-deb, not cargo-deb: the package holds one
# prebuilt static binary plus shell scripts, units and text files, so a
# hundred-line script using only dpkg-deb (in every Debian) and Python's standard
# library says all it does; cargo-deb would be a new build tool on every builder
# machine for no gain, and would still need the man pages and maintainer scripts
# below. Reproducible: file times come from SOURCE_DATE_EPOCH (default: the last
# commit), owners are root, the man pages and changelog are gzip -9n.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

bin=${1:-}
if [ -z "$bin" ]; then
    bin=$(bash initramfs/build-static.sh | tail -n 1)
fi
if [ ! -x "$bin" ] || ! file "$bin" | grep -Eq 'statically linked|static-pie linked'; then
    echo "build-deb: $bin is not the static vaultguard (build it with initramfs/build-static.sh)" >&2
    exit 1
fi

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
# VAULTGUARD_DEB_VERSION_SUFFIX (e.g. "+rebuild1"): the same binary under a higher
# package version, for upgrade tests and local rebuilds; the changelog gets an
# entry for it.
suffix=${VAULTGUARD_DEB_VERSION_SUFFIX:-}
case "$suffix" in
"" | [+~.]*[0-9A-Za-z]*) ;;
*)
    echo "build-deb: VAULTGUARD_DEB_VERSION_SUFFIX=$suffix must start with + ~ or . (a Debian version suffix)" >&2
    exit 1
    ;;
esac
if [ -n "$suffix" ] && ! printf '%s\n' "$suffix" | grep -Eq '^[0-9A-Za-z.+~]+$'; then
    echo "build-deb: VAULTGUARD_DEB_VERSION_SUFFIX=$suffix: only letters, digits, . + ~ may follow" >&2
    exit 1
fi
version=$version$suffix
arch=$(dpkg --print-architecture)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
date=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)
out=${VAULTGUARD_DEB_DIR:-$repo/target/deb}
stage=$out/stage
rm -rf "$stage"
mkdir -p "$stage/DEBIAN" "$out"

inst() { # MODE SRC DEST
    install -D -m "$1" "$2" "$stage$3"
}
doc=/usr/share/doc/vaultguard

inst 0755 "$bin" /usr/bin/vaultguard
# The crypttab generator is the same binary, dispatched on its name (src/generator.rs).
mkdir -p "$stage/usr/lib/systemd/system-generators"
ln -s ../../../bin/vaultguard "$stage/usr/lib/systemd/system-generators/vaultguard-generator"
inst 0644 systemd/vaultguard-supervisor.service /usr/lib/systemd/system/vaultguard-supervisor.service
inst 0644 systemd/vaultguard-unlock.service /usr/lib/systemd/system/vaultguard-unlock.service
# The dracut module where dracut looks for it (what dracut/install.sh installs).
inst 0755 dracut/90vaultguard/module-setup.sh /usr/lib/dracut/modules.d/90vaultguard/module-setup.sh
inst 0755 dracut/90vaultguard/vaultguard-unlock.sh /usr/lib/dracut/modules.d/90vaultguard/vaultguard-unlock.sh
inst 0644 systemd/vaultguard-unlock.service /usr/lib/dracut/modules.d/90vaultguard/vaultguard-unlock.service
inst 0755 dracut/90vaultguard/vaultguard-mount.sh /usr/lib/dracut/modules.d/90vaultguard/vaultguard-mount.sh
inst 0644 dracut/90vaultguard/vaultguard-mount.service /usr/lib/dracut/modules.d/90vaultguard/vaultguard-mount.service
inst 0755 initramfs/initramfs-tools/hook /usr/share/initramfs-tools/hooks/vaultguard
inst 0755 initramfs/initramfs-tools/local-top /usr/share/initramfs-tools/scripts/local-top/vaultguard
inst 0755 initramfs/initramfs-tools/local-bottom /usr/share/initramfs-tools/scripts/local-bottom/vaultguard
inst 0644 completions/vaultguard.bash /usr/share/bash-completion/completions/vaultguard
inst 0644 completions/_vaultguard /usr/share/zsh/vendor-completions/_vaultguard
inst 0644 completions/vaultguard.fish /usr/share/fish/vendor_completions.d/vaultguard.fish
inst 0644 packaging/config.json "$doc/examples/config.json"
inst 0644 README.md "$doc/README.md"
inst 0644 packaging/copyright "$doc/copyright"
inst 0644 packaging/lintian-overrides /usr/share/lintian/overrides/vaultguard

python3 doc/render-man.py doc/manpages.txt "$out/man" "$date" "$version" >/dev/null
for page in "$out"/man/*.[0-9]; do
    sec=${page##*.}
    install -D -m 0644 "$page" "$stage/usr/share/man/man$sec/$(basename "$page")"
    gzip -9n "$stage/usr/share/man/man$sec/$(basename "$page")"
done
install -D -m 0644 packaging/changelog "$stage$doc/changelog.gz.tmp"
if [ -n "$suffix" ]; then
    {
        printf 'vaultguard (%s) unstable; urgency=medium\n\n  * Rebuild of %s.\n\n' "$version" "${version%"$suffix"}"
        printf ' -- vaultguard developers <vaultguard@localhost.invalid>  %s\n\n' "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
        cat packaging/changelog
    } >"$stage$doc/changelog.gz.tmp"
fi
gzip -9nc "$stage$doc/changelog.gz.tmp" >"$stage$doc/changelog.gz"
rm "$stage$doc/changelog.gz.tmp"

for s in postinst prerm postrm; do
    install -m 0755 "packaging/$s" "$stage/DEBIAN/$s"
done
installed_size=$(du -sk --apparent-size --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@INSTALLED_SIZE@/$installed_size/" \
    packaging/control >"$stage/DEBIAN/control"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
    xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/md5sums"
find "$stage" -depth -newermt "@$SOURCE_DATE_EPOCH" -exec touch --no-dereference -d "@$SOURCE_DATE_EPOCH" {} +

deb=$out/vaultguard_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >&2
echo "$deb"
