"""The prompt formats BLIP-2 was trained and documented with (see the BLIP-2 blog post)."""
from __future__ import annotations

from typing import Sequence

QUESTION_TEMPLATE = "Question: {} Answer:"
TURN_TEMPLATE = "Question: {} Answer: {}."


def vqa_prompt(question: str) -> str:
    """'Question: {question} Answer:'"""
    return QUESTION_TEMPLATE.format(question.strip())


def chat_prompt(history: Sequence[tuple[str, str]], question: str) -> str:
    """Earlier (question, answer) turns as context, then the new question:
    'Question: q1 Answer: a1. Question: q2 Answer:' (the template of the BLIP-2 blog post).
    """
    turns = [TURN_TEMPLATE.format(q.strip(), a.strip()) for q, a in history]
    return " ".join([*turns, vqa_prompt(question)])
