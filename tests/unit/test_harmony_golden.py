"""Golden Harmony tokens and labels for hand-picked conversations (tests/golden/harmony_*.json).

``harmony_expected.json`` pins the exact token ids and trained spans (regenerated only on purpose, see
tests/golden/regenerate_harmony.py). Independently of it, ``harmony_cases.json`` spells out by hand what
each trained span must decode to and how many messages the render holds, so a wrong golden file cannot
pass either.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from epochwise.harmony import IGNORE_INDEX, ensure_vocab_dir, load_encoding, render_row
from tests.golden.regenerate_harmony import label_spans

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CASES = orjson.loads((GOLDEN / "harmony_cases.json").read_bytes())
EXPECTED = orjson.loads((GOLDEN / "harmony_expected.json").read_bytes())


@pytest.fixture(scope="module")
def vocab_dir() -> str:
    return str(ensure_vocab_dir())


def special(encoding, text: str) -> int:  # noqa: ANN001
    (token,) = encoding.encode(text, allowed_special={text})
    return token


def test_every_case_has_a_golden_entry() -> None:
    assert sorted(EXPECTED) == sorted(case["name"] for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_tokens_and_label_spans_match_golden(case: dict, vocab_dir: str) -> None:
    tokens, labels = render_row(case["messages"], case["reasoning_effort"], vocab_dir)
    assert tokens.tolist() == EXPECTED[case["name"]]["input_ids"]
    assert label_spans(labels.tolist()) == EXPECTED[case["name"]]["label_spans"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_each_trained_span_is_exactly_an_assistant_part(case: dict, vocab_dir: str) -> None:
    encoding = load_encoding(vocab_dir)
    tokens, labels = (a.tolist() for a in render_row(case["messages"], case["reasoning_effort"], vocab_dir))
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(tokens, labels, strict=True))
    spans = label_spans(labels)
    assert [encoding.decode_utf8(tokens[a:b]) for a, b in spans] == case["trained_parts"]
    # Decoded text cannot tell "<|end|>" the token from "<|end|>" the text, so check the special tokens:
    # each span is <|channel|> name <|message|> ... terminator, with no other special token inside.
    channel, message = special(encoding, "<|channel|>"), special(encoding, "<|message|>")
    terminators = {special(encoding, t) for t in ("<|end|>", "<|return|>", "<|call|>")}
    for a, b in spans:
        specials = [(i - a, t) for i, t in enumerate(tokens[a:b], start=a) if encoding.is_special_token(t)]
        assert specials[0] == (0, channel)
        assert specials[1][1] == message
        assert specials[2] == (b - a - 1, specials[2][1]) and specials[2][1] in terminators
        assert len(specials) == 3
        assert tokens[a - 1] == encoding.encode("assistant")[0]  # the span starts right after the role token
        assert tokens[a - 2] == special(encoding, "<|start|>")
    starts = sum(1 for t in tokens if t == special(encoding, "<|start|>"))
    assert starts == case["rendered_messages"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_system_message_has_effort_and_no_date(case: dict, vocab_dir: str) -> None:
    tokens, _ = render_row(case["messages"], case["reasoning_effort"], vocab_dir)
    text = load_encoding(vocab_dir).decode_utf8(tokens.tolist())
    assert f"Reasoning: {case['reasoning_effort']}\n" in text
    assert "Current date" not in text
    if "rendered" in case:
        assert text == case["rendered"]


def test_thinking_of_an_earlier_turn_is_not_rendered(vocab_dir: str) -> None:
    (case,) = [c for c in CASES if c["name"] == "thinking_earlier_turn_dropped"]
    tokens, _ = render_row(case["messages"], case["reasoning_effort"], vocab_dir)
    text = load_encoding(vocab_dir).decode_utf8(tokens.tolist())
    assert "EARLIER-THOUGHT" not in text
    assert "<|channel|>analysis<|message|>2 * 2 = 4.<|end|>" in text


def test_single_turn_thinking_survives_unlike_the_library_default(vocab_dir: str) -> None:
    """The reason for auto_drop_analysis=False: the default config drops the only analysis message."""
    from openai_harmony import RenderConversationConfig

    from epochwise.harmony import to_harmony

    (case,) = [c for c in CASES if c["name"] == "thinking_last_turn"]
    conversation, _ = to_harmony(case["messages"], case["reasoning_effort"])
    encoding = load_encoding(vocab_dir)
    default = encoding.decode_utf8(encoding.render_conversation_for_training(conversation))
    ours = encoding.decode_utf8(
        encoding.render_conversation_for_training(conversation, RenderConversationConfig(auto_drop_analysis=False))
    )
    assert "Rock crushes scissors" not in default
    assert "Rock crushes scissors" in ours
