#!/usr/bin/env bash
# The completions (completions/) and the manual (doc/manpages.txt) must cover every
# command and option the binary's own --help lists: a command added to src/cli.rs
# without them fails here, naming what is missing and where.
# Usage: packaging/check-docs.sh STATIC_BINARY
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:?usage: $0 VAULTGUARD_BINARY}
files=(completions/vaultguard.bash completions/_vaultguard completions/vaultguard.fish doc/manpages.txt)
missing=0

# Commands: the lines under "Commands:" in --help ("  name   description").
commands() { "$bin" "$@" --help | sed -n '/^Commands:/,$p' | sed -n 's/^  \([a-z][a-z0-9-]*\)  .*/\1/p'; }
# Options: "  --name" or "  -x, --name" under "Options:", without --help.
options() { "$bin" "$@" --help | sed -n '/^Options:/,/^$/p' | grep -oE '^  (-[a-z], )?--[a-z0-9-]+' |
    grep -oE -- '--[a-z0-9-]+$' | grep -vx -- '--help' || true; }

need() { # WORD WHAT
    local f
    for f in "${files[@]}"; do
        # In the man source a hyphen is written as is; in the zsh table, options
        # sit inside quotes; a whole-word search finds both (and "lock" is not
        # found in "unlock").
        if ! grep -qwF -- "$1" "$repo/$f"; then
            echo "check-docs: $2 is not in $f" >&2
            missing=1
        fi
    done
}

for o in $(options); do need "${o#--}" "global option $o"; done
for c in $(commands); do
    need "$c" "command $c"
    for o in $(options "$c"); do need "${o#--}" "option $o of $c"; done
    for sub in $(commands "$c"); do
        need "$sub" "command $c $sub"
        for o in $(options "$c" "$sub"); do need "${o#--}" "option $o of $c $sub"; done
    done
done
bash -n "$repo/completions/vaultguard.bash"
if ((missing)); then
    echo "check-docs: add the missing names to the completions and to doc/manpages.txt" >&2
    exit 1
fi
echo "check-docs: completions and manual cover $(commands | wc -l) commands and their options"
