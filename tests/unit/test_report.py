"""The run report: one step axis across the chain, lineage rows, markdown, the PNG and the files."""

from __future__ import annotations

import base64
import struct

from epochwise import report as rp
from epochwise.epochs import EpochRecord

RECORDS = [
    EpochRecord(fold="games", epoch=1, backend="together", job_id="ft-1", model="me/m-e1", parent=None,
                train_loss=1.9, val_loss=2.0, price_usd=1.5),
    EpochRecord(fold="games", epoch=2, backend="together", job_id="ft-2", model="me/m-e2", parent="ft-1",
                train_loss=1.5, val_loss=1.7, price_usd=1.5),
]
LINEAGE = rp.Lineage(
    "a" * 64,
    [rp.FileLineage("train-0123.jsonl", "b" * 64, "file-t"), rp.FileLineage("val-4567.jsonl", "c" * 64, "file-v")],
    {2: "me/ew-games-e2"},
)
CURVES = {
    1: rp.EpochCurve(train=[(1.0, 2.4), (2.0, 2.2), (3.0, 1.9)], val=[(3.0, 2.0)]),
    2: rp.EpochCurve(train=[(1.0, 1.8), (2.0, 1.6), (3.0, 1.5), (4.0, 1.5)], val=[(4.0, 1.7)]),
}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_chain_curve_puts_each_epoch_after_the_previous_ones_last_step():
    chain = rp.chain_curve(CURVES)
    assert [s for s, _ in chain.train] == [1, 2, 3, 4, 5, 6, 7]
    assert chain.val == [(3.0, 2.0), (7.0, 1.7)]
    assert chain.boundaries == [(1, 3.0), (2, 7.0)]


def test_lineage_links_records_files_jobs_models_and_endpoints():
    rows = rp.lineage_rows(RECORDS, LINEAGE)
    assert [r["job"] for r in rows] == ["ft-1", "ft-2"]
    assert rows[0]["records sha256"] == "a" * 12
    assert rows[0]["fold files sha256"] == f"train-0123.jsonl {'b' * 12}, val-4567.jsonl {'c' * 12}"
    assert rows[1]["Together files"] == "file-t, file-v"
    assert [r["model"] for r in rows] == ["me/m-e1", "me/m-e2"]
    assert [r["endpoint"] for r in rows] == ["-", "me/ew-games-e2"] and rows[1]["parent"] == "ft-1"
    unknown = rp.lineage_rows(RECORDS[:1], rp.Lineage(None, []))
    assert unknown[0]["records sha256"] == "unknown" and unknown[0]["Together files"] == "-"


def test_markdown_holds_picture_table_price_lineage_and_hyper_parameters():
    md = rp.report_markdown("games", RECORDS, {"learning_rate": 0.0001, "lora_r": 16}, LINEAGE, "loss.png",
                            {"backend": "together"})
    assert md.startswith("# games: run report")
    assert "price so far: $3.00" in md and "2 epoch(s) completed" in md
    assert "](loss.png)" in md
    assert "| epoch | status | model | job |" in md and "| 2 | completed | me/m-e2 | ft-2 |" in md
    assert "me/ew-games-e2" in md and "file-t, file-v" in md
    assert "| learning_rate | 0.0001 |" in md and "| backend | together |" in md
    local = EpochRecord(fold="g", epoch=1, backend="local", model="/x/epoch-1", train_loss=1.0)
    assert "no charge recorded" in rp.report_markdown("g", [local], {}, rp.Lineage(None, []), "loss.png")


def test_loss_png_and_data_uri_and_files(tmp_path):
    png = rp.loss_png("games", CURVES)
    width, height = png_size(png)
    assert (width, height) == (800, 400)
    uri = rp.data_uri(png)
    assert uri.startswith("data:image/png;base64,") and base64.b64decode(uri.split(",", 1)[1]) == png
    assert png_size(rp.loss_png("games", {})) == (800, 400)  # no losses yet: still a picture, saying so

    path = rp.write_report(tmp_path / "games", "# report\n", png)
    assert path == tmp_path / "games" / "report" / "report.md" and path.read_text() == "# report\n"
    assert (path.parent / "loss.png").read_bytes() == png
    assert sorted(p.name for p in path.parent.iterdir()) == ["loss.png", "report.md"]  # no temp files left


def test_source_hash_depends_on_record_bytes_not_file_names(tmp_path):
    from epochwise.prepare import source_sha256

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "one.jsonl").write_text('{"x": 1}\n')
    (a / "two.jsonl").write_text('{"x": 2}\n')
    (b / "z.jsonl").write_text('{"x": 2}\n')
    (b / "y.jsonl").write_text('{"x": 1}\n')
    (b / "notes.txt").write_text("not a record file")
    assert source_sha256(a) == source_sha256(b)
    (b / "y.jsonl").write_text('{"x": 3}\n')
    assert source_sha256(a) != source_sha256(b)


def _epochs(*models: str) -> list[EpochRecord]:
    return [EpochRecord(fold="games", epoch=i, backend="together", model=m, job_id=f"ft-{i}") for i, m in enumerate(models, 1)]


def test_report_state_describes_the_files_it_was_written_with(tmp_path):
    fold, png = tmp_path / "games", rp.loss_png("games", CURVES)
    records, context = _epochs("m1", "m2"), rp.report_context(["settings"])
    key = rp.report_key("# report\n", CURVES)
    rp.write_report(fold, "# report\n", png)
    rp.write_report_state(fold, key, context, records, "# report\n", png)

    state = rp.read_report_state(fold)
    assert state is not None and (state.key, state.context, state.epochs) == (key, context, {"1": "m1", "2": "m2"})
    assert rp.report_key("# report\n", {1: CURVES[1]}) != key  # other curves: another report

    (fold / rp.REPORT_DIR / rp.PICTURE_FILE).write_bytes(png + b"x")  # the picture changed behind its back
    assert rp.read_report_state(fold) is None


def test_a_replayed_prefix_of_the_chain_does_not_set_the_report_back(tmp_path):
    fold, png = tmp_path / "games", rp.loss_png("games", CURVES)
    context = rp.report_context(["settings"])
    rp.write_report(fold, "# report\n", png)
    rp.write_report_state(fold, "k", context, _epochs("m1", "m2"), "# report\n", png)
    state = rp.read_report_state(fold)

    assert rp.shows_later_report(state, _epochs("m1"), context)  # epoch 1 replayed from the cache
    assert not rp.shows_later_report(state, _epochs("m1", "m2"), context)  # the same epochs: compare keys
    assert not rp.shows_later_report(state, _epochs("other"), context)  # another chain (retrained epoch 1)
    assert not rp.shows_later_report(state, _epochs("m1"), rp.report_context(["other settings"]))
    assert not rp.shows_later_report(None, _epochs("m1"), context)
