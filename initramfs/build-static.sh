#!/usr/bin/env bash
# Build the statically linked release binary and check that it is static.
# Prints the path of the binary on its last line.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash initramfs/build-cdeps.sh >&2
target=x86_64-unknown-linux-gnu
# --target keeps build scripts and proc-macros dynamic; only the binary is static.
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
cargo build --release --locked --target "$target" --bin vaultguard >&2
bin="$repo/target/$target/release/vaultguard"
if ! file "$bin" | grep -Eq 'statically linked|static-pie linked'; then
    echo "build-static: $bin is not static: $(file "$bin")" >&2
    exit 1
fi
if ldd "$bin" 2>&1 | grep -q '=>'; then
    echo "build-static: $bin still needs shared libraries:" >&2
    ldd "$bin" >&2
    exit 1
fi
echo "$bin"
