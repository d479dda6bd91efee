#!/usr/bin/env bash
# The whole test suite: lint, unit tests (no root needed) and real-kernel integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check egressd netns_fixtures tests bench
.venv/bin/ruff format --check egressd netns_fixtures tests bench
exec .venv/bin/python -m pytest -q "$@"
