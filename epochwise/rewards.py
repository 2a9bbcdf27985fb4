"""GRPO reward functions: user Python named ``module:function`` or ``path/to/rewards.py:function``.

A reward has TRL's signature (https://huggingface.co/docs/trl/main/en/grpo_trainer#using-a-custom-reward-function)::

    def correct(prompts, completions, answer, **kwargs) -> list[float | None]: ...

``prompts`` are the rows' ``messages`` (a list of chat messages each), ``completions`` the sampled replies in
the same conversational form (``[{"role": "assistant", "content": text}]`` each), and every other column of
the prompt rows arrives by name as a list aligned with them. ``None`` means "does not apply to this row".
Functions written for TRL's ``GRPOTrainer`` on conversational data therefore work unchanged.

`check_rewards` calls each function on a real row before any paid or long work, so a missing function, a
signature that cannot take the columns, a result of the wrong length, a non-number or an exception is a
`UserError` naming the function and the row, not a crash in the middle of an epoch.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from epochwise.problems import UserError

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Reward:
    """One loaded reward function; ``spec`` is what the user wrote (part of the epoch key)."""

    spec: str
    fn: Callable[..., Sequence[float | None]]

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", self.spec)


def load_reward(spec: str, base: Path | None = None) -> Reward:
    """Import ``module:function`` or ``file.py:function`` (a relative file is resolved against ``base``)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f"reward {spec!r}: write it as module:function or path/to/file.py:function")
    module = _import(spec, where, base or Path.cwd())
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UserError(f"reward {spec!r}: {where} has no function {name!r} (it has: {', '.join(public) or 'none'})")
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {name} is a {type(fn).__name__}, not a function")
    return Reward(spec, fn)


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _file_of(where: str, base: Path) -> Path:
    path = Path(where).expanduser()
    return path if path.is_absolute() else base / path


def reward_source_hash(spec: str, base: Path | None = None) -> str | None:
    """sha256 of the source file behind ``spec`` (``file.py:fn`` or ``module:fn``), part of a GRPO
    epoch's key so that an edited reward trains again; None when the file cannot be found (loading the
    reward then fails with the reason)."""
    where, _, _ = spec.rpartition(":")
    if _is_file(where):
        path: Path | None = _file_of(where, base or Path.cwd())
    else:
        try:
            found = importlib.util.find_spec(where)
        except (ImportError, ValueError):
            return None
        path = Path(found.origin) if found and found.origin and found.has_location else None
    if path is None or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import(spec: str, where: str, base: Path) -> Any:
    if _is_file(where):
        path = _file_of(where, base)
        if not path.is_file():
            raise UserError(f"reward {spec!r}: no file {path}")
        # the content is in the name: a file edited while a worker runs is imported again, not served stale
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        module_name = f"epochwise_rewards_{abs(hash(str(path.resolve()))):x}_{digest}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise UserError(f"reward {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
        return module
    try:
        return importlib.import_module(where)
    except Exception as exc:
        raise UserError(f"reward {spec!r}: cannot import {where}: {type(exc).__name__}: {exc}") from None


def load_rewards(specs: Sequence[str], base: Path | None = None) -> list[Reward]:
    """Every reward of ``train.rewards``; GRPO needs at least one."""
    if not specs:
        raise UserError("GRPO needs at least one reward function: --reward module:function (repeatable)")
    return [load_reward(spec, base) for spec in specs]


def read_prompt_rows(path: Path | str) -> list[dict[str, Any]]:
    """Prompt rows ``{"messages": [system?, user], ...columns}``; a `UserError` names a bad line."""
    rows = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = orjson.loads(line)
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages:
                raise UserError(f"{path}:{number}: a GRPO prompt row needs 'messages' (system?, user)")
            if messages[-1].get("role") == "assistant":
                raise UserError(f"{path}:{number}: a GRPO prompt ends with the user turn, not an assistant reply")
            rows.append(row)
    return rows


def prompt_columns(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Messages], dict[str, list[Any]]]:
    """Prompts (each row's ``messages``) and the other columns by name, aligned with them."""
    names = sorted({k for row in rows for k in row if k != "messages"})
    return [list(row["messages"]) for row in rows], {n: [row.get(n) for row in rows] for n in names}


def as_completions(texts: Sequence[str]) -> list[Messages]:
    """Sampled texts in TRL's conversational completion form."""
    return [[{"role": "assistant", "content": text}] for text in texts]


def score(
    reward: Reward, prompts: Sequence[Messages], completions: Sequence[Messages], columns: Mapping[str, Sequence[Any]]
) -> list[float | None]:
    """Call one reward and check its result: one number (or None) per completion, finite."""
    result = reward.fn(prompts=list(prompts), completions=list(completions), **{k: list(v) for k, v in columns.items()})
    if inspect.isawaitable(result):
        raise UserError(f"reward {reward.spec}: async reward functions are not supported; return a list")
    try:
        values = list(result)
    except TypeError:
        raise UserError(f"reward {reward.spec}: returned {type(result).__name__}, not a list of numbers") from None
    if len(values) != len(completions):
        raise UserError(f"reward {reward.spec}: returned {len(values)} values for {len(completions)} completions")
    checked: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"reward {reward.spec}: value {i} is {value!r} ({type(value).__name__}), not a number")
        if not math.isfinite(value):
            raise UserError(f"reward {reward.spec}: value {i} is {value}, not a finite number")
        checked.append(float(value))
    return checked


def check_rewards(rewards: Sequence[Reward], rows: Sequence[Mapping[str, Any]], source: str) -> None:
    """Call every reward on the first row of ``source`` (``path`` of the prompt rows) with two sample
    completions, so a broken reward fails before any model is loaded or any resource is paid for."""
    if not rows:
        raise UserError(f"{source}: no prompt rows to check the rewards on")
    prompts, columns = prompt_columns(rows[:1])
    prompts, columns = prompts * 2, {k: v * 2 for k, v in columns.items()}
    completions = as_completions(["", "sample completion"])
    for reward in rewards:
        signature = _signature(reward)
        if signature is not None:
            try:
                signature.bind(prompts=prompts, completions=completions, **columns)
            except TypeError as exc:
                given = ", ".join(["prompts", "completions", *columns])
                raise UserError(
                    f"reward {reward.spec}: cannot be called with ({given}) from {source}:1: {exc}; "
                    "take the columns you need by name and accept **kwargs"
                ) from None
        try:
            score(reward, prompts, completions, columns)
        except UserError as exc:
            raise UserError(f"{exc} (called on {source}:1)") from None
        except Exception as exc:
            raise UserError(f"reward {reward.spec}: raised {type(exc).__name__}: {exc} on {source}:1") from None


def _signature(reward: Reward) -> inspect.Signature | None:
    try:
        return inspect.signature(reward.fn)
    except (TypeError, ValueError):  # some builtins have none; calling them is the check then
        return None
