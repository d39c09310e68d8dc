#!/usr/bin/env bash
# The benchmark command: sets up .venv on first use, then runs `blip2-triton bench --perf-analyzer`
# (which creates .venv-perf for perf_analyzer on first use) and writes benchmarks/results/.
# Extra arguments go to the bench, e.g. `bash scripts/bench.sh --model tiny-opt --quick --output /tmp/b`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/venv.sh")"
cd "$root"
exec "$venv/bin/blip2-triton" bench --perf-analyzer "$@"
