"""`blip2-triton caption | ask | chat`: the client workflows from a shell.

`register(subparsers)` adds the subcommands to the `blip2-triton` parser. Every generation control
of the served API (`blip2_triton.api.CONTROLS`) becomes a flag derived from its name and
dtype: `max_new_tokens` -> `--max-new-tokens INT`, `do_sample` -> `--do-sample/--no-do-sample`.
Absent flags leave the control to the checkpoint's generation config.

Output: the text of each answer on one line; `--stream` prints pieces as they arrive; `--json`
prints one JSON object per answer (image, prompt, text, token_ids). Errors print one line to
stderr and exit with status 1 (130 on Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, TextIO

from blip2_triton.api import CONTROLS, PIPELINE

from .aio import DEFAULT_TIMEOUT, DEFAULT_URL, Result
from .errors import Blip2Error
from .options import PYTHON_TYPES
from .prompts import vqa_prompt
from .sync import Blip2Client

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def register(subparsers) -> None:
    """Add `caption`, `ask` and `chat` to a parser's subparsers (argparse `add_subparsers()`)."""
    p = subparsers.add_parser("caption", help="caption images with a served model")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (several are sent concurrently)")
    p.add_argument("--prompt", default="", help='text the caption continues, e.g. "a photo of"')
    _add_common(p)
    p.set_defaults(func=_caption)

    p = subparsers.add_parser("ask", help="ask a question about an image (VQA)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("question", metavar="QUESTION")
    _add_common(p)
    p.set_defaults(func=_ask)

    p = subparsers.add_parser(
        "chat", help="ask questions about an image, one per line on stdin, with the earlier turns as context",
        description="Reads questions from stdin, one per line, and answers each with the whole conversation "
                    "so far as context (the client leaves out the oldest turns when they do not fit the "
                    "model's context). Ends on EOF or an empty line.",
    )
    p.add_argument("image", metavar="IMAGE")
    _add_common(p)
    p.set_defaults(func=_chat)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help="gRPC address host:port of the server (default %(default)s)")
    p.add_argument("--model", default=PIPELINE, help="served model name (default %(default)s)")
    p.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT,
                   help="seconds allowed per answer (default %(default)g)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print text pieces as they are generated")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object per answer: image, prompt, text, token_ids")
    controls = p.add_argument_group("generation controls", "named as in transformers' generate(); "
                                    "absent ones take the checkpoint's generation config")
    for tensor in CONTROLS:
        flag = "--" + tensor.name.replace("_", "-")
        kind = PYTHON_TYPES[tensor.dtype]
        if kind is bool:
            controls.add_argument(flag, dest=tensor.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            controls.add_argument(flag, dest=tensor.name, type=kind, default=None,
                                  metavar=kind.__name__.upper(), help=f"({tensor.dtype})")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _controls(args) -> dict:
    return {t.name: getattr(args, t.name) for t in CONTROLS if getattr(args, t.name) is not None}


# ---- commands --------------------------------------------------------------------------------
def _caption(args) -> int:
    def run(client: Blip2Client, out: TextIO) -> None:
        controls = _controls(args)
        if args.stream:
            for image in args.images:
                label = image if len(args.images) > 1 else None
                _print_stream(client.stream(image, args.prompt, **controls), out, label)
            return
        for image, result in zip(args.images, client.batch(args.images, args.prompt, **controls)):
            _print_result(args, image, result, out, label=image if len(args.images) > 1 else None)

    return _with_client(args, run)


def _ask(args) -> int:
    def run(client: Blip2Client, out: TextIO) -> None:
        if args.stream:
            _print_stream(client.stream(args.image, vqa_prompt(args.question), **_controls(args)), out)
        else:
            _print_result(args, args.image, client.ask(args.image, args.question, **_controls(args)), out)

    return _with_client(args, run)


def _chat(args) -> int:
    def run(client: Blip2Client, out: TextIO) -> None:
        controls = _controls(args)
        history: list[tuple[str, str]] = []
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                print("question> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            question = line.strip()
            if not question:  # EOF or an empty line
                return
            if args.stream:
                answer = _print_stream(client.chat_stream(args.image, history, question, **controls), out)
            else:
                result = client.chat(args.image, history, question, **controls)
                answer = result.text
                _print_result(args, args.image, result, out)
            history.append((question, answer.strip()))

    return _with_client(args, run)


# ---- output ----------------------------------------------------------------------------------
def _print_result(args, image: str, result: Result, out: TextIO, label: str | None = None) -> None:
    if args.json:
        record = {"image": image, "prompt": result.prompt, "text": result.text, "token_ids": result.token_ids}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        out.write((f"{label}: " if label else "") + result.text.strip() + "\n")
    out.flush()


def _print_stream(pieces, out: TextIO, label: str | None = None) -> str:
    """Print pieces as they come (the line starts once the first one arrived); returns the text."""
    text = []
    for piece in pieces:
        if not text:
            out.write((f"{label}: " if label else "") + piece.lstrip())
        else:
            out.write(piece)
        out.flush()
        text.append(piece)
    if not text:
        out.write(f"{label}: " if label else "")
    out.write("\n")
    out.flush()
    return "".join(text)


def _with_client(args, run: Callable[[Blip2Client, TextIO], None]) -> int:
    """Run a command; a Blip2Error or Ctrl-C becomes one line on stderr and an exit status."""
    try:
        with Blip2Client(args.url, args.model, args.timeout) as client:
            run(client, sys.stdout)
    except Blip2Error as e:
        print(f"error: {_one_line(e.message)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        sys.stdout = open(os.devnull, "w")
        return EXIT_ERROR
    return 0


def _one_line(message: str) -> str:
    return " ".join(message.split())
