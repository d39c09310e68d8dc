"""The deployment recipe (deploy/) checked against the code, so that it cannot drift: the kustomize
base renders with `kubectl kustomize` (offline), its commands parse with the project's own CLI
(the Triton pods run `blip2-triton serve`), its ports are the ones those commands open, its probe
paths answer 200 and its metric names exist on the real server, and the Dockerfiles run the same
command. Not run here: building the images (no container runtime) or applying the manifests (no
cluster)."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from blip2_triton.cli import build_parser

from .conftest import metric, random_image

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "k8s" / "base"
DOCKER = ROOT / "deploy" / "docker"


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, as `kubectl kustomize` renders the base."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/k8s/base (kubectl kustomize runs offline)"
    rendered = subprocess.run([kubectl, "kustomize", str(BASE)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(rendered.stdout) if o}


def _container(manifests, kind: str, name: str) -> dict:
    spec = manifests[(kind, name)]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return container


def _command(container) -> tuple[list[str], object]:
    """The container's command and the project's CLI's reading of it."""
    command = container["command"]
    assert command[0] == "blip2-triton", command
    return command, build_parser().parse_args(command[1:])


def _ports(container) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _dockerfile_cmd(name: str) -> list[str]:
    text = (DOCKER / name).read_text()
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.MULTILINE)
    return json.loads(cmd)


def _exposed(name: str) -> set[int]:
    text = (DOCKER / name).read_text()
    return {int(p) for line in re.findall(r"^EXPOSE (.*)$", text, re.MULTILINE) for p in line.split()}


def test_the_triton_pods_run_serve_on_the_ports_they_declare(manifests):
    triton = _container(manifests, "Deployment", "blip2-triton")
    command, args = _command(triton)
    assert args.command == "serve" and args.address == "0.0.0.0"
    assert _ports(triton) == {"grpc": args.grpc_port, "http": args.http_port, "metrics": args.metrics_port}
    service = manifests[("Service", "blip2-triton")]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(_ports(triton))
    pod = manifests[("Deployment", "blip2-triton")]["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.metrics_port) and annotations["prometheus.io/scrape"] == "true"
    # the image runs the same command by default
    assert _dockerfile_cmd("Dockerfile.cpu") == command
    assert {args.grpc_port, args.http_port, args.metrics_port} <= _exposed("Dockerfile.cpu")


def test_the_export_job_writes_the_repository_the_replicas_serve(manifests):
    job = manifests[("Job", "blip2-export")]["spec"]["template"]["spec"]
    _, export = _command(job["containers"][0])
    _, serve = _command(_container(manifests, "Deployment", "blip2-triton"))
    assert export.command == "export" and export.output == serve.model_repository
    # the embedded model's path inside the image is where the package keeps it
    assert export.model.endswith("site-packages/blip2_triton/assets/blip2-tiny-scenes")
    from blip2_triton.toy.embedded import TRAINED_MODEL

    assert TRAINED_MODEL.parts[-3:] == ("blip2_triton", "assets", "blip2-tiny-scenes")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in job["volumes"]}
    triton = manifests[("Deployment", "blip2-triton")]["spec"]["template"]["spec"]
    assert claims <= {v["persistentVolumeClaim"]["claimName"] for v in triton["volumes"] if "persistentVolumeClaim" in v}
    assert ("PersistentVolumeClaim", next(iter(claims))) in manifests


def test_the_front_door_points_at_the_triton_service(manifests):
    from blip2_triton.frontend.app import create_app

    door = _container(manifests, "Deployment", "blip2-openai")
    _, args = _command(door)
    assert args.command == "openai" and args.host == "0.0.0.0" and _ports(door) == {"http": args.port}
    (url,) = args.triton_urls
    host, port = url.rsplit(":", 1)
    grpc = {p["name"]: p["port"] for p in manifests[("Service", host)]["spec"]["ports"]}["grpc"]
    assert int(port) == grpc
    paths = {route.path for route in create_app(url).routes}
    for probe in ("readinessProbe", "livenessProbe"):
        assert door[probe]["httpGet"]["path"] in paths and door[probe]["httpGet"]["port"] == "http"


def test_the_gpu_image_serves_the_same_ports():
    cmd = _dockerfile_cmd("Dockerfile.gpu")
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    serve = build_parser().parse_args(["serve", "--model-repository", "x"])  # its default ports
    assert cmd[0] == "tritonserver" and flags["--model-repository"] == "/models/repo"
    assert (int(flags["--grpc-port"]), int(flags["--http-port"]), int(flags["--metrics-port"])) == (
        serve.grpc_port, serve.http_port, serve.metrics_port)
    assert {serve.grpc_port, serve.http_port, serve.metrics_port} <= _exposed("Dockerfile.gpu")


@pytest.mark.server
def test_probe_paths_and_metric_names_exist_on_the_real_server(manifests, served, client):
    triton = _container(manifests, "Deployment", "blip2-triton")
    server = served.server
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = triton[probe]["httpGet"]
        assert get["port"] == "http"
        with urllib.request.urlopen(f"http://{server.http_url}{get['path']}", timeout=10) as r:
            assert r.status == 200, (probe, get["path"])
    path = manifests[("Deployment", "blip2-triton")]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    assert server.metrics_url.endswith(path)
    hpa = manifests[("HorizontalPodAutoscaler", "blip2-triton")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "blip2-triton"
    client.caption(random_image(1), max_new_tokens=2)  # every metric family has a sample
    for m in hpa["metrics"]:
        name = m["pods"]["metric"]["name"]
        assert not math.isnan(metric(server, name)), f"{name} is not on the server's metrics endpoint"
