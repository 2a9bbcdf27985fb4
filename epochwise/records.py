"""Read JSON records and map them to ChatML conversations (pure functions, no Prefect).

Input is a ``.jsonl`` file (one record per line), a ``.json`` file (one record or an array of records),
or a directory holding such files (read in name order, not recursively). Every record keeps the path and
line it came from so that each problem can be reported as ``path:line: reason``.
"""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from epochwise.config.data import RecordMapping
from epochwise.io import DEFAULT_MAX_LINE_BYTES, gc_paused, json_type, jsonl_lines, parse_json_object
from epochwise.problems import Problem, display_path

RECORD_SUFFIXES = (".jsonl", ".json")

Conversation = dict[str, Any]  # {"messages": [{"role": ..., "content": ...}, ...]}


@dataclass(frozen=True)
class SourceRecord:
    """One parsed record and where it came from."""

    path: str
    line: int
    data: Any


@dataclass
class ReadResult:
    """Records read from the input plus problems that make the input unusable (bad JSON, bad bytes)."""

    records: list[SourceRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def record_files(source: Path) -> list[Path]:
    """The record files behind ``source`` (a file, or a directory's ``*.jsonl``/``*.json`` files)."""
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.suffix in RECORD_SUFFIXES and not p.name.startswith("."))
    return [source]


def read_records(source: Path | str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> ReadResult:
    """Parse every record under ``source``; structural problems are collected, never raised."""
    source = Path(source)
    result = ReadResult()
    if not source.exists():
        result.problems.append(Problem(display_path(source), None, "no such file or directory"))
        return result
    files = record_files(source)
    if not files:
        result.problems.append(
            Problem(display_path(source), None, "directory holds no *.jsonl or *.json record files")
        )
        return result
    with gc_paused():
        _read_files(files, max_line_bytes, result)
    return result


def _read_files(files: list[Path], max_line_bytes: int, result: ReadResult) -> None:
    for path in files:
        shown = display_path(path)
        try:
            reader = _read_json_array if path.suffix == ".json" else _read_jsonl
            for record in reader(path, shown, max_line_bytes, result.problems):
                result.records.append(record)
        except OSError as exc:
            result.problems.append(Problem(shown, None, f"cannot read file: {exc.strerror or exc}"))


def _read_jsonl(path: Path, shown: str, max_line_bytes: int, problems: list[Problem]) -> Iterator[SourceRecord]:
    empty, known = True, len(problems)
    with open(path, "rb") as handle:
        for number, raw in jsonl_lines(handle, shown, problems, max_line_bytes):
            empty = False
            data, reason = parse_json_object(raw)
            if reason is not None:
                problems.append(Problem(shown, number, reason))
                continue
            yield SourceRecord(shown, number, data)
    if empty and len(problems) == known:  # no line at all, not even an over-long one
        problems.append(Problem(shown, None, "file is empty"))


def _read_json_array(
    path: Path, shown: str, max_line_bytes: int, problems: list[Problem]
) -> Iterator[SourceRecord]:
    """A ``.json`` file: one object, or an array of objects, each reported at the line it starts on."""
    size = path.stat().st_size
    if size > max_line_bytes:
        problems.append(Problem(shown, None, f"file is {size} bytes, over the limit of {max_line_bytes}"))
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(Problem(shown, raw.count(b"\n", 0, exc.start) + 1, "not valid UTF-8"))
        return
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos == len(text):
        problems.append(Problem(shown, None, "file is empty"))
        return
    if text[pos] != "[":
        data, reason = _decode_at(decoder, text, pos)
        if reason is None and not isinstance(data, dict):
            reason = f"expected a JSON object or an array of objects, got {json_type(data)}"
        if reason is not None:
            problems.append(Problem(shown, text.count("\n", 0, pos) + 1, reason))
        else:
            yield SourceRecord(shown, text.count("\n", 0, pos) + 1, data)
        return
    pos = _skip_ws(text, pos + 1)
    line = text.count("\n", 0, pos) + 1
    last = pos
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", last, pos)
        last = pos
        data, reason = _decode_at(decoder, text, pos)
        if reason is not None:
            problems.append(Problem(shown, line, reason))
            return
        end = decoder.raw_decode(text, pos)[1]
        if not isinstance(data, dict):
            problems.append(Problem(shown, line, f"array element is {json_type(data)}, not a JSON object"))
        else:
            yield SourceRecord(shown, line, data)
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _decode_at(decoder: json.JSONDecoder, text: str, pos: int) -> tuple[Any, str | None]:
    try:
        return decoder.raw_decode(text, pos)[0], None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg}"


class MappingError(ValueError):
    """A record that cannot become a conversation under the configured mapping."""


@functools.lru_cache(maxsize=64)
def template_fields(template: str) -> tuple[str, ...]:
    """The ``{field}`` names a user template reads, in order (``{{`` escapes are not fields)."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            if not name.isidentifier():
                raise ValueError(f"user template placeholder {{{name}}} is not a plain field name")
            names.append(name)
    return tuple(names)


def as_text(value: Any) -> str:
    """A record value as message text: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode("utf-8")


def to_conversation(record: dict[str, Any], mapping: RecordMapping) -> Conversation:
    """Map one record to ``{"messages": [...]}``; raises `MappingError` with the reason when impossible."""
    return orjson.loads(conversation_line(record, mapping))


