"""Hyper-parameter sweeps over epoch chains: the search space, the Optuna study in the fold, the budget,
the result table and picture, and the best (trial, epoch).

A trial is one epoch chain (``epoch-train`` with the trial's settings). Optuna's ask-and-tell interface
(https://optuna.readthedocs.io/en/stable/tutorial/20_recipes/009_ask_and_tell.html) proposes each trial;
after every epoch the chain reports its validation loss as the intermediate value at step = epoch and
the pruner (``MedianPruner``: worse than the median of finished trials at that epoch) may stop it before
the next epoch is submitted. The study lives in ``<fold>/sweeps/<name>/journal.log``, an Optuna
``JournalFileBackend`` (an append-only file, no database), so a killed sweep is resumed by reading it:
finished trials are kept, trials still RUNNING are trained again with the same parameters, which reuses
their finished epochs (epoch-train's cache) and re-attaches to their running Together job.

What each trial records, in its Optuna user attributes (JSON), as soon as it happens:

* ``epoch-<k>``: that epoch's record (job, model, losses, price);
* ``decision-<k>``: ``continue`` or ``prune``, written before the trial is told PRUNED, so a sweep killed
  in between takes the same decision when it resumes (the median may have moved meanwhile);
* ``estimate_usd``: the chain's estimated price when the trial was admitted, ``spent_usd`` so far;
* ``stopped``: why a chain ended before its last epoch (``pruned``, ``budget``, ``val stalled``);
  ``error``: why its last attempt failed (the trial stays RUNNING: a rerun trains it again).

Search space file (YAML): config field paths mapped to a fixed value, a list of choices, or a range::

    train.hyper.learning_rate: {log_uniform: [1e-6, 1e-4]}
    train.hyper.lora_r: [16, 32, 64]
    train.epochs: 4
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from epochwise.config import SECTIONS
from epochwise.config.sweep import SweepConfig
from epochwise.epochs import EpochRecord
from epochwise.problems import UserError

if TYPE_CHECKING:
    import optuna

    from epochwise.config.local import LocalConfig
    from epochwise.config.train import TrainConfig

SWEEPS_DIR = "sweeps"
JOURNAL_FILE = "journal.log"
PICTURE_FILE = "sweep.png"
TABLE_FILE = "sweep.md"
SPACE_SECTIONS = ("train", "local")  # what a trial may vary: how a chain is trained
RANGES = ("uniform", "log_uniform", "int", "log_int")
DimensionKind = Literal["fixed", "choice", "uniform", "log_uniform", "int", "log_int"]


# ---------------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One settings field of the space: fixed, one of ``values``, or a range ``values = (low, high)``."""

    path: str  # "train.hyper.learning_rate"
    kind: DimensionKind
    values: tuple[Any, ...]

    @property
    def varies(self) -> bool:
        return self.kind != "fixed" and not (self.kind == "choice" and len(self.values) == 1)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind in ("choice", "fixed"):
            return CategoricalDistribution(list(self.values))
        low, high = self.values
        if self.kind in ("int", "log_int"):
            return IntDistribution(int(low), int(high), log=self.kind == "log_int")
        return FloatDistribution(float(low), float(high), log=self.kind == "log_uniform")


@dataclass(frozen=True)
class Space:
    """A parsed search space; ``digest`` identifies it (a sweep resumed with another space is refused)."""

    dimensions: tuple[Dimension, ...]

    @property
    def digest(self) -> str:
        payload = [(d.path, d.kind, list(d.values)) for d in self.dimensions]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def varying(self) -> list[Dimension]:
        return [d for d in self.dimensions if d.varies]

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {d.path: d.distribution() for d in self.varying}

    def fixed(self) -> dict[str, Any]:
        return {d.path: d.values[0] for d in self.dimensions if not d.varies}

    def grid(self) -> dict[str, list[Any]]:
        """The grid of ``GridSampler``: every varying field must be a list of values."""
        ranges = [d.path for d in self.varying if d.kind != "choice"]
        if ranges:
            raise UserError(f"--sampler grid needs lists of values, not ranges: {', '.join(ranges)}")
        return {d.path: list(d.values) for d in self.varying}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())


