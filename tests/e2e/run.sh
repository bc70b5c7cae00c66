#!/usr/bin/env bash
# End-to-end tests of the browser client (web/, served at /app/) in headless Chromium.
#
#   tests/e2e/run.sh            (from any directory)
#
# Starts a private redis-server on a free port (never the shared one on 6379; nothing is
# flushed), two chatgate replicas with auth on (HS256, a secret generated for this run)
# and two with auth off, all on free ports and sharing that Redis, then runs the Node
# suites (auth.test.mjs, dev.test.mjs) against them. Screenshots and logs go to
# target/e2e/. Everything started here is stopped by PID when the script exits.
#
# Needs: node and npm, cargo, redis-server; installs chromium with apt-get (as root) when
# /usr/bin/chromium is missing. The whole run is bounded by E2E_TIMEOUT seconds (default
# 1500, which covers a first chromium install and a cold debug build); the browser suites
# alone by E2E_TEST_TIMEOUT (default 240).

set -euo pipefail

if [[ -z ${E2E_RUN_BOUNDED:-} ]]; then
  export E2E_RUN_BOUNDED=1
  exec timeout --kill-after=20 "${E2E_TIMEOUT:-1500}" bash "$0" "$@"
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ARTIFACTS=$ROOT/target/e2e
LOGS=$ARTIFACTS/logs
BIN=$ROOT/target/debug/chatgate
STARTED=$(date +%s)

say() { printf 'e2e: %s\n' "$*" >&2; }

PIDS=()
cleanup() {
  local status=$?
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    # chatgate drains for up to server.shutdown_grace_secs (2 s in the test environment).
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  say "finished in $(($(date +%s) - STARTED)) s (exit $status); logs and screenshots in $ARTIFACTS"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });'
}

# ------------------------------------------------------------------ tools and build

if [[ ! -x /usr/bin/chromium ]]; then
  say "installing chromium with apt-get"
  if [[ $(id -u) -ne 0 ]]; then
    say "/usr/bin/chromium is missing and this is not root: install the chromium package"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  timeout 900 apt-get install -y chromium \
    || { timeout 300 apt-get update && timeout 900 apt-get install -y chromium; }
fi

for tool in node npm cargo redis-server redis-cli curl; do
  command -v "$tool" >/dev/null || { say "$tool is required"; exit 1; }
done

rm -rf "$LOGS"
mkdir -p "$LOGS"
say "npm ci"
(cd "$HERE" && timeout 300 npm ci --no-audit --no-fund --loglevel=error)
say "cargo build --locked --bin chatgate"
(cd "$ROOT" && timeout 1200 cargo build --locked --bin chatgate)

# ------------------------------------------------------------------ redis and replicas

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$ARTIFACTS" --logfile "$LOGS/redis.log" &
PIDS+=("$!")
for _ in $(seq 1 100); do
  [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && break
  sleep 0.1
done
[[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] || { say "redis did not start"; exit 1; }

# A fresh 48-character HMAC secret for this run.
SECRET=$(head -c 36 /dev/urandom | base64 | tr '+/' '-_')

# start_replica NAME PORT [VAR=VALUE...]
start_replica() {
  local name=$1 port=$2
  shift 2
  (
    cd "$ROOT"
    exec env REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" CHATGATE_STORE__BACKEND=redis \
      CHATGATE_ADMIN__HOST=127.0.0.1 CHATGATE_ADMIN__PORT=0 "$@" \
      "$BIN" --environment test --config-dir "$ROOT/config" --host 127.0.0.1 --port "$port"
  ) >"$LOGS/$name.log" 2>&1 &
  PIDS+=("$!")
  READY_PIDS[$name]=$!
}

# wait_ready NAME URL: polls /readyz (bounded); prints the log tail if the replica died.
wait_ready() {
  local name=$1 url=$2
  for _ in $(seq 1 200); do
    if curl -fsS --max-time 1 "$url/readyz" >/dev/null 2>&1; then
      return 0
    fi
    if ! kill -0 "${READY_PIDS[$name]}" 2>/dev/null; then
      say "$name exited before it was ready:"
      tail -n 20 "$LOGS/$name.log" >&2
      return 1
    fi
    sleep 0.1
  done
  say "$name was not ready within 20 s:"
  tail -n 20 "$LOGS/$name.log" >&2
  return 1
}

declare -A READY_PIDS
AUTH_ENV=(CHATGATE_AUTH__ENABLED=true CHATGATE_AUTH__ALGORITHMS=HS256 "CHATGATE_AUTH__HMAC_SECRET=$SECRET")
# The dev replicas use their own key prefix, so the two pairs do not share channels.
DEV_ENV=(CHATGATE_AUTH__ENABLED=false CHATGATE_REDIS__KEY_PREFIX=e2edev.)

AUTH_A_PORT=$(free_port)
AUTH_B_PORT=$(free_port)
DEV_A_PORT=$(free_port)
DEV_B_PORT=$(free_port)
start_replica auth-a "$AUTH_A_PORT" "${AUTH_ENV[@]}"
start_replica auth-b "$AUTH_B_PORT" "${AUTH_ENV[@]}"
start_replica dev-a "$DEV_A_PORT" "${DEV_ENV[@]}"
start_replica dev-b "$DEV_B_PORT" "${DEV_ENV[@]}"

SUITES=()
if wait_ready auth-a "http://127.0.0.1:$AUTH_A_PORT" && wait_ready auth-b "http://127.0.0.1:$AUTH_B_PORT"; then
  SUITES+=(auth.test.mjs)
else
  AUTH_FAILED=1
fi
if wait_ready dev-a "http://127.0.0.1:$DEV_A_PORT" && wait_ready dev-b "http://127.0.0.1:$DEV_B_PORT"; then
  SUITES+=(dev.test.mjs)
else
  DEV_FAILED=1
fi
say "replicas ready after $(($(date +%s) - STARTED)) s; running ${SUITES[*]:-no suite}"

# ------------------------------------------------------------------ the browser suites

status=0
if ((${#SUITES[@]})); then
  TESTS_STARTED=$(date +%s)
  (
    cd "$HERE"
    export E2E_ARTIFACTS=$ARTIFACTS E2E_SECRET=$SECRET
    export E2E_AUTH_A=http://127.0.0.1:$AUTH_A_PORT E2E_AUTH_B=http://127.0.0.1:$AUTH_B_PORT
    export E2E_DEV_A=http://127.0.0.1:$DEV_A_PORT E2E_DEV_B=http://127.0.0.1:$DEV_B_PORT
    timeout --kill-after=10 "${E2E_TEST_TIMEOUT:-240}" \
      node --test --test-concurrency=1 --test-reporter=spec "${SUITES[@]}"
  ) || status=$?
  say "browser suites took $(($(date +%s) - TESTS_STARTED)) s"
fi
if [[ -n ${AUTH_FAILED:-} ]]; then
  say "FAILED: the auth-mode replicas did not start (see $LOGS/auth-a.log)"
  status=1
fi
if [[ -n ${DEV_FAILED:-} ]]; then
  say "FAILED: the dev-mode replicas did not start (see $LOGS/dev-a.log)"
  status=1
fi
exit "$status"
