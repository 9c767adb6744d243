#!/usr/bin/env bash
# Builds the release binaries and runs the benchmark (≈ 3 minutes after the build). Extra
# arguments go to relay-bench, e.g. --secs 10 --backlog 1000000 --agents 0.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { echo "redis-server is required: apt-get install -y redis-server" >&2; exit 1; }
cargo build --release --quiet --bins -p relay-edge -p relay-agent -p relay-bench
exec target/release/relay-bench "$@"
