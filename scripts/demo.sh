#!/usr/bin/env bash
# The whole story on a simulated ESP32, with the real agent in the real micropython binary:
# 1.0.0 -> 2.0.0 (installed, rebooted, confirmed); 3.0.0 (unhealthy) installed, fails its health
# check, rolls back to 2.0.0 by itself, says why, and is not downloaded again. Then a fleet: three
# more devices report to a local `mpota fleet serve`, which shows what happened to each.
# Run by `make demo`; everything it makes lands in ./demo/ (git-ignored).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$here/.venv/bin:$PATH"
work="${MPOTA_DEMO_DIR:-$here/demo}"
rm -rf "$work"; mkdir -p "$work"; cd "$work"

# Bold headings only on a terminal, and never with NO_COLOR set (https://no-color.org).
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then bold=$'\033[1m'; plain=$'\033[0m'; else bold=; plain=; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
show() { printf '$ %s\n' "$*"; "$@"; }
expect() {  # expect FIELD VALUE: check one field of `mpota sim status dev1`
  got=$(mpota sim status dev1 | python3 -c "import json,sys; print(json.dumps(json.load(sys.stdin)[sys.argv[1]]).strip('\"'))" "$1")
  if [ "$got" != "$2" ]; then echo "demo: FAILED: status $1 is $got, expected $2" >&2; exit 1; fi
  echo "check: status $1 = $got"
}

step "1. A release key (Ed25519)"
show mpota keygen keys/release

step "2. Three firmware images (valid ESP32 app images; 3.0.0 fails its health check)"
show mpota sim firmware fw-1.0.0.bin --version 1.0.0
show mpota sim firmware fw-2.0.0.bin --version 2.0.0
show mpota sim firmware fw-3.0.0.bin --version 3.0.0 --behavior unhealthy
show esptool --chip esp32 image-info fw-2.0.0.bin | grep -E "App version|Validation hash|Checksum"

step "3. Sign 2.0.0 into a release and verify it"
show mpota release fw-2.0.0.bin --key keys/release --out release/
show mpota verify release/ --pub keys/release.pub

step "4. Serve the release directory"
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
echo "$ mpota serve release/ --host 127.0.0.1 --port $port &"
mpota serve release/ --host 127.0.0.1 --port "$port" --quiet &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
python3 - "$port" <<'PY'
import socket, sys, time
for _ in range(100):  # wait until the server listens
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close(); break
    except OSError:
        time.sleep(0.1)
PY

step "5. A simulated ESP32 running 1.0.0, trusting our key"
show mpota sim create dev1 --pub keys/release.pub --server "http://127.0.0.1:$port" --firmware fw-1.0.0.bin --force

step "6. Boot it: it finds 2.0.0, installs, reboots, confirms"
show mpota sim run dev1
show mpota sim status dev1
expect version 2.0.0
expect last_error null

step "7. Publish 3.0.0 (it fails its health check on the device)"
show mpota release fw-3.0.0.bin --key keys/release --out release/

step "8. Boot again: 3.0.0 installs, fails its health check, the device rolls back to 2.0.0"
show mpota sim run dev1
show mpota sim status dev1
expect version 2.0.0
expect last_error health-failed

step "9. And it does not download 3.0.0 again"
show mpota sim run dev1
expect version 2.0.0

step "10. A fleet: a fleet server, and three more devices that report to it"
fport=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
echo "$ mpota fleet serve --db fleet.sqlite --port $fport --quiet &"
mpota fleet serve --db fleet.sqlite --port "$fport" --quiet > fleet-serve.log 2>&1 &
fleet=$!
trap 'kill $server $fleet 2>/dev/null || true' EXIT
python3 - "$fport" <<'PY'
import socket, sys, time
for _ in range(300):  # wait until the fleet server listens
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close(); break
    except OSError:
        time.sleep(0.1)
PY
for d in dev2 dev3 dev4; do
  show mpota sim create "$d" --pub keys/release.pub --server "http://127.0.0.1:$port" --firmware fw-1.0.0.bin \
    --fleet "http://127.0.0.1:$fport" --fleet-token-file fleet.sqlite.token --force
done

step "11. They boot: each installs 3.0.0, which fails its health check, and rolls back; each says so"
for d in dev2 dev3 dev4; do show mpota sim run "$d"; done

step "12. The fleet as the server derived it from their reports"
show mpota fleet devices --db fleet.sqlite
show mpota fleet device dev2 --db fleet.sqlite
got=$(mpota fleet devices --db fleet.sqlite --status rolled-back --json | python3 -c "import json,sys; print(json.load(sys.stdin)['count'])")
if [ "$got" != 3 ]; then echo "demo: FAILED: $got devices rolled back in the fleet's view, expected 3" >&2; exit 1; fi
echo "check: the fleet server counts 3 devices rolled back (health-failed)"

printf '\n%sdemo: OK%s — 1.0.0 -> 2.0.0 confirmed; 3.0.0 rejected by its health check and rolled back; the fleet saw it.\n' "$bold" "$plain"
echo "demo: its files are in $work/: keys/, fw-*.bin, release/, fleet.sqlite and the simulated devices devices/"
echo "demo: to go on by hand, put mpota on your PATH and look around:"
echo "    export PATH=$here/.venv/bin:\$PATH"
echo "    cd $work && mpota sim list && mpota inspect release/ --pub keys/release.pub"
echo "demo: the fleet's dashboard: mpota fleet serve --db fleet.sqlite --port $fport, then open http://127.0.0.1:$fport/"
echo "      (sign in with the token in fleet.sqlite.token)"
