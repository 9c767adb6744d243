#!/usr/bin/env bash
# Runs every test: formatting check, then the whole workspace's tests
# (unit, property and end-to-end against a real redis-server they start),
# then one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
for pair in redis-server:redis-server slowhttptest:slowhttptest testssl:testssl.sh openssl:openssl; do
  command -v "${pair%%:*}" >/dev/null || {
    echo "${pair%%:*} is required by the end-to-end and attack-tool tests: apt-get install -y ${pair#*:}" >&2
    exit 1
  }
done
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all --check
else
  echo "rustfmt not installed: format check skipped" >&2
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
