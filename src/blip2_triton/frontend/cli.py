"""`blip2-triton openai`: run the OpenAI-compatible front door in front of Triton replicas."""
from __future__ import annotations

import argparse

from blip2_triton.api import PIPELINE
from blip2_triton.client.aio import DEFAULT_URL

DEFAULT_PORT = 9000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--triton-url", dest="triton_urls", action="append", metavar="URL",
                   help=f"gRPC address host:port of a Triton server (default {DEFAULT_URL}); repeat it for replicas")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default %(default)s)")
    p.add_argument("--served-model-name", default=PIPELINE,
                   help="the model name clients send in 'model' (default %(default)s)")
    p.add_argument("--triton-model", default=PIPELINE, help="the Triton model to run (default %(default)s)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (refused by default: the front door would fetch any URL it is sent)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per completion (default %(default)g)")
    p.add_argument("--image-affinity", action="store_true",
                   help="with replicas: send the turns of a chat on one image to the same replica while it is no "
                        "busier than the others, so its image cache answers them (default: ties in turn)")


def command(args) -> int:
    from .app import serve

    serve(args.triton_urls or [DEFAULT_URL], host=args.host, port=args.port, served_model=args.served_model_name,
          triton_model=args.triton_model, allow_remote_images=args.allow_remote_images, timeout=args.timeout,
          image_affinity=args.image_affinity)
    return 0
