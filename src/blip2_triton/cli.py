"""`blip2-triton`: the one command-line entry point, with subcommands."""
from __future__ import annotations

# Each subcommand imports what it needs inside its function: `blip2-triton caption` must not
# load torch, transformers or onnxruntime, and `--help` answers at once.

import argparse
import logging
import sys


def _export(args) -> int:
    from blip2_triton.export.checkpoint import ProcessorMismatchError
    from blip2_triton.export.exporter import export_checkpoint
    from blip2_triton.errors import UnsupportedModelError
    from blip2_triton.export.validate import ValidationError

    from blip2_triton.sizing import SizingError, from_arguments

    try:
        sizing = from_arguments(args)
    except SizingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        report = export_checkpoint(
            args.model, args.output, dtype=args.dtype, validate=not args.no_validate,
            providers=args.providers.split(",") if args.providers else None, quantize=args.quantize,
            image_cache_bytes=None if args.no_image_cache else args.image_cache_mib * 2**20,
            sizing=sizing, stateless_backend=args.stateless_backend,
        )
    except ValidationError as e:
        print(f"error: {e.summary}", file=sys.stderr)  # every failing case: the kept report
        return 2
    except (UnsupportedModelError, ProcessorMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.model} -> {args.output} in {report.seconds:.1f}s, peak RSS {report.peak_rss_mib:.0f} MiB")
    if not report.validated:
        print("  not validated (--no-validate): no output was compared with PyTorch")
    for graph, diff in report.max_abs_diff.items():
        print(f"  {graph:<15} max |onnx - torch| = {diff:.2e}")
    return 0


def _configure(args) -> int:
    from blip2_triton.export.repository_writer import resize_repository
    from blip2_triton.sizing import SizingError, from_arguments

    try:
        resize_repository(args.repository, from_arguments(args), args.stateless_backend)
    except (SizingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"rendered the config.pbtxt files of {args.repository} again (graphs untouched); restart its server")
    return 0


def _make_tiny(args) -> int:
    from blip2_triton.toy.presets import build_tiny_checkpoint

    path = build_tiny_checkpoint(args.output, args.preset, seed=args.seed)
    print(f"wrote tiny checkpoint {args.preset!r} to {path}")
    return 0


def _demo(args) -> int:
    from blip2_triton.demo import run_demo

    return run_demo(args.workdir, args.model)


def _bench(args) -> int:
    from blip2_triton.benchmarks.run import run_from_args

    return run_from_args(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _soak(args) -> int:
    from blip2_triton.benchmarks.soak import run_from_args

    return run_from_args(args)


def _bench_retrieval(args) -> int:
    from blip2_triton.benchmarks.retrieval import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    from blip2_triton.export.exporter import DTYPES
    from blip2_triton.sizing import add_arguments as add_sizing_arguments
    from blip2_triton.export.quantize import QUANTIZATIONS
    from blip2_triton.repository import DEFAULT_IMAGE_CACHE_BYTES
    from blip2_triton.toy.presets import ALL_PRESETS, DEFAULT_PRESET

    parser = argparse.ArgumentParser(prog="blip2-triton", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a BLIP-2 checkpoint into a Triton model repository")
    p.add_argument("--model", required=True, help="hub id or local checkpoint directory")
    p.add_argument("--output", required=True, help="model repository directory to write")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="fp16 is meant for GPU deployments")
    p.add_argument("--quantize", choices=QUANTIZATIONS, help="int8 weights for the MatMuls; int4 (MatMulNBits) for the decoder's, int8 elsewhere (validated after fp32)")
    p.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-PyTorch gate")
    p.add_argument("--providers", help="onnxruntime providers for validation, comma-separated")
    p.add_argument("--stateless-backend", choices=("python", "onnxruntime"), default="python",
                   help="who runs the vision encoder and Q-Former: onnxruntime in the Python backend (everywhere), "
                        "or Triton's onnxruntime backend (NVIDIA's containers only)")
    add_sizing_arguments(p)
    p.add_argument("--image-cache-mib", type=_positive_int, default=DEFAULT_IMAGE_CACHE_BYTES // 2**20,
                   help="bound of blip2's cache of recent images' query embeddings (default %(default)s)")
    p.add_argument("--no-image-cache", action="store_true", help="every request runs the image stages")
    p.set_defaults(func=_export)

    p = sub.add_parser("configure", help="size an exported repository again (config.pbtxt only, no re-export)")
    p.add_argument("--repository", required=True, help="an exported model repository")
    p.add_argument("--stateless-backend", choices=("python", "onnxruntime"),
                   help="as for export (default: what the repository uses now)")
    add_sizing_arguments(p)
    p.set_defaults(func=_configure)

    p = sub.add_parser("make-tiny", help="write a random-weight tiny BLIP-2 OPT or Flan-T5 checkpoint (no download)")
    p.add_argument("--output", required=True)
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(ALL_PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("demo", help="export the embedded OPT and Flan-T5 models (then the retrieval one), serve each with tritonserver, ask, stop")
    p.add_argument("--workdir", default="artifacts/demo", help="where the exported repositories go")
    p.add_argument("--model", help="one checkpoint to use instead of the embedded ones")
    p.set_defaults(func=_demo)

    from blip2_triton.client.cli import register as register_client_commands

    register_client_commands(sub)  # caption, ask, chat

    from blip2_triton.server.serve import add_serve_arguments, serve_command

    p = sub.add_parser("serve", help="run the real tritonserver on an exported model repository")
    add_serve_arguments(p)
    p.set_defaults(func=serve_command)

    from blip2_triton.frontend.cli import add_arguments as add_openai_arguments, command as openai_command

    p = sub.add_parser("openai", help="an OpenAI-compatible HTTP front door (chat completions) to Triton replicas")
    add_openai_arguments(p)
    p.set_defaults(func=openai_command)

    from blip2_triton.benchmarks.run import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="latency, throughput and memory benchmarks, side by side with transformers")
    add_bench_arguments(p)
    p.set_defaults(func=_bench)

    from blip2_triton.benchmarks.soak import add_arguments as add_soak_arguments

    p = sub.add_parser("soak", help="many clients mixing good, bad, beam and cancelled requests for a long time; "
                                    "server memory over time")
    add_soak_arguments(p)
    p.set_defaults(func=_soak)

    from blip2_triton.benchmarks.retrieval import add_arguments as add_retrieval_bench_arguments

    p = sub.add_parser("bench-retrieval", help="embed_image, ITM, index and search benchmarks, side by side with transformers")
    add_retrieval_bench_arguments(p)
    p.set_defaults(func=_bench_retrieval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="[%(name)s] %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
