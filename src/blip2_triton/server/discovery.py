"""Find the Triton Inference Server shipped in the `nvidia-pytriton` wheel and prepare what it needs.

The wheel lays out (inside site-packages):

    pytriton/tritonserver/bin/tritonserver
    pytriton/tritonserver/backends/python/{libtriton_python.so, triton_python_backend_utils.py}
    pytriton/tritonserver/python_backend_stubs/<3.x>/triton_python_backend_stub
    nvidia_pytriton.libs/            # shared libraries (libtritonserver, libcudart, libb64, ...)

The Python backend looks for `triton_python_backend_stub` next to `libtriton_python.so`, so a
backend directory is assembled with the stub that matches the running interpreter.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB_NAME = "triton_python_backend_stub"


class TritonNotFoundError(RuntimeError):
    """The `nvidia-pytriton` installation lacks a file the server needs."""


@dataclasses.dataclass(frozen=True)
class TritonInstallation:
    """Paths of one installed tritonserver, its Python backend and the stub for one Python version."""

    server_binary: Path
    libs_dir: Path
    python_backend_dir: Path
    stub: Path
    python_version: str

    def backend_files(self) -> dict[str, Path]:
        """File name in `<backends>/python/` -> installed source file."""
        files = {name: self.python_backend_dir / name for name in PYTHON_BACKEND_FILES}
        files[STUB_NAME] = self.stub
        return files


def _site_root_of_pytriton() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFoundError(
            "the `pytriton` package is not importable from "
            f"{sys.executable}; install it with `pip install nvidia-pytriton==0.7.0`"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def find_installation(python_version: str | None = None) -> TritonInstallation:
    """Locate tritonserver, the Python backend and the stub for `python_version` (default: this one).

    Raises TritonNotFoundError naming every missing file.
    """
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    site = _site_root_of_pytriton()
    root = site / "pytriton" / "tritonserver"
    inst = TritonInstallation(
        server_binary=root / "bin" / "tritonserver",
        libs_dir=site / "nvidia_pytriton.libs",
        python_backend_dir=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / STUB_NAME,
        python_version=version,
    )
    missing = [str(p) for p in (inst.server_binary, inst.libs_dir, *inst.backend_files().values()) if not p.exists()]
    if missing:
        stubs_dir = root / "python_backend_stubs"
        available = sorted(p.name for p in stubs_dir.iterdir()) if stubs_dir.is_dir() else []
        raise TritonNotFoundError(
            "incomplete nvidia-pytriton installation under "
            f"{site}; missing: {', '.join(missing)} (stubs available for Python: {available or 'none'})"
        )
    return inst


def prepare_backend_directory(inst: TritonInstallation, backends_dir: str | os.PathLike) -> Path:
    """Write `<backends_dir>/python/` with the backend library, its utils and the matching stub.

    The files are copied, not linked: the backend chmods the stub, and a copy cannot be broken by
    a later change of the installation while a server runs. Returns `backends_dir`.
    """
    backends = Path(backends_dir)
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, src in inst.backend_files().items():
        shutil.copy2(src, python_dir / name)
    (python_dir / STUB_NAME).chmod(0o755)
    return backends


def python_libdir() -> Path:
    """Directory of the running interpreter's libpython (sysconfig LIBDIR)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir:
        raise TritonNotFoundError("sysconfig has no LIBDIR for this interpreter; cannot locate libpython")
    return Path(libdir)


def _prepend(value: str, existing: str | None) -> str:
    return value + (os.pathsep + existing if existing else "")


def server_environment(inst: TritonInstallation, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver and the Python-backend stubs it forks (`base`: default os.environ).

    - LD_LIBRARY_PATH starts with nvidia_pytriton.libs (the copied binaries lose their $ORIGIN
      RPATH) and this interpreter's LIBDIR; without the latter the stub loads the system
      libpython of the same minor version (Debian's 3.11.2) instead of this interpreter's.
    - PATH starts with the directory of sys.executable: the stub embeds Python without a program
      name, so CPython searches PATH for `python3`, finds the venv's, reads its pyvenv.cfg and
      thereby gets sys.prefix = the venv and the venv's site-packages, .pth files included (so
      editable installs such as blip2_triton import). No PYTHONPATH is needed for that.
    """
    bindir = Path(sys.executable).parent
    if not (bindir / "python3").exists():
        raise TritonNotFoundError(
            f"{bindir} has no `python3`; the Python-backend stub finds its site-packages through "
            "the first `python3` on PATH, so run from a venv (or an interpreter whose bin dir has python3)"
        )
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = _prepend(
        os.pathsep.join([str(inst.libs_dir), str(python_libdir())]), env.get("LD_LIBRARY_PATH")
    )
    env["PATH"] = _prepend(str(bindir), env.get("PATH", os.defpath))
    return env
