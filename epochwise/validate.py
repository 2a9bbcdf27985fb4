"""Strict validation of fine-tuning JSONL, following Together's server-side rules.

together 3.1.1's own ``check_file`` is structural only (UTF-8, one JSON object per line, at least one
sample; together-py PR #364); the schema rules below are the ones Together's server applies after upload
(its data preparation, function-calling, reasoning and vision fine-tuning guides at
https://docs.together.ai/docs/fine-tuning/data-preparation). Catching them here means a bad file fails
in a second, before an upload or a paid job, with ``path:line: reason`` instead of a server-side
INVALID_FORMAT.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from epochwise.io import DEFAULT_MAX_LINE_BYTES, jsonl_lines, parse_json_object
from epochwise.problems import Problem, display_path

# Bump when a rule changes what passes: recorded passes (`epochwise.validation_record`) name this version.
VALIDATOR_VERSION = "1"

ROLES = ("system", "user", "assistant", "tool")
# Chain-of-thought fields of an assistant turn: Together reads ``reasoning`` / ``reasoning_content``,
# the Harmony converter also ``thinking``. Each must be a string.
REASONING_KEYS = ("thinking", "reasoning", "reasoning_content")
# Images (vision fine-tuning): base64 data URLs of JPEG, PNG or WEBP, at most 10 per example, 10 MB each
# (the limits together 3.1.1 ships in together/lib/constants.py), in user messages only.
MAX_IMAGES = 10
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_URL_CHARS = len("data:image/jpeg;base64,") + 4 * MAX_IMAGE_BYTES // 3
IMAGE_URL = re.compile(r"data:image/(jpeg|jpg|png|webp);base64,")
# Each format is detected by its required keys; a line matching two formats is ambiguous.
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "conversation": ("messages",),
    "instruction": ("prompt", "completion"),
    "preference": ("input", "preferred_output", "non_preferred_output"),
    "general": ("text",),
}


def detect_format(row: dict[str, Any]) -> tuple[str | None, str | None]:
    """Return ``(format, None)`` or ``(None, reason)`` for one JSON object."""
    found = [name for name, keys in FORMAT_KEYS.items() if all(k in row for k in keys)]
    if len(found) == 1:
        return found[0], None
    if not found:
        return None, (
            "no known format: expected 'messages', 'prompt'+'completion', 'text' or "
            "'input'+'preferred_output'+'non_preferred_output'"
        )
    return None, f"matches two or more formats ({', '.join(found)})"


def message_problems(messages: Any, *, require_assistant: bool = True) -> list[str]:
    """Reasons a ``messages`` list breaks Together's conversation rules (empty list when valid)."""
    if not isinstance(messages, list):
        return ["'messages' must be a list"]
    if not messages:
        return ["'messages' is empty"]
    reasons: list[str] = []
    previous: str | None = None
    images = 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            reasons.append(f"{where} is not an object")
            continue
        role = message.get("role")
        if "role" not in message:
            reasons.append(f"{where} has no 'role'")
        elif role not in ROLES:
            reasons.append(f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        calls = message.get("tool_calls")
        if "tool_calls" in message and not (
            isinstance(calls, list) and calls and all(isinstance(c, dict) for c in calls)
        ):
            reasons.append(f"{where}.tool_calls must be a non-empty list of objects")
        # An assistant turn that calls tools may carry tool_calls instead of content.
        calls_instead = role == "assistant" and isinstance(calls, list) and bool(calls)
        if "content" not in message:
            if not calls_instead:
                reasons.append(f"{where} has no 'content'")
        elif not (calls_instead and message["content"] is None):
            problems, found = _content_problems(where, message["content"], role)
            reasons.extend(problems)
            images += found
        for key in REASONING_KEYS:
            if key in message and not isinstance(message[key], str):
                reasons.append(f"{where}.{key} must be a string, got {_type_name(message[key])}")
        if "weight" in message and (message["weight"] not in (0, 1) or isinstance(message["weight"], bool)):
            reasons.append(f"{where} has weight {message['weight']!r}; weight must be 0 or 1")
        if role == "system" and index != 0:
            reasons.append(f"{where} is a system message; only the first message may be one")
        if index == 0 and role not in ("system", "user", None) and role in ROLES:
            reasons.append(f"{where} is {role!r}; a conversation starts with 'system' or 'user'")
        elif role == "tool" and previous not in ("assistant", "tool"):
            reasons.append(
                f"{where} is a tool message after {previous!r}; a tool result follows an assistant or tool message"
            )
        # Parallel tool calls give several tool results in a row; every other role alternates.
        if role is not None and role == previous and role in ROLES and role != "tool":
            reasons.append(f"{where} repeats role {role!r}; user and assistant turns must alternate")
        previous = role
    if images > MAX_IMAGES:
        reasons.append(f"{images} images in one example; at most {MAX_IMAGES} are allowed")
    if require_assistant and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        reasons.append("no assistant message: at least one is needed to train on")
    return reasons


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _content_problems(where: str, content: Any, role: Any) -> tuple[list[str], int]:
    """Reasons one message's content is invalid, and how many images it holds."""
    if isinstance(content, str):
        return [], 0
    if not isinstance(content, list):
        return [f"{where} content must be a string, got {_type_name(content)}"], 0
    # OpenAI-style multimodal parts: [{"type": "text", "text": ...}, {"type": "image_url", ...}]
    reasons: list[str] = []
    images = 0
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                reasons.append(f"{where}.content[{i}] is a text part without a string 'text'")
        elif kind == "image_url":
            images += 1
            if role != "user":
                reasons.append(
                    f"{where}.content[{i}] is an image in a {role!r} message; only user messages may hold images"
                )
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not (isinstance(url, str) and IMAGE_URL.match(url)):
                reasons.append(
                    f"{where}.content[{i}] image_url.url must be a base64 data URL (data:image/jpeg|png|webp;base64,...)"
                )
            elif len(url) > MAX_IMAGE_URL_CHARS:
                reasons.append(f"{where}.content[{i}] image is over {MAX_IMAGE_BYTES // 2**20} MB")
        else:
            reasons.append(f"{where}.content[{i}] must be a 'text' or 'image_url' part")
    return reasons, images


def row_problems(row: dict[str, Any], fmt: str) -> list[str]:
    """Reasons one row of a known format is invalid."""
    if fmt == "conversation":
        tools = [] if isinstance(row.get("tools", []), list) else ["'tools' must be a list of tool definitions"]
        return tools + message_problems(row["messages"])
    if fmt == "instruction":
        return [f"'{k}' must be a string" for k in ("prompt", "completion") if not isinstance(row[k], str)]
    if fmt == "general":
        return [] if isinstance(row["text"], str) else ["'text' must be a string"]
    reasons = []
    inp = row["input"]
    if not isinstance(inp, dict) or "messages" not in inp:
        return ["'input' must be an object with 'messages'"]
    reasons += [f"input: {r}" for r in message_problems(inp["messages"], require_assistant=False)]
    if isinstance(inp["messages"], list) and inp["messages"] and isinstance(inp["messages"][-1], dict):
        if inp["messages"][-1].get("role") == "assistant":
            reasons.append("input.messages must not end with an assistant message")
    for key in ("preferred_output", "non_preferred_output"):
        out = row[key]
        if not (
            isinstance(out, list) and len(out) == 1 and isinstance(out[0], dict) and out[0].get("role") == "assistant"
        ):
            reasons.append(f"'{key}' must hold exactly one assistant message")
    return reasons


def validate_rows(path: str, rows: Iterable[tuple[int, dict[str, Any]]]) -> tuple[list[Problem], int, str | None]:
    """Validate parsed rows; returns ``(problems, sample_count, file_format)``.

    The file's format is the first valid row's format; later rows of another format are reported.
    """
    problems: list[Problem] = []
    state = _FileFormat()
    count = _check_rows(path, rows, problems, state)
    return problems, count, state.format


class _FileFormat:
    """The format of a file being validated: its first valid row's format, and that row's line."""

    format: str | None = None
    first_line: int = 0


def _check_rows(path: str, rows: Iterable[tuple[int, dict[str, Any]]], problems: list[Problem], state: _FileFormat) -> int:
    """`validate_rows` over ``rows``, continuing ``state`` (a file checked in chunks); returns the row count."""
    count = 0
    for line, row in rows:
        count += 1
        fmt, reason = detect_format(row)
        if reason is not None:
            problems.append(Problem(path, line, reason))
            continue
        if state.format is None:
            state.format, state.first_line = fmt, line
        elif fmt != state.format:
            problems.append(
                Problem(path, line, f"{fmt} row in a {state.format} file (line {state.first_line}); one format per file")
            )
            continue
        problems.extend(Problem(path, line, r) for r in row_problems(row, fmt))
    return count


# Files are read in chunks of whole lines of about this size (a longer line extends its chunk). Small
# chunks keep the decoded rows of one chunk in the CPU's caches: 4 MiB chunks were ~1.2x slower.
# Shorter chunks (a file's last one, or a small file) are checked line by line.
CHUNK_BYTES = 64 * 1024
# Role sequences already shown to pass `message_problems` (for plain messages, the rest of which is valid).
_VALID_ROLES: set[tuple[str, ...]] = set()


def _plain_chunk(chunk: bytearray, max_line_bytes: int, file_format: str | None) -> tuple[int, str] | None:
    """``(line count, format)`` of ``chunk`` when every line is a valid plain row of one format (the
    file's format, when known), else None: then the chunk is checked line by line, with the same
    messages as ever.

    A plain row holds exactly its format's keys with string values (`epochwise.plain_rows`):
    ``{"prompt": ..., "completion": ...}``, ``{"text": ...}`` or ``{"messages": [...]}`` whose
    messages each hold a ``role`` and a string ``content``, and at most a ``weight`` of 0 or 1 and
    string reasoning fields besides. Such an instruction or text row is valid; for such a
    conversation row every rule of `row_problems` depends on the sequence of roles alone, so each
    distinct sequence is checked once with `message_problems`. The rest (parsing, keys, types, known
    roles) is msgspec's typed decoding of the whole chunk in one C call, not a Python call per line,
    which lets a large file validate at about the cost of parsing it (bench/cli_start.py). A blank or
    over-long line, mixed formats, extra columns, tools, images, tool calls or any problem returns
    None.

    The chunk is decoded as ``[[line 1],\n[line 2],\n...]``. That reads each line on its own: a raw
    newline cannot sit inside a JSON string, so every ``],\n[`` is structural; after it the ``,`` puts
    us in an array, so its ``]`` closed an array that is an element of an array. In the typed result
    only the outer list has arrays (the one-row wrappers) for elements (``messages`` sits in an
    object), so each ``],\n[`` closes one line's wrapper and opens the next; with exactly ``lines``
    wrappers of one row each, wrapper i holds line i and nothing else, and line i alone is that row.
    """
    from epochwise.plain_rows import PLAIN_ROWS, decode_plain, role_sequences  # msgspec: a file fills a chunk

    if len(chunk) > max_line_bytes and max(map(len, chunk.split(b"\n")), default=0) > max_line_bytes:
        return None
    joined = chunk.replace(b"\n", b"],\n[")
    lines = (len(joined) - len(chunk)) // 3  # each newline became 3 bytes longer
    if chunk.endswith(b"\n"):
        del joined[-4:]
    else:
        lines += 1
    joined[0:0] = b"[["
    joined += b"]]"
    # A row of another format fails on its first key, so trying each format in turn costs little.
    for fmt in [file_format] if file_format else PLAIN_ROWS:
        wrappers = decode_plain(joined, lines, fmt)
        if wrappers is not None:
            break
    else:
        return None
    if fmt == "conversation":
        for roles in role_sequences(wrappers) - _VALID_ROLES:
            if message_problems([{"role": role, "content": ""} for role in roles]):
                return None
            _VALID_ROLES.add(roles)
    return lines, fmt


def validate_file(
    path: Path | str, *, run_together_check: bool = True, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> list[Problem]:
    """All problems in one fine-tuning JSONL file; an empty list means Together will accept it."""
    path = Path(path)
    shown = display_path(path)
    if path.suffix != ".jsonl":
        return [Problem(shown, None, f"expected a .jsonl file, got '{path.suffix or path.name}'")]
    problems: list[Problem] = []
    state = _FileFormat()
    count = 0

    def check_lines(handle: BinaryIO, before: int) -> None:
        """Parse and check the lines of ``handle`` one by one, numbered after line ``before``."""
        nonlocal count
        rows: list[tuple[int, dict[str, Any]]] = []
        too_long: list[Problem] = []
        for number, raw in jsonl_lines(handle, shown, too_long, max_line_bytes):
            row, reason = parse_json_object(raw)
            if reason is not None:
                problems.append(Problem(shown, before + number, reason))
            else:
                rows.append((before + number, row))
        problems.extend(Problem(shown, before + (p.line or 0), p.reason) for p in too_long)
        count += _check_rows(shown, rows, problems, state)

    try:
        with open(path, "rb") as handle:
            before = 0  # lines in the chunks already checked
            for chunk in _line_chunks(handle, max_line_bytes):
                if chunk is None:  # a line over the limit with no end in sight: the rest one line at a time
                    check_lines(handle, before)
                    break
                plain = _plain_chunk(chunk, max_line_bytes, state.format) if len(chunk) >= CHUNK_BYTES else None
                if plain is None:
                    check_lines(io.BytesIO(chunk), before)
                    lines = chunk.count(b"\n") + (not chunk.endswith(b"\n"))
                else:
                    lines, fmt = plain
                    if state.format is None:
                        state.format, state.first_line = fmt, before + 1
                    count += lines
                before += lines
    except FileNotFoundError:
        return [Problem(shown, None, "no such file")]
    except IsADirectoryError:
        return [Problem(shown, None, "is a directory, not a file")]
    except OSError as exc:
        return [Problem(shown, None, f"cannot read file: {exc.strerror or exc}")]
    if count == 0 and not problems:
        problems.append(Problem(shown, None, "file is empty: at least 1 sample is needed"))
    if run_together_check and not problems:
        problems.extend(together_check(path, shown))
    return sorted(problems, key=lambda p: p.line or 0)


def _line_chunks(handle: BinaryIO, max_line_bytes: int) -> Iterator[bytearray | None]:
    """The file as chunks of whole lines (about `CHUNK_BYTES` each; the last may lack its newline).

    A line growing past ``max_line_bytes`` yields None, with ``handle`` put back at the start of that
    line, so the caller reads on with `jsonl_lines` (which skips it without loading it).
    """
    while True:
        chunk = bytearray(CHUNK_BYTES)
        size = handle.readinto(chunk)
        if not size:
            return
        del chunk[size:]
        if not chunk.endswith(b"\n"):
            chunk += handle.readline(max_line_bytes + 1)  # on to the end of the line it stops in
            start = chunk.rfind(b"\n") + 1
            if len(chunk) - start > max_line_bytes:
                if start:
                    yield chunk[:start]
                handle.seek(start - len(chunk), io.SEEK_CUR)
                yield None
                return
        yield chunk


def together_check(path: Path, shown: str) -> list[Problem]:
    """Run together's own ``check_file`` (the check its SDK runs before every upload)."""
    from together.lib import check_file

    report = check_file(path, purpose="fine-tune")
    if report.get("is_check_passed") and not report.get("load_parquet"):
        return []
    detail = report.get("load_parquet") or report.get("message") or "failed"
    return [Problem(shown, report.get("line_number"), f"together check_file: {detail}")]


# --- DPO preference rows and GRPO prompt rows ----------------------------------------------------
#
# together 3.1.1's ``check_file`` checks a JSONL file's structure only (UTF-8, one JSON object per line,
# at least one sample: together/lib/utils/files.py ``_check_jsonl``); its preference column map
# (together/lib/constants.py) is not used by any check. The rules below are the ones the earlier SDKs'
# ``validate_preference_openai`` enforced (together-python PR #262) and Together's preference-tuning
# guide states (https://docs.together.ai/docs/fine-tuning/preference-tuning).

PREFERENCE_KEYS = FORMAT_KEYS["preference"]
PREFERENCE_SHAPE = (
    '{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}], '
    '"non_preferred_output": [{"role": "assistant", "content": ...}]}'
)
PROMPT_SHAPE = '{"messages": [system?, user, ...], <columns for the rewards>} ending with a user turn'
# What each method trains on, for the messages of a file given to the wrong method.
METHOD_ROWS = {
    "sft": "chat rows ({\"messages\": [..., assistant]}, prompt/completion or text)",
    "dpo": f"preference rows {PREFERENCE_SHAPE}",
    "grpo": f"prompt rows {PROMPT_SHAPE}",
}
CHAT_IN_DPO = f"a chat row ('messages'), but DPO trains on {METHOD_ROWS['dpo']}"
PREFERENCE_IN_GRPO = f"a preference row, but GRPO trains on {METHOD_ROWS['grpo']}"
CHAT_IN_GRPO = (
    "ends with an assistant message (a chat row?); a GRPO prompt ends with the user's turn and the model writes the reply"
)
# Reasons that mean "a row of another method": a file holding nothing else is reported once.
WRONG_FORMAT = {CHAT_IN_DPO, PREFERENCE_IN_GRPO, CHAT_IN_GRPO}


def preference_row_problems(row: dict[str, Any]) -> list[str]:
    """Reasons one line breaks Together's preference (DPO) format; empty when it is a valid row."""
    missing = [k for k in PREFERENCE_KEYS if k not in row]
    if missing:
        fmt, _ = detect_format(row)
        if fmt == "conversation":
            return [CHAT_IN_DPO]
        return [f"missing {', '.join(repr(k) for k in missing)}: a DPO row is {PREFERENCE_SHAPE}"]
    reasons = []
    extra = sorted(k for k in row if k not in PREFERENCE_KEYS)
    if extra:
        reasons.append(
            f"extra column(s) {', '.join(repr(k) for k in extra)}: a preference row holds only "
            "'input', 'preferred_output' and 'non_preferred_output'"
        )
    inp = row["input"]
    if not isinstance(inp, dict) or "messages" not in inp:
        reasons.append("'input' must be an object with 'messages'")
    else:
        messages = inp["messages"]
        reasons += [f"input: {r}" for r in message_problems(messages, require_assistant=False)]
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            if messages[-1].get("role") == "assistant":
                reasons.append("input.messages ends with an assistant message; the replies to compare are the outputs")
    for key in ("preferred_output", "non_preferred_output"):
        reasons += _output_problems(key, row[key])
    return reasons


def _output_problems(key: str, out: Any) -> list[str]:
    """One preference output: a list of exactly one assistant message with non-empty content."""
    if not isinstance(out, list):
        return [f"'{key}' must be a list holding one assistant message, got {_type_name(out)}"]
    if len(out) != 1:
        return [f"'{key}' holds {len(out)} messages; it must hold exactly one assistant message"]
    message = out[0]
    if not isinstance(message, dict):
        return [f"{key}[0] is not an object"]
    if message.get("role") != "assistant":
        return [f"{key}[0] has role {message.get('role')!r}; it must be 'assistant'"]
    if "content" not in message:
        return [f"{key}[0] has no 'content'"]
    content = message["content"]
    if content is None or content == "" or content == []:
        return [f"{key}[0] content is empty"]
    problems, _ = _content_problems(f"{key}[0]", content, "assistant")
    return problems


def prompt_row_problems(row: dict[str, Any]) -> list[str]:
    """Reasons one line is not a GRPO prompt row; empty when it is valid. Columns besides ``messages``
    are free (they reach the reward functions by name)."""
    if "messages" not in row:
        fmt, _ = detect_format(row)
        if fmt == "preference":
            return [PREFERENCE_IN_GRPO]
        return [f"no 'messages': GRPO trains on {METHOD_ROWS['grpo']}"]
    messages = row["messages"]
    reasons = message_problems(messages, require_assistant=False)
    if isinstance(messages, list) and messages:
        roles = [m.get("role") for m in messages if isinstance(m, dict)]
        if "user" not in roles:
            reasons.append("no user message: a prompt row needs the user's turn to answer")
        if roles and roles[-1] == "assistant":
            reasons.append(CHAT_IN_GRPO)
    return reasons


ROW_CHECKS = {"dpo": preference_row_problems, "grpo": prompt_row_problems}


def validate_method_file(
    path: Path | str,
    method: str = "sft",
    *,
    run_together_check: bool = True,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> list[Problem]:
    """All problems of one fold file for ``method`` (``train.method``): chat rows for ``sft``
    (`validate_file`, plus: a preference file is refused, it needs ``--method dpo``), preference rows for
    ``dpo``, prompt rows for ``grpo``; every line's problems as ``path:line: reason``."""
    if method == "sft":
        problems = validate_file(path, run_together_check=run_together_check, max_line_bytes=max_line_bytes)
        return problems or _not_preference(Path(path), max_line_bytes)
    check = ROW_CHECKS[method]
    path = Path(path)
    shown = display_path(path)
    if path.suffix != ".jsonl":
        return [Problem(shown, None, f"expected a .jsonl file, got '{path.suffix or path.name}'")]
    problems: list[Problem] = []
    count = 0
    try:
        with open(path, "rb") as handle:
            for number, raw in jsonl_lines(handle, shown, problems, max_line_bytes):
                count += 1
                row, reason = parse_json_object(raw)
                if reason is not None:
                    problems.append(Problem(shown, number, reason))
                    continue
                problems.extend(Problem(shown, number, r) for r in check(row))
    except FileNotFoundError:
        return [Problem(shown, None, f"no such file ({method} trains on {METHOD_ROWS[method]})")]
    except IsADirectoryError:
        return [Problem(shown, None, "is a directory, not a file")]
    except OSError as exc:
        return [Problem(shown, None, f"cannot read file: {exc.strerror or exc}")]
    if count == 0 and not problems:
        problems.append(Problem(shown, None, "file is empty: at least 1 sample is needed"))
    wrong = {p.reason for p in problems}
    if count > 1 and len(problems) == count and len(wrong) == 1 and wrong <= WRONG_FORMAT:
        # A whole file of another method's rows (chat rows given to --method dpo) is one problem, not N.
        first = min(p.line or 0 for p in problems)
        return [Problem(shown, first, f"{next(iter(wrong))} (every line, {count} of {count})")]
    if run_together_check and not problems and method == "dpo":  # the check the SDK runs on upload
        problems.extend(together_check(path, shown))
    return sorted(problems, key=lambda p: p.line or 0)


def _not_preference(path: Path, max_line_bytes: int) -> list[Problem]:
    """A valid file of preference rows is not SFT data: one problem naming ``--method dpo``."""
    try:
        with open(path, "rb") as handle:
            for number, raw in jsonl_lines(handle, display_path(path), [], max_line_bytes):
                row, _ = parse_json_object(raw)
                if isinstance(row, dict) and detect_format(row)[0] == "preference":
                    return [
                        Problem(display_path(path), number, "preference rows: train them with --method dpo (SFT trains on chat rows)")
                    ]
                return []
    except OSError:
        return []
    return []

