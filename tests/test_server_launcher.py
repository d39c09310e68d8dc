"""Integration tests: the real tritonserver from the nvidia-pytriton wheel, no mocks."""
from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from blip2_triton.server import TritonServer, TritonStartupError, process_group_members

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]

PLUS_ONE_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "X" data_type: TYPE_INT32 dims: [ -1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_INT32 dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

# Importing numpy and blip2_triton proves the stub runs on the venv's site-packages
# (blip2_triton is an editable install, found through a .pth finder).
PLUS_ONE_MODEL = '''\
import numpy as np
import blip2_triton
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", (x + 1).astype(np.int32))]))
        return responses
'''

BROKEN_REASON = "deliberately broken model for the launcher test"
BROKEN_MODEL = f'''\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("{BROKEN_REASON}")

    def execute(self, requests):
        return []
'''


def _write_model(repo: Path, name: str, model_py: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(PLUS_ONE_CONFIG.format(name=name))
    (repo / name / "1" / "model.py").write_text(model_py)


def test_serves_python_model_over_grpc_and_metrics(tmp_path):
    repo = tmp_path / "repo"
    _write_model(repo, "plus_one", PLUS_ONE_MODEL)
    server = TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None, log_file=tmp_path / "server.log")
    with server:
        assert server.is_running()
        assert server.grpc_url.startswith("127.0.0.1:")
        pgid = server.pgid
        assert process_group_members(pgid), "tritonserver's process group should be alive"

        client = tritonclient_grpc.InferenceServerClient(server.grpc_url)
        assert client.is_model_ready("plus_one")
        x = np.array([1, 2, 41], dtype=np.int32)
        inp = tritonclient_grpc.InferInput("X", list(x.shape), "INT32")
        inp.set_data_from_numpy(x)
        result = client.infer("plus_one", [inp], outputs=[tritonclient_grpc.InferRequestedOutput("Y")])
        np.testing.assert_array_equal(result.as_numpy("Y"), x + 1)
        client.close()

        # Triton counts a request in its metrics after the response is sent, so a loaded machine
        # can answer the scrape first: poll, and require the exact count once it shows.
        success = 'nv_inference_request_success{model="plus_one",version="1"} '
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(server.metrics_url, timeout=5) as resp:
                metrics = resp.read().decode()
            counted = [line for line in metrics.splitlines() if line.startswith(success)]
            if counted and counted[0] != success + "0" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "# TYPE nv_inference_request_success counter" in metrics
        assert counted == [success + "1"], counted

    assert not server.is_running()
    assert server.poll() == 0
    assert process_group_members(pgid) == [], "stub processes leaked"
    log = (tmp_path / "server.log").read_text()
    assert "successfully unloaded 'plus_one'" in log


def test_broken_model_fails_start_with_the_server_log_reason(tmp_path):
    repo = tmp_path / "repo"
    _write_model(repo, "plus_one", PLUS_ONE_MODEL)
    _write_model(repo, "broken", BROKEN_MODEL)
    server = TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None, startup_timeout=60)
    with pytest.raises(TritonStartupError) as excinfo:
        server.start()
    message = str(excinfo.value)
    errors = message.split("--- errors in the server log ---")[1].split("--- last")[0]
    assert "failed to load 'broken'" in errors and BROKEN_REASON in errors
    assert "CudaDriverHelper" not in errors  # harmless on CPU, filtered out of the summary
    assert not server.is_running()
    assert process_group_members(server.pgid) == []


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(TritonStartupError, match="not a directory"):
        TritonServer(tmp_path / "nope", grpc_port=None, http_port=None, metrics_port=None).start()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_serve_entry_point_serves_a_caption_and_stops_cleanly(exported, tmp_path, sig):
    """The installed `blip2-triton serve` on an exported repository: the server log echoed and
    written, a banner saying where it listens, a caption served there, then SIGTERM or SIGINT
    (Ctrl-C) -> exit status 0, the models unloaded, no tritonserver or stub process left."""
    import re
    import signal
    import subprocess
    import sys

    from blip2_triton.client import Blip2Client
    from blip2_triton.server import free_ports

    from .conftest import popen_interruptible, random_image

    _, repo, _ = exported("tiny-opt")
    grpc, http, metrics = free_ports(3)
    log = tmp_path / "serve.log"
    proc = popen_interruptible(
        [str(Path(sys.executable).with_name("blip2-triton")), "serve", "--model-repository", str(repo),
         "--log-file", str(log), "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    server_pid = None
    try:
        echoed = []
        for line in proc.stdout:  # the server log (echoed) comes first, then the banner
            if line.startswith("blip2-triton serve:"):
                break
            echoed.append(line)
        assert "ready" in line, "".join(echoed) + proc.stderr.read()
        assert any("Started GRPCInferenceService" in e for e in echoed)
        server_pid = int(re.search(r"pid (\d+)", line).group(1))
        assert all(m in line for m in ("blip2", "preprocess", "qformer", "vision_encoder")), line
        where = {}
        for _ in range(3):
            name, url = proc.stdout.readline().split()
            where[name] = url
        assert where == {"gRPC": f"127.0.0.1:{grpc}", "HTTP": f"127.0.0.1:{http}",
                         "metrics": f"http://127.0.0.1:{metrics}/metrics"}
        assert process_group_members(server_pid)
        with Blip2Client(where["gRPC"], timeout=60) as client:
            assert client.caption(random_image(1), max_new_tokens=3).token_ids
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        assert f"{'Ctrl-C' if sig == 'SIGINT' else sig}, stopping tritonserver" in err
        assert process_group_members(server_pid) == [], "tritonserver or a stub outlived the serve command"
        text = log.read_text()
        # Not asserted for blip2: under load it sometimes outlives tritonserver's 10 s exit timeout
        # (its stub idle, its finalize not yet called; still being investigated), and serve then
        # says so on stderr and reaps the stub itself, which the process check above covers.
        for model in ("preprocess", "vision_encoder", "qformer"):
            assert f"successfully unloaded '{model}'" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if server_pid is not None and process_group_members(server_pid):
            os.killpg(server_pid, signal.SIGKILL)


def test_busy_port_is_refused_before_launch(tmp_path):
    import socket

    repo = tmp_path / "repo"
    _write_model(repo, "plus_one", PLUS_ONE_MODEL)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        server = TritonServer(repo, grpc_port=None, http_port=busy, metrics_port=None)
        with pytest.raises(TritonStartupError, match=f"http port {busy} already in use"):
            server.start()
        assert server.pid is None


OWNER = """\
import sys, time
from blip2_triton.server import TritonServer
server = TritonServer(sys.argv[1], grpc_port=None, http_port=None, metrics_port=None).start()
if sys.argv[2:] == ["restart"]:
    server.restart("the test restarts it")  # the watchdog now guards the new process group
print(server.pgid, server.runtime_dir, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("stopped_by", ["SIGKILL", "SIGKILL after a restart", "clean stop"])
def test_nothing_outlives_the_owner(tmp_path, stopped_by):
    """An owner that is SIGKILLed (as a CI time-out or the OOM killer would) leaves no server
    process and no runtime file behind within seconds: its watchdog stops the server's whole
    process group (the restarted server's, after a restart) and removes the runtime directory; a
    clean stop leaves nothing either."""
    import signal
    import subprocess
    import sys
    import time

    repo = tmp_path / "repo"
    _write_model(repo, "plus_one", PLUS_ONE_MODEL)
    if stopped_by == "clean stop":
        with TritonServer(repo, grpc_port=None, http_port=None, metrics_port=None) as server:
            pgid, runtime = server.pgid, server.runtime_dir
            assert process_group_members(pgid) and (runtime / "backends").is_dir()
        assert not process_group_members(pgid) and not runtime.exists()
        return
    restart = ["restart"] if "restart" in stopped_by else []
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(repo), *restart], stdout=subprocess.PIPE, text=True)
    try:
        pgid, runtime = owner.stdout.readline().split()
        pgid, runtime = int(pgid), Path(runtime)
        assert len(process_group_members(pgid)) >= 2  # tritonserver and the model's stub
        assert any(runtime.iterdir())
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 20
        while (process_group_members(pgid) or runtime.exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_group_members(pgid), "server processes outlived their owner"
        assert not runtime.exists(), "the runtime directory outlived its owner"
    finally:
        owner.kill()
