#!/usr/bin/env python3
"""Render doc/manpages.txt (the one source of vaultguard's manual pages) to roff.

Usage: doc/render-man.py SOURCE OUTDIR [DATE]  ->  OUTDIR/vaultguard.8, ...
The markup is described at the top of the source. Standard library only, so the
package build needs no document tool."""
import os
import re
import sys


def inline(text):
    """Escape roff specials, then turn **bold** and *italic* into font changes."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"\*\*(.+?)\*\*", r"\\fB\1\\fR", text)
    text = re.sub(r"\*(.+?)\*", r"\\fI\1\\fR", text)
    return text


def line(text):
    out = inline(text)
    # A line starting with . or ' would be a roff request.
    return "\\&" + out if out[:1] in (".", "'") else out


def render(src, date, version):
    pages, cur = {}, None
    in_example = False
    for raw in src.splitlines():
        if raw.startswith("#"):
            continue
        m = re.match(r"^=== (\S+) (\d) (.+)$", raw)
        if m:
            name, sec, desc = m.groups()
            cur = pages.setdefault(f"{name}.{sec}", [])
            title = inline(name.upper())
            cur += [f'.TH {title} {sec} "{date}" "vaultguard {version}"',
                    ".SH NAME", f"{inline(name)} \\- {inline(desc)}"]
            continue
        if cur is None:
            if raw.strip():
                raise SystemExit(f"render-man: text before the first page: {raw!r}")
            continue
        if raw.startswith("    "):
            if not in_example:
                cur += [".PP", ".RS 4", ".nf"]
                in_example = True
            cur.append(line(raw[4:]))
            continue
        if in_example:
            cur += [".fi", ".RE"]
            in_example = False
        if raw.startswith("== "):
            cur.append(f".SH {raw[3:].strip()}")
        elif raw.startswith(": "):
            cur += [".TP", line(raw[2:])]
        elif not raw.strip():
            if cur[-1] not in (".PP",) and not cur[-1].startswith((".SH", ".TP")):
                cur.append(".PP")
        else:
            cur.append(line(raw))
    if in_example and cur is not None:
        cur += [".fi", ".RE"]
    for v in pages.values():
        while v and v[-1] == ".PP":
            v.pop()
    return {k: "\n".join(v) + "\n" for k, v in pages.items()}


def main(argv):
    if len(argv) < 3:
        raise SystemExit("usage: render-man.py SOURCE OUTDIR [DATE] [VERSION]")
    src, outdir = argv[1], argv[2]
    date = argv[3] if len(argv) > 3 else "2026-11-25"
    version = argv[4] if len(argv) > 4 else "0.1.0"
    with open(src) as f:
        pages = render(f.read(), date, version)
    os.makedirs(outdir, exist_ok=True)
    for name, text in pages.items():
        with open(os.path.join(outdir, name), "w") as f:
            f.write(text)
        print(os.path.join(outdir, name))


if __name__ == "__main__":
    main(sys.argv)
