#!/usr/bin/env bash
# Creates (once) and prints the project's virtual environment: .venv, with the package installed
# in editable mode and the test/bench extras. Re-runs pip only when pyproject.toml or setup.py change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BLIP2_TRITON_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
fi
stamp="$venv/.blip2-triton-installed"
want="$(cat "$root/pyproject.toml" "$root/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing blip2-triton and its dependencies into $venv" >&2
  "$venv/bin/python" -m pip install -q -e "$root[test,bench]" >&2
  echo "$want" > "$stamp"
fi
echo "$venv"
