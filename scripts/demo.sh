#!/usr/bin/env bash
# The whole story on a simulated ESP32, with the real agent in the real micropython binary:
# 1.0.0 -> 2.0.0 (installed, rebooted, confirmed); 3.0.0 (unhealthy) installed, fails its health
# check, rolls back to 2.0.0 by itself, says why, and is not downloaded again. Then a fleet: three
# more devices report to a local `mpota fleet serve`, which shows what happened to each. Last, a
# phased rollout: 4.0.0 (unhealthy) goes to the first 25 % of six devices that trust a rollout
# key; they roll back, the fleet server halts the rollout by itself, and nobody else installs it.
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

step "10. A fleet: a fleet server (holding a rollout key: it decides who installs when), and three more devices that report to it"
show mpota keygen keys/rollout
fport=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
echo "$ mpota fleet serve --db fleet.sqlite --port $fport --rollout-key keys/rollout --rollout-interval 1 --quiet &"
mpota fleet serve --db fleet.sqlite --port "$fport" --rollout-key keys/rollout --rollout-interval 1 --quiet > fleet-serve.log 2>&1 &
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

step "13. A phased rollout: 4.0.0 (it fails its health check) in a release of its own, served"
show mpota sim firmware fw-4.0.0.bin --version 4.0.0 --behavior unhealthy
show mpota release fw-4.0.0.bin --key keys/release --out release-4/
port4=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
echo "$ mpota serve release-4/ --host 127.0.0.1 --port $port4 &"
mpota serve release-4/ --host 127.0.0.1 --port "$port4" --quiet &
server4=$!
trap 'kill $server $fleet $server4 2>/dev/null || true' EXIT
# Where a device stands in a rollout is SHA-256(device id + release) (docs/rollout.md): the demo
# names its six devices so that two of them fall in the first stage (25 %), as a quarter of a
# larger fleet would.
plant=$(python3 - <<'PY'
import hashlib
from mpota import rolloutdoc
rel = hashlib.sha256(open("release-4/manifest.json", "rb").read()).hexdigest()
ids = [f"plant-{i:02d}" for i in range(100)]
first = [d for d in ids if rolloutdoc.in_share(rolloutdoc.bucket(d, rel), 2500)][:2]
rest = [d for d in ids if d not in first and not rolloutdoc.in_share(rolloutdoc.bucket(d, rel), 2500)][:4]
print(" ".join(sorted(first + rest)))
PY
)
for d in $plant; do
  show mpota sim create "$d" --pub keys/release.pub --rollout-pub keys/rollout.pub --server "http://127.0.0.1:$port4" \
    --firmware fw-2.0.0.bin --fleet "http://127.0.0.1:$fport" --fleet-token-file fleet.sqlite.token --force
done
show mpota fleet rollout start release-4/ --stages 25,100 --min-devices 2 --max-failure-rate 0.01 --silent-after 1h \
  --id r-4.0.0 --server "http://127.0.0.1:$fport" --token-file fleet.sqlite.token
for d in $plant; do
  mpota rollout show release-4/ --pub keys/rollout.pub --device "$d" | tail -1
done

step "14. The devices check: the first stage installs 4.0.0, fails its health check and rolls back; the rest wait"
for d in $plant; do
  echo "$ mpota sim run $d"
  mpota sim run "$d" | grep -E "^\[boot|^    \| ota: (installed|refused|skipped|rolled back|release|held|health|.*not-in-rollout)|^sim: .* (idle|at the REPL|hung) after" || true
done

step "15. The fleet server halts the rollout by itself: rollout.json re-signed with halted, share 0"
python3 - "http://127.0.0.1:$fport" <<'PY'
import sys, time
from pathlib import Path
from mpota.fleet.client import Admin
admin = Admin(sys.argv[1], Path("fleet.sqlite.token").read_text().strip())
for _ in range(60):  # the server evaluates every second
    if admin.rollout("r-4.0.0")["rollout"]["state"] == "halted":
        break
    time.sleep(0.5)
PY
show mpota fleet rollout status r-4.0.0 --server "http://127.0.0.1:$fport" --token-file fleet.sqlite.token --limit 6
show mpota rollout show release-4/ --pub keys/rollout.pub

step "16. They check again: the halted rollout holds every device back; none outside the first stage installed 4.0.0"
for d in $plant; do mpota sim run "$d" > /dev/null || true; done
halted=0; took=0
for d in $plant; do
  st=$(mpota sim status "$d" | python3 -c "import json,sys; s=json.load(sys.stdin); print(s['version'], s['last_error'])")
  echo "$d: $st"
  case "$st" in
    "2.0.0 rollout-halted") halted=$((halted + 1)) ;;
    "2.0.0 health-failed"|"2.0.0 rejected") took=$((took + 1)) ;;
    *) echo "demo: FAILED: $d is at $st" >&2; exit 1 ;;
  esac
done
state=$(mpota fleet rollout status r-4.0.0 --server "http://127.0.0.1:$fport" --token-file fleet.sqlite.token --json | python3 -c "import json,sys; print(json.load(sys.stdin)['rollout']['state'])")
if [ "$state" != halted ] || [ "$took" != 2 ] || [ "$halted" != 4 ]; then
  echo "demo: FAILED: rollout $state, $took devices tried 4.0.0 (expected 2), $halted held by the halt (expected 4)" >&2; exit 1
fi
echo "check: the rollout halted itself; 2 devices tried 4.0.0 and rolled back, 4 were held back"

printf '\n%sdemo: OK%s — 1.0.0 -> 2.0.0 confirmed; 3.0.0 rejected by its health check and rolled back; the fleet saw it;\n' "$bold" "$plain"
echo "          a phased rollout of a bad 4.0.0 halted itself in its first stage."
echo "demo: its files are in $work/: keys/, fw-*.bin, release/, release-4/ (with rollout.json), fleet.sqlite and the simulated devices devices/"
echo "demo: to go on by hand, put mpota on your PATH and look around:"
echo "    export PATH=$here/.venv/bin:\$PATH"
echo "    cd $work && mpota sim list && mpota inspect release/ --pub keys/release.pub"
echo "demo: the fleet's dashboard: mpota fleet serve --db fleet.sqlite --port $fport, then open http://127.0.0.1:$fport/"
echo "      (sign in with the token in fleet.sqlite.token)"
