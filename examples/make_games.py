"""Generate the example record set ``examples/records/games/`` (deterministic: same seed, same bytes).

    python examples/make_games.py            # rewrites examples/records/games/*.jsonl

Each record is a short story about a game between two players and a JSON ``context`` that follows from
the rules, so a model can learn it: Nim (take 1-3 stones, last stone wins: the player to move wins iff
the pile is not a multiple of 4), rock-paper-scissors matches (winner from the counted rounds) and
tic-tac-toe final boards (winner from the lines). About 360 records, ~130 KB.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "records" / "games"
NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ines", "Jonas", "Kofi", "Lena"]
MOODS = ["cheerfully", "nervously", "confidently", "slowly", "with a grin", "after a long pause"]
PLACES = ["in the library", "on a train", "at the kitchen table", "in the park", "at a café", "by the lake"]


def nim(rng: random.Random, i: int) -> dict:
    a, b = rng.sample(NAMES, 2)
    stones = rng.randint(5, 30)
    winner, loser = (a, b) if stones % 4 else (b, a)
    move = stones % 4 or None
    story = (
        f"{a} and {b} play Nim {rng.choice(PLACES)}. There are {stones} stones on the table; each turn a "
        f"player takes 1, 2 or 3 stones, and whoever takes the last stone wins. {a} moves first, "
        f"{rng.choice(MOODS)}."
    )
    context = {
        "game": "nim",
        "players": [a, b],
        "stones": stones,
        "winner_with_perfect_play": winner,
        "loser": loser,
        "winning_first_move": move,
        "rule": "the player to move wins iff stones % 4 != 0",
    }
    return {"id": f"nim-{i:04d}", "game": "nim", "story": story, "context": context}


BEATS = {"rock": "scissors", "scissors": "paper", "paper": "rock"}


def rps(rng: random.Random, i: int) -> dict:
    a, b = rng.sample(NAMES, 2)
    rounds = [(rng.choice(list(BEATS)), rng.choice(list(BEATS))) for _ in range(rng.randint(3, 5))]
    wins = {a: 0, b: 0}
    for x, y in rounds:
        if BEATS[x] == y:
            wins[a] += 1
        elif BEATS[y] == x:
            wins[b] += 1
    told = "; ".join(f"round {k + 1}: {a} {x}, {b} {y}" for k, (x, y) in enumerate(rounds))
    winner = a if wins[a] > wins[b] else b if wins[b] > wins[a] else None
    story = f"{a} and {b} play rock-paper-scissors {rng.choice(PLACES)}. {told}."
    context = {
        "game": "rock-paper-scissors",
        "players": [a, b],
        "rounds": len(rounds),
        "score": {a: wins[a], b: wins[b]},
        "winner": winner,
        "draws": len(rounds) - wins[a] - wins[b],
    }
    return {"id": f"rps-{i:04d}", "game": "rock-paper-scissors", "story": story, "context": context}


LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]


def tictactoe(rng: random.Random, i: int) -> dict:
    a, b = rng.sample(NAMES, 2)
    board = [" "] * 9
    moves, mark, winner_mark = [], "X", None
    for cell in rng.sample(range(9), 9):
        board[cell] = mark
        moves.append(cell + 1)
        if any(all(board[c] == mark for c in line) for line in LINES):
            winner_mark = mark
            break
        mark = "O" if mark == "X" else "X"
    grid = " / ".join("".join(c if c != " " else "." for c in board[r * 3 : r * 3 + 3]) for r in range(3))
    winner = {"X": a, "O": b}.get(winner_mark) if winner_mark else None
    story = (
        f"{a} (X) and {b} (O) play tic-tac-toe {rng.choice(PLACES)}. X moves first; the squares are "
        f"numbered 1-9 row by row. The moves were {', '.join(map(str, moves))}. Final board: {grid}."
    )
    context = {
        "game": "tic-tac-toe",
        "players": {"X": a, "O": b},
        "moves": len(moves),
        "winner": winner,
        "result": "draw" if winner is None else f"{winner_mark} wins",
    }
    return {"id": f"ttt-{i:04d}", "game": "tic-tac-toe", "story": story, "context": context}


def main(seed: int = 20261123, per_game: int = 120) -> None:
    rng = random.Random(seed)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in (("nim", nim), ("rock_paper_scissors", rps), ("tic_tac_toe", tictactoe)):
        lines = [json.dumps(make(rng, i), ensure_ascii=False) for i in range(per_game)]
        (OUT / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
