"""``prepare-fold``: JSON records -> a validated ChatML fold (``train.jsonl`` + ``val.jsonl``).

Steps: load_records (fail on any unreadable or malformed file, with ``path:line: reason``) ->
build_fold (map each record to ChatML, seeded content-hash split, strict validation, together's
``check_file``, atomic write) -> a ``<fold>-prepare`` summary artifact.

Nothing is written unless every step passed; rerunning on the same input writes byte-identical files.

    epochwise prepare examples/records/games --fold folds/games
    prefect deployment run prepare-fold/any --param records=examples/records/games --param fold=folds/games
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from epochwise.config.data import DataConfig
from epochwise.config.presets import with_records_mapping
from epochwise.fold import Fold
from epochwise.prepare import PrepareSummary, source_sha256
from tasks.data import build_fold, load_records


@flow(name="prepare-fold", log_prints=True, validate_parameters=True)
def prepare_fold(records: str, fold: str, data: DataConfig = DataConfig()) -> PrepareSummary:
    """Turn the JSON records under ``records`` into the fold directory ``fold``.

    Without a mapping in ``data``, the records' own ``epochwise.yaml`` (``data.mapping``) applies.
    """
    data = with_records_mapping(data, records)
    loaded = load_records(records, data.max_line_bytes)
    summary = build_fold(loaded, fold, data)
    create_table_artifact(
        key=Fold.of(fold).artifact_key("prepare"),
        table=[
            {"records read": summary.records_read, "train": summary.train_written, "val": summary.val_written,
             "skipped": len(summary.skipped), "records sha256": source_sha256(records)}
        ]
        + [{"skipped because": reason, "records": n} for reason, n in summary.skipped_by_reason().items()],
        description=f"prepare-fold {records} -> {fold}",
    )
    print(
        f"{summary.fold}: {summary.records_read} records read, {summary.train_written} train, "
        f"{summary.val_written} val, {len(summary.skipped)} skipped"
    )
    return summary
