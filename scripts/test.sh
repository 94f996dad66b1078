#!/usr/bin/env bash
# Install what the tests need, lint, type-check, and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --test
ruff check src tests benchmarks dashboards fuzz
mypy
python3 -m ferry statecharts render --check
python3 -m pytest -q -p no:cacheprovider "$@"
