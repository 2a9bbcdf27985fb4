"""The run report of a fold: hyper-parameters, loss curve, epoch table, price and lineage, as markdown.

Pure: built from the flow's `EpochRecord`s, the per-step losses of each epoch and the lineage inputs,
with no Prefect and no network. The same markdown is published as the ``<fold>-report`` artifact (the
picture inline as a ``data:image/png;base64`` URI, which the Prefect UI's markdown renderer draws as an
``<img>``) and written to ``<fold>/report/report.md`` beside ``loss.png`` (so it outlives the server).

Lineage of every epoch: source records hash -> fold file hashes -> Together file ids -> job id -> model
name -> endpoint (when deployed).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from epochwise.epochs import EpochRecord, epoch_table
from epochwise.io import atomic_write_bytes

REPORT_DIR = "report"
REPORT_FILE = "report.md"
PICTURE_FILE = "loss.png"
# What the files in report/ were drawn from (`ReportState`): a rerun that would draw the same report,
# or an older part of it, leaves them alone instead of rendering the picture again.
STATE_FILE = ".report.json"


@dataclass
class EpochCurve:
    """Losses of one epoch by step inside that epoch (steps start at 1)."""

    train: list[tuple[float, float]] = field(default_factory=list)
    val: list[tuple[float, float]] = field(default_factory=list)

    @property
    def steps(self) -> float:
        return max((s for s, _ in [*self.train, *self.val]), default=0.0)


@dataclass(frozen=True)
class FileLineage:
    """One fold file as trained: its name, sha256 and, for Together, the uploaded file's id."""

    name: str
    sha256: str
    file_id: str | None = None


@dataclass(frozen=True)
class Lineage:
    """Where a fold's models come from; the same files feed every epoch of the chain."""

    records_sha256: str | None
    files: list[FileLineage]
    endpoints: dict[int, str] = field(default_factory=dict)  # epoch -> endpoint name, when deployed


@dataclass
class ChainCurve:
    """The whole chain on one step axis: epoch k's steps follow epoch k-1's last step."""

    train: list[tuple[float, float]]
    val: list[tuple[float, float]]
    boundaries: list[tuple[int, float]]  # (epoch, global step where it ends)


def chain_curve(curves: dict[int, EpochCurve]) -> ChainCurve:
    train, val, boundaries, offset = [], [], [], 0.0
    for epoch in sorted(curves):
        curve = curves[epoch]
        train += [(offset + s, loss) for s, loss in curve.train]
        val += [(offset + s, loss) for s, loss in curve.val]
        offset += curve.steps
        boundaries.append((epoch, offset))
    return ChainCurve(train, val, boundaries)


def loss_png(fold: str, curves: dict[int, EpochCurve]) -> bytes:
    """The loss curve of the chain as a PNG: train and validation loss per step, epochs marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    from matplotlib.figure import Figure

    chain = chain_curve(curves)
    figure = Figure(figsize=(8, 4), dpi=100)
    axes = figure.subplots()
    if chain.train:
        axes.plot(*zip(*chain.train, strict=True), label="train loss", color="tab:blue", linewidth=1.2)
    if chain.val:
        axes.plot(*zip(*chain.val, strict=True), label="validation loss", color="tab:orange", marker="o")
    start = 0.0
    for epoch, end in chain.boundaries:
        axes.axvline(end, color="grey", linestyle=":", linewidth=0.8)
        axes.text(
            (start + end) / 2,
            1.0,
            f"epoch {epoch}",
            transform=axes.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color="grey",
        )
        start = end
    axes.set_xlabel("step (whole chain)")
    axes.set_ylabel("loss")
    axes.set_title(f"{fold}: loss per step", pad=16)
    if chain.train or chain.val:
        axes.legend(loc="upper right")
    else:
        axes.text(0.5, 0.5, "no per-step losses yet", transform=axes.transAxes, ha="center")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def lineage_rows(records: list[EpochRecord], lineage: Lineage) -> list[dict[str, str]]:
    """One row per epoch: records hash -> fold file hashes -> file ids -> job -> model -> endpoint."""
    hashes = ", ".join(f"{f.name} {f.sha256[:12]}" for f in lineage.files) or "-"
    ids = ", ".join(f.file_id for f in lineage.files if f.file_id) or "-"
    return [
        {
            "epoch": str(r.epoch),
            "records sha256": (lineage.records_sha256 or "unknown")[:12],
            "fold files sha256": hashes,
            "Together files": ids if r.backend == "together" else "-",
            "job": r.job_id or "-",
            "parent": r.parent or "-",
            "model": r.model or "-",
            "endpoint": lineage.endpoints.get(r.epoch, "-"),
        }
        for r in sorted(records, key=lambda r: r.epoch)
    ]


def markdown_table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "_none_\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ") or " "


def report_markdown(
    fold: str,
    records: list[EpochRecord],
    hyper: dict[str, object],
    lineage: Lineage,
    picture: str,
    settings: dict[str, object] | None = None,
) -> str:
    """The report as markdown; ``picture`` is the loss curve's image URL (a data URI or ``loss.png``)."""
    done = [r for r in records if r.status == "completed"]
    spent = sum(r.price_usd or 0.0 for r in records)
    priced = any(r.price_usd is not None for r in records)
    parts = [
        f"# {fold}: run report",
        "",
        f"{len(done)} epoch(s) completed; price so far: " + (f"${spent:.2f}" if priced else "no charge recorded"),
        "",
        f"![loss per step, train and validation, epochs marked]({picture})",
        "",
        "## Epochs",
        "",
        markdown_table(epoch_table(records)),
        "## Lineage",
        "",
        "source records -> fold files -> Together files -> job -> model -> endpoint",
        "",
        markdown_table(lineage_rows(records, lineage)),
        "## Hyper-parameters",
        "",
        markdown_table([{"setting": k, "value": v} for k, v in {**(settings or {}), **hyper}.items()]),
    ]
    return "\n".join(parts)


