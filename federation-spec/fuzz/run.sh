#!/usr/bin/env bash
# Runs both fuzz targets for SECONDS each (default 600), keeping the corpus in fuzz/corpus/.
# Needs the nightly toolchain and `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
for target in decode handshake; do
  cargo +nightly fuzz run "$target" "fuzz/corpus/$target" -- -max_total_time="$secs" -max_len=70000
done
