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

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

python3 - "$work/source.img" "$work/dest.img" <<'PY'
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
    python3 -m ferry "$mode" --addr 127.0.0.1 --port 0 --file "$work/$name.img" --name demo \
        --sock "$work/$name.sock" --trace "$work/$name.trace" > /dev/null 2> "$work/$name.log" &
    pids+=($!)
    python3 -m ferry status --sock "$work/$name.sock" --wait 30 > /dev/null
    port=$(sed -n 's/.* on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/$name.log" | head -1)
}
start serve source
source_port=$port
start listen dest
dest_port=$port
echo "== source: ferry serve on nbd://127.0.0.1:$source_port/demo"
echo "== destination: ferry listen on nbd://127.0.0.1:$dest_port/demo"
python3 -m ferry status --sock "$work/dest.sock"

echo "== a libnbd client writes to the source while it moves"
/usr/bin/python3 tests/workload.py "nbd://127.0.0.1:$source_port/demo" 0 1 65536 "$work/stop" \
    > "$work/client.json" &
client=$!

python3 -m ferry mirror --addr 127.0.0.1 --port "$dest_port" --sock "$work/source.sock" \
    --action nothing --wait
touch "$work/stop"
wait "$client"
writes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["writes"])' "$work/client.json")
echo "== the client made $writes writes during the migration"

echo "== the destination now serves the image on the same port"
python3 -m ferry status --sock "$work/dest.sock"
nbdinfo "nbd://127.0.0.1:$dest_port/demo" | grep -E 'export-size|is_read_only'
if cmp -s "$work/source.img" "$work/dest.img"; then
    echo "== byte for byte identical: $(sha256sum < "$work/dest.img" | cut -c1-16)…"
else
    echo "== MISMATCH"; exit 1
fi
echo "== source status (it handed the image off)"
python3 -m ferry status --sock "$work/source.sock"
for pid in "${pids[@]}"; do kill -TERM "$pid"; done
for pid in "${pids[@]}"; do wait "$pid"; done
pids=()
python3 -m ferry trace replay "$work/source.trace"
python3 -m ferry trace replay "$work/dest.trace"
echo "== ferry stopped cleanly"
