#!/usr/bin/env bash
# One command for a complete local relay: dev certificates, the edge (with
# its embedded store: nothing but Rust needed), an agent and a sample
# receiver, then a webhook sent through all of it.
#
#   ./scripts/quickstart.sh                 # run, show a webhook going through, keep running (Ctrl-C stops all)
#   ./scripts/quickstart.sh --once          # same, then stop everything and exit
#   ./scripts/quickstart.sh --redis [--once]  # the same on a local redis-server (installed with apt-get if missing)
#
# Ports (override with env): INGEST_PORT=8080 TUNNEL_PORT=8443 ADMIN_PORT=9090
# RECEIVER_PORT=3000 REDIS_PORT=6390. Everything lives in .local/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ONCE=0; REDIS=0
for arg in "$@"; do
  case $arg in
    --once) ONCE=1 ;;
    --redis) REDIS=1 ;;
    *) echo "unknown option $arg (use --once, --redis)" >&2; exit 2 ;;
  esac
done
INGEST_PORT=${INGEST_PORT:-8080} TUNNEL_PORT=${TUNNEL_PORT:-8443} ADMIN_PORT=${ADMIN_PORT:-9090}
RECEIVER_PORT=${RECEIVER_PORT:-3000} REDIS_PORT=${REDIS_PORT:-6390}
DIR=$ROOT/.local/quickstart
mkdir -p "$DIR"
say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if [[ $REDIS -eq 1 ]] && ! command -v redis-server >/dev/null; then
  say "redis-server is missing: installing Debian/Ubuntu package redis-server with apt-get"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq && { $SUDO apt-get install -y -qq redis-server || $SUDO apt-get install -y -qq redis-server; }
fi
command -v curl >/dev/null || { echo "curl is needed to send the demo webhook" >&2; exit 1; }

say "building relay-edge, relay-agent and the sample receiver (cargo build)"
cargo build --quiet --bins --example sample-receiver
BIN=$ROOT/target/debug

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

if [[ $REDIS -eq 1 ]]; then
  say "starting redis-server on 127.0.0.1:$REDIS_PORT (AOF on, data in $DIR/redis)"
  mkdir -p "$DIR/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DIR/redis" --appendonly yes \
    --save "" --loglevel warning >"$DIR/redis.log" 2>&1 &
  PIDS+=($!)
  STORE="redis_url = \"redis://127.0.0.1:$REDIS_PORT/0\""
else
  STORE="path = \"$DIR/data/relay.redb\""
fi

say "making dev certificates in $DIR/certs (CA kept across runs)"
"$BIN/relay-edge" certs init --dir "$DIR/certs" --agent lan-1 >/dev/null

cat >"$DIR/edge.toml" <<TOML
[ingest]
listen = "127.0.0.1:$INGEST_PORT"
[tunnel]
listen = "127.0.0.1:$TUNNEL_PORT"
cert = "$DIR/certs/edge.pem"
key = "$DIR/certs/edge-key.pem"
client_ca = "$DIR/certs/ca.pem"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
token_file = "$DIR/admin.token"
[store]
$STORE
[[route]]
name = "meta"
channels = ["crm"]
api_keys = ["k_live_quickstart"]
verify_token = "meta-verify"
[[agent]]
name = "lan-1"
channels = ["crm"]
TOML
cat >"$DIR/agent.toml" <<TOML
edge = "wss://127.0.0.1:$TUNNEL_PORT"
cert = "$DIR/certs/lan-1.pem"
key = "$DIR/certs/lan-1-key.pem"
ca = "$DIR/certs/ca.pem"
status_socket = "$DIR/agent.sock"
[[target]]
channel = "crm"
url = "http://127.0.0.1:$RECEIVER_PORT/webhook"
TOML

say "starting the sample receiver on 127.0.0.1:$RECEIVER_PORT (log: $DIR/receiver.log)"
"$BIN/examples/sample-receiver" "127.0.0.1:$RECEIVER_PORT" >"$DIR/receiver.log" 2>&1 &
PIDS+=($!)
say "starting relay-edge (ingest :$INGEST_PORT, tunnel :$TUNNEL_PORT, admin :$ADMIN_PORT; log: $DIR/edge.log)"
say "store: $STORE"
"$BIN/relay-edge" --config "$DIR/edge.toml" >"$DIR/edge.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$ADMIN_PORT/ready" >/dev/null 2>&1 && break; sleep 0.1; done
say "starting relay-agent lan-1 (log: $DIR/agent.log)"
"$BIN/relay-agent" --config "$DIR/agent.toml" >"$DIR/agent.log" 2>&1 &
PIDS+=($!)

for _ in $(seq 1 100); do
  "$BIN/relay-agent" status --socket "$DIR/agent.sock" >/dev/null 2>&1 && break
  sleep 0.1
done
say "relay-agent status"
"$BIN/relay-agent" status --socket "$DIR/agent.sock" || { echo "agent did not connect; see $DIR/*.log" >&2; exit 1; }

say "POST http://127.0.0.1:$INGEST_PORT/hooks/meta (a WhatsApp-style callback)"
curl -sS -X POST "http://127.0.0.1:$INGEST_PORT/hooks/meta" \
  -H 'X-API-Key: k_live_quickstart' -H 'Content-Type: application/json' \
  --data-binary '{"object":"whatsapp_business_account","entry":[{"id":"123","changes":[{"field":"messages","value":{"messages":[{"from":"15550001","text":{"body":"caf\u00e9"}}]}}]}]}'
echo
for _ in $(seq 1 50); do grep -q "received" "$DIR/receiver.log" && break; sleep 0.1; done
say "the sample receiver got:"
grep "received" "$DIR/receiver.log" || { echo "nothing arrived; see $DIR/*.log" >&2; exit 1; }

if [[ $ONCE -eq 1 ]]; then
  say "done (--once): stopping everything"
  exit 0
fi
say "running. Try:  curl -X POST 'http://127.0.0.1:$INGEST_PORT/hooks/meta/k_live_quickstart' -d '{\"hello\":1}'"
say "health:        curl http://127.0.0.1:$ADMIN_PORT/health ;  status: $BIN/relay-agent status --socket $DIR/agent.sock"
say "dead letters:  $BIN/relay-edge --config $DIR/edge.toml dlq list --channel crm   (token: $DIR/admin.token)"
say "Ctrl-C stops everything. Following the receiver log:"
tail -n 0 -f "$DIR/receiver.log" &
PIDS+=($!)
wait
