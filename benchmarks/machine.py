"""Machine facts and measured capabilities: memory read bandwidth and matmul rate, from which
flops.py makes the floors (a batch-1 decode step reads every weight it multiplies and its cached
keys and values once, so it cannot be faster than those bytes at the read bandwidth, nor than its
FLOPs at the matmul rate); the machine's other users' share of the CPU.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .records import DecodeRound, SideBySide, WeightBytes

PACKAGES = ("torch", "transformers", "onnxruntime", "numpy", "tritonclient", "nvidia-pytriton", "tokenizers",
            "Pillow", "matplotlib", "psutil", "grpcio", "protobuf")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git(root: Path, *args: str) -> str:
    """A git command's output in `root`; "" when git is missing, fails or hangs."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state(root: Path) -> dict:
    """Commit of the tree being measured, and how many files differed from it; the previous run's
    results in benchmarks/results/, which this run replaces, do not count."""
    return {"commit": git(root, "rev-parse", "HEAD") or None,
            "dirty_files": len(git(root, "status", "--porcelain", "--", ".", ":!benchmarks/results").splitlines())}


def facts(threads: int, root: Path) -> dict:
    """Everything about the run that is not a measurement: machine, threads, versions, commit, date."""
    import psutil

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(root),
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "packages": package_versions(),
        "threads": {
            "torch.set_num_threads": threads,
            "onnxruntime intra_op (in-process)": threads,
            # bench_model starts tritonserver with THREADS_ENV = threads, read by every served session
            "onnxruntime intra_op (server: every model)": threads,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
    }


