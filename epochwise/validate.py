"""Strict validation of fine-tuning JSONL, following Together's server-side rules.

together 3.1.1's own ``check_file`` is structural only (UTF-8, one JSON object per line, at least one
sample; together-py PR #364); the schema rules below are the ones Together's server applies after upload
(https://docs.together.ai/docs/fine-tuning/data-preparation). Catching them here means a bad file fails in a second,
before an upload or a paid job, with ``path:line: reason`` instead of a server-side INVALID_FORMAT.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from epochwise.io import DEFAULT_MAX_LINE_BYTES, jsonl_lines
from epochwise.problems import Problem, display_path
from epochwise.records import parse_json_object

ROLES = ("system", "user", "assistant", "tool")
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
        if "content" not in message:
            reasons.append(f"{where} has no 'content'")
        else:
            reasons.extend(_content_problems(where, message["content"]))
        if "weight" in message and (message["weight"] not in (0, 1) or isinstance(message["weight"], bool)):
            reasons.append(f"{where} has weight {message['weight']!r}; weight must be 0 or 1")
        if role == "system" and index != 0:
            reasons.append(f"{where} is a system message; only the first message may be one")
        if index == 0 and role not in ("system", "user", None) and role in ROLES:
            reasons.append(f"{where} is {role!r}; a conversation starts with 'system' or 'user'")
        if role is not None and role == previous and role in ROLES:
            reasons.append(f"{where} repeats role {role!r}; user and assistant turns must alternate")
        previous = role
    if require_assistant and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        reasons.append("no assistant message: at least one is needed to train on")
    return reasons


def _content_problems(where: str, content: Any) -> list[str]:
    if isinstance(content, str):
        return []
    if isinstance(content, list):
        # OpenAI-style multimodal parts: [{"type": "text", "text": ...}, {"type": "image_url", ...}]
        bad = [i for i, part in enumerate(content) if not (isinstance(part, dict) and part.get("type") in ("text", "image_url"))]
        if bad:
            return [f"{where}.content[{bad[0]}] must be a 'text' or 'image_url' part"]
        return []
    return [f"{where} content must be a string, got {type(content).__name__}"]


def row_problems(row: dict[str, Any], fmt: str) -> list[str]:
    """Reasons one row of a known format is invalid."""
    if fmt == "conversation":
        return message_problems(row["messages"])
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
        if not (isinstance(out, list) and len(out) == 1 and isinstance(out[0], dict) and out[0].get("role") == "assistant"):
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
    return sorted(problems, key=lambda p: (p.line or 0))


def together_check(path: Path, shown: str) -> list[Problem]:
    """Run together's own ``check_file`` (the check its SDK runs before every upload)."""
    from together.lib import check_file

    report = check_file(path, purpose="fine-tune")
    if report.get("is_check_passed") and not report.get("load_parquet"):
        return []
    detail = report.get("load_parquet") or report.get("message") or "failed"
    return [Problem(shown, report.get("line_number"), f"together check_file: {detail}")]
