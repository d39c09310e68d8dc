#!/usr/bin/env bash
# perf_analyzer, the Triton client's load generator, from its own virtual environment.
#
#   benchmarks/perf_analyzer.sh -m blip2 -u 127.0.0.1:8001 -i grpc --streaming --input-data data.json ...
#
# tritonclient==2.51.0 is the last manylinux wheel that ships the binary; it pins numpy<2 and
# protobuf<5, so it lives in .venv-perf (git-ignored), not in .venv. The binary links
# libb64.so.0d and libcudart.so.12, which nvidia-pytriton (in .venv) ships under hashed names in
# nvidia_pytriton.libs; they are linked under their plain names into .venv-perf/libs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
perf_venv="${BLIP2_PERF_VENV:-$root/.venv-perf}"
main_venv="${BLIP2_TRITON_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x "$perf_venv/bin/perf_analyzer" ]; then
  echo "[perf_analyzer] creating $perf_venv with tritonclient==2.51.0" >&2
  "$python" -m venv "$perf_venv"
  "$perf_venv/bin/python" -m pip install -q "tritonclient==2.51.0" >&2
fi
libs="$perf_venv/libs"
if [ ! -e "$libs/libb64.so.0d" ] || [ ! -e "$libs/libcudart.so.12" ]; then
  shipped="$("$main_venv/bin/python" -c "from blip2_triton.server.discovery import find_installation; print(find_installation().libs_dir)" 2>/dev/null || true)"
  if [ -z "$shipped" ] || [ ! -d "$shipped" ]; then
    echo "[perf_analyzer] nvidia_pytriton.libs not found from $main_venv (install the project first)" >&2
    exit 3
  fi
  mkdir -p "$libs"
  for pair in "libb64-*.so.0d:libb64.so.0d" "libcudart-*.so.12*:libcudart.so.12"; do
    pattern="${pair%%:*}"; name="${pair##*:}"
    match="$(compgen -G "$shipped/$pattern" | head -n1 || true)"
    if [ -z "$match" ]; then
      echo "[perf_analyzer] $shipped has no $pattern" >&2
      exit 3
    fi
    ln -sf "$match" "$libs/$name"
  done
fi
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$perf_venv/bin/perf_analyzer" "$@"