def read_space(path: Path | str) -> Space:
    """The search space in the YAML file ``path``; bad keys or values raise `UserError` naming ``path:line``."""
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    try:
        values = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    lines = _key_lines(root)
    return parse_space(values, str(path), lambda key: lines.get(key))


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """1-based line of every key path in a composed YAML mapping (``a.b`` for nested keys)."""
    import yaml

    found: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}{key.value}"
            found[path] = key.start_mark.line + 1
            found.update(_key_lines(value, path + "."))
    return found


def parse_space(values: Any, source: str = "space", line_of: Callable[[str], int | None] | None = None) -> Space:
    """A `Space` from the mapping a space file holds (dotted keys, or nested mappings of them)."""
    if not isinstance(values, dict) or not values:
        raise UserError(f"{source}: a search space maps settings fields to values, e.g. 'train.hyper.lora_r: [16, 32]'")
    problems: list[str] = []
    dimensions = []
    for path, spec in _flatten(values):
        where = source if line_of is None or line_of(path) is None else f"{source}:{line_of(path)}"
        try:
            dimensions.append(_dimension(path, spec))
        except UserError as exc:
            problems.append(f"{where}: {exc}")
    if problems:
        raise UserError("\n".join(problems))
    space = Space(tuple(dimensions))
    if not space.varying:
        raise UserError(f"{source}: the space varies nothing (give a field a list of values or a range)")
    return space


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not (set(value) & set(RANGES)) and not _is_leaf(path):
            out.extend(_flatten(value, path + "."))
        else:
            out.append((path, value))
    return out


def _is_leaf(path: str) -> bool:
    if path in SPACE_SECTIONS:
        return False
    try:
        return _field_model(path)[1] is None
    except UserError:
        return True


