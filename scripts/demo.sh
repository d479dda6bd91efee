#!/usr/bin/env bash
# A throwaway world of namespaces, a few sandboxes with different policies, and a table of what each may reach.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m netns_fixtures.demo "$@"
