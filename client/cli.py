"""`blip2-triton caption | ask | chat | match | index | search`: the client workflows from a shell.

`register(subparsers)` adds the subcommands to the `blip2-triton` parser. Every generation control
of the served API (`blip2_triton.api.CONTROLS`) becomes a flag derived from its name and
dtype: `max_new_tokens` -> `--max-new-tokens INT`, `do_sample` -> `--do-sample/--no-do-sample`.
Absent flags leave the control to the checkpoint's generation config.

Output: the text of each answer on one line; `--stream` prints pieces as they arrive; `--json`
prints one JSON object per answer (image, prompt, text, token_ids). Errors print one line to
stderr and exit with status 1 (130 on Ctrl-C).

`match`, `index` and `search` call a retrieval checkpoint's models (client/retrieval.py,
client/index.py); `index` and `search` keep the images' vectors in a Qdrant collection.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, TextIO

from blip2_triton.api import CONTROLS, PIPELINE

from .aio import DEFAULT_TIMEOUT, DEFAULT_URL, Result
from .errors import Blip2Error, InvalidArgumentError
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

    p = subparsers.add_parser("ask", help="ask questions about an image (VQA)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("questions", nargs="+", metavar="QUESTION",
                   help="one or more questions, sent concurrently (the server's image cache runs the image stages once)")
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

    p = subparsers.add_parser("match", help="how well texts match an image: ITM probability and ITC similarity")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="one or more texts (sent concurrently)")
    _add_connection(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per pair: image, text, itm_probability, itc_similarity")
    p.set_defaults(func=_match)

    p = subparsers.add_parser(
        "index", help="embed every image of a folder through the server into a Qdrant collection",
        description="Resumable: files already indexed (same path, size and modification time) are skipped, "
                    "and an interrupted run leaves a usable collection that the next run completes.")
    p.add_argument("directory", metavar="IMAGE_DIR")
    _add_collection(p)
    p.add_argument("--concurrency", type=_positive_int, default=8, help="images embedded at once (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_connection(p)
    p.set_defaults(func=_index)

    p = subparsers.add_parser(
        "search", help="rank an indexed collection for a text (ITC, then ITM re-ranking) or an image",
        description="A text query ranks by ITC similarity and re-ranks the best --rerank N with the ITM head "
                    "(BLIP-2's retrieval recipe); --image ranks by the images' query vectors (MAX_SIM).")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("text", nargs="?", metavar="TEXT")
    query.add_argument("--image", metavar="IMAGE", help="find the images nearest to this one")
    _add_collection(p)
    p.add_argument("--top-k", type=_positive_int, default=5, help="results to print (default %(default)s)")
    p.add_argument("--rerank", type=_non_negative_int, default=0,
                   help="re-rank the best N by ITC with the ITM head (text queries; default 0: off)")
    p.add_argument("--json", action="store_true", help="one JSON object per hit: rank, path, itc/itm scores")
    _add_connection(p)
    p.set_defaults(func=_search)


def _add_connection(p: argparse.ArgumentParser) -> None:
    _add_url(p)
    p.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT,
                   help="seconds allowed per call (default %(default)g)")


def _add_collection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collection", required=True, help="Qdrant collection name")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--db", help="directory of the embedded (local) Qdrant database "
                                    "(default $XDG_CACHE_HOME/blip2-triton/qdrant)")
    where.add_argument("--qdrant-url", help="a Qdrant server instead, e.g. http://localhost:6333")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", dest="urls", action="append", metavar="URL",
                   help=f"gRPC address host:port of a server (default {DEFAULT_URL}); repeat it for replicas: "
                        "requests go to the ready one with the fewest outstanding, and move to another when one "
                        "is unavailable before answering")


def _add_common(p: argparse.ArgumentParser) -> None:
    _add_url(p)
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
        controls = _controls(args)
        several = len(args.questions) > 1
        if args.stream:
            for question in args.questions:
                _print_stream(client.stream(args.image, vqa_prompt(question), **controls), out,
                              label=question if several else None)
            return
        for question, result in zip(args.questions, client.ask_many(args.image, args.questions, **controls)):
            _print_result(args, args.image, result, out, label=question if several else None)

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


def _match(args) -> int:
    def run(client: Blip2Client, out: TextIO) -> None:
        for text, m in zip(args.texts, client.matches(args.image, args.texts)):
            if args.json:
                record = {"image": args.image, "text": text, "itm_probability": m.itm_probability,
                          "itc_similarity": m.itc_similarity}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                out.write(f"itm_probability={m.itm_probability:.4f} itc_similarity={m.itc_similarity:.4f}  {text}\n")
            out.flush()

    return _with_client(args, run)


def _index(args) -> int:
    from tqdm import tqdm

    from .index import ImageIndex, image_files

    def run(client: Blip2Client, out: TextIO) -> None:
        with ImageIndex(args.collection, args.db, args.qdrant_url) as index, \
                tqdm(total=len(image_files(args.directory)), unit="image", disable=args.no_progress,
                     file=sys.stderr) as bar:
            report = client.index(index, args.directory, concurrency=args.concurrency, progress=bar.update)
            total = index.count()
        for path, message in report.refused:
            print(f"refused {path}: {_one_line(message)}", file=sys.stderr)
        out.write(f"indexed {report.indexed}, already indexed {report.skipped}, refused {len(report.refused)}; "
                  f"collection {args.collection!r} holds {total} images\n")
        if report.refused:
            raise _Refused()

    return _with_client(args, run)


def _search(args) -> int:
    from .index import ImageIndex

    def run(client: Blip2Client, out: TextIO) -> None:
        with ImageIndex(args.collection, args.db, args.qdrant_url) as index:
            if args.image is not None:
                if args.rerank:
                    raise InvalidArgumentError("--rerank needs a text query: the ITM head matches images with texts")
                hits = client.search_image(index, args.image, top_k=args.top_k)
            else:
                hits = client.search_text(index, args.text, top_k=args.top_k, rerank=args.rerank)
        score = "similarity" if args.image is not None else "itc_similarity"
        for rank, hit in enumerate(hits, 1):
            if args.json:
                record = {"rank": rank, "path": hit.path, score: hit.score}
                if hit.itm_probability is not None:
                    record["itm_probability"] = hit.itm_probability
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                itm = "" if hit.itm_probability is None else f" itm={hit.itm_probability:.4f}"
                out.write(f"{rank:>3} {hit.score:.4f}{itm}  {hit.path}\n")
        out.flush()

    return _with_client(args, run)


class _Refused(Exception):
    """index: some files were refused (reported); the others were indexed."""


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
        with Blip2Client(args.urls or [DEFAULT_URL], getattr(args, "model", PIPELINE), args.timeout) as client:
            run(client, sys.stdout)
    except Blip2Error as e:
        print(f"error: {_one_line(e.message)}", file=sys.stderr)
        return EXIT_ERROR
    except _Refused:
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
