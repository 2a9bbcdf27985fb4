"""`epochwise.together_api` with the real SDK against the fake server (no Prefect)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epochwise import together_api as api
from epochwise.config.together import TogetherConfig
from epochwise.config.train import HyperParams
from epochwise.io import sha256_file

BASE = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
CFG = TogetherConfig(poll_initial_s=10, poll_max_s=60, poll_factor=1.5, file_poll_s=0.001, max_retries=3)


def no_sleep(waits: list[float] | None = None):
    def sleep(seconds: float) -> None:
        if waits is not None:
            waits.append(seconds)

    return sleep


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CONVO = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture
def files(together_client, tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [CONVO] * 3)
    val = jsonl(tmp_path / "val.jsonl", [CONVO])
    return (
        api.upload_file(together_client, train, sha256_file(train), CFG, log=no_sleep()),
        api.upload_file(together_client, val, sha256_file(val), CFG, log=no_sleep()),
    )


def request(files, suffix: str, parent: str | None = None, **hyper) -> api.EpochRequest:
    return api.EpochRequest(files[0].id, files[1].id, BASE, parent, suffix, HyperParams(**hyper))


def test_upload_waits_for_server_validation(fake_together, together_client, tmp_path):
    fake_together.script.file_polls = 3
    path = jsonl(tmp_path / "train.jsonl", [CONVO] * 2)
    remote = api.upload_file(together_client, path, sha256_file(path), CFG, log=no_sleep())

    assert fake_together.state.files[remote.id].processing_status == "COMPLETED"
    assert fake_together.counts["GET /v1/files/{id}"] == 3
    assert remote.sha256 == sha256_file(path) and remote.bytes == path.stat().st_size
    assert fake_together.state.files[remote.id].data == path.read_bytes()


def test_upload_of_a_file_the_server_rejects_fails_with_its_report(fake_together, together_client, tmp_path):
    # Structurally valid JSON (together's local check_file passes it), but no known dataset format.
    path = jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(api.TogetherFailure, match="INVALID_FORMAT.*line 1: no known dataset format"):
        api.upload_file(together_client, path, sha256_file(path), CFG, log=no_sleep())


def test_file_exists_is_false_after_delete(fake_together, together_client, files):
    assert api.file_exists(together_client, files[0].id)
    together_client.files.delete(files[0].id)
    assert not api.file_exists(together_client, files[0].id)


def test_create_kwargs_pass_lora_explicitly_and_chain_with_from_checkpoint():
    first = api.EpochRequest("file-t", "file-v", BASE, None, "ew-games-e1-00000000", HyperParams(n_evals=0))
    kw = first.create_kwargs()
    assert kw["model"] == BASE and "from_checkpoint" not in kw
    assert kw["lora"] is True and kw["lora_r"] == 16 and kw["lora_alpha"] == 32
    assert kw["n_evals"] == 1 and kw["validation_file"] == "file-v"  # a validation file always gets an eval
    assert kw["n_epochs"] == 1 and kw["min_lr_ratio"] == 1.0 and kw["lr_scheduler_type"] == "linear"

    full = api.EpochRequest("file-t", None, BASE, "ft-1", "ew-games-e2-00000000", HyperParams(lora=False))
    kw = full.create_kwargs()
    assert kw["from_checkpoint"] == "ft-1" and "model" not in kw
    assert kw["lora"] is False and "lora_r" not in kw and kw["n_evals"] == 0


def test_suffix_is_deterministic_short_and_parsed_back_only_for_its_fold():
    key = "ab" * 32
    suffix = api.epoch_suffix("Games & Puzzles: the long fold name", 12, key)
    assert suffix == api.epoch_suffix("Games & Puzzles: the long fold name", 12, key)
    assert len(suffix) <= api.SUFFIX_MAX
    assert api.parse_suffix("Games & Puzzles: the long fold name", suffix) == 12
    assert api.parse_suffix("games", api.epoch_suffix("games-extra", 1, key)) is None
    assert api.parse_suffix("games", api.epoch_suffix("games", 3, key)) == 3


def test_find_job_ignores_failed_jobs_and_prefers_a_live_one(fake_together, together_client, files):
    suffix = "ew-games-e1-11111111"
    fake_together.fail_jobs(suffix, "bad node")
    failed = together_client.fine_tuning.create(**request(files, suffix).create_kwargs())
    while together_client.fine_tuning.retrieve(failed.id).status not in api.TERMINAL:
        pass
    assert api.find_job(together_client, suffix) is None

    job, created = api.create_job(together_client, request(files, suffix), CFG, log=no_sleep(), sleep=no_sleep())
    assert created and job.id != failed.id
    again, created = api.create_job(together_client, request(files, suffix), CFG, log=no_sleep(), sleep=no_sleep())
    assert not created and again.id == job.id
    assert api.find_job(together_client, "ew-games-e1-22222222") is None


def test_two_hosts_racing_one_epoch_keep_the_oldest_job_and_cancel_the_other(fake_together, together_client, files):
    """Both created (neither saw the other's job in the lagging list); each settles on its own thread."""
    import threading

    suffix = "ew-games-e1-44444444"
    fake_together.script.list_delay_s = 1.0
    kwargs = request(files, suffix).create_kwargs()
    first = api._info(together_client.fine_tuning.create(**kwargs))
    second = api._info(together_client.fine_tuning.create(**kwargs))
    assert api.find_job(together_client, suffix) is None  # the list has not caught up with either create
    cfg = CFG.model_copy(update={"list_poll_s": 0.02, "list_catchup_s": 120})
    kept: dict[str, api.JobInfo] = {}
    logs: list[str] = []

    def settle(own: api.JobInfo) -> None:
        kept[own.id] = api.settle_duplicates(together_client, own, suffix, cfg, log=logs.append)

    threads = [threading.Thread(target=settle, args=(job,)) for job in (second, first)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert kept[first.id].id == kept[second.id].id == first.id  # the same, oldest, job for both racers
    assert fake_together.state.jobs[first.id].status == "pending"
    assert fake_together.state.jobs[second.id].status == "cancel_requested"
    assert any(f"duplicate job {second.id}" in line and f"keeping {first.id}" in line for line in logs)
    assert api.find_job(together_client, suffix).id == first.id


def test_find_job_prefers_a_completed_job_then_the_oldest(fake_together, together_client, files):
    suffix = "ew-games-e1-55555555"
    kwargs = request(files, suffix).create_kwargs()
    older, newer = (together_client.fine_tuning.create(**kwargs) for _ in range(2))
    assert api.find_job(together_client, suffix).id == older.id
    while together_client.fine_tuning.retrieve(newer.id).status != "completed":
        pass
    assert api.find_job(together_client, suffix).id == newer.id


def test_create_whose_reply_is_lost_is_found_in_the_list_not_created_twice(fake_together, together_client, files):
    fake_together.script.create_then_500 = 1
    job, created = api.create_job(
        together_client, request(files, "ew-games-e1-33333333"), CFG, log=no_sleep(), sleep=no_sleep()
    )
    assert not created  # found by suffix after the 500
    assert len(fake_together.state.jobs) == 1 and fake_together.counts["POST /v1/fine-tunes"] == 1
    assert job.id == next(iter(fake_together.state.jobs))


def test_create_refused_by_together_raises_its_message(fake_together, together_client, files):
    bad = request(files, "ew-games-e2-44444444", parent="ft-does-not-exist")
    with pytest.raises(api.TogetherFailure, match="no such job"):
        api.create_job(together_client, bad, CFG, log=no_sleep(), sleep=no_sleep())
    assert not fake_together.state.jobs


def test_poll_backs_off_from_10_to_60_seconds_and_logs_events(fake_together, together_client, files):
    fake_together.script.job_polls_per_state = 3  # 15 status calls to completion
    job, _ = api.create_job(
        together_client, request(files, "ew-games-e1-55555555"), CFG, log=no_sleep(), sleep=no_sleep()
    )
    waits: list[float] = []
    lines: list[str] = []
    final = api.poll_job(together_client, job.id, CFG, lambda info, new: lines.extend(new), sleep=no_sleep(waits))

    assert final.status == "completed" and final.model_output_name
    assert waits[:4] == [10, 15, 22.5, 33.75] and max(waits) == 60 and waits[-1] == 60
    assert any(line.startswith("job_complete") for line in lines)
    assert fake_together.counts["GET /v1/fine-tunes/{id}/events"] == 6  # only on status changes, not per poll


def test_poll_deadline_leaves_the_job_running(fake_together, together_client, files):
    fake_together.script.hold_jobs = True
    job, _ = api.create_job(
        together_client, request(files, "ew-games-e1-66666666"), CFG, log=no_sleep(), sleep=no_sleep()
    )
    cfg = CFG.model_copy(update={"job_deadline_s": 0.001})
    with pytest.raises(api.TogetherFailure, match="keeps running at Together"):
        api.poll_job(together_client, job.id, cfg, lambda *_: None, sleep=no_sleep())
    assert fake_together.state.jobs[job.id].status not in api.TERMINAL and len(fake_together.state.jobs) == 1


def test_failure_message_and_losses(fake_together, together_client, files):
    fake_together.script.job_polls_per_state = 0
    fake_together.script.losses = {1: (1.25, 1.5)}
    good, _ = api.create_job(
        together_client, request(files, "ew-games-e1-77777777"), CFG, log=no_sleep(), sleep=no_sleep()
    )
    assert api.job_losses(together_client, good.id) == (1.25, 1.5)
    fake_together.fail_jobs("e2", "loss went NaN at step 3", status="user_error")
    bad, _ = api.create_job(
        together_client, request(files, "ew-games-e2-77777777", parent=good.id), CFG, log=no_sleep(), sleep=no_sleep()
    )
    assert api.get_job(together_client, bad.id).status == "user_error"
    assert api.failure_message(together_client, bad.id) == "loss went NaN at step 3"


def test_estimate_price_and_fold_jobs(fake_together, together_client, files):
    fake_together.script.price_per_epoch_usd = 2.25
    assert api.estimate_price(together_client, request(files, "ew-games-e1-88888888")) == 2.25
    fake_together.script.job_polls_per_state = 0
    one, _ = api.create_job(together_client, request(files, "ew-games-e1-88888888"), CFG, log=no_sleep())
    two, _ = api.create_job(together_client, request(files, "ew-games-e2-88888888", parent=one.id), CFG, log=no_sleep())
    api.create_job(together_client, request(files, "ew-other-e1-88888888"), CFG, log=no_sleep())
    assert [(e, j.id) for e, j in api.fold_jobs(together_client, "games")] == [(1, one.id), (2, two.id)]
    assert api.cancel_job(together_client, two.id) == "completed"  # a finished job stays finished
