#!/usr/bin/env bash
# Install what the tests need, lint, type-check, run the whole suite, then fuzz each parser briefly.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --test
ruff check src tests benchmarks dashboards fuzz
mypy
python3 -m ferry statecharts render --check
python3 -m pytest -q -p no:cacheprovider "$@"
# 30 s a target, two at a time: about 90 s for the five (see fuzz/fuzzing.py).
scripts/fuzz.sh all 30
