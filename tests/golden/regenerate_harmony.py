"""Rewrite ``harmony_expected.json`` from ``harmony_cases.json`` with the current converter.

    .venv/bin/python -m tests.golden.regenerate_harmony

Only run this after a deliberate change to the conversion (and bump ``CONVERTER_VERSION``); review the
diff token by token, since the golden test exists to catch silent changes of exactly these numbers.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from epochwise.harmony import ensure_vocab_dir, render_row

HERE = Path(__file__).resolve().parent
CASES = HERE / "harmony_cases.json"
EXPECTED = HERE / "harmony_expected.json"


def label_spans(labels: list[int]) -> list[list[int]]:
    """``[start, end)`` of each run of trained (not -100) labels."""
    spans: list[list[int]] = []
    for index, label in enumerate(labels):
        if label == -100:
            continue
        if spans and spans[-1][1] == index:
            spans[-1][1] = index + 1
        else:
            spans.append([index, index + 1])
    return spans


def main() -> None:
    vocab_dir = str(ensure_vocab_dir())
    expected = {}
    for case in orjson.loads(CASES.read_bytes()):
        tokens, labels = render_row(case["messages"], case["reasoning_effort"], vocab_dir)
        expected[case["name"]] = {"input_ids": tokens.tolist(), "label_spans": label_spans(labels.tolist())}
    # One case per line, so a changed token shows up as one changed line in a diff.
    lines = [f"  {orjson.dumps(name).decode()}: {orjson.dumps(value).decode()}" for name, value in expected.items()]
    EXPECTED.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {EXPECTED} ({len(expected)} cases)")


if __name__ == "__main__":
    main()
