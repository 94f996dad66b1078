#!/usr/bin/env bash
# Install what the tests need, lint, type-check, run the whole suite, then fuzz
# each parser briefly, all with the virtual environment install-deps.sh makes
# (.venv, or FERRY_VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --test
venv=${FERRY_VENV:-.venv}
export PATH="$PWD/$venv/bin:$PATH"
ruff check src tests benchmarks dashboards fuzz
mypy
lint-imports --no-cache
python -m ferry statecharts render --check
python -m pytest -q -p no:cacheprovider "$@"
# 30 s a target, two at a time: about 90 s for the five (see fuzz/fuzzing.py).
scripts/fuzz.sh all 30
