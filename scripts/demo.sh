#!/usr/bin/env bash
# The main job on embedded defaults: a live migration.
#
# Serves a demo image with ferry, starts a real NBD client (libnbd) writing
# to it, starts a second ferry listening for the image, migrates it while
# the client writes (progress on the terminal), and ends with the
# destination serving and the data verified byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ "${FERRY_SKIP_INSTALL:-}" == 1 ]] || scripts/install-deps.sh
# ferry's own Python (install-deps.sh's virtual environment); the client below
# runs under Debian's, which has the libnbd bindings.
if [[ -x "${FERRY_VENV:-.venv}/bin/python" ]]; then
    python=${FERRY_VENV:-.venv}/bin/python
else
    python=python3  # FERRY_SKIP_INSTALL with ferry installed some other way
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$python" - "$work/source.img" "$work/dest.img" <<'PY'
import random, sys
rng = random.Random(2026)
with open(sys.argv[1], "wb") as f:
    f.truncate(256 << 20)                              # 256 MiB, sparse
    for offset in range(0, 256 << 20, 16 << 20):       # 4 MiB of data every 16 MiB
        f.seek(offset)
        f.write(rng.randbytes(4 << 20))
with open(sys.argv[2], "wb") as f:
    f.truncate(256 << 20)                              # the destination starts empty
PY

port=""
start() {  # start MODE NAME: run `ferry MODE` in the background; sets $port
    local mode=$1 name=$2
    "$python" -m ferry "$mode" --addr 127.0.0.1 --port 0 --file "$work/$name.img" --name demo \
        --sock "$work/$name.sock" --trace "$work/$name.trace" > /dev/null 2> "$work/$name.log" &
    pids+=($!)
    "$python" -m ferry status --sock "$work/$name.sock" --wait 30 > /dev/null
    port=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/$name.log" | head -1)
}
start serve source
source_port=$port
start listen dest
dest_port=$port
echo "== source: ferry serve on nbd://127.0.0.1:$source_port/demo"
echo "== destination: ferry listen on nbd://127.0.0.1:$dest_port/demo"
"$python" -m ferry status --sock "$work/dest.sock"

echo "== a libnbd client writes to the source while it moves"
/usr/bin/python3 tests/workload.py "nbd://127.0.0.1:$source_port/demo" 0 1 65536 "$work/stop" \
    > "$work/client.json" &
client=$!

"$python" -m ferry mirror --addr 127.0.0.1 --port "$dest_port" --sock "$work/source.sock" \
    --action nothing --wait
touch "$work/stop"
wait "$client"
"$python" - "$work/client.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
how = "was stopped" if report["ended"] == "stopped" else f"ended with an error: {report['error']}"
print(f"== the client made {report['writes']} writes, and {how}")
PY

echo "== the destination now serves the image on the same port"
"$python" -m ferry status --sock "$work/dest.sock"
nbdinfo "nbd://127.0.0.1:$dest_port/demo" | grep -E 'export-size|is_read_only'
moved=$("$python" -m ferry status --json --sock "$work/dest.sock" |
    "$python" -c 'import json, sys; print(json.load(sys.stdin).get("connections_moved", 0))')
if [[ $moved == 1 ]]; then
    echo "== the client's connection moved with the image: the same connection, never reset"
else
    echo "== this host cannot move connections (run as root): the client was disconnected"
fi
echo "== every write the client got acknowledged is on the destination, and the rest is the source's"
if ! "$python" tests/workload.py check "$work/dest.img" "$work/client.json" "$work/source.img"; then
    echo "== MISMATCH"; exit 1
fi
echo "== source status (it handed the image off)"
"$python" -m ferry status --sock "$work/source.sock"
for pid in "${pids[@]}"; do kill -TERM "$pid"; done
for pid in "${pids[@]}"; do wait "$pid"; done
pids=()
"$python" -m ferry trace replay "$work/source.trace"
"$python" -m ferry trace replay "$work/dest.trace"
echo "== ferry stopped cleanly"
