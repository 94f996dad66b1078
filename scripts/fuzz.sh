#!/usr/bin/env bash
# Coverage-guided fuzzing of ferry's parsers with atheris (libFuzzer); see fuzz/fuzzing.py.
#   scripts/fuzz.sh TARGET SECONDS   fuzz fuzz/TARGET.py for SECONDS, from fuzz/corpus/TARGET
#   scripts/fuzz.sh all SECONDS      every target for SECONDS each, two at a time
#   scripts/fuzz.sh TARGET FILE...   run these inputs once through TARGET (reproduce a crash)
#   FUZZ_OUT=DIR scripts/fuzz.sh merge {all|TARGET}
#                                    keep what a run into DIR found that reaches new code,
#                                    minimized, as fuzz/corpus/TARGET/grown-*
# Inputs that reach new code go to $FUZZ_OUT/TARGET/new (FUZZ_OUT defaults to a new
# temporary directory); the corpus in the repository is only read.  A crash leaves its
# input in $FUZZ_OUT/TARGET/ and makes the script exit 1: keep that input in
# fuzz/corpus/TARGET/ beside the fix and its regression test in tests/unit/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

mapfile -t TARGETS < <(cd fuzz && python3 -c 'import fuzzing; print(*fuzzing.TARGETS, sep="\n")')

usage() {
    local IFS="|"
    echo "usage: $0 {all|${TARGETS[*]}} SECONDS | $0 TARGET FILE... | $0 merge {all|TARGET}" >&2
    exit 2
}

fuzz_one() {
    local target=$1 seconds=$2 out="$FUZZ_OUT/$1"
    mkdir -p "$out/new"
    local status=0 start=$SECONDS
    python3 "fuzz/$target.py" -max_total_time="$seconds" -print_final_stats=1 \
        -timeout=20 -rss_limit_mb=2048 -artifact_prefix="$out/" \
        "$out/new" "fuzz/corpus/$target" >"$out/log" 2>&1 || status=$?
    local runs rate
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out/log")
    echo "$target: ${runs:-?} runs in $((SECONDS - start))s, ${rate:-?} exec/s," \
        "$(find "$out/new" -type f | wc -l) new inputs in $out/new"
    if ((status != 0)); then
        grep -A40 "Uncaught Python exception" "$out/log" >&2 || tail -40 "$out/log" >&2
        for crash in "$out"/crash-* "$out"/timeout-* "$out"/oom-*; do
            [[ -e $crash ]] && echo "$target: FOUND $crash; reproduce: $0 $target $crash" >&2
        done
        return 1
    fi
}

merge_one() {
    local target=$1 merged known name
    merged=$(mktemp -d)
    python3 "fuzz/$target.py" -merge=1 "$merged" "fuzz/corpus/$target" "$FUZZ_OUT/$target/new" \
        >"$FUZZ_OUT/$target/merge.log" 2>&1
    known=$(sha1sum "fuzz/corpus/$target"/* | cut -d' ' -f1)
    for input in "$merged"/*; do
        name=$(basename "$input")  # libFuzzer names it by the SHA-1 of its content
        grep -qx "$name" <<<"$known" || cp "$input" "fuzz/corpus/$target/grown-${name:0:16}"
    done
    rm -r "$merged"
    echo "$target: $(ls "fuzz/corpus/$target" | grep -c '^grown-') grown inputs kept"
}

(($# >= 2)) || usage
if [[ $1 == merge ]]; then
    [[ -n ${FUZZ_OUT:-} ]] || { echo "merge: set FUZZ_OUT to the run's directory" >&2; exit 2; }
    if [[ $2 == all ]]; then set -- "${TARGETS[@]}"; else set -- "$2"; fi
    for target; do merge_one "$target"; done
    exit 0
fi
target=$1
shift
if [[ $target != all && ! " ${TARGETS[*]} " =~ " $target " ]]; then
    usage
fi
if [[ $target != all && -e $1 && ! $1 =~ ^[0-9]+$ ]]; then
    exec python3 "fuzz/$target.py" "$@"
fi
seconds=$1
[[ $seconds =~ ^[0-9]+$ ]] || usage
export FUZZ_OUT=${FUZZ_OUT:-$(mktemp -d -t ferry-fuzz.XXXXXX)}
python3 -c "import atheris" 2>/dev/null || {
    echo "atheris is not installed: pip install -e '.[fuzz]' (scripts/install-deps.sh --test)" >&2
    exit 2
}

if [[ $target == all ]]; then
    # Two at a time: the 2-core machines CI and development run on.
    printf '%s\n' "${TARGETS[@]}" | xargs -P 2 -I{} "$0" {} "$seconds"
else
    fuzz_one "$target" "$seconds"
fi
