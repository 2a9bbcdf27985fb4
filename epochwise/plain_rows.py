"""Typed bulk decoding of plain rows (conversation, instruction, text), the fast path of
`epochwise.validate`.

A separate module so that msgspec is imported only when a file is large enough to take that path (the
CLI validating a small fold file never loads it). It knows nothing of Together's rules beyond a row's
shape: it decodes, and `epochwise.validate` judges the role sequences it returns.
"""

import itertools
import operator
from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

# The roles `epochwise.validate.ROLES` names (a test keeps the two alike). Only a speed filter: each role
# sequence is checked again by `epochwise.validate.message_problems`.
Role = Literal["system", "user", "assistant", "tool"]


class PlainMessage(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A message holding a known ``role`` and a string ``content``, and at most a ``weight`` of 0 or 1
    and string chain-of-thought fields (`epochwise.validate.REASONING_KEYS`) besides: each valid on its
    own, whatever the role, so a row of them is valid when its role sequence is."""

    role: Role
    content: str
    weight: Literal[0, 1] | UnsetType = UNSET  # JSON 0 or 1; not true, 1.0 (valid, left to the line check)
    thinking: str | UnsetType = UNSET
    reasoning: str | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET


class PlainConversation(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A conversation row holding exactly ``messages`` (no tools or other columns)."""

    messages: list[PlainMessage]


class PlainInstruction(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """An instruction row holding exactly a string ``prompt`` and a string ``completion``."""

    prompt: str
    completion: str


class PlainText(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A general row holding exactly a string ``text``."""

    text: str


# Each format's plain row (the names of `epochwise.validate.FORMAT_KEYS`). An instruction or text row of
# this shape is valid; a conversation row is when its role sequence is.
PLAIN_ROWS: dict[str, type[msgspec.Struct]] = {
    "conversation": PlainConversation,
    "instruction": PlainInstruction,
    "general": PlainText,
}
# Lists of one-row wrappers. Keys, types and roles are all checked in C while decoding; the structs
# hold only strings and lists (no cycles), so they stay out of the cyclic GC.
_WRAPPED_ROWS = {fmt: msgspec.json.Decoder(list[tuple[row]]) for fmt, row in PLAIN_ROWS.items()}
_FIRST = operator.itemgetter(0)
_ROLE = operator.attrgetter("role")
_MESSAGES = operator.attrgetter("messages")


def decode_plain(wrapped: bytes | bytearray, rows: int, fmt: str) -> list[tuple[msgspec.Struct]] | None:
    """``wrapped``, JSON of the form ``[[row], [row], ...]``, when it is exactly ``rows`` one-row
    wrappers of plain rows of ``fmt`` (`PLAIN_ROWS`); else None (invalid JSON, another shape or
    format, another count, a format with no plain row).

    msgspec and orjson (which `epochwise.validate` parses single lines with) agree on what is JSON
    here: both refuse invalid UTF-8, lone surrogates, raw control characters and a BOM, and both keep
    the last of duplicate keys (tests/unit/test_validate_chunks.py).
    """
    decoder = _WRAPPED_ROWS.get(fmt)
    if decoder is None:
        return None
    try:
        wrappers = decoder.decode(wrapped)
    except msgspec.DecodeError:  # bad JSON, or JSON that is not plain rows (msgspec.ValidationError)
        return None
    return wrappers if len(wrappers) == rows else None


def role_sequences(wrappers: list[tuple[PlainConversation]]) -> set[tuple[str, ...]]:
    """The distinct role sequences of decoded conversation rows."""
    conversations = map(_MESSAGES, map(_FIRST, wrappers))
    return set(map(tuple, map(map, itertools.repeat(_ROLE), conversations)))  # all in C, no call per row
