#!/usr/bin/env bash
# Runs every test: formatting check, then the whole workspace's tests
# (unit, property and end-to-end against a real redis-server they start),
# then one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || {
  echo "redis-server is required by the end-to-end tests: apt-get install -y redis-server" >&2
  exit 1
}
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all --check
else
  echo "rustfmt not installed: format check skipped" >&2
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
