#!/usr/bin/env bash
# The main job on embedded defaults: serve a demo image with ferry, read it
# back with a real NBD client (libnbd's nbdcopy), check it byte for byte,
# show the status line, and stop cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ "${FERRY_SKIP_INSTALL:-}" == 1 ]] || scripts/install-deps.sh

work=$(mktemp -d)
server=""
cleanup() {
    [[ -z "$server" ]] || kill "$server" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

python3 - "$work/demo.img" <<'PY'
import random, sys
rng = random.Random(2026)
with open(sys.argv[1], "wb") as f:
    f.truncate(64 << 20)                      # 64 MiB, sparse
    for offset in (0, 9 << 20, 40 << 20):     # three 1 MiB islands of data
        f.seek(offset)
        f.write(rng.randbytes(1 << 20))
PY

python3 -m ferry serve --addr 127.0.0.1 --port 0 --file "$work/demo.img" \
    --sock "$work/ctl.sock" --name demo 2> "$work/ferry.log" &
server=$!
port=""
for _ in $(seq 1 300); do
    port=$(sed -n 's/.*serving .* on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/ferry.log")
    [[ -n "$port" ]] && break
    kill -0 "$server" 2>/dev/null || { cat "$work/ferry.log"; exit 1; }
    sleep 0.1
done
[[ -n "$port" ]] || { echo "ferry did not start"; cat "$work/ferry.log"; exit 1; }

echo "== ferry serves demo.img on nbd://127.0.0.1:$port/demo"
nbdinfo "nbd://127.0.0.1:$port/demo" | sed -n '1,12p'
echo "== allocation map (holes stay holes)"
nbdinfo --map "nbd://127.0.0.1:$port/demo"
echo "== copying the export back with nbdcopy"
nbdcopy --progress "nbd://127.0.0.1:$port/demo" "$work/copy.img"
if cmp -s "$work/demo.img" "$work/copy.img"; then
    echo "== byte for byte identical: $(sha256sum < "$work/copy.img" | cut -c1-16)…"
else
    echo "== MISMATCH"; exit 1
fi
echo "== status"
python3 -m ferry status --sock "$work/ctl.sock"
kill -TERM "$server"
wait "$server"
server=""
echo "== ferry stopped cleanly"
