#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy (warnings are errors), the
# docs (broken intra-doc links are errors), the fuzz targets built (not
# run), then the whole workspace's tests (unit, property, end-to-end
# against a real redis-server they start, attack tools), then one
# summary line. Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
for pair in redis-server:redis-server slowhttptest:slowhttptest testssl:testssl.sh openssl:openssl haproxy:haproxy; do
  command -v "${pair%%:*}" >/dev/null || {
    echo "${pair%%:*} is required by the end-to-end and attack-tool tests: apt-get install -y ${pair#*:}" >&2
    exit 1
  }
done
cargo fmt --version >/dev/null 2>&1 || {
  echo "rustfmt is required (the format check is part of the tests): rustup component add rustfmt" >&2
  exit 1
}
step() { echo "== $*" >&2; }
step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
step "fuzz targets build (cargo check; same dependency versions as the workspace)"
cp Cargo.lock fuzz/Cargo.lock
CARGO_TARGET_DIR=target cargo check --manifest-path fuzz/Cargo.toml --bins --quiet
step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
