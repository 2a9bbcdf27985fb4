"""DPO on Together through the real SDK against the fake: the job's wire body, the price estimate, the
rules the fake enforces (as Together does), the plan's DPO price and the chain-switch rule."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from together import BadRequestError
from typer.testing import CliRunner

from epochwise import plan as pl
from epochwise import together_api as api
from epochwise.cli import app
from epochwise.config.harmony import HarmonyConfig
from epochwise.config.together import TogetherConfig
from epochwise.config.train import DPOParams, HyperParams, TrainConfig
from epochwise.epochs import EpochRecord, chain_before, epoch_table, records_from_table
from epochwise.io import sha256_file
from tests.helpers import add_preference_files

BASE = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
CFG = TogetherConfig(file_poll_s=0.001)
CONVO = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def upload(client, path: Path) -> api.RemoteFile:
    return api.upload_file(client, path, sha256_file(path), CFG, log=lambda _: None)


@pytest.fixture
def prefs(together_client, tmp_path):
    fold = add_preference_files(tmp_path / "fold", "unit")
    return upload(together_client, fold / "train_dpo.jsonl"), upload(together_client, fold / "val_dpo.jsonl")


def dpo_request(files, dpo: DPOParams, parent: str | None = None, **hyper) -> api.EpochRequest:
    return api.EpochRequest(files[0].id, files[1].id, BASE, parent, "ew-unit-e1-00000000", HyperParams(**hyper), dpo=dpo)


def test_dpo_create_kwargs_name_the_method_and_leave_out_train_on_inputs():
    request = api.EpochRequest("file-t", "file-v", BASE, None, "s", HyperParams(train_on_inputs=True), dpo=DPOParams())
    kw = request.create_kwargs()
    assert kw["training_method"] == "dpo" and kw["dpo_beta"] == 0.1
    assert kw["dpo_normalize_logratios_by_length"] is False
    assert "train_on_inputs" not in kw and "rpo_alpha" not in kw and "simpo_gamma" not in kw
    sft = api.EpochRequest("file-t", "file-v", BASE, None, "s", HyperParams()).create_kwargs()
    assert "training_method" not in sft and sft["train_on_inputs"] is False  # SFT requests are unchanged


def test_dpo_job_wire_body_and_simpo_forces_reference_free(fake_together, together_client, prefs):
    job, created = api.create_job(together_client, dpo_request(prefs, DPOParams(beta=0.3, rpo_alpha=1.0)), CFG)
    assert created
    body = fake_together.state.jobs[job.id].request
    assert body["training_method"] == {
        "method": "dpo", "dpo_beta": 0.3, "dpo_normalize_logratios_by_length": False,
        "dpo_reference_free": False, "rpo_alpha": 1.0,
    }
    assert body["model"] == BASE and body["n_epochs"] == 1 and body["validation_file"] == prefs[1].id

    simpo = dpo_request(prefs, DPOParams(simpo_gamma=0.5))
    simpo.suffix = "ew-unit-e1-11111111"
    job, _ = api.create_job(together_client, simpo, CFG)
    method = fake_together.state.jobs[job.id].request["training_method"]
    assert method["simpo_gamma"] == 0.5 and method["dpo_reference_free"] is True
    assert method["dpo_normalize_logratios_by_length"] is True


def test_dpo_estimate_asks_for_a_dpo_job_and_costs_more_than_sft(fake_together, together_client, prefs):
    dpo = api.estimate_price(together_client, dpo_request(prefs, DPOParams()))
    sft = api.estimate_price(together_client, api.EpochRequest(prefs[0].id, prefs[1].id, BASE, None, "s", HyperParams()))
    assert (sft, dpo) == (1.5, 3.75)  # the fake's DPO factor: 2.5


def test_the_fake_refuses_what_together_refuses_for_dpo(fake_together, together_client, prefs, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(CONVO) + "\n")
    chat_file = upload(together_client, chat)
    with pytest.raises(BadRequestError, match="DPO training needs a preference dataset"):
        together_client.fine_tuning.create(training_file=chat_file.id, model=BASE, lora=True, training_method="dpo")
    with pytest.raises(ValueError, match="train_on_inputs is only supported for SFT"):  # the SDK's own rule
        together_client.fine_tuning.create(training_file=prefs[0].id, model=BASE, training_method="dpo", train_on_inputs=True)

    def raw(method: dict) -> tuple[int, str]:
        body = json.dumps({"training_file": prefs[0].id, "model": BASE, "training_method": method}).encode()
        req = urllib.request.Request(f"{fake_together.base_url}/v1/fine-tunes", body, method="POST",
                                     headers={"Authorization": f"Bearer {fake_together.api_key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    assert raw({"method": "dpo", "train_on_inputs": False})[0] == 400  # a request that bypasses the SDK
    assert raw({"method": "grpo"})[0] == 400
    assert raw({"method": "dpo", "rpo_alpha": -1})[0] == 400
    assert raw({"method": "dpo", "dpo_beta": 0.1})[0] == 200
    assert not any(j.request["training_file"] == chat_file.id for j in fake_together.state.jobs.values())


def test_a_dpo_job_may_continue_an_sft_job(fake_together, together_client, prefs, tmp_path):
    fake_together.script.job_polls_per_state = 0
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(CONVO) + "\n")
    sft = together_client.fine_tuning.create(training_file=upload(together_client, chat).id, model=BASE, lora=True,
                                             train_on_inputs=False)
    dpo, _ = api.create_job(together_client, dpo_request(prefs, DPOParams(), parent=sft.id), CFG)
    assert fake_together.state.jobs[dpo.id].request["from_checkpoint"] == sft.id
    assert fake_together.state.jobs[dpo.id].depth == 2


@pytest.mark.parametrize(
    "rows, reason",
    [
        ([{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [], "non_preferred_output": []}],
         "preferred_output must hold exactly one assistant message"),
        ([{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "assistant", "content": "a"}],
           "non_preferred_output": [{"role": "assistant", "content": "b"}]}, CONVO], "mixed dataset formats"),
    ],
)
def test_uploaded_preference_files_are_checked_by_the_server(fake_together, together_client, tmp_path, rows, reason):
    path = tmp_path / "bad_dpo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(api.TogetherFailure, match=reason):
        upload(together_client, path)


# --- plan ------------------------------------------------------------------------------------------


def test_plan_prices_dpo_offline_as_a_labelled_estimate_and_with_togethers_dpo_estimate(fake_together, together_client, tmp_path):
    fold = add_preference_files(tmp_path / "dplan", "plan")
    train = TrainConfig(base_model=BASE, epochs=2, method="dpo")
    offline = pl.build_plan(fold, "together", train, None, HarmonyConfig(), None)
    tokens = [f.tokens for f in offline.files]
    assert [Path(f.path).name for f in offline.files] == ["train_dpo.jsonl", "val_dpo.jsonl"]
    rate = 0.48 * pl.DPO_RATE_FACTOR  # 8B, LoRA
    assert offline.epochs[0].price_usd == pytest.approx((tokens[0] + tokens[1]) * rate / 1e6)
    assert "estimate" in offline.price_source and "DPO rate" in offline.price_source

    for name in ("train_dpo.jsonl", "val_dpo.jsonl"):
        upload(together_client, fold / name)
    online = pl.build_plan(fold, "together", train, None, HarmonyConfig(), together_client)
    assert [e.price_usd for e in online.epochs] == [3.75, 3.75]
    assert "DPO estimate-price" in online.price_source

    result = CliRunner().invoke(app, ["plan", str(fold), "--backend", "together", "--method", "dpo", "--base-model", BASE, "-n", "2"])
    assert result.exit_code == 0, result.output
    assert "7.50" in result.output and "train_dpo.jsonl" in result.output


# --- the chain-switch rule -------------------------------------------------------------------------


def rec(epoch: int, method: str, status: str = "completed") -> EpochRecord:
    return EpochRecord(fold="f", epoch=epoch, backend="together", method=method, status=status, job_id=f"ft-{epoch}")


def test_chain_before_keeps_the_earlier_methods_epochs_only():
    sft3 = [rec(1, "sft"), rec(2, "sft"), rec(3, "sft")]
    assert chain_before(sft3, "sft") == []  # one method: nothing kept, its epochs resume by their keys
    assert [r.epoch for r in chain_before(sft3, "dpo")] == [1, 2, 3]
    switched = [*sft3, rec(4, "dpo"), rec(5, "dpo")]
    assert [r.epoch for r in chain_before(switched, "dpo")] == [1, 2, 3]  # 4-5 resume by their keys
    assert [r.epoch for r in chain_before(switched, "sft")] == [1, 2, 3, 4, 5]  # dpo -> sft continues from 5
    failed = [rec(1, "sft"), rec(2, "sft"), rec(3, "sft", "error")]
    assert [r.epoch for r in chain_before(failed, "dpo")] == [1, 2]  # epoch 3 is trained by the new method
    assert chain_before([rec(2, "sft")], "dpo") == []  # no epoch 1: no chain to continue


def test_the_epochs_table_round_trips_method_and_price():
    records = [rec(1, "sft").model_copy(update={"price_usd": 1.5}), rec(2, "dpo").model_copy(update={"price_usd": 3.75})]
    back = records_from_table("f", epoch_table(records))
    assert [(r.method, r.price_usd, r.job_id) for r in back] == [("sft", 1.5, "ft-1"), ("dpo", 3.75, "ft-2")]
