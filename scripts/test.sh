#!/usr/bin/env bash
# Install what the tests need, lint, type-check, and run the whole suite,
# all with the virtual environment install-deps.sh makes (.venv, or FERRY_VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --test
venv=${FERRY_VENV:-.venv}
export PATH="$PWD/$venv/bin:$PATH"
ruff check src tests benchmarks dashboards
mypy
lint-imports --no-cache
python -m ferry statecharts render --check
python -m pytest -q -p no:cacheprovider "$@"
