"""Benchmark: records -> fold throughput against the floor of a bare ``json.loads`` + ``json.dumps`` loop.

    python bench/prepare.py [--records 100000] [--repeat 3]

Both sides run in this process on the same generated JSONL file. The floor only parses and re-serialises
each line; ``prepare`` also maps to ChatML, validates every conversation, hashes it for the seeded split,
sorts, writes two files atomically and runs together's ``check_file`` over them. Target: >= 0.7x the floor.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from epochwise.config.data import DataConfig, RecordMapping
from epochwise.prepare import prepare
from epochwise.records import read_records

MAPPING = RecordMapping(
    system_prompt="You read short stories about games and answer with the game's context as compact JSON.",
    user_template="Generate a detailed socialized context for the following story:\n\n{story}",
    assistant_field="context",
)
WORDS = "alice bob stones pile table turn takes wins rock paper scissors board move first last player".split()


def generate(path: Path, n: int, seed: int = 0) -> int:
    """~1 KB records shaped like the example games set; returns the file size in bytes."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            story = " ".join(rng.choice(WORDS) for _ in range(110))
            context = {"game": "nim", "id": i, "stones": rng.randint(5, 30), "winner": rng.choice(WORDS),
                       "moves": [rng.randint(1, 3) for _ in range(12)]}
            out.write(json.dumps({"id": f"r-{i}", "story": story, "context": context}) + "\n")
    return path.stat().st_size


def bare_loop(path: Path, out_path: Path) -> None:
    """The floor: parse each line and serialise it back, nothing else."""
    with open(path, encoding="utf-8") as src, open(out_path, "w", encoding="utf-8") as out:
        for line in src:
            out.write(json.dumps(json.loads(line)) + "\n")


def run_prepare(path: Path, fold: Path) -> None:
    prepare(read_records(path).records, fold, DataConfig(mapping=MAPPING))


def best_of(repeat: int, fn, *args) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "records.jsonl"
        size = generate(src, args.records)
        # Alternate the two sides so that machine noise hits both alike.
        floor_times, prep_times = [], []
        for _ in range(args.repeat):
            floor_times.append(best_of(1, bare_loop, src, tmp / "floor.jsonl")[0])
            prep_times.append(best_of(1, run_prepare, src, tmp / "fold")[0])
        floor, prep = min(floor_times), min(prep_times)
        n = args.records
        print(f"input: {n} records, {size / 1e6:.1f} MB")
        print(f"bare json.loads+json.dumps loop: {n / floor:10.0f} records/s  ({floor:.2f} s, best of {args.repeat})")
        print(f"epochwise prepare (full fold):   {n / prep:10.0f} records/s  ({prep:.2f} s, best of {args.repeat})")
        print(f"ratio prepare / floor: {floor / prep:.2f}x  (target >= 0.70x)")


if __name__ == "__main__":
    main()