def conversation_line(record: dict[str, Any], mapping: RecordMapping) -> bytes:
    """Map one record straight to its compact ChatML JSON line (no newline).

    Template and prompt/completion rows are assembled from pre-serialised pieces: only the two message
    texts are encoded per record, about 4x faster than building the nested dicts and dumping them
    (bench/prepare.py). The bytes equal ``orjson.dumps`` of the equivalent conversation dict.
    """
    fmt = mapping.format
    if fmt == "auto":
        if "messages" in record:
            fmt = "messages"
        elif "prompt" in record and "completion" in record:
            fmt = "prompt_completion"
        else:
            fmt = "template"
    if fmt == "messages":
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise MappingError("'messages' must be a non-empty list")
        has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
        if has_system or not mapping.system_prompt:
            return orjson.dumps({"messages": messages})
        return _line_prefix(mapping.system_prompt) + orjson.dumps(messages)[1:] + b"}"
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in record:
                raise MappingError(f"missing field '{key}'")
        user, reply = as_text(record["prompt"]), as_text(record["completion"])
    else:
        user, reply = _from_template(record, mapping)
    return (
        _line_prefix(mapping.system_prompt)
        + b'{"role":"user","content":'
        + orjson.dumps(user)
        + b'},{"role":"assistant","content":'
        + orjson.dumps(reply)
        + b"}]}"
    )


@functools.lru_cache(maxsize=16)
def _line_prefix(system_prompt: str | None) -> bytes:
    """``{"messages":[`` plus the serialised system message and a comma, when there is one."""
    if not system_prompt:
        return b'{"messages":['
    return b'{"messages":[{"role":"system","content":' + orjson.dumps(system_prompt) + b"},"


def _from_template(record: dict[str, Any], mapping: RecordMapping) -> tuple[str, str]:
    """The user text (template filled from the record) and the reply text."""
    if not mapping.user_template or not mapping.assistant_field:
        raise MappingError(
            "record has no 'messages' or 'prompt'/'completion'; configure data.mapping.user_template "
            "and data.mapping.assistant_field to map its fields"
        )
    fields = template_fields(mapping.user_template)
    missing = [name for name in fields if name not in record]
    if missing:
        raise MappingError(f"missing field '{missing[0]}' used by the user template")
    if mapping.assistant_field not in record:
        raise MappingError(f"missing assistant field '{mapping.assistant_field}'")
    reply = record[mapping.assistant_field]
    if reply is None or reply == "":
        raise MappingError(f"assistant field '{mapping.assistant_field}' is empty")
    user = mapping.user_template.format_map({name: as_text(record[name]) for name in fields})
    return user, as_text(reply)


# --- preference (DPO) and prompt (GRPO) rows ------------------------------------------------------


def row_line(record: dict[str, Any], mapping: RecordMapping) -> bytes:
    """Map one record to its fold row under ``mapping.format``: a chat row (`conversation_line`), a
    preference row (`preference_line`) or a prompt row (`prompt_line`)."""
    if mapping.format == "preference":
        return preference_line(record, mapping)
    if mapping.format == "prompt":
        return prompt_line(record, mapping)
    return conversation_line(record, mapping)


def input_messages(record: dict[str, Any], mapping: RecordMapping) -> list[Any]:
    """The prompt of a preference or prompt row: the record's own ``messages`` when it has them (with
    the system prompt put first when they have none), else the system prompt and the user template
    filled from the record. The caller validates the result (it must not end with the assistant)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise MappingError("'messages' must be a non-empty list")
        has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
        if mapping.system_prompt and not has_system:
            return [{"role": "system", "content": mapping.system_prompt}, *messages]
        return list(messages)
    if not mapping.user_template:
        raise MappingError(
            f"record has no 'messages'; configure data.mapping.user_template to build the {mapping.format} "
            "row's prompt from its fields"
        )
    fields = template_fields(mapping.user_template)
    missing = [name for name in fields if name not in record]
    if missing:
        raise MappingError(f"missing field '{missing[0]}' used by the user template")
    user = mapping.user_template.format_map({name: as_text(record[name]) for name in fields})
    system = [{"role": "system", "content": mapping.system_prompt}] if mapping.system_prompt else []
    return [*system, {"role": "user", "content": user}]


def _reply(record: dict[str, Any], name: str | None, what: str) -> str:
    if not name:
        raise MappingError(
            "format: preference needs data.mapping.chosen_field and data.mapping.rejected_field "
            "(the record fields holding the preferred and the rejected reply)"
        )
    if name not in record:
        raise MappingError(f"missing {what} field '{name}'")
    value = record[name]
    if value is None or value == "":
        raise MappingError(f"{what} field '{name}' is empty")
    return as_text(value)


def preference_line(record: dict[str, Any], mapping: RecordMapping) -> bytes:
    """One record as Together's preference row (compact JSON, no newline)::

        {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": chosen}],
         "non_preferred_output": [{"role": "assistant", "content": rejected}]}
    """
    messages = input_messages(record, mapping)
    chosen = _reply(record, mapping.chosen_field, "chosen")
    rejected = _reply(record, mapping.rejected_field, "rejected")
    if chosen == rejected:
        raise MappingError(
            f"chosen field '{mapping.chosen_field}' and rejected field '{mapping.rejected_field}' hold the same "
            "reply: DPO learns nothing from the pair"
        )
    return orjson.dumps(
        {
            "input": {"messages": messages},
            "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}],
        }
    )


def prompt_line(record: dict[str, Any], mapping: RecordMapping) -> bytes:
    """One record as a GRPO prompt row (compact JSON, no newline): ``{"messages": [...], <columns>}``;
    each column named in ``mapping.columns`` is copied from the record as it is."""
    messages = input_messages(record, mapping)
    row: dict[str, Any] = {"messages": messages}
    for name in mapping.columns:
        if name not in record:
            raise MappingError(f"missing column '{name}' (data.mapping.columns)")
        row[name] = record[name]
    return orjson.dumps(row)
