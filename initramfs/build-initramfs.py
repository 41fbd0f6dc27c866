#!/usr/bin/env python3
"""Build a minimal initramfs (newc cpio, gzip or plain) for vaultguard's boot path.

Contents:
  - busybox-static at /usr/bin/busybox with a link per applet;
  - the static vaultguard binary at /usr/bin/vaultguard (checked static);
  - the kernel modules for virtio-blk + dm-crypt + ext4 of the installed Debian
    kernel, with their dependencies (modprobe --show-depends) and the modules.*
    indexes (depmod on the image), listed in /etc/modules for /init to load;
  - the given /init script, /etc/initrd-release, /dev/console and /dev/null;
  - busybox udhcpc's hook /usr/share/udhcpc/default.script (UDHCPC_SCRIPT): a guest
    with a NIC (its driver in --module, e.g. virtio_net) brings its network up with
    `udhcpc -i eth0`, as an initramfs-tools or dracut initrd would before unlocking
    a volume bound to a Tang server;
  - optionally extra files (--add SRC:DST), extra dynamically linked programs with
    the shared libraries ldd names (--add-dynamic PROG[:DST]) and libraries loaded
    at run time with dlopen (--add-lib NAME|PATH|GLOB), then an ld.so.cache.

The layout is merged-/usr (bin, sbin, lib, lib64 are links into /usr), so a program
finds /sbin/modprobe, /lib/x86_64-linux-gnu/... and /usr/lib/... alike.

--static-only makes the build fail if any file in the image is a dynamically linked
program or a shared object (ELF with PT_INTERP, DT_NEEDED or DT_SONAME), which proves
that vaultguard runs with no shared library around.

Usage:
    initramfs/build-initramfs.py --init INIT --out OUT [--vaultguard BIN]
        [--add SRC:DST]... [--add-dynamic PROG[:DST]]... [--add-lib LIB]...
        [--module NAME]... [--no-default-modules] [--kernel-release KVER]
        [--static-only] [--compress gzip|none] [--keep-root DIR] [--list]

Python 3.11 standard library only; host tools used: busybox (static), modprobe,
depmod, ldd, ldconfig.
"""

import argparse
import fnmatch
import glob
import gzip
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile

# What the boot path needs from the kernel: virtio disks on PCI, dm-crypt with the
# LUKS2 default cipher (aes-xts-plain64: aes is built in, xts and ecb are modules),
# ext4 (and the crc32c it asks the crypto API for) on the opened vault.
DEFAULT_MODULES = ["virtio_pci", "virtio_blk", "dm_mod", "dm_crypt", "xts", "ecb",
                   "crc32c_generic", "ext4"]

# busybox udhcpc runs this with $1 = deconfig | bound | renew | leasefail | nak and the
# lease in the environment ($ip, $mask as a prefix length, $router). It configures
# the address and the default route only: the guests resolve no names (a Tang URL
# in a test names its server by address), so no resolv.conf.
UDHCPC_SCRIPT = b"""#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    echo "udhcpc: $interface $ip/${mask:-24} via ${router:-no router}"
    ;;
esac
exit 0
"""

# Merged /usr: these top-level directories are links into /usr.
MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}

# Directories every image gets.
SKELETON = ["dev", "proc", "sys", "run", "tmp", "mnt", "root", "etc", "var/log",
            "usr/bin", "usr/sbin", "usr/lib", "usr/lib64"]

# Character devices the kernel needs before devtmpfs is mounted (init's console).
DEVICES = [("dev/console", 0o600, 5, 1), ("dev/null", 0o666, 1, 3)]

MULTIARCH_DIRS = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"]


class BuildError(Exception):
    pass


def _run(cmd, **kw):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw).stdout
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} not found (run qemu-tests/setup-host.sh)") from None
    except subprocess.CalledProcessError as e:
        raise BuildError(f"{' '.join(cmd)} failed ({e.returncode}): {e.stderr.strip()}") from None


def _version_key(v):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", v)]


def kernel_release():
    """The kernel the images are built for: $VG_KERNEL_RELEASE, else the newest
    release that has both /boot/vmlinuz-R and /lib/modules/R."""
    env = os.environ.get("VG_KERNEL_RELEASE")
    if env:
        return env
    rels = [f[len("vmlinuz-"):] for f in os.listdir("/boot") if f.startswith("vmlinuz-")]
    rels = [r for r in rels if os.path.isdir(f"/lib/modules/{r}")]
    if not rels:
        raise BuildError("no kernel with modules in /boot and /lib/modules "
                         "(install linux-image-amd64: qemu-tests/setup-host.sh)")
    return max(rels, key=_version_key)


