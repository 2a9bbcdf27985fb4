"""Generate the DPO and GRPO example records (deterministic: same seed, same bytes).

    python examples/make_rps.py      # rewrites examples/records/rps-dpo/ and rps-grpo/ rps.jsonl

One rock-paper-scissors round per record: two players, their moves, and which move wins (``answer``,
one of the closed set rock | paper | scissors | draw). Both directories hold the same records; only the
``epochwise.yaml`` beside them differs:

* ``rps-dpo``: ``format: preference``, the preferred reply is the one-word ``answer``, the rejected one
  a wordy wrong answer (``rejected``);
* ``rps-grpo``: ``format: prompt``, the ``answer`` column reaches the rewards in
  ``examples/rewards/rps.py`` (a format reward: one word of the closed set, nothing else; and a
  correctness reward: that word is the winning move).

The task is built so that even the offline random-init ``tiny`` model can raise its rewards in a few
epochs: every answer word also appears in every prompt (so it is one token of the fold's tokenizer,
and copying it is enough), the format reward gives partial credit on the way to a one-word reply,
and a guess among four answers is right a quarter of the time.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).parent / "records"
OUT_DIRS = (ROOT / "rps-dpo", ROOT / "rps-grpo")
NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ines", "Jonas", "Kofi", "Lena"]
MOVES = ("rock", "paper", "scissors")
BEATS = {"rock": "scissors", "scissors": "paper", "paper": "rock"}  # key beats value
CHOICES = ("rock", "paper", "scissors", "draw")
REASONS = (
    "it usually does",
    "that is my feeling",
    "it is hard to say",
    "the other one looks weaker",
    "I am not completely sure",
)


def winner_move(x: str, y: str) -> str:
    if x == y:
        return "draw"
    return x if BEATS[x] == y else y


def record(rng: random.Random, i: int) -> dict:
    a, b = rng.sample(NAMES, 2)
    move_a, move_b = rng.choice(MOVES), rng.choice(MOVES)
    answer = winner_move(move_a, move_b)
    wrong = rng.choice([c for c in CHOICES if c != answer])
    rejected = f"I think {wrong} wins this round, because {rng.choice(REASONS)}."
    return {
        "id": f"rps-{i:04d}",
        "a": a,
        "b": b,
        "move_a": move_a,
        "move_b": move_b,
        "answer": answer,
        "rejected": rejected,
    }


def main(seed: int = 20261202, count: int = 240) -> None:
    rng = random.Random(seed)
    lines = [json.dumps(record(rng, i), ensure_ascii=False) for i in range(count)]
    for out in OUT_DIRS:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rps.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
