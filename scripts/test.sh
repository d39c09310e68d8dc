#!/usr/bin/env bash
# The test command: sets up .venv on first use, then runs the whole suite (real tritonserver included).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/venv.sh")"
cd "$root"
exec "$venv/bin/python" -m pytest -ra "$@"