@dataclass
class Capabilities:
    read_gbps_numpy_1thread: float  # numpy sum over a large float32 array (numpy sums on one thread)
    read_gbps_torch: float  # torch sum over the same array, with the benchmark's thread count
    matmul_gflops_torch: float  # fp32 n x n matmul, the benchmark's thread count
    matmul_gflops_numpy: float  # fp32 n x n matmul through numpy's BLAS (its own thread count)
    # fp32 MatMul in onnxruntime (the benchmark's threads), best of n x n and a ViT-B MLP's
    # [257, 768] x [768, 3072]: onnxruntime's kernels run the graphs, and they can beat torch's
    # n x n rate on the smaller, cache-resident shape. Without it the "floor" of the vision encoder
    # came out above its measured time (benchmarks/README.md, "The floor").
    matmul_gflops_onnxruntime: float
    array_mib: int
    matmul_n: int

    @property
    def read_gbps(self) -> float:
        """The best read bandwidth seen: the floor must be a true lower bound."""
        return max(self.read_gbps_numpy_1thread, self.read_gbps_torch)

    @property
    def matmul_gflops(self) -> float:
        return max(self.matmul_gflops_torch, self.matmul_gflops_numpy, self.matmul_gflops_onnxruntime)

    def as_dict(self) -> dict:
        return asdict(self) | {"read_gbps": round(self.read_gbps, 2), "matmul_gflops": round(self.matmul_gflops, 1)}

    def best(self, other: "Capabilities") -> "Capabilities":
        """Field by field maximum: on a shared machine the least disturbed measurement is the truest."""
        return Capabilities(*(max(a, b) for a, b in zip(asdict(self).values(), asdict(other).values())))


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread-pool start
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _read_bandwidth(array_mib: int, repeats: int) -> tuple[float, float]:
    """GB/s summing a float32 array of `array_mib` MiB: numpy (one thread), torch (its threads)."""
    import torch

    data = np.ones(array_mib * 2**20 // 4, np.float32)
    tensor = torch.from_numpy(data)
    numpy_read = data.nbytes / _best_seconds(lambda: float(data.sum()), repeats) / 1e9
    torch_read = data.nbytes / _best_seconds(lambda: float(tensor.sum()), repeats) / 1e9
    return numpy_read, torch_read


class BandwidthProbe:
    """The read bandwidth of this moment, for a ratio measured side by side: the machine's memory
    bandwidth moves with other users' traffic within one run (README: "The floor"), so a
    floor probed minutes apart from the step it bounds can be off by more than the target's margin."""

    def __init__(self, array_mib: int):
        import torch

        self.data = torch.ones(array_mib * 2**20 // 4)

    def read_gbps(self, repeats: int = 2) -> float:
        return self.data.numel() * 4 / _best_seconds(lambda: float(self.data.sum()), repeats) / 1e9


def side_by_side(bytes_read: int, rounds: list[DecodeRound], rows: int = 1) -> SideBySide:
    """Median over rounds of (decode step / bandwidth floor of the same round) at `rows` rows, the
    step reading `bytes_read` bytes."""
    import statistics

    ratios = [r.step_ms[rows] / (bytes_read / (r.read_gbps * 1e9) * 1e3) for r in rounds]
    return SideBySide(rounds=len(rounds), ratio_median=round(statistics.median(ratios), 3),
                      ratio_min=round(min(ratios), 3), ratio_max=round(max(ratios), 3),
                      step_ms_median=round(statistics.median(r.step_ms[rows] for r in rounds), 3),
                      read_gbps_min=min(r.read_gbps for r in rounds), read_gbps_max=max(r.read_gbps for r in rounds))


def _onnxruntime_gflops(threads: int, shapes: list[tuple[int, int, int]], repeats: int) -> float:
    """Best fp32 GFLOP/s of one MatMul [m, k] x [k, n] (weights as an initializer) in onnxruntime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    rng = np.random.default_rng(0)
    best = 0.0
    for m, k, n in shapes:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
            [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = {"a": rng.standard_normal((m, k), dtype=np.float32)}
        best = max(best, 2 * m * k * n / _best_seconds(lambda: session.run(None, feed), repeats) / 1e9)
    return best


def measure(threads: int, array_mib: int = 512, matmul_n: int = 2048, repeats: int = 8) -> Capabilities:
    """Memory read bandwidth and fp32 matmul rate (best of `repeats`: the least disturbed run)."""
    import torch

    torch.set_num_threads(threads)
    numpy_read, torch_read = _read_bandwidth(array_mib, repeats)
    flops = 2 * matmul_n**3
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    torch_gflops = flops / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9
    an, bn = a.numpy(), b.numpy()
    numpy_gflops = flops / _best_seconds(lambda: an @ bn, repeats) / 1e9
    ort_gflops = _onnxruntime_gflops(threads, [(matmul_n, matmul_n, matmul_n), (257, 768, 3072)], repeats)
    return Capabilities(round(numpy_read, 2), round(torch_read, 2), round(torch_gflops, 1), round(numpy_gflops, 1),
                        round(ort_gflops, 1), array_mib, matmul_n)


def decoder_weights(onnx_path: Path) -> WeightBytes:
    """Bytes and parameters of the decoder graph's weights, and the part one decode step reads
    (see weights_read)."""
    import onnx

    return WeightBytes(**weights_read(onnx.load(str(onnx_path), load_external_data=False)))


def weights_read(model) -> dict:
    """Bytes and parameters of a graph's weights (an onnx ModelProto), and the part one run reads.

    A run reads every initializer in full except lookup tables (token and position embeddings,
    only consumed by Gather), of which it reads a few rows. The decoder's tied LM head is a
    separate transposed copy in the exported graph, consumed by a MatMul, so it counts. Rank-2
    weights feeding MatMul/Gemm do 2 FLOPs per parameter per row.
    """
    import collections

    import onnx

    consumers: dict[str, set[str]] = collections.defaultdict(set)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].add(node.op_type)
    total = read = matmul_params = 0
    for init in model.graph.initializer:
        count = int(np.prod(init.dims)) if init.dims else 1
        size = count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        total += size
        ops = consumers.get(init.name, set())
        if ops and ops <= {"Gather"}:
            continue
        read += size
        if len(init.dims) == 2 and ops & {"MatMul", "Gemm"}:
            matmul_params += count
    return {"weight_bytes": total, "bytes_read_per_step": read, "matmul_params": matmul_params}


class CpuMeter:
    """Splits the machine's busy CPU time over an interval into ours and other users'.

    Ours is this process and all its descendants (workers, tritonserver and its stubs); busy
    includes steal time (the hypervisor running someone else on our cores). On a shared machine,
    `others_cores` says how much of the 2 (or N) cores other users' processes took while one
    request ran, so each request can be judged quiet or disturbed after the fact.
    """

    def __init__(self):
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()

    def _ours(self) -> dict[int, float]:
        times = {}
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                times[proc.pid] = t.user + t.system
            except self._psutil.Error:
                continue
        return times

    def snapshot(self) -> tuple[float, float, dict[int, float]]:
        t = self._psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
        return time.perf_counter(), busy, self._ours()

    def others_cores(self, before, after) -> float:
        """Average number of cores other users' processes kept busy between two snapshots."""
        (t0, busy0, _), (t1, busy1, _) = before, after
        return round(max(0.0, (busy1 - busy0) / max(t1 - t0, 1e-9) - self.our_cores(before, after)), 3)

    @staticmethod
    def our_cores(before, after) -> float:
        """Average number of cores this process tree (the bench, its workers, the server) kept busy."""
        (t0, _, ours0), (t1, _, ours1) = before, after
        return round(sum(v - ours0.get(pid, 0.0) for pid, v in ours1.items()) / max(t1 - t0, 1e-9), 3)
