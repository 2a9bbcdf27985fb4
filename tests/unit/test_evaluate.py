"""Pure evaluation logic: targets from val rows, every built-in metric (label metrics against hand-computed
values), user metrics and their one-row check, the table, ``best-eval`` and the heatmap picture."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import pytest

from epochwise import evaluate as ev
from epochwise.evaluation_report import heatmap_png, markdown


def write_val(fold: Path, conversations: list[list[dict]]) -> Path:
    fold.mkdir(parents=True, exist_ok=True)
    (fold / "val.jsonl").write_bytes(b"".join(orjson.dumps({"messages": c}) + b"\n" for c in conversations))
    return fold


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_rows_take_the_last_assistant_turn_as_target_and_skip_rows_without_one(tmp_path: Path):
    fold = write_val(
        tmp_path / "a",
        [
            [
                turn("system", "s"),
                turn("user", "u1"),
                turn("assistant", "a1"),
                turn("user", "u2"),
                turn("assistant", "a2"),
            ],
            [turn("user", "no reply")],
            [turn("user", "q"), turn("assistant", "yes")],
        ],
    )
    rows = ev.read_eval_rows(fold)
    assert [r.target for r in rows] == ["a2", "yes"]
    assert [m["content"] for m in rows[0].prompt] == ["s", "u1", "a1", "u2"]
    assert rows[0].source.endswith("val.jsonl:1") and rows[1].source.endswith("val.jsonl:3")
    assert rows[0].key != rows[1].key and len(rows[0].key) == 64
    # the key is the content's: the same conversation on another line of another fold has the same key
    other = write_val(
        tmp_path / "b", [[turn("user", "x"), turn("assistant", "y")], [turn("user", "q"), turn("assistant", "yes")]]
    )
    assert ev.read_eval_rows(other)[1].key == rows[1].key
    assert [r.target for r in ev.read_eval_rows(fold, limit=1)] == ["a2"]


def test_a_fold_without_rows_or_val_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ev.EvaluationError, match="val.jsonl: not found"):
        ev.read_eval_rows(tmp_path)
    write_val(tmp_path / "a", [[turn("user", "u")]])
    with pytest.raises(ev.EvaluationError, match="no conversation with an assistant turn"):
        ev.read_eval_rows(tmp_path / "a")


def rows_for(targets: list[str]) -> list[ev.EvalRow]:
    return [ev.EvalRow(f"val.jsonl:{i}", (turn("user", "q"),), t, str(i)) for i, t in enumerate(targets, 1)]


def test_exact_contains_and_json_field():
    assert ev.exact(" Kofi\n", "Kofi") == 1.0 and ev.exact("kofi", "Kofi") == 0.0
    assert ev.contains("the winner is Kofi.", "Kofi") == 1.0 and ev.contains("Jonas", "Kofi") == 0.0
    field = ev.parse_metric("json-field:winner").row
    assert field('{"winner": "Kofi", "x": 1}', '{"winner": "Kofi", "x": 2}') == 1.0
    assert field('{"winner": "Jonas"}', '{"winner": "Kofi"}') == 0.0
    assert field("not json", '{"winner": "Kofi"}') == 0.0
    assert field('{"other": 1}', '{"winner": "Kofi"}') == 0.0
    nested = ev.parse_metric("json-field:board.size").row
    assert nested('{"board": {"size": 3}}', '{"board": {"size": 3, "x": 0}}') == 1.0
    assert nested('{"board": 3}', '{"board": {"size": 3}}') == 0.0
    scores = ev.score_replies(
        [ev.parse_metric("exact"), ev.parse_metric("contains")], rows_for(["a", "b", "c", "d"]), ["a", "xb", "c ", "z"]
    )
    assert scores == {"exact": 0.5, "contains": 0.75}


def test_label_metrics_match_hand_computed_values():
    # targets:   cat cat cat dog dog bird ; predictions: cat cat dog dog cat cat
    # cat:  tp 2, fp 2, fn 1 -> P 2/4, R 2/3, F1 2*(1/2*2/3)/(1/2+2/3) = 4/7
    # dog:  tp 1, fp 1, fn 1 -> P 1/2, R 1/2, F1 1/2
    # bird: tp 0, fp 0, fn 1 -> P 0 (never predicted), R 0, F1 0
    scores = ev.label_scores(["cat", "cat", "dog", "dog", "cat", "cat"], ["cat", "cat", "cat", "dog", "dog", "bird"])
    assert scores["accuracy"] == pytest.approx(3 / 6)
    assert scores["precision"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert scores["recall"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert scores["f1"] == pytest.approx((4 / 7 + 1 / 2 + 0) / 3)
    # a predicted label no target has counts in the macro average (precision 0, recall 0)
    extra = ev.label_scores(["yes", "maybe"], ["yes", "no"])
    assert extra == pytest.approx({"accuracy": 0.5, "precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    assert ev.score_replies([ev.parse_metric("labels")], rows_for(["a", "b"]), [" a", "b"]) == {
        "accuracy": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
    }


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def half(reply, target):\n    return 0.5\n"
        "def flag(reply, target):\n    return reply == target\n"
        "def broken(reply, target):\n    raise KeyError('score')\n"
        "def too_big(reply, target):\n    return 3\n"
        "NOT_CALLABLE = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_metrics"
    sys.modules.pop("my_metrics", None)


def test_user_metrics_by_import_path_and_their_one_row_check(user_module):
    row = rows_for(["Kofi"])[0]
    assert ev.score_replies(
        [ev.parse_metric(f"{user_module}:half"), ev.parse_metric(f"{user_module}:flag")], [row], ["Jonas"]
    ) == {f"{user_module}:half": 0.5, f"{user_module}:flag": 0.0}
    ev.check_metrics([ev.parse_metric(f"{user_module}:flag")], row)
    with pytest.raises(ev.EvaluationError, match=r"metric my_metrics:broken failed on val.jsonl:1: KeyError: 'score'"):
        ev.check_metrics([ev.parse_metric(f"{user_module}:broken")], row)
    with pytest.raises(
        ev.EvaluationError, match=r"my_metrics:too_big returned 3 on val.jsonl:1: expected a number in \[0, 1\]"
    ):
        ev.check_metrics([ev.parse_metric(f"{user_module}:too_big")], row)
    with pytest.raises(ev.EvaluationError, match="my_metrics has no function NOT_CALLABLE"):
        ev.parse_metric(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(ev.EvaluationError, match="cannot import no_such_module_xyz"):
        ev.parse_metric("no_such_module_xyz:f")
    with pytest.raises(ev.EvaluationError, match="not one of exact, contains, labels"):
        ev.parse_metric("bleu")
    with pytest.raises(ev.EvaluationError, match="needs a field name"):
        ev.parse_metric("json-field:")


RESULTS = [
    {"epoch": 1, "fold": "a", "rows": 4, "scores": {"exact": 0.25, "contains": 0.5}},
    {"epoch": 1, "fold": "b", "rows": 4, "scores": {"exact": 0.75, "contains": 0.5}},
    {"epoch": 2, "fold": "a", "rows": 4, "scores": {"exact": 1.0, "contains": 1.0}},
    {"epoch": 2, "fold": "b", "rows": 4, "scores": {"exact": 0.25, "contains": 1.0}},
    {"epoch": 3, "fold": "a", "rows": 4, "scores": {"exact": 0.5, "contains": 0.0}},
    {"epoch": 3, "fold": "b", "rows": 4, "scores": {"exact": 0.5, "contains": 0.0}},
]


def test_table_has_one_row_per_epoch_fold_and_metric_and_best_eval_is_the_best_mean():
    rows = ev.table_rows(list(reversed(RESULTS)))
    assert len(rows) == 12 and rows[0] == {"epoch": 1, "eval fold": "a", "metric": "exact", "value": 0.25, "rows": 4}
    assert ev.metric_names(rows) == ["exact", "contains"]
    # exact means: e1 0.5, e2 0.625, e3 0.5 -> 2; though epoch 2 is not the best on fold b
    assert ev.epoch_means(rows, "exact") == {1: 0.5, 2: 0.625, 3: 0.5}
    assert ev.best_eval_epoch(rows) == 2
    # contains means: e1 0.5, e2 1.0, e3 0.0 ; a tie goes to the earlier epoch
    assert ev.best_eval_epoch(rows, "contains") == 2
    tie = ev.table_rows([r for r in RESULTS if r["epoch"] != 2])
    assert ev.best_eval_epoch(tie) == 1
    with pytest.raises(ev.EvaluationError, match="metric f1 is not in the evaluation table"):
        ev.best_eval_epoch(rows, "f1")


def test_epochs_choice():
    assert ev.parse_epochs("all", [3, 1, 2], 2) == [1, 2, 3]
    assert ev.parse_epochs("best", [1, 2, 3], 2) == [2]
    assert ev.parse_epochs("3,1", [1, 2, 3], 2) == [1, 3]
    with pytest.raises(ev.EvaluationError, match=r"epoch\(s\) 4 not finished \(finished: 1, 2\)"):
        ev.parse_epochs("1,4", [1, 2], 1)
    with pytest.raises(ev.EvaluationError, match="all, best or numbers"):
        ev.parse_epochs("last", [1], 1)


def test_heatmap_is_a_png_and_the_markdown_embeds_it():
    rows = ev.table_rows(RESULTS)
    png = heatmap_png(rows, "games")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    text = markdown(rows, png, "games", ev.best_eval_epoch(rows))
    assert "data:image/png;base64,iVBORw0KGgo" in text and "| 2 (best-eval) | 0.6250 | 1.0000 |" in text