def kernel_image(kver=None):
    return f"/boot/vmlinuz-{kver or kernel_release()}"


# --- ELF inspection ---------------------------------------------------------

PT_DYNAMIC, PT_INTERP, PT_LOAD = 2, 3, 1
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME = 0, 1, 5, 14


def elf_linkage(path):
    """None if `path` is not an ELF executable or shared object (or is a kernel
    module); else a dict: interp (PT_INTERP path or None), needed (DT_NEEDED names),
    soname (DT_SONAME or None). A static-pie has PT_DYNAMIC for its own relocations
    but none of the three."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        return None
    if data[4] != 2 or data[5] != 1:  # not ELF64 little-endian: count it as dynamic
        return {"interp": "(unsupported ELF class)", "needed": [], "soname": None}
    e_type, = struct.unpack_from("<H", data, 0x10)
    if e_type not in (2, 3):  # ET_EXEC, ET_DYN; skip ET_REL (.ko) and cores
        return None
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    interp, dyn, loads = None, None, []
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, off)
        if p_type == PT_INTERP:
            interp = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode(errors="replace")
        elif p_type == PT_DYNAMIC:
            dyn = (p_offset, p_filesz)
        elif p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
    needed_off, soname_off, strtab = [], None, None
    if dyn:
        for j in range(dyn[0], dyn[0] + dyn[1] - 15, 16):
            tag, val = struct.unpack_from("<qQ", data, j)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed_off.append(val)
            elif tag == DT_SONAME:
                soname_off = val
            elif tag == DT_STRTAB:
                strtab = val

    def string(off):
        if strtab is None:
            return f"<str@{off}>"
        for vaddr, foff, size in loads:
            if vaddr <= strtab < vaddr + size:
                start = foff + (strtab - vaddr) + off
                return data[start:data.index(b"\0", start)].decode(errors="replace")
        return f"<str@{off}>"

    return {"interp": interp, "needed": [string(o) for o in needed_off],
            "soname": string(soname_off) if soname_off is not None else None}


def is_dynamic(info):
    return bool(info and (info["interp"] or info["needed"] or info["soname"]))


# --- the image --------------------------------------------------------------

class Initramfs:
    """An image being assembled in a staging directory on disk."""

    def __init__(self, kver=None, root=None):
        self.kver = kver or kernel_release()
        self._tmp = None
        if root:
            if os.path.exists(root):
                shutil.rmtree(root)
            os.makedirs(root)
            self.root = root
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="vg-initramfs-")
            self.root = self._tmp.name
        for d in SKELETON:
            os.makedirs(self._host(d), exist_ok=True)
        for link, target in MERGED.items():
            os.symlink(target, os.path.join(self.root, link))
        self.modules = []      # load order for /etc/modules
        self.has_dynamic = False

    def cleanup(self):
        if self._tmp:
            self._tmp.cleanup()

    # Paths: image paths are absolute ("/usr/bin/x"); /bin, /sbin, /lib, /lib64
    # are rewritten to their /usr homes so no write goes through a link.
    @staticmethod
    def norm(path):
        p = os.path.normpath("/" + path.lstrip("/")).lstrip("/")
        top, _, rest = p.partition("/")
        if top in MERGED:
            p = MERGED[top] + ("/" + rest if rest else "")
        return p

    def _host(self, path):
        return os.path.join(self.root, self.norm(path))

    def exists(self, path):
        return os.path.lexists(self._host(path))

    def _prepare(self, path):
        h = self._host(path)
        os.makedirs(os.path.dirname(h), exist_ok=True)
        if os.path.islink(h) or os.path.isfile(h):
            os.unlink(h)  # e.g. a busybox applet link replaced by the real program
        return h

    def add_file(self, dst, src=None, data=None, mode=None):
        """Copy host file `src` (following links) or write `data` to `dst`."""
        h = self._prepare(dst)
        if src is not None:
            if not os.path.isfile(src):
                raise BuildError(f"{src}: no such file")
            shutil.copyfile(src, h)
            os.chmod(h, mode if mode is not None else stat.S_IMODE(os.stat(src).st_mode))
        else:
            if isinstance(data, str):
                data = data.encode()
            with open(h, "wb") as f:
                f.write(data)
            os.chmod(h, mode if mode is not None else 0o644)

    def add_symlink(self, path, target):
        os.symlink(target, self._prepare(path))

    def add_tree(self, src, dst):
        """Copy a host directory tree (files and symlinks as they are) to dst."""
        if not os.path.isdir(src):
            raise BuildError(f"{src}: not a directory")
        h = self._host(dst)
        os.makedirs(os.path.dirname(h), exist_ok=True)
        shutil.copytree(src, h, symlinks=True, dirs_exist_ok=True)

    def add_busybox(self, busybox="/bin/busybox"):
        info = elf_linkage(busybox) if os.path.exists(busybox) else None
        if info is None or is_dynamic(info):
            raise BuildError(f"{busybox} is missing or not static (install busybox-static)")
        self.add_file("/usr/bin/busybox", src=busybox, mode=0o755)
        for applet in _run([busybox, "--list-full"]).split():
            if os.path.basename(applet) == "busybox":
                continue
            if not self.exists("/" + applet):
                self.add_symlink("/" + applet, "/usr/bin/busybox")

    def add_vaultguard(self, binary):
        info = elf_linkage(binary) if os.path.exists(binary) else None
        if info is None:
            raise BuildError(f"{binary}: not an ELF program (build it: initramfs/build-static.sh)")
        if is_dynamic(info):
            raise BuildError(f"{binary} is dynamically linked ({_why(info)}); "
                             "build the static one: initramfs/build-static.sh")
        self.add_file("/usr/bin/vaultguard", src=binary, mode=0o755)

    def add_modules(self, names):
        """The modules and their dependencies, the modules.* indexes (depmod on the
        image) and /etc/modules listing `names` in order."""
        kdir = f"/lib/modules/{self.kver}"
        if not os.path.isdir(kdir):
            raise BuildError(f"{kdir} missing: no modules for kernel {self.kver}")
        for name in names:
            out = _run(["modprobe", "-S", self.kver, "--show-depends", name])
            for line in out.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "insmod":
                    ko = parts[1]
                    if not ko.startswith(kdir + "/"):
                        raise BuildError(f"module {name}: unexpected path {ko}")
                    if not self.exists(ko):
                        self.add_file(ko, src=ko, mode=0o644)
            self.modules.append(name)
        for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            if os.path.exists(f"{kdir}/{f}"):
                self.add_file(f"{kdir}/{f}", src=f"{kdir}/{f}", mode=0o644)
        _run(["depmod", "-b", self.root, self.kver])
        self.add_file("/etc/modules", data="".join(m + "\n" for m in self.modules))

    def _ldd(self, path):
        """Absolute library paths ldd reports for `path` (program or library)."""
        try:
            out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        except FileNotFoundError:
            raise BuildError("ldd not found (libc-bin)") from None
        libs = []
        for line in out.splitlines():
            line = line.strip()
            if "not found" in line:
                raise BuildError(f"{path}: ldd: {line}")
            m = re.match(r"\S+ => (/\S+)", line) or re.match(r"(/\S+) \(0x", line)
            if m:
                libs.append(m.group(1))
        return libs

    def _add_library_file(self, path):
        """Copy a library, keeping the host's symlink chain (libfoo.so.1 ->
        libfoo.so.1.2.3) so each library is in the image once."""
        if self.exists(path):
            return
        if os.path.islink(path):
            target = os.readlink(path)
            self.add_symlink(path, target)
            self._add_library_file(os.path.normpath(os.path.join(os.path.dirname(path), target)))
        else:
            self.add_file(path, src=path, mode=0o755)

    def add_dynamic(self, prog, dst=None):
        """A dynamically linked program with every shared library ldd names."""
        if not os.path.isfile(prog):
            found = shutil.which(prog)
            if not found:
                raise BuildError(f"{prog}: no such program")
            prog = found
        if dst is None and os.path.islink(prog):
            # e.g. /usr/bin/tpm2_pcrread -> tpm2: keep the link, carry the target once
            target = os.readlink(prog)
            if not self.exists(prog) or os.path.islink(self._host(prog)):
                self.add_symlink(prog, target)
            self.add_dynamic(os.path.normpath(os.path.join(os.path.dirname(prog), target)))
            return
        self.add_file(dst or prog, src=prog, mode=0o755)
        for lib in self._ldd(prog):
            self._add_library_file(lib)
        self.has_dynamic = True

    def add_library(self, spec):
        """A library loaded at run time (dlopen), with its own dependencies. `spec`:
        a path, a glob (/usr/lib/x86_64-linux-gnu/libtss2-tcti-*.so.0) or a soname
        (libtss2-esys.so.0) looked up in the host's ld.so.cache."""
        if spec.startswith("/"):
            paths = sorted(glob.glob(spec))
        else:
            cache = _run(["ldconfig", "-p"])
            paths = sorted({m.group(2) for m in re.finditer(r"^\s*(\S+) \(libc6,x86-64[^)]*\) => (\S+)$",
                                                            cache, re.M)
                            if fnmatch.fnmatch(m.group(1), spec)})
        if not paths:
            raise BuildError(f"library {spec}: not found on the host")
        for p in paths:
            self._add_library_file(p)
            for lib in self._ldd(p):
                self._add_library_file(lib)
        self.has_dynamic = True

    def finish(self, init, static_only=False, release_name="vaultguard test initramfs"):
        """Write /init (a host path, or the script as bytes) and the release file; with dynamic content an ld.so.cache;
        then the static-only check."""
        if isinstance(init, (bytes, bytearray)):
            self.add_file("/init", data=bytes(init), mode=0o755)
        else:
            self.add_file("/init", src=init, mode=0o755)
        # systemd and vaultguard recognise an initramfs by this file.
        self.add_file("/etc/initrd-release", data=f'NAME="{release_name}"\nID=vaultguard-initrd\n')
        if self.has_dynamic:
            self.add_file("/etc/ld.so.conf", data="".join(d + "\n" for d in MULTIARCH_DIRS))
            _run(["ldconfig", "-r", self.root])
        if static_only:
            bad = self.dynamic_files()
            if bad:
                raise BuildError("--static-only, but the image holds dynamically linked files:\n  "
                                 + "\n  ".join(f"{p}: {why}" for p, why in bad))

    def dynamic_files(self):
        """[(image path, reason)] for every dynamically linked program or shared
        object in the image."""
        bad = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                h = os.path.join(dirpath, name)
                if os.path.islink(h) or not os.path.isfile(h):
                    continue
                rel = "/" + os.path.relpath(h, self.root)
                info = elf_linkage(h)
                if is_dynamic(info):
                    bad.append((rel, _why(info)))
                elif info is None and re.search(r"\.so(\.\d+)*$", name):
                    bad.append((rel, "named like a shared library"))
        return sorted(bad)

    def listing(self):
        rows = []
        for dirpath, dirs, files in os.walk(self.root):
            dirs.sort()
            for name in sorted(files):
                h = os.path.join(dirpath, name)
                rel = "/" + os.path.relpath(h, self.root)
                if os.path.islink(h):
                    rows.append(f"{rel} -> {os.readlink(h)}")
                else:
                    rows.append(f"{rel} {os.path.getsize(h)}")
        return rows

    def write(self, out, compress="gzip"):
        """Write the newc archive (owner root, mtime 0, so builds are reproducible)."""
        tmp = out + ".tmp"
        raw = open(tmp, "wb")
        sink = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) if compress == "gzip" else raw
        ino = 1
        entries = []
        for dirpath, dirs, files in os.walk(self.root):
            dirs.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in sorted(dirs + files):
                entries.append(os.path.normpath(os.path.join(rel_dir, name)))
        for path in sorted(entries):
            h = os.path.join(self.root, path)
            st = os.lstat(h)
            if stat.S_ISLNK(st.st_mode):
                data = os.readlink(h).encode()
                mode = stat.S_IFLNK | 0o777
            elif stat.S_ISDIR(st.st_mode):
                data, mode = b"", stat.S_IFDIR | stat.S_IMODE(st.st_mode)
            else:
                with open(h, "rb") as f:
                    data = f.read()
                mode = stat.S_IFREG | stat.S_IMODE(st.st_mode)
            _cpio_entry(sink, ino, mode, path, data)
            ino += 1
        for path, perm, major, minor in DEVICES:
            _cpio_entry(sink, ino, stat.S_IFCHR | perm, path, b"", rdev=(major, minor))
            ino += 1
        _cpio_entry(sink, ino, 0, "TRAILER!!!", b"")
        if sink is not raw:
            sink.close()
        raw.close()
        os.replace(tmp, out)
        return os.path.getsize(out)


