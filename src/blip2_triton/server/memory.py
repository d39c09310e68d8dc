"""Memory of a running server, process by process: tritonserver and each model's Python-backend stub.

RSS counts every page a process has resident, shared ones (libraries, memory-mapped graph weights)
once per process; PSS splits each shared page between the processes that map it, so PSS sums to
what the server really occupies. Each process is also broken down by mapping (anonymous memory,
each shared library, each memory-mapped graph file) from /proc/<pid>/smaps, which is how one sees
whether a process holds libtorch or a second copy of its weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .launcher import model_stub_pids, process_group_members

ANONYMOUS = "[anon]"  # heap, malloc'd and mmap'd buffers: onnxruntime's weights, arena and prepacked copies


@dataclass(frozen=True)
class ProcessMemory:
    """One process now, in bytes. `mappings`: PSS by mapped file ([anon] for anonymous memory), the
    largest first; `torch`: whether it maps libtorch (imported torch, directly or through transformers)."""

    rss: int
    pss: int
    uss: int  # unique: what ending this process would free
    anonymous: int  # RSS of anonymous pages (weights read into memory, arenas, Python objects)
    file: int  # RSS of file-backed pages (libraries, memory-mapped weights)
    torch: bool
    mappings: dict[str, int] = field(default_factory=dict)


def smaps_by_mapping(pid: int) -> dict[str, dict[str, int]]:
    """/proc/<pid>/smaps summed per mapped path: path -> {"rss", "pss", "anonymous"} in bytes.

    Anonymous mappings (no path, [heap], [stack]) are one entry, ANONYMOUS.
    """
    totals: dict[str, dict[str, int]] = {}
    current = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):  # a mapping's header: "start-end perms offset dev inode [path]"
            parts = line.split(None, 5)
            path = parts[5].strip() if len(parts) > 5 else ""
            name = ANONYMOUS if not path or path.startswith("[") else path
            current = totals.setdefault(name, {"rss": 0, "pss": 0, "anonymous": 0})
        elif current is not None and head in ("Rss:", "Pss:", "Anonymous:"):
            current[head[:-1].lower()] += int(line.split()[1]) * 1024
    return totals


def process_memory(pid: int, top: int = 8) -> ProcessMemory:
    """RSS, PSS and USS of `pid` (psutil's memory_full_info) and its `top` largest mappings by PSS."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    by_mapping = smaps_by_mapping(pid)
    anonymous = sum(m["anonymous"] for m in by_mapping.values())
    largest = sorted(by_mapping.items(), key=lambda kv: -kv[1]["pss"])[:top]
    return ProcessMemory(
        rss=info.rss, pss=info.pss, uss=info.uss, anonymous=anonymous, file=info.rss - anonymous,
        torch=any("libtorch" in Path(p).name for p in by_mapping),
        mappings={_short(p): m["pss"] for p, m in largest},
    )


def server_memory(pgid: int, top: int = 8) -> dict[str, ProcessMemory]:
    """Every live process of a server's process group: "tritonserver", each model's stub by model
    name, anything else by its pid. Processes that end while measured are left out."""
    stubs = {pid: model for model, pid in model_stub_pids(pgid).items()}
    found = {}
    for pid in process_group_members(pgid):
        name = stubs.get(pid) or _command_name(pid)
        try:
            found[name] = process_memory(pid, top)
        except (OSError, ProcessLookupError):
            continue
        except Exception as e:  # psutil.NoSuchProcess / AccessDenied: the process ended or is not ours
            if type(e).__module__.startswith("psutil"):
                continue
            raise
    return dict(sorted(found.items()))


def _command_name(pid: int) -> str:
    try:
        return Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()).name or f"pid {pid}"
    except OSError:
        return f"pid {pid}"


def _short(path: str) -> str:
    """A mapping's name for a table: the file name (its folder adds nothing but width)."""
    if path == ANONYMOUS:
        return path
    p = Path(path)
    return f"{p.parent.parent.name}/{p.name}" if p.suffix in (".onnx", ".data") else p.name
