"""ChatML fold -> Harmony token parquet for gpt-oss, with labels on exactly what the assistant generates.

Together trains gpt-oss on pre-tokenized parquet (columns ``input_ids``, ``attention_mask``, ``labels``);
the local trainer reads the same rows, so both see identical tokens and loss masks. The conversion:

- Every conversation starts with a Harmony system message carrying ``Reasoning: <effort>`` and no
  conversation start date (a date would make the output depend on the day it ran).
- ChatML ``system`` -> Harmony developer message (the text as instructions); ``user`` -> user;
  ``assistant`` -> assistant on channel ``final``. A non-empty ``thinking`` (or ``reasoning_content``)
  becomes an assistant message on channel ``analysis`` just before it, but only for assistant turns after
  the last user message: gpt-oss drops earlier chain-of-thought at inference, so it is dropped here too.
- Rendering is openai-harmony's ``render_conversation_for_training`` with ``auto_drop_analysis=False``
  (its default silently drops the analysis of a single-turn conversation, so reasoning would never be
  trained).
- Labels are -100 except, for every assistant message, the tokens after the ``assistant`` role token
  through its terminator (``<|end|>``, ``<|return|>`` or ``<|call|>``): exactly what the model generates
  after ``<|start|>assistant``. Boundaries come from the special tokens of the rendered stream. Message
  text can never produce a special token (the renderer encodes text as ordinary tokens), so text that
  looks like ``<|end|>`` cannot move a boundary. An assistant message with ``"weight": 0`` (Together's
  per-message switch) is rendered but not trained.
- No padding: ``attention_mask`` is all 1. Rows over ``max_seq_length`` are an error, dropped or
  truncated (`HarmonyConfig.overlong`).

The vocab never comes from the network: o200k_base is unpacked once from the ``bpe-openai`` package into
a cache directory (or read from a configured one) and handed to openai-harmony through
``TIKTOKEN_ENCODINGS_BASE``; openai-harmony verifies its sha256.

Outputs (``<fold>/harmony/train_harmony.parquet``, ``val_harmony.parquet``) are written atomically and
only after together's ``check_file`` passed on them. ``<fold>/harmony/manifest.json`` records the
conversion key (sha256 of the source files + settings + openai-harmony version + converter version) and
the outputs' sha256; a rerun with the same key and intact outputs reuses them instead of converting.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import multiprocessing
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from openai_harmony import (
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyEncodingName,
    HarmonyError,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    TextContent,
    load_harmony_encoding,
)

from epochwise.config.harmony import HarmonyConfig
from epochwise.fold import TRAIN_FILE, TRAIN_PARQUET, VAL_FILE, VAL_PARQUET, Fold
from epochwise.io import (
    DEFAULT_MAX_LINE_BYTES,
    atomic_write,
    atomic_write_bytes,
    jsonl_lines,
    parse_json_object,
    sha256_file,
)
from epochwise.problems import InputError, Problem, display_path
from epochwise.validate import message_problems, together_check

# Bump when the same input and settings would give different tokens or labels: it is part of the cache key.
CONVERTER_VERSION = "1"

O200K_FILE = "o200k_base.tiktoken"
# sha256 of the unpacked o200k_base vocab (3,613,922 bytes); openai-harmony checks the same value.
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

MANIFEST = "manifest.json"
SOURCES = {"train": TRAIN_FILE, "val": VAL_FILE}
OUTPUTS = {"train": TRAIN_PARQUET, "val": VAL_PARQUET}

IGNORE_INDEX = -100  # label of a token that is not trained (PyTorch cross-entropy's ignore_index)

# Column types as HF tokenizers + datasets write them, the form Together's own tokenizing example uploads.
SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("attention_mask", pa.list_(pa.int8())),
        ("labels", pa.list_(pa.int64())),
    ]
)

TRAINING_RENDER = RenderConversationConfig(auto_drop_analysis=False)
EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}

CHUNK_ROWS = 256  # rows per unit of work (and per parquet record batch)
POOL_MIN_ROWS = 2000  # below this a worker pool costs more to start (~1 s per process) than it saves


# --- vocab and encoding ---------------------------------------------------------------------------


def default_vocab_cache() -> Path:
    """``$XDG_CACHE_HOME/epochwise/tiktoken`` (``~/.cache/epochwise/tiktoken`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "epochwise" / "tiktoken"


def ensure_vocab_dir(vocab_dir: Path | str | None = None) -> Path:
    """The directory holding ``o200k_base.tiktoken``, unpacking it from ``bpe-openai`` when needed.

    A configured ``vocab_dir`` is used as it is (openai-harmony rejects a file with the wrong sha256).
    The default cache is (re)written atomically whenever its file is missing or differs.
    """
    if vocab_dir is not None:
        directory = Path(vocab_dir).expanduser()
        if not (directory / O200K_FILE).is_file():
            raise FileNotFoundError(f"{directory / O200K_FILE} not found (harmony.vocab_dir must hold {O200K_FILE})")
        return directory
    directory = default_vocab_cache()
    target = directory / O200K_FILE
    if target.is_file() and sha256_file(target) == O200K_SHA256:
        return directory
    data = gzip.decompress(packed_vocab().read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_SHA256:
        raise RuntimeError(f"bpe-openai's {O200K_FILE}.gz unpacks to sha256 {digest}, expected {O200K_SHA256}")
    atomic_write_bytes(target, data)
    return directory


def packed_vocab() -> Path:
    """``bpe_openai/data/o200k_base.tiktoken.gz``, found without importing bpe_openai (its import takes ~2 s)."""
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the bpe-openai package is not installed; set harmony.vocab_dir to a directory holding {O200K_FILE}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{O200K_FILE}.gz"


_ENV_LOCK = threading.Lock()


@functools.cache
def load_encoding(vocab_dir: str) -> HarmonyEncoding:
    """The gpt-oss Harmony encoding, reading o200k_base from ``vocab_dir`` (never downloading).

    openai-harmony reads ``TIKTOKEN_ENCODINGS_BASE`` while loading; it is set only for that call, under
    a lock, so the rest of the process keeps its environment.
    """
    with _ENV_LOCK:
        previous = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = vocab_dir
        try:
            return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        except HarmonyError as exc:
            raise RuntimeError(f"cannot load the o200k_base vocab from {vocab_dir}: {exc}") from exc
        finally:
            if previous is None:
                del os.environ["TIKTOKEN_ENCODINGS_BASE"]
            else:
                os.environ["TIKTOKEN_ENCODINGS_BASE"] = previous


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the Harmony tokens that delimit messages, read from the encoding rather than hard-coded."""

    start: int
    channel: int
    terminators: tuple[int, ...]  # <|end|>, <|return|>, <|call|>
    assistant: int  # the role token right after <|start|>

    @classmethod
    def of(cls, encoding: HarmonyEncoding) -> SpecialTokens:
        def one(text: str, allowed: bool = True) -> int:
            ids = encoding.encode(text, allowed_special={text} if allowed else set())
            if len(ids) != 1:
                raise RuntimeError(f"{text!r} is {len(ids)} tokens in this encoding, expected 1")
            return ids[0]

        return cls(
            start=one("<|start|>"),
            channel=one("<|channel|>"),
            terminators=(one("<|end|>"), one("<|return|>"), one("<|call|>")),
            assistant=one("assistant", allowed=False),
        )


@functools.cache
def _special_tokens(vocab_dir: str) -> SpecialTokens:
    return SpecialTokens.of(load_encoding(vocab_dir))


# --- one conversation -----------------------------------------------------------------------------


class ConversionError(ValueError):
    """A conversation that cannot become a Harmony training row; the message is the reason."""


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts; only text has a Harmony equivalent here
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ConversionError(f"{where} has a non-text content part; Harmony conversion is text-only")
            texts.append(part["text"])
        return "".join(texts)
    raise ConversionError(f"{where} content must be a string")


def _thinking(message: dict[str, Any], where: str) -> str:
    for key in ("thinking", "reasoning_content"):
        value = message.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise ConversionError(f"{where}.{key} must be a string")
        return value
    return ""


@functools.cache
def _system_message(reasoning_effort: str) -> Message:
    """The Harmony system message, built once per effort (pydantic construction is a fifth of the
    per-row cost outside rendering); it is only read, never mutated, so sharing it is safe."""
    system = SystemContent.new().with_reasoning_effort(EFFORTS[reasoning_effort])
    return Message.from_role_and_content(Role.SYSTEM, system)


def to_harmony(messages: list[dict[str, Any]], reasoning_effort: str) -> tuple[Conversation, list[bool]]:
    """A ChatML ``messages`` list as a Harmony conversation.

    Returns the conversation and, for each assistant message of it in order (analysis messages
    included), whether it is trained (``False`` for ``"weight": 0``).
    """
    reasons = message_problems(messages)
    if reasons:
        raise ConversionError("; ".join(reasons))
    out = [_system_message(reasoning_effort)]
    trained: list[bool] = []
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message["role"]
        if "tool_calls" in message:  # valid for Together's JSONL, but not rendered into Harmony here
            raise ConversionError(f"{where} has tool_calls; the Harmony conversion supports text turns only")
        text = _text(message["content"], where)
        if role == "system":
            out.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(text)))
        elif role == "user":
            out.append(Message.from_role_and_content(Role.USER, TextContent(text=text)))
        elif role == "assistant":
            train = message.get("weight", 1) != 0
            thinking = _thinking(message, where)
            if thinking and index > last_user:
                out.append(Message.from_role_and_content(Role.ASSISTANT, thinking).with_channel("analysis"))
                trained.append(train)
            out.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final"))
            trained.append(train)
        else:
            raise ConversionError(f"{where} has role {role!r}; the Harmony conversion supports system, user, assistant")
    return Conversation.from_messages(out), trained


def assistant_spans(tokens: np.ndarray, special: SpecialTokens, n_messages: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each assistant message's generated part: after the role token through the terminator.

    Every rendered message is ``<|start|>role ... <|terminator|>``; the stream is checked to hold
    exactly ``n_messages`` such well-nested messages before any span is trusted.
    """
    start_id, (end_id, return_id, call_id) = special.start, special.terminators
    marks = np.flatnonzero(
        (tokens == start_id) | (tokens == end_id) | (tokens == return_id) | (tokens == call_id)
    ).tolist()
    kinds = tokens[marks].tolist()
    # Well nested means: start, terminator, start, terminator, ..., ending on the stream's last token.
    if (
        len(marks) != 2 * n_messages
        or any(kind != start_id for kind in kinds[0::2])
        or start_id in kinds[1::2]
        or (marks and marks[-1] != len(tokens) - 1)
    ):
        raise ConversionError(f"rendered stream is not {n_messages} well-nested <|start|> ... terminator messages")
    spans = []
    for begin, end in zip(marks[0::2], marks[1::2], strict=True):
        if tokens[begin + 1] == special.assistant:
            if tokens[begin + 2] != special.channel:
                raise ConversionError("assistant message rendered without a channel")
            spans.append((begin + 2, end + 1))
    return spans


def render_row(messages: list[dict[str, Any]], reasoning_effort: str, vocab_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, labels)`` of one ChatML conversation; raises `ConversionError` with the reason."""
    encoding = load_encoding(vocab_dir)
    conversation, trained = to_harmony(messages, reasoning_effort)
    tokens = np.asarray(encoding.render_conversation_for_training(conversation, TRAINING_RENDER), dtype=np.int32)
    spans = assistant_spans(tokens, _special_tokens(vocab_dir), len(conversation.messages))
    if len(spans) != len(trained):
        raise ConversionError(f"rendered {len(spans)} assistant messages, expected {len(trained)}")
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
    for (begin, end), train in zip(spans, trained, strict=True):
        if train:
            labels[begin:end] = tokens[begin:end]
    return tokens, labels


# One converted line: (line number, input_ids, labels) or (line number, reason).
Converted = tuple[int, np.ndarray, np.ndarray] | tuple[int, str]


def convert_lines(lines: list[tuple[int, bytes]], reasoning_effort: str, vocab_dir: str) -> list[Converted]:
    """Convert raw JSONL lines; a line that cannot be converted becomes ``(line, reason)``.

    Module-level and free of shared state so a process pool can run it on chunks of a file.
    """
    out: list[Converted] = []
    for number, raw in lines:
        row, reason = parse_json_object(raw)
        if reason is None and "messages" not in row:
            reason = "no 'messages': a fold holds ChatML conversations"
        if reason is not None:
            out.append((number, reason))
            continue
        try:
            tokens, labels = render_row(row["messages"], reasoning_effort, vocab_dir)
        except (ConversionError, HarmonyError) as exc:
            out.append((number, str(exc)))
            continue
        out.append((number, tokens, labels))
    return out


# --- a whole fold ---------------------------------------------------------------------------------


@dataclass
class SplitStats:
    """What the conversion of one split wrote; token counts are of the written rows."""

    source: str
    output: str
    rows_read: int = 0
    rows: int = 0
    tokens: int = 0
    labelled_tokens: int = 0
    longest: int = 0  # longest rendered row in tokens, before any truncation
    over_max: int = 0  # rows longer than max_seq_length (then dropped, truncated, or an error)
    dropped: int = 0  # overlong rows left out, plus truncated rows left with no trained token
    truncated: int = 0
    untrained: int = 0  # rows without any trained token (every assistant message has weight 0), left out
    sha256: str = ""  # of the written parquet file


TOTALS = ("rows", "tokens", "labelled_tokens", "longest", "over_max", "dropped", "truncated", "untrained")


@dataclass
class HarmonySummary:
    """The result of `convert_fold`; ``cached`` is True when existing outputs were reused."""

    fold: str
    key: str
    cached: bool
    train: SplitStats
    val: SplitStats | None
    manifest: str
    settings: dict[str, Any] = field(default_factory=dict)

    def splits(self) -> list[SplitStats]:
        return [s for s in (self.train, self.val) if s is not None]

    def total(self, name: str) -> int:
        values = [getattr(s, name) for s in self.splits()]
        return max(values) if name == "longest" else sum(values)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a Prefect result or JSON: output paths first, then the totals and each split."""
        return {
            "train": self.train.output,
            "val": self.val.output if self.val else None,
            "manifest": self.manifest,
            "key": self.key,
            "cached": self.cached,
            **{name: self.total(name) for name in TOTALS},
            "splits": {name: asdict(s) for name, s in (("train", self.train), ("val", self.val)) if s},
            "settings": self.settings,
        }


def conversion_settings(config: HarmonyConfig) -> dict[str, Any]:
    """The settings that change the written bytes (and so belong in the cache key)."""
    return {
        "reasoning_effort": config.reasoning_effort,
        "max_seq_length": config.max_seq_length,
        "overlong": config.overlong,
    }


def cache_key(source_hashes: dict[str, str | None], config: HarmonyConfig) -> str:
    """sha256 over the sources' sha256, the output-changing settings and the tool versions; never paths or times."""
    material = {
        "sources": source_hashes,
        "settings": conversion_settings(config),
        "openai_harmony": importlib.metadata.version("openai-harmony"),
        "converter": CONVERTER_VERSION,
        "vocab": O200K_SHA256,
    }
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def harmony_paths(fold_dir: Path | str) -> dict[str, Path]:
    """Where `convert_fold` writes: ``train``, ``val`` and ``manifest`` under ``<fold>/harmony``."""
    paths = Fold.of(fold_dir).harmony
    return {**paths, "manifest": paths["train"].parent / MANIFEST}


def convert_fold(
    fold_dir: Path | str,
    config: HarmonyConfig,
    *,
    force: bool = False,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> HarmonySummary:
    """Convert ``<fold>/train.jsonl`` (and ``val.jsonl`` when present) to Harmony parquet, or reuse it.

    Raises `InputError` listing every bad or overlong row (with ``overlong='error'``) before anything is
    replaced; ``force`` reconverts even when the manifest's key matches. A line over ``max_line_bytes``
    (``data.max_line_bytes``) is such a row.
    """
    fold_dir = Path(fold_dir)
    sources = {name: fold_dir / file for name, file in SOURCES.items()}
    if not sources["train"].is_file():
        raise InputError([Problem(display_path(sources["train"]), None, "no such file: convert needs a prepared fold")])
    if not sources["val"].is_file():
        del sources["val"]
    hashes = {
        name: (sha256_file(path) if name in sources else None)
        for name, path in (("train", sources["train"]), ("val", fold_dir / SOURCES["val"]))
    }
    key = cache_key(hashes, config)
    paths = harmony_paths(fold_dir)
    if not force:
        reused = _reuse(fold_dir, key, paths)
        if reused is not None:
            return reused
    summary = _convert(fold_dir, sources, key, config, paths, max_line_bytes)
    if "val" not in sources:
        paths["val"].unlink(missing_ok=True)  # a val parquet from an earlier fold layout would be stale
    manifest = {
        "key": key,
        "converter": CONVERTER_VERSION,
        "openai_harmony": importlib.metadata.version("openai-harmony"),
        "settings": conversion_settings(config),
        "sources": hashes,
        "outputs": {
            stats_name: stats.sha256 for stats_name, stats in (("train", summary.train), ("val", summary.val)) if stats
        },
        "splits": {s: asdict(stats) for s, stats in (("train", summary.train), ("val", summary.val)) if stats},
    }
    atomic_write_bytes(paths["manifest"], orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return summary


def _reuse(fold_dir: Path, key: str, paths: dict[str, Path]) -> HarmonySummary | None:
    """The summary recorded beside outputs made under ``key``, if those outputs are still intact."""
    try:
        manifest = orjson.loads(paths["manifest"].read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return None
    try:
        outputs = manifest["outputs"]
        for split, digest in outputs.items():
            if not paths[split].is_file() or sha256_file(paths[split]) != digest:
                return None
        splits = manifest["splits"]
        return HarmonySummary(
            fold=display_path(fold_dir),
            key=key,
            cached=True,
            train=_here(SplitStats(**splits["train"]), paths["train"]),
            val=_here(SplitStats(**splits["val"]), paths["val"]) if "val" in splits else None,
            manifest=str(paths["manifest"].resolve()),
            settings=manifest["settings"],
        )
    except (KeyError, TypeError, AttributeError):  # a manifest from another version or hand-edited
        return None


def _here(stats: SplitStats, output: Path) -> SplitStats:
    """Recorded stats with the output path as it is now (the fold may have been moved or copied)."""
    stats.output = str(output.resolve())
    return stats


def _convert(
    fold_dir: Path,
    sources: dict[str, Path],
    key: str,
    config: HarmonyConfig,
    paths: dict[str, Path],
    max_line_bytes: int,
) -> HarmonySummary:
    vocab_dir = str(ensure_vocab_dir(config.vocab_dir))
    load_encoding(vocab_dir)  # fail on a bad vocab before any worker starts
    problems: list[Problem] = []
    stats: dict[str, SplitStats] = {}
    n_rows = sum(_count_lines(path) for path in sources.values())
    with (
        _renderer(config, vocab_dir, n_rows) as render,
        atomic_write(paths["train"]) as train_out,
        atomic_write(paths["val"]) if "val" in sources else _no_file() as val_out,
    ):
        for split, handle in (("train", train_out), ("val", val_out)):
            if split not in sources:
                continue
            shown = display_path(sources[split])
            split_stats = SplitStats(source=shown, output=str(paths[split].resolve()))
            stats[split] = split_stats
            with pq.ParquetWriter(handle, SCHEMA) as writer:
                for converted in render(_chunks(sources[split], shown, problems, max_line_bytes)):
                    batch = _accept(converted, shown, config, split_stats, problems)
                    if batch is not None and not problems:
                        writer.write_batch(batch)
            handle.flush()
            if split_stats.rows == 0 and not problems:
                problems.append(Problem(shown, None, "no rows left to write (see the dropped counts)"))
            if not problems:
                problems.extend(together_check(Path(handle.name), display_path(paths[split])))
                # Hashed before the rename, so the manifest describes what this run wrote even if a
                # concurrent run replaces the file right after.
                split_stats.sha256 = sha256_file(handle.name)
        if problems:
            raise InputError(sorted(problems))
    return HarmonySummary(
        fold=display_path(fold_dir),
        key=key,
        cached=False,
        train=stats["train"],
        val=stats.get("val"),
        manifest=str(paths["manifest"].resolve()),
        settings=conversion_settings(config),
    )


class _no_file:
    """Stands in for the val output when a fold has no val.jsonl."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def _chunks(path: Path, shown: str, problems: list[Problem], max_line_bytes: int) -> Iterator[list[tuple[int, bytes]]]:
    """Non-blank lines of ``path`` in chunks of `CHUNK_ROWS`; over-long lines become problems."""
    chunk: list[tuple[int, bytes]] = []
    with open(path, "rb") as handle:
        for number, raw in jsonl_lines(handle, shown, problems, max_line_bytes):
            chunk.append((number, raw))
            if len(chunk) == CHUNK_ROWS:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _accept(
    converted: list[Converted], shown: str, config: HarmonyConfig, stats: SplitStats, problems: list[Problem]
) -> pa.RecordBatch | None:
    """Apply the length policy to one chunk, update ``stats`` and build its record batch."""
    limit = config.max_seq_length
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for item in converted:
        stats.rows_read += 1
        if len(item) == 2:
            problems.append(Problem(shown, item[0], item[1]))  # type: ignore[arg-type]
            continue
        number, tokens, row_labels = item  # type: ignore[misc]
        stats.longest = max(stats.longest, len(tokens))
        if len(tokens) > limit:
            stats.over_max += 1
            if config.overlong == "error":
                problems.append(Problem(shown, number, f"{len(tokens)} tokens, over max_seq_length {limit}"))
                continue
            if config.overlong == "drop":
                stats.dropped += 1
                continue
            tokens, row_labels = tokens[:limit], row_labels[:limit]
            if not np.any(row_labels != IGNORE_INDEX):
                stats.dropped += 1
                continue
            stats.truncated += 1
        trained = int(np.count_nonzero(row_labels != IGNORE_INDEX))
        if trained == 0:
            stats.untrained += 1
            continue
        stats.rows += 1
        stats.tokens += len(tokens)
        stats.labelled_tokens += trained
        ids.append(tokens)
        labels.append(row_labels)
    if not ids:
        return None
    return rows_to_batch(ids, labels)


def rows_to_batch(ids: list[np.ndarray], labels: list[np.ndarray]) -> pa.RecordBatch:
    """Build the three list columns from flat buffers (no per-token Python work)."""
    lengths = np.fromiter((len(a) for a in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])  # int32 offsets: one batch of CHUNK_ROWS rows is far below 2**31 tokens
    flat_ids = np.concatenate(ids).astype(np.int32, copy=False)
    flat_labels = np.concatenate(labels).astype(np.int64, copy=False)
    pa_offsets = pa.array(offsets)
    return pa.RecordBatch.from_arrays(
        [
            pa.ListArray.from_arrays(pa_offsets, pa.array(flat_ids)),
            pa.ListArray.from_arrays(pa_offsets, pa.array(np.ones(len(flat_ids), dtype=np.int8))),
            pa.ListArray.from_arrays(pa_offsets, pa.array(flat_labels)),
        ],
        schema=SCHEMA,
    )


class _renderer:
    """Context manager giving ``render(chunks) -> iterator of converted chunks``, in order.

    With one worker it converts in this process. With more, chunks go to a process pool (spawned, not
    forked: Prefect and the caller may hold threads) with at most two chunks per worker in flight, so
    memory stays bounded on large folds.
    """

    def __init__(self, config: HarmonyConfig, vocab_dir: str, n_rows: int) -> None:
        self.effort = config.reasoning_effort
        self.vocab_dir = vocab_dir
        workers = config.workers or available_cpus()
        self.workers = workers if n_rows >= POOL_MIN_ROWS else 1
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self):  # noqa: ANN204
        if self.workers > 1:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )
        return self.render

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def render(self, chunks: Iterable[list[tuple[int, bytes]]]) -> Iterator[list[Converted]]:
        if self.pool is None:
            for chunk in chunks:
                yield convert_lines(chunk, self.effort, self.vocab_dir)
            return
        pending: list[concurrent.futures.Future[list[Converted]]] = []
        for chunk in chunks:
            pending.append(self.pool.submit(convert_lines, chunk, self.effort, self.vocab_dir))
            if len(pending) >= 2 * self.workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def read_parquet_rows(path: Path | str) -> list[dict[str, list[int]]]:
    """Rows of a written parquet file as ``{"input_ids", "attention_mask", "labels"}`` int lists."""
    return pq.read_table(path).to_pylist()
