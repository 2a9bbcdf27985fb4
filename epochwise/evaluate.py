"""Score epochs on held-out conversations: targets, metrics, aggregation and the best epoch (pure, no I/O
beyond reading a fold's ``val.jsonl``).

An evaluation row is one ``val.jsonl`` conversation: everything before its last assistant turn is the
prompt, that turn's content the target. Each row is identified by the sha256 of its conversation, so a
cached reply belongs to the row's content, never to a line number.

Metrics (``--metric``):

* ``exact``: the reply equals the target after trimming whitespace (1 or 0 per row, mean over rows);
* ``contains``: the target occurs in the reply;
* ``json-field:NAME``: reply and target parsed as JSON and field ``NAME`` compared (``a.b`` descends into
  objects); a reply that is not JSON, or lacks the field, scores 0;
* ``labels``: targets are class labels: accuracy and macro-averaged precision, recall and F1 over the
  labels seen in targets and replies (a label never predicted has precision 0, as scikit-learn's
  ``zero_division=0``);
* ``module:function``: a user function ``f(reply: str, target: str) -> float`` in [0, 1] (a bool
  counts as 0/1), checked on the first row (reply = target) before anything is generated, like a
  reward function.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from epochwise.fold import Fold
from epochwise.problems import UserError

RowMetric = Callable[[str, str], float]
BUILT_IN = ("exact", "contains", "labels")
LABEL_METRICS = ("accuracy", "precision", "recall", "f1")


class EvaluationError(UserError, ValueError):
    """Bad evaluation input (a metric spec, a fold without rows, a user metric failing): says what and where."""


@dataclass(frozen=True)
class EvalRow:
    """One held-out conversation: prompt messages, target reply, where it came from and its content key."""

    source: str  # "<path>:<line>"
    prompt: tuple[dict[str, str], ...]
    target: str
    key: str  # sha256 of the conversation's canonical JSON

    def messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self.prompt]


def row_key(messages: Sequence[dict[str, object]]) -> str:
    """Content key of a conversation (canonical JSON: sorted keys, no whitespace)."""
    return hashlib.sha256(orjson.dumps(list(messages), option=orjson.OPT_SORT_KEYS)).hexdigest()


def read_eval_rows(fold: Path | str, limit: int | None = None) -> list[EvalRow]:
    """The evaluation rows of ``fold``'s ``val.jsonl`` (conversations without an assistant turn are skipped)."""
    path = Fold.of(fold).val
    if not path.is_file():
        raise EvaluationError(f"{path}: not found (run `epochwise prepare` for this fold first)")
    rows: list[EvalRow] = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                messages = orjson.loads(raw)["messages"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise EvaluationError(f"{path}:{number}: not a ChatML row with 'messages'") from None
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last is None:
                continue
            prompt = tuple({"role": m["role"], "content": m.get("content") or ""} for m in messages[:last])
            target = messages[last].get("content") or ""
            rows.append(EvalRow(f"{path}:{number}", prompt, target, row_key(messages[: last + 1])))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise EvaluationError(f"{path}: no conversation with an assistant turn to evaluate")
    return rows


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def exact(reply: str, target: str) -> float:
    return float(reply.strip() == target.strip())


def contains(reply: str, target: str) -> float:
    return float(target.strip() in reply)


_MISSING = object()


def _field(text: str, path: str) -> object:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _MISSING
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def json_field(name: str) -> RowMetric:
    """The metric comparing field ``name`` of reply and target, both parsed as JSON."""

    def score(reply: str, target: str) -> float:
        expected = _field(target, name)
        return float(expected is not _MISSING and _field(reply, name) == expected)

    score.__name__ = f"json-field:{name}"
    return score


def label_scores(replies: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 over the labels in targets and replies (trimmed)."""
    predicted = [r.strip() for r in replies]
    truth = [t.strip() for t in targets]
    if not truth:
        return dict.fromkeys(LABEL_METRICS, 0.0)
    labels = sorted(set(truth) | set(predicted))
    precisions, recalls, f1s = [], [], []
    for label in labels:
        tp = sum(p == label and t == label for p, t in zip(predicted, truth, strict=True))
        fp = sum(p == label and t != label for p, t in zip(predicted, truth, strict=True))
        fn = sum(p != label and t == label for p, t in zip(predicted, truth, strict=True))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        precisions.append(precision)
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {
        "accuracy": sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth),
        "precision": sum(precisions) / len(labels),
        "recall": sum(recalls) / len(labels),
        "f1": sum(f1s) / len(labels),
    }


@dataclass(frozen=True)
class Metric:
    """A parsed ``--metric``: a per-row function (scores averaged) or the corpus-level label metrics."""

    spec: str
    row: RowMetric | None  # None for ``labels``

    @property
    def names(self) -> tuple[str, ...]:
        return LABEL_METRICS if self.row is None else (self.spec,)


def parse_metric(spec: str) -> Metric:
    """``exact``, ``contains``, ``labels``, ``json-field:NAME`` or ``module:function`` (imported here)."""
    spec = spec.strip()
    if spec == "exact":
        return Metric(spec, exact)
    if spec == "contains":
        return Metric(spec, contains)
    if spec == "labels":
        return Metric(spec, None)
    if spec.startswith("json-field:"):
        name = spec.removeprefix("json-field:")
        if not name:
            raise EvaluationError("--metric json-field:NAME needs a field name, e.g. json-field:winner")
        return Metric(spec, json_field(name))
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EvaluationError(
            f"--metric {spec!r}: not one of exact, contains, labels, json-field:NAME or module:function"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a user module: any import error is the user's to fix
        raise EvaluationError(f"--metric {spec}: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise EvaluationError(f"--metric {spec}: {module_name} has no function {attr}")
    return Metric(spec, function)


def score_row(metric: Metric, reply: str, row: EvalRow) -> float:
    """One row's score in [0, 1]; a user metric that raises or returns anything else names itself and the row."""
    assert metric.row is not None
    try:
        value = metric.row(reply, row.target)
    except Exception as exc:
        raise EvaluationError(f"metric {metric.spec} failed on {row.source}: {type(exc).__name__}: {exc}") from None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise EvaluationError(f"metric {metric.spec} returned {value!r} on {row.source}: expected a number in [0, 1]")
    return float(value)


def check_metrics(metrics: Sequence[Metric], row: EvalRow) -> None:
    """Run every per-row metric once on ``row`` (its target as the reply) before anything is generated."""
    for metric in metrics:
        if metric.row is not None:
            score_row(metric, row.target, row)


def score_replies(metrics: Sequence[Metric], rows: Sequence[EvalRow], replies: Sequence[str]) -> dict[str, float]:
    """``{metric name: value}``: the mean of per-row scores, and the label metrics over all rows."""
    if len(rows) != len(replies):
        raise ValueError(f"{len(rows)} rows but {len(replies)} replies")
    scores: dict[str, float] = {}
    for metric in metrics:
        if metric.row is None:
            scores.update(label_scores(replies, [r.target for r in rows]))
        else:
            values = [score_row(metric, reply, row) for reply, row in zip(replies, rows, strict=True)]
            scores[metric.spec] = sum(values) / len(values) if values else 0.0
    return scores


# ---------------------------------------------------------------------------------------------------
# Table, best epoch
# ---------------------------------------------------------------------------------------------------


def table_rows(results: Sequence[dict]) -> list[dict[str, object]]:
    """Rows of the ``<fold>-evaluation`` table (one per epoch x eval fold x metric), metrics in the
    order asked (the first one ranks epochs for ``--epoch best-eval``).

    ``results``: ``{"epoch": k, "fold": name, "rows": n, "scores": {metric: value}}`` per (epoch, fold).
    """
    out = []
    for result in sorted(results, key=lambda r: (r["epoch"], r["fold"])):
        for name, value in result["scores"].items():
            out.append(
                {
                    "epoch": result["epoch"],
                    "eval fold": result["fold"],
                    "metric": name,
                    "value": round(float(value), 4),
                    "rows": result["rows"],
                }
            )
    return out


def metric_names(rows: Sequence[dict]) -> list[str]:
    """Metric names in table order."""
    return list(dict.fromkeys(str(r["metric"]) for r in rows))


def epoch_means(rows: Sequence[dict], metric: str) -> dict[int, float]:
    """``{epoch: mean of metric over eval folds}``."""
    by_epoch: dict[int, list[float]] = {}
    for row in rows:
        if row["metric"] == metric:
            by_epoch.setdefault(int(row["epoch"]), []).append(float(row["value"]))
    return {epoch: sum(v) / len(v) for epoch, v in sorted(by_epoch.items())}


def best_eval_epoch(rows: Sequence[dict], metric: str | None = None) -> int:
    """The epoch with the highest mean of ``metric`` (default: the table's first) over eval folds;
    the earlier epoch on a tie."""
    names = metric_names(rows)
    if not names:
        raise EvaluationError("the evaluation table is empty: run `epochwise evaluate` first")
    metric = metric or names[0]
    if metric not in names:
        raise EvaluationError(f"metric {metric} is not in the evaluation table (it has {', '.join(names)})")
    means = epoch_means(rows, metric)
    return max(means, key=lambda e: (means[e], -e))


def parse_epochs(spec: str, finished: Sequence[int], best: int | None) -> list[int]:
    """``all``, ``best`` (lowest validation loss) or ``1,3`` among the ``finished`` epochs."""
    spec = spec.strip()
    if spec == "all":
        chosen = sorted(finished)
    elif spec == "best":
        if best is None:
            raise EvaluationError("--epochs best: no finished epoch")
        chosen = [best]
    else:
        try:
            chosen = sorted({int(p) for p in spec.split(",") if p.strip()})
        except ValueError:
            raise EvaluationError(f"--epochs must be all, best or numbers like 1,3, not {spec!r}") from None
        missing = [e for e in chosen if e not in finished]
        if missing:
            done = ", ".join(map(str, sorted(finished))) or "none"
            raise EvaluationError(f"epoch(s) {', '.join(map(str, missing))} not finished (finished: {done})")
    if not chosen:
        raise EvaluationError("no finished epoch to evaluate (train the fold first)")
    return chosen
