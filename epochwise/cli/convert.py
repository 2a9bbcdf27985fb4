"""``epochwise convert``: a prepared ChatML fold -> Harmony token parquet for gpt-oss models.

    epochwise convert folds/games --format harmony --reasoning-effort low --max-seq-length 4096

Runs the pure conversion directly, without Prefect (its ephemeral API takes seconds to start); the
``epoch-train`` flow calls the same code through ``tasks.harmony.convert_fold_to_harmony`` and shares
its cache (``<fold>/harmony/manifest.json``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from epochwise.cli.common import ConfigOption, console, fail_lines, field_help, friendly_errors, settings
from epochwise.problems import InputError, Problem

SHOWN_PROBLEMS = 50  # an overlong limit can hit every row; the first lines say enough


def convert(
    fold: Path = typer.Argument(..., help="Fold directory holding train.jsonl (and val.jsonl)."),
    format: str = typer.Option("harmony", "--format", help="Output format; 'harmony' (gpt-oss) is the only one."),
    reasoning_effort: str = typer.Option(
        None,
        "--reasoning-effort",
        help=field_help("harmony.reasoning_effort", "low | medium | high, written into the Harmony system message."),
    ),
    max_seq_length: int = typer.Option(None, "--max-seq-length", help=field_help("harmony.max_seq_length")),
    overlong: str = typer.Option(None, "--overlong", help=field_help("harmony.overlong")),
    vocab_dir: Path = typer.Option(None, "--vocab-dir", help=field_help("harmony.vocab_dir")),
    workers: int = typer.Option(
        None, "--workers", help=field_help("harmony.workers", "Rendering processes; 0 = one per CPU core.")
    ),
    force: bool = typer.Option(False, "--force", help="Reconvert even when the outputs match the sources."),
    config: Path = ConfigOption,
) -> None:
    """Tokenize a fold into train_harmony.parquet / val_harmony.parquet with assistant-only labels."""
    if format != "harmony":
        raise typer.BadParameter(f"unknown format {format!r}; only 'harmony' is supported", param_hint="--format")
    loaded = settings(
        config,
        **{
            "harmony.reasoning_effort": reasoning_effort,
            "harmony.max_seq_length": max_seq_length,
            "harmony.overlong": overlong,
            "harmony.vocab_dir": vocab_dir,
            "harmony.workers": workers,
        },
    )
    cfg = loaded.harmony
    from epochwise.harmony import convert_fold  # openai-harmony and pyarrow load only for this command

    with friendly_errors():
        try:
            summary = convert_fold(fold, cfg, force=force, max_line_bytes=loaded.data.max_line_bytes)
        except InputError as exc:
            fail_lines(problem_lines(exc.problems))
    state = "reused (sources and settings unchanged)" if summary.cached else "written"
    from rich.table import Table

    table = Table(title=f"harmony parquet for {summary.fold}: {state}")
    table.add_column("")
    for stats in summary.splits():
        table.add_column(Path(stats.output).name, justify="right")
    rows: list[tuple[str, str]] = [
        ("rows", "rows"),
        ("tokens", "tokens"),
        ("labelled tokens", "labelled_tokens"),
        ("longest row (tokens)", "longest"),
        (f"rows over {cfg.max_seq_length}", "over_max"),
        ("dropped", "dropped"),
        ("truncated", "truncated"),
        ("untrained (weight 0 only)", "untrained"),
    ]
    for label, name in rows:
        table.add_row(label, *(f"{getattr(s, name):,}" for s in summary.splits()))
    console.print(table)
    for stats in summary.splits():
        console.print(stats.output, markup=False)
    console.print(f"reasoning effort {cfg.reasoning_effort}, overlong rows: {cfg.overlong}, key {summary.key[:12]}")


def problem_lines(problems: list[Problem]) -> list[str]:
    """At most `SHOWN_PROBLEMS` ``path:line: reason`` lines, the count, and a hint for overlong rows."""
    lines = [str(p) for p in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        lines.append(f"... and {len(problems) - SHOWN_PROBLEMS} more")
    lines.append(f"{len(problems)} problem(s) found; nothing was written")
    if any("over max_seq_length" in p.reason for p in problems):
        lines.append("hint: raise --max-seq-length, or pass --overlong drop or --overlong truncate")
    return lines


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(convert)
