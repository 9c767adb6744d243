#!/usr/bin/env bash
# Builds the release binaries and runs the benchmark (≈ 3 minutes after the build). Extra
# arguments go to relay-bench, e.g. --secs 10 --backlog 1000000 --agents 0.
set -euo pipefail
RATHOLE_VERSION=0.5.0
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { echo "redis-server is required: apt-get install -y redis-server" >&2; exit 1; }
cargo build --release --quiet --bins -p relay-edge -p relay-agent -p relay-bench
# The tunnel yardstick (a TCP tunnel that stores nothing), built once into
# target/: not part of the project, never committed.
tools=target/bench-tools
if [ ! -x "$tools/bin/rathole" ]; then
  echo "installing rathole $RATHOLE_VERSION (the tunnel yardstick) into $tools" >&2
  cargo install --quiet rathole --version "$RATHOLE_VERSION" --no-default-features --features server,client --root "$tools"
fi
exec target/release/relay-bench --rathole "$tools/bin/rathole" "$@"