def write_report(fold_dir: Path | str, markdown: str, png: bytes) -> Path:
    """``<fold>/report/report.md`` (picture as ``loss.png`` beside it) and ``loss.png``, each atomically."""
    out = Path(fold_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / PICTURE_FILE, png)
    atomic_write_bytes(out / REPORT_FILE, markdown.encode("utf-8"))
    return out / REPORT_FILE


@dataclass(frozen=True)
class ReportState:
    """What ``report/`` holds: the inputs' key, the epochs drawn (epoch -> model) and the files' sha256."""

    key: str
    context: str  # settings, hyper-parameters and files: a report of other ones is another report
    epochs: dict[str, str]
    markdown_sha256: str
    picture_sha256: str


def report_context(context: object) -> str:
    """Digest of what a report is about beyond its epochs (settings, hyper-parameters, files)."""
    return hashlib.sha256(json.dumps(context, sort_keys=True, default=str).encode()).hexdigest()


def reported_epochs(records: list[EpochRecord]) -> dict[str, str]:
    """``{epoch: model}`` of the completed epochs a report shows."""
    return {str(r.epoch): r.model or r.job_id or "" for r in records if r.status == "completed"}


def report_key(markdown: str, curves: dict[int, EpochCurve]) -> str:
    """The key of one report's content: its file markdown and its curves."""
    material = json.dumps({"markdown": markdown, "curves": {k: asdict(c) for k, c in sorted(curves.items())}})
    return hashlib.sha256(material.encode()).hexdigest()


def read_report_state(fold_dir: Path | str) -> ReportState | None:
    """The state of ``<fold>/report/`` when its files are still the ones it describes, else None."""
    out = Path(fold_dir) / REPORT_DIR
    try:
        state = ReportState(**json.loads((out / STATE_FILE).read_bytes()))
        intact = (
            hashlib.sha256((out / REPORT_FILE).read_bytes()).hexdigest() == state.markdown_sha256
            and hashlib.sha256((out / PICTURE_FILE).read_bytes()).hexdigest() == state.picture_sha256
        )
    except (OSError, ValueError, TypeError):
        return None
    return state if intact else None


def shows_later_report(state: ReportState | None, records: list[EpochRecord], context: str) -> bool:
    """Whether ``report/`` shows a later report of the same chain: same context, more epochs, the shared
    ones the same models. Writing this one would set it back (a rerun replaying cached epochs)."""
    if state is None or state.context != context:
        return False
    asked = reported_epochs(records)
    shown = state.epochs
    return len(shown) > len(asked) and all(shown.get(epoch) == model for epoch, model in asked.items())


def write_report_state(
    fold_dir: Path | str, key: str, context: str, records: list[EpochRecord], markdown: str, png: bytes
) -> None:
    """Record what `write_report` just wrote (after it, so a crash in between only costs a redraw)."""
    state = ReportState(
        key=key,
        context=context,
        epochs=reported_epochs(records),
        markdown_sha256=hashlib.sha256(markdown.encode("utf-8")).hexdigest(),
        picture_sha256=hashlib.sha256(png).hexdigest(),
    )
    atomic_write_bytes(Path(fold_dir) / REPORT_DIR / STATE_FILE, json.dumps(asdict(state), indent=2).encode())
