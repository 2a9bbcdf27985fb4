"""``epochwise prepare`` and ``epochwise validate``."""

from __future__ import annotations

from pathlib import Path

import typer

from epochwise.cli.common import (
    ConfigOption,
    PresetOption,
    before_flow_run,
    console,
    defaults_apply,
    field_help,
    friendly_errors,
    print_line,
    report_problems,
    settings,
    settings_values,
)


def prepare(
    records: Path = typer.Argument(..., help="A directory of *.jsonl/*.json record files, or one such file."),
    fold: Path = typer.Option(..., "--fold", help="Fold directory to write train.jsonl and val.jsonl into."),
    val_ratio: float = typer.Option(None, "--val-ratio", help=field_help("data.val_ratio")),
    seed: int = typer.Option(None, "--seed", help=field_help("data.seed")),
    system_prompt: str = typer.Option(None, "--system-prompt", help=field_help("data.mapping.system_prompt")),
    user_template: str = typer.Option(
        None,
        "--user-template",
        help=field_help("data.mapping.user_template", "User message with {field} placeholders filled from the record."),
    ),
    assistant_field: str = typer.Option(None, "--assistant-field", help=field_help("data.mapping.assistant_field")),
    mapping_format: str = typer.Option(None, "--format", help=field_help("data.mapping.format")),
    chosen_field: str = typer.Option(None, "--chosen-field", help=field_help("data.mapping.chosen_field")),
    rejected_field: str = typer.Option(None, "--rejected-field", help=field_help("data.mapping.rejected_field")),
    column: list[str] = typer.Option(None, "--column", help=field_help("data.mapping.columns", "Record field copied into each GRPO prompt row (repeatable).")),
    strict: bool = typer.Option(None, "--strict/--skip-bad-records", help=field_help("data.strict")),
    config: Path = ConfigOption,
    preset: list[str] = PresetOption,
) -> None:
    """Turn JSON records into a fold: ChatML train.jsonl + val.jsonl, seeded split, strictly validated.

    ``--format preference`` writes DPO rows (train_dpo.jsonl + val_dpo.jsonl) from --chosen-field and
    --rejected-field; ``--format prompt`` writes GRPO prompt rows (train_grpo.jsonl + val_grpo.jsonl)
    with the --column fields for the reward functions.

    The records' own ``epochwise.yaml`` (in RECORDS, or beside a single records file) supplies
    ``data.mapping`` when present; the config file, presets, EPOCHWISE_* and flags override it.
    """
    cfg = settings(
        config,
        preset,
        records,
        **{
            "data.val_ratio": val_ratio,
            "data.seed": seed,
            "data.strict": strict,
            "data.mapping.system_prompt": system_prompt,
            "data.mapping.user_template": user_template,
            "data.mapping.assistant_field": assistant_field,
            "data.mapping.format": mapping_format,
            "data.mapping.chosen_field": chosen_field,
            "data.mapping.rejected_field": rejected_field,
            "data.mapping.columns": column or None,
        },
    ).data
    from epochwise.records import read_records

    # Structural problems are reported before Prefect starts (its ephemeral API takes seconds to boot).
    result = read_records(records, cfg.max_line_bytes)
    if result.problems:
        report_problems(result.problems)
    before_flow_run()
    from flows.prepare_fold import prepare_fold

    with friendly_errors():
        summary = prepare_fold(str(records), str(fold), cfg)  # the value itself: see common.run_ended
    from rich.table import Table

    table = Table(title=f"prepared {summary.fold}", show_header=False)
    table.add_row("records read", str(summary.records_read))
    train_name, val_name = summary.files
    table.add_row(train_name, str(summary.train_written))
    table.add_row(val_name, str(summary.val_written))
    table.add_row("skipped", str(len(summary.skipped)))
    for reason, count in summary.skipped_by_reason().items():
        table.add_row(f"  {reason}", str(count))
    console.print(table)
    for problem in summary.skipped[:10]:
        console.print(f"skipped {problem}", markup=False, soft_wrap=True)


def validate(
    files: list[Path] = typer.Argument(..., help="Fine-tuning JSONL files (e.g. a fold's train.jsonl val.jsonl)."),
    method: str = typer.Option(
        None, "--method", "-m", help=field_help("train.method", "sft (chat rows) | dpo (preference rows) | grpo (prompt rows).")
    ),
    together_check: bool = typer.Option(
        False,
        "--together-check",
        help="Also run together's own check_file (it runs anyway before every upload; it loads the whole SDK).",
    ),
    config: Path = ConfigOption,
    preset: list[str] = PresetOption,
) -> None:
    """Check JSONL files against Together's rules; prints path:line: reason.

    ``--method dpo`` checks Together's preference rows, ``--method grpo`` GRPO prompt rows. These rules
    hold the ones together's check_file applies to JSONL (UTF-8, one JSON object per non-blank line, at
    least one sample; not its 50.1 GB size cap) and the server-side ones it leaves out; check_file itself
    runs where a file is uploaded (the SDK's files.upload and the flows' validation task) or with
    --together-check.
    """
    from epochwise.validate import validate_method_file

    if method is None and defaults_apply(config, preset):
        from epochwise.io import DEFAULT_MAX_LINE_BYTES as limit  # data.max_line_bytes's one default

        chosen = "sft"
    else:
        needed = ("data.max_line_bytes", "train.method")
        values = settings_values(config, preset, needed, **{"train.method": method})
        limit, chosen = values["data.max_line_bytes"], values["train.method"]
    problems = [
        p
        for path in files
        for p in validate_method_file(path, chosen, run_together_check=together_check, max_line_bytes=limit)
    ]
    if problems:
        report_problems(problems)
    for path in files:
        print_line(f"{path}: ok")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(prepare)
    app.command()(validate)