def _why(info):
    parts = []
    if info["interp"]:
        parts.append(f"interpreter {info['interp']}")
    if info["needed"]:
        parts.append("needs " + ", ".join(info["needed"]))
    if info["soname"]:
        parts.append(f"shared object {info['soname']}")
    return "; ".join(parts)


def _cpio_entry(f, ino, mode, name, data, rdev=(0, 0)):
    name_b = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
    f.write(b"070701" + "".join(f"{v:08x}" for v in fields).encode() + name_b)
    f.write(b"\0" * (-(110 + len(name_b)) % 4))
    f.write(data)
    f.write(b"\0" * (-len(data) % 4))


def build(out, init, vaultguard=None, adds=(), dynamic=(), libs=(), trees=(),
          modules=DEFAULT_MODULES, static_only=False, compress="gzip", kver=None,
          keep_root=None, listing=None):
    """Build the image at `out`. `init`: a path or the script as bytes. `adds`:
    [(src path or bytes content, dst)];
    `dynamic`: [prog or (prog, dst)]; `libs`: sonames, paths or globs; `trees`:
    [(src dir, dst)]. `listing`: a path to write the image's file list to.
    Returns a dict with size, kernel release and module load order."""
    img = Initramfs(kver=kver, root=keep_root)
    try:
        img.add_busybox()
        img.add_file("/usr/share/udhcpc/default.script", data=UDHCPC_SCRIPT, mode=0o755)
        if vaultguard:
            img.add_vaultguard(vaultguard)
        img.add_modules(list(modules))
        for src, dst in adds:
            if isinstance(src, (bytes, bytearray)):
                img.add_file(dst, data=bytes(src), mode=0o644)
            else:
                img.add_file(dst, src=src)
        for src, dst in trees:
            img.add_tree(src, dst)
        for prog in dynamic:
            p, d = (prog, None) if isinstance(prog, str) else prog
            img.add_dynamic(p, d)
        for lib in libs:
            img.add_library(lib)
        img.finish(init, static_only=static_only)
        size = img.write(out, compress=compress)
        if listing:
            with open(listing, "w") as f:
                f.write("\n".join(img.listing()) + "\n")
        return {"out": out, "size": size, "kernel_release": img.kver, "modules": img.modules,
                "dynamic": img.has_dynamic}
    finally:
        img.cleanup()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="the /init script")
    ap.add_argument("--out", required=True, help="the cpio archive to write")
    ap.add_argument("--vaultguard", help="the static vaultguard binary (left out if not given)")
    ap.add_argument("--add", action="append", default=[], metavar="SRC:DST")
    ap.add_argument("--add-tree", action="append", default=[], metavar="SRCDIR:DST")
    ap.add_argument("--add-dynamic", action="append", default=[], metavar="PROG[:DST]")
    ap.add_argument("--add-lib", action="append", default=[], metavar="LIB",
                    help="a soname, path or glob, for libraries loaded with dlopen")
    ap.add_argument("--module", action="append", default=[], metavar="NAME",
                    help="load this module too (with its dependencies)")
    ap.add_argument("--no-default-modules", action="store_true",
                    help=f"leave out the defaults: {' '.join(DEFAULT_MODULES)}")
    ap.add_argument("--kernel-release", help="default: newest in /boot with modules")
    ap.add_argument("--static-only", action="store_true",
                    help="fail if any file is a dynamic program or shared object")
    ap.add_argument("--compress", choices=["gzip", "none"], default="gzip")
    ap.add_argument("--keep-root", metavar="DIR", help="assemble in DIR and keep it")
    ap.add_argument("--list", action="store_true", help="print the image's files")
    a = ap.parse_args(argv)

    def split(spec, what):
        src, sep, dst = spec.partition(":")
        if not sep or not dst.startswith("/"):
            raise BuildError(f"{what} {spec}: expected SRC:/ABSOLUTE/DST")
        return src, dst

    try:
        modules = ([] if a.no_default_modules else DEFAULT_MODULES) + a.module
        listing = None
        if a.list:
            listing = a.out + ".list"
        r = build(a.out, a.init, vaultguard=a.vaultguard,
                  adds=[split(s, "--add") for s in a.add],
                  trees=[split(s, "--add-tree") for s in a.add_tree],
                  dynamic=[tuple(s.split(":", 1)) if ":" in s else s for s in a.add_dynamic],
                  libs=a.add_lib, modules=modules, static_only=a.static_only,
                  compress=a.compress, kver=a.kernel_release, keep_root=a.keep_root,
                  listing=listing)
    except BuildError as e:
        print(f"build-initramfs: {e}", file=sys.stderr)
        return 1
    if listing:
        with open(listing) as f:
            sys.stdout.write(f.read())
        os.unlink(listing)
    print(f"{r['out']}: {r['size']} bytes, kernel {r['kernel_release']}, "
          f"modules {' '.join(r['modules'])}"
          + ("" if r["dynamic"] else ", no shared library")
          + (", checked static-only" if a.static_only else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
