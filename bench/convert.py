"""Benchmark: Harmony conversion throughput against the floor of a bare openai-harmony render loop.

    python bench/convert.py [--rows 6000] [--repeat 3]

Both sides run in this process, interleaved, on the same generated conversations (single-turn, with a
system prompt, with thinking, multi-turn). The floor is a loop calling openai-harmony's
``render_conversation_for_training`` on Conversation objects built *before* the clock starts: the library
does all the tokenizing, so nothing can be faster on one core. ``convert`` is timed end to end: read and
hash the fold's JSONL, build the conversations, render, find the labels, write two parquet files
atomically, run together's ``check_file`` on them and write the manifest (``force=True``, so no reuse).
It runs once in this process (``workers=1``) and once with a worker per core (``workers=0``).
Target: >= 0.8x the floor's rows/s. Best of ``--repeat`` runs each, after one warm-up. CPU seconds are
printed too: on a shared machine they compare the work done even when wall time is disturbed.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import tempfile
import time
from pathlib import Path

import orjson
from openai_harmony import (
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
)

from epochwise.config.harmony import HarmonyConfig
from epochwise.harmony import available_cpus, convert_fold, ensure_vocab_dir, load_encoding

WORDS = "alice bob stones pile table turn takes wins rock paper scissors board move first last player".split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    """ChatML conversations of ~150-500 tokens in four shapes, like a reasoning-flavoured games fold."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        story = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 140)))
        reply = orjson.dumps(
            {
                "game": "nim",
                "id": i,
                "stones": rng.randint(5, 30),
                "winner": rng.choice(WORDS),
                "moves": [rng.randint(1, 3) for _ in range(12)],
            }
        ).decode()
        messages = [
            {"role": "user", "content": f"Describe the game in this story:\n\n{story}"},
            {"role": "assistant", "content": reply},
        ]
        shape = i % 4
        if shape >= 1:
            messages.insert(0, {"role": "system", "content": "Answer with the game's context as compact JSON."})
        if shape == 2:
            messages[-1]["thinking"] = " ".join(rng.choice(WORDS) for _ in range(30))
        if shape == 3:
            messages += [
                {"role": "user", "content": "And who moves last?"},
                {"role": "assistant", "content": rng.choice(WORDS)},
            ]
        out.append({"messages": messages})
    return out


def to_library_conversation(messages: list[dict], effort: ReasoningEffort) -> Conversation:
    """The same Harmony conversation epochwise builds, written with openai-harmony alone."""
    harmony = [Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(effort))]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    for i, m in enumerate(messages):
        if m["role"] == "system":
            harmony.append(
                Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(m["content"]))
            )
        elif m["role"] == "user":
            harmony.append(Message.from_role_and_content(Role.USER, m["content"]))
        else:
            if m.get("thinking") and i > last_user:
                harmony.append(Message.from_role_and_content(Role.ASSISTANT, m["thinking"]).with_channel("analysis"))
            harmony.append(Message.from_role_and_content(Role.ASSISTANT, m["content"]).with_channel("final"))
    return Conversation.from_messages(harmony)


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the pool's workers exit before we read it)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def floor(encoding, convs: list[Conversation]) -> tuple[float, float, int]:  # noqa: ANN001
    config = RenderConversationConfig(auto_drop_analysis=False)
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    for conversation in convs:
        tokens += len(encoding.render_conversation_for_training(conversation, config))
    return time.perf_counter() - start, cpu_seconds() - cpu, tokens


def ours(fold: Path, workers: int) -> tuple[float, float, int]:
    start, cpu = time.perf_counter(), cpu_seconds()
    summary = convert_fold(fold, HarmonyConfig(reasoning_effort="low", workers=workers), force=True)
    return time.perf_counter() - start, cpu_seconds() - cpu, summary.total("tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6000, help="conversations in the fold (train + val)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    chat = conversations(args.rows)
    encoding = load_encoding(str(ensure_vocab_dir()))
    library = [to_library_conversation(c["messages"], ReasoningEffort.LOW) for c in chat]
    with tempfile.TemporaryDirectory() as tmp:
        fold = Path(tmp) / "fold"
        fold.mkdir()
        n_val = args.rows // 10
        (fold / "val.jsonl").write_bytes(b"".join(orjson.dumps(c) + b"\n" for c in chat[:n_val]))
        (fold / "train.jsonl").write_bytes(b"".join(orjson.dumps(c) + b"\n" for c in chat[n_val:]))
        library = library[n_val:] + library[:n_val]

        runs: dict[str, list[float]] = {"floor": [], "convert workers=1": [], "convert workers=0": []}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        tokens: dict[str, int] = {}
        floor(encoding, library[:200]), ours(fold, 1)  # warm-up: imports, vocab, check_file
        for _ in range(args.repeat):
            for name in runs:
                if name == "floor":
                    seconds, cpu_used, count = floor(encoding, library)
                else:
                    seconds, cpu_used, count = ours(fold, int(name[-1]))
                runs[name].append(seconds)
                cpu[name].append(cpu_used)
                tokens[name] = count

    assert len(set(tokens.values())) == 1, f"token totals differ: {tokens}"
    best_floor, best_floor_cpu = min(runs["floor"]), min(cpu["floor"])
    load = os.getloadavg()[0]
    print(
        f"{args.rows} conversations, {tokens['floor']:,} tokens, {available_cpus()} CPU(s), "
        f"load average {load:.1f}, best of {args.repeat}"
    )
    print(f"{'':<20} {'wall s':>7} {'rows/s':>7} {'tokens/s':>9} {'x floor':>8} {'CPU s':>7} {'x floor (CPU)':>14}")
    for name, times in runs.items():
        best, best_cpu = min(times), min(cpu[name])
        print(
            f"{name:<20} {best:7.2f} {args.rows / best:7.0f} {tokens[name] / best:9.0f} {best_floor / best:8.2f} "
            f"{best_cpu:7.2f} {best_floor_cpu / best_cpu:14.2f}"
        )
    print(
        "x floor: wall-clock rows/s relative to the bare loop (target >= 0.8); the CPU column counts all "
        "processes' CPU seconds, which other load on the machine disturbs far less."
    )


if __name__ == "__main__":
    main()
