"""Typed bulk decoding of plain conversation rows, the fast path of `epochwise.validate`.

A separate module so that msgspec is imported only when a file is large enough to take that path (the
CLI validating a small fold file never loads it). It knows nothing of Together's rules: it decodes,
and `epochwise.validate` judges the role sequences it returns.
"""

import itertools
import operator
from typing import Literal

import msgspec

# The roles `epochwise.validate.ROLES` names (a test keeps the two alike). Only a speed filter: each role
# sequence is checked again by `epochwise.validate.message_problems`.
Role = Literal["system", "user", "assistant", "tool"]


class PlainMessage(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A message holding exactly a known ``role`` and a string ``content`` (no other key)."""

    role: Role
    content: str


class PlainRow(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A conversation row holding exactly ``messages`` (no tools or other columns)."""

    messages: list[PlainMessage]


# A list of one-row wrappers. Keys, types and roles are all checked in C while decoding; the structs
# hold only strings and lists (no cycles), so they stay out of the cyclic GC.
_WRAPPED_ROWS = msgspec.json.Decoder(list[tuple[PlainRow]])
_FIRST = operator.itemgetter(0)
_ROLE = operator.attrgetter("role")
_MESSAGES = operator.attrgetter("messages")


def role_sequences(wrapped: bytes | bytearray, rows: int) -> set[tuple[str, ...]] | None:
    """The distinct role sequences of ``wrapped``, JSON of the form ``[[row], [row], ...]``, when it
    is exactly ``rows`` one-row wrappers of `PlainRow` rows; else None (invalid JSON, another shape,
    another count).

    msgspec and orjson (which `epochwise.validate` parses single lines with) agree on what is JSON
    here: both refuse invalid UTF-8, lone surrogates, raw control characters and a BOM, and both keep
    the last of duplicate keys (tests/unit/test_validate_chunks.py).
    """
    try:
        wrappers = _WRAPPED_ROWS.decode(wrapped)
    except msgspec.DecodeError:  # bad JSON, or JSON that is not plain rows (msgspec.ValidationError)
        return None
    if len(wrappers) != rows:
        return None
    conversations = map(_MESSAGES, map(_FIRST, wrappers))
    return set(map(tuple, map(map, itertools.repeat(_ROLE), conversations)))  # all in C, no call per row
