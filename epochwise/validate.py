"""Strict validation of fine-tuning JSONL, following Together's server-side rules.

together 3.1.1's own ``check_file`` is structural only (UTF-8, one JSON object per line, at least one
sample; together-py PR #364); the schema rules below are the ones Together's server applies after upload
(its data preparation, function-calling, reasoning and vision fine-tuning guides at
https://docs.together.ai/docs/fine-tuning/data-preparation). Catching them here means a bad file fails
in a second, before an upload or a paid job, with ``path:line: reason`` instead of a server-side
INVALID_FORMAT.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from epochwise.io import DEFAULT_MAX_LINE_BYTES, jsonl_lines
from epochwise.problems import Problem, display_path
from epochwise.records import parse_json_object

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
    file_format: str | None = None
    first_line = 0
    count = 0
    for line, row in rows:
        count += 1
        fmt, reason = detect_format(row)
        if reason is not None:
            problems.append(Problem(path, line, reason))
            continue
        if file_format is None:
            file_format, first_line = fmt, line
        elif fmt != file_format:
            problems.append(
                Problem(path, line, f"{fmt} row in a {file_format} file (line {first_line}); one format per file")
            )
            continue
        problems.extend(Problem(path, line, r) for r in row_problems(row, fmt))
    return problems, count, file_format


def validate_file(
    path: Path | str, *, run_together_check: bool = True, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> list[Problem]:
    """All problems in one fine-tuning JSONL file; an empty list means Together will accept it."""
    path = Path(path)
    shown = display_path(path)
    if path.suffix != ".jsonl":
        return [Problem(shown, None, f"expected a .jsonl file, got '{path.suffix or path.name}'")]
    problems: list[Problem] = []
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        with open(path, "rb") as handle:
            for number, raw in jsonl_lines(handle, shown, problems, max_line_bytes):
                row, reason = parse_json_object(raw)
                if reason is not None:
                    problems.append(Problem(shown, number, reason))
                else:
                    rows.append((number, row))
    except FileNotFoundError:
        return [Problem(shown, None, "no such file")]
    except IsADirectoryError:
        return [Problem(shown, None, "is a directory, not a file")]
    except OSError as exc:
        return [Problem(shown, None, f"cannot read file: {exc.strerror or exc}")]
    row_issues, count, _ = validate_rows(shown, rows)
    problems.extend(row_issues)
    if count == 0 and not problems:
        problems.append(Problem(shown, None, "file is empty: at least 1 sample is needed"))
    if run_together_check and not problems:
        problems.extend(together_check(path, shown))
    return sorted(problems, key=lambda p: p.line or 0)


def together_check(path: Path, shown: str) -> list[Problem]:
    """Run together's own ``check_file`` (the check its SDK runs before every upload)."""
    from together.lib import check_file

    report = check_file(path, purpose="fine-tune")
    if report.get("is_check_passed") and not report.get("load_parquet"):
        return []
    detail = report.get("load_parquet") or report.get("message") or "failed"
    return [Problem(shown, report.get("line_number"), f"together check_file: {detail}")]


def validate_prompt_file(path: Path | str, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[Problem]:
    """GRPO prompt rows: ``{"messages": [system?, user, ...], ...extra columns}``, the messages valid and
    not ending with the assistant (the model writes that turn); an empty list means usable."""
    path = Path(path)
    shown = display_path(path)
    problems: list[Problem] = []
    count = 0
    try:
        with open(path, "rb") as handle:
            for number, raw in jsonl_lines(handle, shown, problems, max_line_bytes):
                row, reason = parse_json_object(raw)
                count += 1
                if reason is None and not isinstance(row.get("messages"), list):
                    reason = "a prompt row needs 'messages': a list of chat messages"
                if reason is not None:
                    problems.append(Problem(shown, number, reason))
                    continue
                problems += [Problem(shown, number, r) for r in message_problems(row["messages"], require_assistant=False)]
                last = row["messages"][-1] if row["messages"] else None
                if isinstance(last, dict) and last.get("role") == "assistant":
                    problems.append(Problem(shown, number, "a prompt must not end with an assistant message"))
    except OSError as exc:
        return [Problem(shown, None, f"cannot read file: {exc.strerror or exc}")]
    if count == 0 and not problems:
        problems.append(Problem(shown, None, "file is empty: at least 1 prompt row is needed"))
    return problems
