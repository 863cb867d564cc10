#!/usr/bin/env bash
# The whole story on a simulated ESP32, with the real agent in the real micropython binary:
# 1.0.0 -> 2.0.0 (installed, rebooted, confirmed); 3.0.0 (unhealthy) installed, fails its health
# check, rolls back to 2.0.0 by itself, says why, and is not downloaded again.
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

printf '\n%sdemo: OK%s — 1.0.0 -> 2.0.0 confirmed; 3.0.0 rejected by its health check and rolled back.\n' "$bold" "$plain"
echo "demo: its files are in $work/: keys/, fw-*.bin, release/ and the simulated device devices/dev1/"
echo "demo: to go on by hand, put mpota on your PATH and look around:"
echo "    export PATH=$here/.venv/bin:\$PATH"
echo "    cd $work && mpota sim list && mpota inspect release/ --pub keys/release.pub"
