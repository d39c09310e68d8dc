"""`blip2-triton serve`: run tritonserver in the foreground until Ctrl-C or SIGTERM."""
from __future__ import annotations

import argparse
import signal
import sys
import time

from blip2_triton.server.discovery import TritonNotFoundError
from blip2_triton.server.launcher import TritonServer, TritonStartupError


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `serve` options to `parser` (a subcommand parser); returns it."""
    parser.add_argument("--model-repository", required=True, help="Triton model repository directory")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--address", default="127.0.0.1",
        help="address every endpoint binds to (default 127.0.0.1; 0.0.0.0 exposes the server)",
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument("--log-file", help="also write the server log here (default: a temporary file)")
    parser.add_argument("--quiet", action="store_true", help="do not copy the server log to stdout")
    parser.add_argument(
        "--startup-timeout", type=float, default=600.0,
        help="seconds to wait for all models to load (default %(default)s)",
    )
    parser.add_argument(
        "--no-supervise", dest="supervise", action="store_false",
        help="do not bring back a model whose process dies (by default it is reloaded within seconds, "
             "or tritonserver restarted for the streaming `blip2` model)",
    )
    return parser


class _Shutdown(Exception):
    """Raised by the SIGTERM handler to leave the wait loop like Ctrl-C does."""


def _raise_shutdown(signum, frame):
    raise _Shutdown(signal.Signals(signum).name)


def serve_command(args: argparse.Namespace) -> int:
    """Start the server, report its addresses, block until Ctrl-C/SIGTERM, then stop it.

    Returns the process exit code: 0 after a requested shutdown, 1 if the server failed to start
    or died on its own.
    """
    server = TritonServer(
        args.model_repository,
        grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
        host=args.address, log_file=args.log_file, log_verbose=args.log_verbose,
        echo_log=not args.quiet, startup_timeout=args.startup_timeout, supervise=args.supervise,
    )
    previous_term = signal.signal(signal.SIGTERM, _raise_shutdown)
    requested = False
    try:
        try:
            server.start()
        except (TritonStartupError, TritonNotFoundError) as e:
            print(f"blip2-triton serve: {e}", file=sys.stderr)
            return 1
        names = ", ".join(m["name"] for m in server.repository_index()) or "none"
        print(
            f"blip2-triton serve: tritonserver (pid {server.pid}) ready in {server.startup_seconds:.1f}s; "
            f"models: {names}\n"
            f"  gRPC    {server.grpc_url}\n  HTTP    {server.http_url}\n  metrics {server.metrics_url}\n"
            "  Ctrl-C or SIGTERM stops the server",
            flush=True,
        )
        while (code := server.poll()) is None:
            time.sleep(0.5)
        print(f"blip2-triton serve: tritonserver exited on its own with code {code}\n{server.log_tail()}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Shutdown) as e:
        reason = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else str(e)
        print(f"blip2-triton serve: {reason}, stopping tritonserver", file=sys.stderr, flush=True)
        requested = True
        return 0
    finally:
        # A second Ctrl-C/SIGTERM must not abort the shutdown halfway and leak stubs.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            code = server.stop()
            if requested and code not in (0, None):
                # Every process is gone either way (stop() reaps the group); say that a model did
                # not unload in time rather than let a clean-looking exit hide it.
                print(f"blip2-triton serve: tritonserver exited with code {code} while stopping (a model did not "
                      "unload within its exit timeout?); its processes are gone", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)
