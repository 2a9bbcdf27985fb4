"""``epochwise plan``: tokens and prices per epoch, against the fake Together server with zero writes."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from epochwise import plan as pl
from epochwise.cli import app
from epochwise.config.harmony import HarmonyConfig
from epochwise.config.train import TrainConfig
from tests.fake_together.server import FakeTogether
from tests.helpers import example_fold, local_config

LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
# Together's estimate-price is a POST that creates nothing; every other POST/PUT/PATCH/DELETE is a write.
NOT_A_WRITE = {"POST /v1/fine-tunes/estimate-price"}


def writes(fake: FakeTogether) -> dict[str, int]:
    return {
        route: n
        for route, n in fake.counts.items()
        if n and route.split()[0] in ("POST", "PUT", "PATCH", "DELETE") and route not in NOT_A_WRITE
    }


def make_fold(root: Path, n_train: int = 6, n_val: int = 2) -> Path:
    fold = root / "planfold"
    fold.mkdir(parents=True)

    def convo(i: int) -> str:
        return json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Answer with a number."},
                    {"role": "user", "content": f"What is {i} + {i}?"},
                    {"role": "assistant", "content": str(2 * i)},
                ]
            }
        )

    (fold / "train.jsonl").write_text("".join(convo(i) + "\n" for i in range(n_train)))
    (fold / "val.jsonl").write_text("".join(convo(100 + i) + "\n" for i in range(n_val)))
    return fold


# --- pure arithmetic -------------------------------------------------------------------------------


def test_running_total_stops_where_the_flows_budget_rule_would():
    rows = pl.plan_epochs(4, 1000, 100, 2, 1.5, budget_usd=4.0)
    assert [r.total_usd for r in rows] == [1.5, 3.0, 4.5, 6.0]
    assert [r.within_budget for r in rows] == [True, True, False, False]
    assert all(r.val_tokens == 200 for r in rows)  # validated n_evals times per epoch
    found = pl.Plan("f", "together", "m", "t", "p", 4.0, [], rows)
    assert found.stops_before == 3
    assert "budget stops the chain before epoch 3" in "\n".join(found.summary_lines())
    assert pl.plan_epochs(2, 10, 0, 0, 1.0, budget_usd=2.0)[-1].within_budget  # exactly the budget fits


def test_model_size_and_published_rate():
    assert pl.model_size_b("openai/gpt-oss-20b") == 20
    assert pl.model_size_b("meta-llama/Meta-Llama-3.1-8B-Instruct-Reference") == 8
    assert pl.model_size_b("Qwen/Qwen2.5-0.5B-Instruct") == 0.5
    assert pl.model_size_b("some/model") is None
    assert pl.rate_per_mtok("meta-llama/Meta-Llama-3.1-8B-Instruct-Reference", lora=True) == 0.48
    assert pl.rate_per_mtok("openai/gpt-oss-20b", lora=False) == 1.65
    assert pl.rate_per_mtok("some/model", lora=True) is None
    assert pl.price_from_rate(1_000_000, 500_000, 2, 1.5) == pytest.approx(3.0)


# --- against the fake ------------------------------------------------------------------------------


def test_plan_gpt_oss_counts_o200k_tokens_bills_padding_and_writes_nothing(fake_together, tmp_path):
    from epochwise.harmony import ensure_vocab_dir, render_row

    fold = make_fold(tmp_path)
    result = CliRunner().invoke(
        app,
        ["plan", str(fold), "--backend", "together", "--base-model", "openai/gpt-oss-20b", "--epochs", "3",
         "--budget", "0.25"],
    )
    assert result.exit_code == 0, result.output
    assert writes(fake_together) == {}
    assert fake_together.state.uploads == 0 and not fake_together.state.jobs

    # Real tokens: each conversation rendered by openai-harmony on its own, as the converter does.
    effort = HarmonyConfig().reasoning_effort
    vocab = str(ensure_vocab_dir())
    real = {
        name: sum(len(render_row(json.loads(line)["messages"], effort, vocab)[0]) for line in lines)
        for name, lines in (
            ("train", (fold / "train.jsonl").read_text().splitlines()),
            ("val", (fold / "val.jsonl").read_text().splitlines()),
        )
    }
    cfg = TrainConfig(backend="together", base_model="openai/gpt-oss-20b", epochs=3, budget_usd=0.25)
    from together import Together

    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url)
    found = pl.build_plan(fold, "together", cfg, None, HarmonyConfig(), client)
    files = {f.role: f for f in found.files}
    assert files["train"].tokens == real["train"] and files["val"].tokens == real["val"]
    # Parquet is not packed: billed as rows x max_seq_length (the model's limit from Together: 8192).
    assert files["train"].billed_tokens == 6 * 8192 and files["val"].billed_tokens == 2 * 8192
    assert files["train"].padding_waste == 6 * 8192 - real["train"]
    per_epoch = (6 * 8192 + 2 * 8192) * 1.50 / 1e6  # 20B: Together's 16.1-69B LoRA rate
    assert [e.price_usd for e in found.epochs] == [pytest.approx(per_epoch)] * 3
    assert [e.within_budget for e in found.epochs] == [True, True, False]
    assert found.price_source.startswith("estimate:") and "o200k" in found.tokenizer
    assert writes(fake_together) == {}

    out = " ".join(result.output.split())
    assert f"{real['train']}" in out and f"{6 * 8192}" in out and "padding waste" in out
    assert "budget stops the chain before epoch 3" in out and "estimate:" in out


def test_plan_uses_togethers_estimate_when_the_files_are_already_uploaded(fake_together, tmp_path):
    from together import Together

    from epochwise import together_api as api
    from epochwise.config.together import TogetherConfig
    from epochwise.io import sha256_file

    fold = make_fold(tmp_path)
    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url)
    cfg = TogetherConfig(file_poll_s=0.005)
    uploaded = [api.upload_file(client, fold / n, sha256_file(fold / n), cfg).id for n in ("train.jsonl", "val.jsonl")]
    before = dict(fake_together.counts)

    result = CliRunner().invoke(app, ["plan", str(fold), "--backend", "together", "--base-model", LLAMA, "-n", "2"])
    assert result.exit_code == 0, result.output
    assert {r: n - before.get(r, 0) for r, n in writes(fake_together).items() if n != before.get(r, 0)} == {}
    assert fake_together.counts["POST /v1/fine-tunes/estimate-price"] == before.get(
        "POST /v1/fine-tunes/estimate-price", 0
    ) + 1
    out = " ".join(result.output.split())
    assert "Together's estimate-price" in out and all(fid in out for fid in uploaded)
    assert "estimate, bytes/4" in out  # JSONL: Together's tokenizer is not available offline
    assert "3.00" in out  # the fake prices 1.50 per epoch: running total after 2 epochs

    found = pl.build_plan(fold, "together", TrainConfig(base_model=LLAMA, epochs=2), None, HarmonyConfig(), client)
    assert [f.file_id for f in found.files] == uploaded
    assert [f.tokens for f in found.files] == [(fold / n).stat().st_size // 4 for n in ("train.jsonl", "val.jsonl")]
    assert [e.total_usd for e in found.epochs] == [1.5, 3.0]


def test_plan_of_the_local_tiny_model_counts_with_its_own_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from epochwise.local.models import base_model_path

    fold = example_fold(tmp_path / "games")
    local = local_config(tmp_path)
    train = TrainConfig(backend="local", epochs=2, local_model="tiny")
    found = pl.build_plan(fold, "local", train, local, None)

    tokenizer = AutoTokenizer.from_pretrained(base_model_path("tiny", fold, local))
    expected = {}
    for role in ("train", "val"):
        lines = (fold / f"{role}.jsonl").read_bytes().splitlines()
        ids = [tokenizer.apply_chat_template(orjson.loads(line)["messages"], tokenize=True) for line in lines]
        expected[role] = sum(min(len(getattr(i, "input_ids", i)), local.seq_length) for i in ids)
    files = {f.role: f for f in found.files}
    assert {r: f.tokens for r, f in files.items()} == expected
    assert [e.train_tokens for e in found.epochs] == [expected["train"]] * 2
    assert [e.price_usd for e in found.epochs] == [0.0, 0.0] and found.backend == "local"
    assert "trained on this fold" in found.tokenizer


def test_plan_stops_on_a_setting_the_models_together_limits_refuse_and_writes_nothing(fake_together, tmp_path):
    fold = make_fold(tmp_path)
    args = ["plan", str(fold), "--backend", "together", "--base-model", LLAMA, "-n", "2"]

    result = CliRunner().invoke(app, [*args, "--lora-r", "128"])  # the fake's max_rank is 64

    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert f"error: Together would refuse every job on {LLAMA}: train.hyper.lora_r 128 is above" in out
    assert "max_rank 64" in out and "Traceback" not in result.output
    assert "planfold: epochs" in out  # the plan itself is still shown
    assert writes(fake_together) == {}
    assert CliRunner().invoke(app, args).exit_code == 0  # within the limits: no error
