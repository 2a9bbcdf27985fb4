"""Reward functions of the rock-paper-scissors GRPO example (``examples/records/rps-grpo``).

TRL's signature (https://huggingface.co/docs/trl/main/en/grpo_trainer#using-a-custom-reward-function):
``fn(prompts, completions, **columns) -> list[float | None]``. ``completions`` are conversational
(``[{"role": "assistant", "content": text}]`` each); a plain string is accepted too. Dataset columns
arrive by name (here ``answer``); ``**kwargs`` takes the rest.

    epochwise train folds/rps-grpo --method grpo \\
        --reward examples/rewards/rps.py:format_reward --reward examples/rewards/rps.py:correctness_reward

Both rewards are in [0, 1] and graded, so that groups of completions of a weak model rarely all score
the same (a group whose rewards are all equal teaches GRPO nothing).
"""

from __future__ import annotations

import re
from typing import Any

CHOICES = ("rock", "paper", "scissors", "draw")
WORD = re.compile(r"[a-z]+")
BREVITY_CHARS = 64  # replies at least this long get no brevity credit


def completion_text(completion: Any) -> str:
    """The reply's text: the last message's content (conversational) or the string itself."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return ""


def first_choice(text: str) -> str | None:
    """The first word of the closed set in ``text`` (lowercased), None when there is none."""
    return next((w for w in WORD.findall(text.lower()) if w in CHOICES), None)


def format_score(text: str) -> float:
    """1.0 for exactly one word of the closed set (case and one final ``.``/``!`` ignored); otherwise
    0.5 when the first word is one of them or 0.25 when one appears later, plus up to 0.25 for
    brevity (shorter replies score higher). An empty reply scores 0."""
    reply = text.strip()
    if reply.lower().rstrip(".!") in CHOICES:
        return 1.0
    if not reply:
        return 0.0
    words = WORD.findall(reply.lower())
    score = 0.0
    if words and words[0] in CHOICES:
        score = 0.5
    elif any(w in CHOICES for w in words):
        score = 0.25
    return score + 0.25 * max(0.0, 1.0 - len(reply) / BREVITY_CHARS)


def format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """Answer only: one word of rock | paper | scissors | draw, no extra words (graded, see `format_score`)."""
    return [format_score(completion_text(c)) for c in completions]


def correctness_reward(prompts: list, completions: list, answer: list, **kwargs: Any) -> list[float | None]:
    """1.0 when the reply's first closed-set word is the winning move (``answer``), else 0.0; None for
    a row without an answer (that row is not scored by this reward)."""
    scores: list[float | None] = []
    for completion, expected in zip(completions, answer, strict=True):
        if expected is None:
            scores.append(None)
        else:
            scores.append(1.0 if first_choice(completion_text(completion)) == str(expected).lower() else 0.0)
    return scores
