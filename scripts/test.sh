#!/usr/bin/env bash
# Install what the tests need, lint, type-check, and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --test
ruff check src tests benchmarks dashboards
mypy
lint-imports --no-cache
python3 -m ferry statecharts render --check
python3 -m pytest -q -p no:cacheprovider "$@"
# The deterministic simulator: a few hundred seeds, every fault (a minute or less on 2 cores).
python3 -m ferry.sim --seeds 300 --jobs 2
