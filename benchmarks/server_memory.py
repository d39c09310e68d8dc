"""Server memory per process against the weight bytes it serves: idle after load, and after requests.

    python -m blip2_triton.benchmarks.server_memory --repository artifacts/bench/base-opt/repository \
        [--requests 24] [--output benchmarks/results/server_memory.json]

Starts tritonserver on the repository (free ports), measures every process (tritonserver and each
model's stub: RSS, PSS, USS, and the largest mappings) once every model is loaded, then sends
`--requests` captions (a third one at a time, the rest at once, so the stages see batches of up to 16) and
measures again. Prints the table and writes the raw record (records.ServerMemory) as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from .records import ProcessMemoryRecord, ServerMemory

GIB = 2**30


def weight_bytes(repository: Path) -> int:
    """Bytes of every graph the repository serves (.onnx files and their external data)."""
    return sum(p.stat().st_size for p in Path(repository).glob("*/1/*") if p.suffix in (".onnx", ".data"))


def snapshot(pgid: int) -> dict[str, ProcessMemoryRecord]:
    """Every process of the server's group now, as records."""
    from blip2_triton.server.memory import server_memory

    return {name: ProcessMemoryRecord.of(m) for name, m in server_memory(pgid).items()}


def measure(repository: Path, requests: int = 24, settle: float = 2.0, log_file: Path | None = None,
            env: dict[str, str] | None = None) -> ServerMemory:
    """Start a server on `repository`, measure it idle and after `requests` captions, stop it."""
    from blip2_triton.client import AsyncBlip2Client
    from blip2_triton.server.launcher import TritonServer

    from .workloads import images

    pictures = images(max(requests, 1))
    with TritonServer(repository, grpc_port=None, http_port=None, metrics_port=None, log_file=log_file,
                      startup_timeout=600, env=env or {}) as server:
        time.sleep(settle)
        idle = snapshot(server.pgid)

        async def send():
            async with AsyncBlip2Client(server.grpc_url, timeout=600) as client:
                half = requests // 3
                for picture in pictures[:half]:
                    await client.caption(picture, max_new_tokens=30)
                await asyncio.gather(*(client.caption(p, max_new_tokens=30) for p in pictures[half:requests]))

        asyncio.run(send())
        time.sleep(settle)
        after = snapshot(server.pgid)
    return ServerMemory(weights_mib=round(weight_bytes(repository) / 2**20, 1), requests=requests,
                        idle=idle, after_requests=after)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m blip2_triton.benchmarks.server_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="an exported model repository")
    parser.add_argument("--requests", type=int, default=24, help="captions sent before the second measurement (the first third one at a time, the rest at once)")
    parser.add_argument("--output", type=Path, help="where to write the raw record as JSON")
    parser.add_argument("--log-file", type=Path, help="tritonserver's log")
    args = parser.parse_args(argv)
    result = measure(args.repository, args.requests, log_file=args.log_file)
    print(result.table())
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"raw numbers: {args.output}")


if __name__ == "__main__":
    main()
