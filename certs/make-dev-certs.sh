#!/usr/bin/env bash
# Development certificates in certs/dev: CA, edge (localhost, 127.0.0.1 and
# any names given as arguments) and the agent `lan-1`.
set -euo pipefail
cd "$(dirname "$0")/.."
sans=(--san localhost --san 127.0.0.1)
for name in "$@"; do sans+=(--san "$name"); done
cargo run --quiet -p relay-edge -- certs init --dir certs/dev "${sans[@]}" --agent lan-1
