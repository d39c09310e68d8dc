"""Markdown tables as the bench report prints them: numbers rounded as people read them, and
systems named as the reader knows them."""
from __future__ import annotations


def fmt(value, digits: int | None = None) -> str:
    """Numbers as people read them: 3 significant digits below 100, whole numbers above."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if digits is None:
            size = abs(value)
            digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3
        return f"{value:,.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def label(system: str, threads: int | None = None) -> str:
    """'server' -> 'ours: Triton + gRPC'; 'transformers_1_thread' -> 'transformers, 1 thread'."""
    if system == "server":
        return "ours: Triton + gRPC"
    if system == "in_process":
        return "ours: in-process"
    if system == "in_process_int8":
        return "ours, int8 weights: in-process"
    if system == "transformers":
        return f"transformers, {threads} threads" if threads else "transformers"
    return "transformers, " + system.split("_", 1)[1].replace("_", " ")


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, rounded; None when either is missing or zero."""
    return round(ours / theirs, 4) if ours and theirs else None