def _field_model(path: str) -> tuple[type[BaseModel], type[BaseModel] | None]:
    """(model holding the last part of ``path``, that field's own model when it is a section)."""
    section, *rest = path.split(".")
    if section not in SPACE_SECTIONS:
        close = difflib.get_close_matches(section, SPACE_SECTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{path}: a sweep varies how a chain trains: train.* or local.* fields{hint}")
    model: type[BaseModel] = SECTIONS[section]
    nested: type[BaseModel] | None = model
    for depth, part in enumerate(rest):
        model = nested  # type: ignore[assignment]
        if part not in model.model_fields:
            close = difflib.get_close_matches(part, list(model.model_fields), n=1, cutoff=0.6)
            hint = f" (did you mean {'.'.join([section, *rest[:depth], close[0]])!r}?)" if close else ""
            raise UserError(f"unknown setting {path!r}{hint}")
        annotation = model.model_fields[part].annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if not rest:
        raise UserError(f"{path} is a whole section; name one of its fields")
    return model, nested


def _dimension(path: str, spec: Any) -> Dimension:
    model, nested = _field_model(path)
    if nested is not None:
        raise UserError(f"{path} is a section; name one of its fields (e.g. {path}.{next(iter(nested.model_fields))})")
    if path == "train.backend":
        raise UserError("train.backend cannot vary inside one sweep (the budget and the jobs depend on it)")
    if isinstance(spec, dict):
        kinds = [k for k in spec if k in RANGES]
        if len(kinds) != 1 or len(spec) != 1:
            raise UserError(f"{path}: a range is one of {', '.join(f'{{{k}: [low, high]}}' for k in RANGES)}")
        kind = kinds[0]
        bounds = spec[kind]
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise UserError(f"{path}: {kind} takes [low, high]")
        low, high = (_number(b, path) for b in bounds)
        if kind in ("int", "log_int") and not (float(low).is_integer() and float(high).is_integer()):
            raise UserError(f"{path}: {kind} takes whole numbers")
        if not low < high:
            raise UserError(f"{path}: {kind} needs low < high (got {low}, {high})")
        if kind.startswith("log") and low <= 0:
            raise UserError(f"{path}: {kind} needs low > 0 (got {low})")
        for bound in (low, high):
            _check_value(path, bound)
        if kind in ("int", "log_int"):
            low, high = int(low), int(high)
        return Dimension(path, kind, (low, high))  # type: ignore[arg-type]
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{path}: an empty list of values")
        choices = tuple(_coerce(v) for v in spec)
        if len(set(map(repr, choices))) != len(choices):
            raise UserError(f"{path}: a value is listed twice")
        for value in choices:
            if value is not None and not isinstance(value, bool | int | float | str):
                raise UserError(f"{path}: list values must be numbers, strings, booleans or null (got {value!r})")
            _check_value(path, value)
        return Dimension(path, "choice", choices)
    value = _coerce(spec)
    _check_value(path, value)
    return Dimension(path, "fixed", (value,))


def _number(value: Any, path: str) -> float:
    coerced = _coerce(value)
    if isinstance(coerced, bool) or not isinstance(coerced, int | float):
        raise UserError(f"{path}: {value!r} is not a number")
    return coerced


def _coerce(value: Any) -> Any:
    """YAML 1.1 reads ``1e-6`` (no dot) as a string; such strings are numbers here."""
    if isinstance(value, str):
        try:
            return int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            return value
    return value


def _check_value(path: str, value: Any) -> None:
    """Validate ``value`` for the field ``path`` the way the config does (its range, its type)."""
    section, *rest = path.split(".")
    try:
        SECTIONS[section].model_validate(_nested(rest, value))
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise UserError(f"{path}: {value!r}: {reason[:1].lower() + reason[1:]}") from None


def _nested(parts: list[str], value: Any) -> dict[str, Any]:
    node: dict[str, Any] = {}
    root = node
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return root


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def trial_settings(
    params: dict[str, Any], train: TrainConfig, local: LocalConfig
) -> tuple[TrainConfig, LocalConfig]:
    """``train`` and ``local`` with a trial's values (dotted paths) put over them."""
    overrides: dict[str, Any] = {}
    for path, value in params.items():
        overrides = _merge(overrides, _nested(path.split("."), value))
    sections = []
    for name, base in (("train", train), ("local", local)):
        values = _merge(base.model_dump(mode="json", exclude_unset=False), overrides.get(name, {}))
        sections.append(type(base).model_validate(values))
    return sections[0], sections[1]  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# The study (Optuna, journal file in the fold)
# ---------------------------------------------------------------------------------------------------


def sweep_dir(fold: Path | str, name: str) -> Path:
    return Path(fold) / SWEEPS_DIR / name


def make_sampler(cfg: SweepConfig, space: Space, asked: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler for the next trial. Every task opens the study afresh, so a seeded random or TPE
    sampler would start from the same random state each time and propose the same values: its seed is
    ``seed + trials asked so far`` (reproducible, and the same after a resume)."""
    import optuna

    if cfg.sampler == "grid":  # picks an unvisited grid point from the study itself
        return optuna.samplers.GridSampler(space.grid(), seed=cfg.seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed + asked)
    return optuna.samplers.TPESampler(seed=cfg.seed + asked)


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    import optuna

    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    # step = epoch (1, 2, ...): steps below n_warmup_steps are never pruned.
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_min_epochs)


class Study:
    """One sweep's Optuna study in ``<fold>/sweeps/<name>/journal.log`` (created on first use)."""

    def __init__(self, directory: Path | str, name: str, cfg: SweepConfig, space: Space | None = None) -> None:
        """``space`` None: a handle that only records epochs and prunes (a trial's run), asks nothing."""
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name, self.cfg, self.space = name, cfg, space
        self.storage = JournalStorage(JournalFileBackend(str(self.directory / JOURNAL_FILE)))
        self.study = optuna.create_study(
            study_name=name,
            storage=self.storage,
            sampler=make_sampler(cfg, space) if space is not None else None,
            pruner=make_pruner(cfg),
            direction="minimize",
            load_if_exists=True,
        )
        self.study_id = self.storage.get_study_id_from_name(name)
        recorded = self.study.user_attrs.get("space")
        if space is None:
            return
        if recorded is None:
            self.study.set_user_attr("space", space.digest)
            self.study.set_user_attr("fields", [d.path for d in space.dimensions])
        elif recorded != space.digest:
            raise UserError(
                f"sweep {name!r} in {self.directory} was started with another search space "
                f"(fields {', '.join(self.study.user_attrs.get('fields', []))}); give this one another --name"
            )

    # --- trials -----------------------------------------------------------------------------------

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def trial(self, number: int) -> optuna.trial.FrozenTrial:
        return self.storage.get_trial(self._id(number))

    def _id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def unfinished(self) -> list[int]:
        """Trials a killed sweep left RUNNING (or whose chain failed): trained again on resume."""
        from optuna.trial import TrialState

        return [t.number for t in self.trials() if t.state == TrialState.RUNNING]

    def ask(self, estimate_usd: float | None) -> int:
        assert self.space is not None, "a study opened without its space asks nothing"
        self.study.sampler = make_sampler(self.cfg, self.space, asked=len(self.trials()))
        trial = self.study.ask(self.space.distributions())
        if estimate_usd is not None:
            trial.set_user_attr("estimate_usd", estimate_usd)
        return trial.number

    def params(self, number: int) -> dict[str, Any]:
        """Every field the trial sets: the space's fixed values and the sampled ones."""
        fixed = self.space.fixed() if self.space is not None else {}
        return {**fixed, **self.trial(number).params}

    def set(self, number: int, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(self._id(number), key, value)

    # --- per epoch --------------------------------------------------------------------------------

    def report_epoch(self, number: int, record: EpochRecord, epochs: int) -> bool:
        """Record ``record`` for trial ``number``; False when the pruner stops the chain here.

        The decision is written before the trial is told PRUNED, and a recorded decision is reused, so
        a resumed sweep decides what the killed one did.
        """
        from optuna.trial import TrialState

        trial_id = self._id(number)
        frozen = self.storage.get_trial(trial_id)
        if frozen.state != TrialState.RUNNING:
            return frozen.state == TrialState.COMPLETE
        self.storage.set_trial_user_attr(trial_id, f"epoch-{record.epoch}", epoch_attr(record))
        spent = sum((frozen.user_attrs.get(f"epoch-{k}") or {}).get("price_usd") or 0.0 for k in range(1, record.epoch))
        self.storage.set_trial_user_attr(trial_id, "spent_usd", round(spent + (record.price_usd or 0.0), 6))
        decision = frozen.user_attrs.get(f"decision-{record.epoch}")
        if decision is None:
            if record.val_loss is None or record.status != "completed":
                decision = "continue"
            else:
                if record.epoch not in frozen.intermediate_values:
                    self.storage.set_trial_intermediate_value(trial_id, record.epoch, record.val_loss)
                last = record.epoch >= epochs  # nothing left to save: the chain ends anyway
                pruned = not last and self.study.pruner.prune(self.study, self.storage.get_trial(trial_id))
                decision = "prune" if pruned else "continue"
            self.storage.set_trial_user_attr(trial_id, f"decision-{record.epoch}", decision)
        if decision == "prune":
            self.storage.set_trial_user_attr(trial_id, "stopped", "pruned")
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
            return False
        return True

    def finish(self, number: int, records: list[EpochRecord], epochs: int, stalled: bool) -> None:
        """Tell a chain that ended (all epochs, or stopped by the budget or early stopping) COMPLETE."""
        from optuna.trial import TrialState

        frozen = self.trial(number)
        if frozen.state != TrialState.RUNNING:
            return
        for record in records:
            if f"epoch-{record.epoch}" not in frozen.user_attrs:
                self.set(number, f"epoch-{record.epoch}", epoch_attr(record))
        if len(records) < epochs:
            self.set(number, "stopped", "val stalled" if stalled else "budget")
        losses = [r.val_loss for r in records if r.val_loss is not None and r.status == "completed"]
        if losses:
            self.study.tell(number, min(losses), skip_if_finished=True)
        else:
            self.set(number, "error", "no validation loss (the fold needs a val.jsonl and n_evals >= 1)")
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)


def epoch_attr(record: EpochRecord) -> dict[str, Any]:
    """What a sweep keeps of one epoch (a trial's ``epoch-<k>`` attribute)."""
    return record.model_dump(
        mode="json", include={"epoch", "backend", "status", "job_id", "model", "train_loss", "val_loss", "price_usd"}
    )


class TrialLink(BaseModel):
    """What one trial's ``epoch-train`` run needs to report its epochs to the sweep (a flow parameter)."""

    directory: str  # the sweep directory holding journal.log
    study: str
    number: int
    label: str  # the trial's artifact prefix, ``<fold>-<sweep>-t<n>``: its tables are not the fold's
    sweep: SweepConfig  # the pruner's settings

    def open(self) -> Study:
        return Study(self.directory, self.study, self.sweep)


# ---------------------------------------------------------------------------------------------------
# Budget
# ---------------------------------------------------------------------------------------------------


def committed_usd(trials: list[Any], excluding: int | None = None) -> float:
    """What the sweep's trials spent, plus what the running ones may still spend (their estimate).

    A running trial holds its whole chain's estimate (or what it spent, when more); a finished one
    only what it spent. ``excluding``: a trial number left out (the one asking for its own share).
    """
    from optuna.trial import TrialState

    total = 0.0
    for trial in trials:
        if trial.number == excluding:
            continue
        spent = float(trial.user_attrs.get("spent_usd") or 0.0)
        if trial.state == TrialState.RUNNING:
            spent = max(spent, float(trial.user_attrs.get("estimate_usd") or 0.0))
        total += spent
    return total


# ---------------------------------------------------------------------------------------------------
# Results: table, best (trial, epoch), picture
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialEpoch:
    """One epoch of one trial, as a deploy candidate."""

    trial: int
    record: EpochRecord


def trial_state(trial: Any) -> str:
    """``complete``, ``pruned``, ``budget``, ``val stalled``, ``failed`` or ``running``."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    if trial.state == TrialState.RUNNING:
        return "failed (rerun retries)" if attrs.get("error") else "running"
    if trial.state == TrialState.COMPLETE and attrs.get("stopped"):
        return str(attrs["stopped"])
    return {TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}.get(trial.state, "complete")


def trial_epochs(trial: Any, fold: str) -> list[EpochRecord]:
    """The epochs a trial recorded, in order."""
    found = []
    for key, value in trial.user_attrs.items():
        if key.startswith("epoch-") and isinstance(value, dict):
            found.append(EpochRecord(fold=fold, **value))
    return sorted(found, key=lambda r: r.epoch)


def candidates(trials: list[Any], fold: str) -> list[TrialEpoch]:
    return [TrialEpoch(t.number, r) for t in trials for r in trial_epochs(t, fold)]


def best_trial_epoch(found: list[TrialEpoch]) -> TrialEpoch | None:
    """The completed epoch with the lowest validation loss over every epoch of every trial (pruned and
    budget-stopped trials included: their epochs are models like any other); ties: earliest trial, epoch."""
    scored = [c for c in found if c.record.status == "completed" and c.record.val_loss is not None]
    return min(scored, key=lambda c: (c.record.val_loss, c.trial, c.record.epoch), default=None)


def _short(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def sweep_table(trials: list[Any], fold: str, space: Space, epochs: int) -> list[dict[str, object]]:
    """One row per trial: state, its varying parameters, validation loss per epoch, price, best marked."""
    best = best_trial_epoch(candidates(trials, fold))
    width = max([epochs, *[r.epoch for t in trials for r in trial_epochs(t, fold)]])
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        records = {r.epoch: r for r in trial_epochs(trial, fold)}
        row: dict[str, object] = {"trial": trial.number, "state": trial_state(trial)}
        for d in space.varying:
            value = trial.params.get(d.path)
            row[_short(d.path)] = f"{value:.3g}" if isinstance(value, float) else ("" if value is None else value)
        for k in range(1, width + 1):
            r = records.get(k)
            row[f"e{k} val loss"] = "" if r is None or r.val_loss is None else f"{r.val_loss:.4f}"
        prices = [r.price_usd for r in records.values() if r.price_usd is not None]
        row["price $"] = f"{sum(prices):.2f}" if prices else ""
        row["best"] = f"epoch {best.record.epoch}" if best is not None and best.trial == trial.number else ""
        rows.append(row)
    return rows


def sweep_png(title: str, trials: list[Any], fold: str) -> bytes:
    """Validation loss per epoch, one line per trial (pruned dashed), the best (trial, epoch) starred."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    axes = figure.subplots()
    drawn = False
    for trial in sorted(trials, key=lambda t: t.number):
        points = [(r.epoch, r.val_loss) for r in trial_epochs(trial, fold) if r.val_loss is not None]
        if not points:
            continue
        state = trial_state(trial)
        style = "--" if state == "pruned" else "-"
        axes.plot(*zip(*points, strict=True), style, marker="o", label=f"trial {trial.number} ({state})")
        drawn = True
    best = best_trial_epoch(candidates(trials, fold))
    if best is not None:
        axes.plot([best.record.epoch], [best.record.val_loss], "*", color="black", markersize=16,
                  label=f"best: trial {best.trial} epoch {best.record.epoch}")
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation loss")
    axes.set_title(title)
    axes.xaxis.get_major_locator().set_params(integer=True)
    if drawn:
        axes.legend(loc="upper right", fontsize=7)
    else:
        axes.text(0.5, 0.5, "no validation loss yet", transform=axes.transAxes, ha="center")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def sweep_markdown(title: str, rows: list[dict[str, object]], picture: str, best: TrialEpoch | None, summary: str) -> str:
    from epochwise.report import markdown_table

    if best is None:
        chosen = "no completed epoch with a validation loss yet"
    else:
        r = best.record
        chosen = (f"best: trial {best.trial} epoch {r.epoch}, val loss {r.val_loss:.4f}, "
                  f"model {r.model}" + (f" (job {r.job_id})" if r.job_id else ""))
    parts = [f"# {title}", "", summary, "", chosen, "", f"![validation loss per epoch per trial]({picture})", "",
             markdown_table(rows)]
    return "\n".join(parts)


def sweep_names(fold: Path | str) -> list[str]:
    """The fold's sweeps (directories holding a journal), most recently changed last."""
    journals = sorted(Path(fold).glob(f"{SWEEPS_DIR}/*/{JOURNAL_FILE}"), key=lambda p: p.stat().st_mtime)
    return [p.parent.name for p in journals]


def load_trials(fold: Path | str, name: str | None = None) -> tuple[str, list[Any]] | None:
    """(sweep name, its trials) of the sweep ``name`` of ``fold`` (default: the latest), read from its
    journal; None when the fold has no such sweep."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    names = sweep_names(fold)
    if name is None:
        if not names:
            return None
        name = names[-1]
    elif name not in names:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(sweep_dir(fold, name) / JOURNAL_FILE)))
    return name, optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def choose_trial_epoch(found: list[TrialEpoch], trial: int | None, which: str | int) -> TrialEpoch:
    """``--trial T --epoch N|best`` (or, without a trial, the best over the sweep) among ``found``."""
    from epochwise.epochs import EpochChoiceError, choose_epoch

    if trial is None:
        if str(which).lower() != "best":
            raise EpochChoiceError("a sweep epoch is chosen with --trial T --epoch N (or --epoch best)")
        best = best_trial_epoch(found)
        if best is None:
            raise EpochChoiceError("the sweep has no completed epoch with a validation loss")
        return best
    mine = [c for c in found if c.trial == trial]
    if not mine:
        known = ", ".join(str(t) for t in sorted({c.trial for c in found})) or "none"
        raise EpochChoiceError(f"trial {trial} has no recorded epochs (trials: {known})")
    record = choose_epoch([c.record for c in mine], which)
    return TrialEpoch(trial, record)
