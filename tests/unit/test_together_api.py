"""`epochwise.together_api` with the real SDK against the fake server (no Prefect)."""

from __future__ import annotations

import json
import re
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


def test_upload_is_named_by_its_content_and_found_again_in_the_list(fake_together, together_client, tmp_path):
    path = jsonl(tmp_path / "train.jsonl", [CONVO] * 2)
    sha = sha256_file(path)
    first = api.upload_file(together_client, path, sha, CFG, log=no_sleep())
    assert fake_together.state.files[first.id].filename == f"train-{sha[:16]}.jsonl" == first.filename
    assert not list(tmp_path.glob(".ew-upload-*"))  # the staging link is gone

    logged: list[str] = []
    again = api.upload_file(together_client, path, sha, CFG, log=logged.append)  # no cache record: the list
    assert again == first and fake_together.state.uploads == 1 and fake_together.counts["POST /v1/files"] == 1
    assert fake_together.counts["GET /v1/files"] == 2 and "reusing" in logged[0]


def test_a_listed_file_with_the_name_but_other_bytes_purpose_or_status_is_not_reused(
    fake_together, together_client, tmp_path
):
    path = jsonl(tmp_path / "train.jsonl", [CONVO] * 2)
    sha = sha256_file(path)
    decoys = tmp_path / "decoys"
    decoys.mkdir()
    # Same content-addressed name, other bytes (a byte count that differs).
    jsonl(decoys / api.remote_filename(path, sha), [CONVO] * 3)
    other_bytes = together_client.files.upload(decoys / api.remote_filename(path, sha)).id
    # Same name and bytes, another purpose.
    (decoys / api.remote_filename(path, sha)).write_bytes(path.read_bytes())
    wrong_purpose = together_client.files.upload(decoys / api.remote_filename(path, sha), purpose="eval").id
    # Same name, bytes and purpose, but Together rejected it, or it is still PENDING from long ago
    # (older than file_deadline_s: it would not pass in time).
    fake_together.script.file_polls = 10**6
    failed = together_client.files.upload(decoys / api.remote_filename(path, sha)).id
    fake_together.state.files[failed].processing_status = "FAILED"
    stale = together_client.files.upload(decoys / api.remote_filename(path, sha)).id
    fake_together.state.files[stale].created_at -= int(CFG.file_deadline_s) + 60
    fake_together.script.file_polls = 1
    listed = {f.id: f for f in together_client.files.list().data}
    assert {listed[i].filename for i in (other_bytes, wrong_purpose, failed, stale)} == {api.remote_filename(path, sha)}
    assert api.find_uploaded(together_client, sha, path.stat().st_size, "fine-tune") is None

    remote = api.upload_file(together_client, path, sha, CFG, log=no_sleep())
    assert remote.id not in (other_bytes, wrong_purpose, failed, stale)
    assert fake_together.state.uploads == 5 and fake_together.state.files[remote.id].processing_status == "COMPLETED"
    assert api.find_uploaded(together_client, sha, path.stat().st_size, "fine-tune") == remote


def test_an_upload_still_being_validated_is_waited_for_not_uploaded_again(fake_together, together_client, tmp_path):
    """A run stopped while Together validated its upload: the rerun waits for that file's validation."""
    path = jsonl(tmp_path / "train.jsonl", [CONVO] * 2)
    sha = sha256_file(path)
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / api.remote_filename(path, sha)).write_bytes(path.read_bytes())
    fake_together.script.file_polls = 3
    first = together_client.files.upload(staged / api.remote_filename(path, sha)).id  # then the run stopped
    assert fake_together.state.files[first].processing_status == "PENDING"
    logged: list[str] = []

    remote = api.upload_file(together_client, path, sha, CFG, log=logged.append)

    assert remote.id == first and fake_together.state.uploads == 1 and fake_together.counts["POST /v1/files"] == 1
    assert fake_together.state.files[first].processing_status == "COMPLETED"
    assert "waiting for its validation" in logged[0]


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
    assert created  # found by suffix after the 500: this call made it, and the caller settles as after a create
    assert len(fake_together.state.jobs) == 1 and fake_together.counts["POST /v1/fine-tunes"] == 1
    assert job.id == next(iter(fake_together.state.jobs))


def test_two_lost_create_replies_and_a_lagging_list_leave_one_live_job(fake_together, together_client, files):
    """Both creates make a job and lose the reply; the third attempt's list shows only the first job."""
    import time

    fake_together.script.create_then_500 = 2
    fake_together.script.list_delay_s = 2.5  # job 1 (t=0) is listed at 2.5 s, job 2 (t=1) at 3.5 s
    cfg = CFG.model_copy(update={"poll_initial_s": 1.0, "list_poll_s": 0.1, "list_catchup_s": 30})
    logs: list[str] = []
    job, created = api.create_job(
        together_client, request(files, "ew-games-e1-23232323"), cfg, log=logs.append, sleep=time.sleep
    )

    assert created and fake_together.counts["POST /v1/fine-tunes"] == 2  # attempt 3 (t=3) found job 1
    first, second = fake_together.state.jobs_in_order()
    assert job.id == first.id and first.status != "cancel_requested"
    assert second.status == "cancel_requested"  # the younger duplicate, listed only after attempt 3 looked
    assert any(f"duplicate job {second.id}" in line and f"keeping {first.id}" in line for line in logs)


def test_creates_refused_with_429_made_nothing_and_are_not_waited_for(fake_together, together_client, files):
    fake_together.burst("POST /v1/fine-tunes", [429, 429])
    cfg = CFG.model_copy(update={"create_attempts": 2, "poll_initial_s": 0.0, "list_poll_s": 0.01, "list_catchup_s": 30})
    with pytest.raises(api.TogetherFailure, match="could not create job"):
        api.create_job(together_client, request(files, "ew-games-e1-67676767"), cfg, log=no_sleep())
    assert fake_together.counts["GET /v1/fine-tunes"] == 2  # one look before each attempt, no wait for lost creates
    assert not fake_together.state.jobs


def test_creates_that_all_lose_their_replies_continue_on_the_job_they_made(fake_together, together_client, files):
    fake_together.script.create_then_500 = 2
    fake_together.script.list_delay_s = 0.5  # every attempt's list read comes before the last create shows
    cfg = CFG.model_copy(update={"create_attempts": 2, "poll_initial_s": 0.0, "list_poll_s": 0.05, "list_catchup_s": 30})
    job, created = api.create_job(together_client, request(files, "ew-games-e1-45454545"), cfg, log=no_sleep())

    assert created and fake_together.counts["POST /v1/fine-tunes"] == 2
    first, second = fake_together.state.jobs_in_order()
    assert job.id == first.id and second.status == "cancel_requested"  # no TogetherFailure, nothing left running


def test_create_after_the_callers_own_listing_lists_again_only_after_a_failed_attempt(
    fake_together, together_client, files
):
    lists = fake_together.counts["GET /v1/fine-tunes"]
    job, created = api.create_job(
        together_client, request(files, "ew-games-e1-66666666"), CFG, log=no_sleep(), sleep=no_sleep(), listed=True
    )
    assert created and fake_together.counts["GET /v1/fine-tunes"] == lists  # the caller's listing is not repeated
    fake_together.script.create_then_500 = 1
    again, created = api.create_job(
        together_client, request(files, "ew-games-e2-77777777"), CFG, log=no_sleep(), sleep=no_sleep(), listed=True
    )
    assert created and fake_together.counts["GET /v1/fine-tunes"] == lists + 2  # one look after the 500, one to settle
    assert fake_together.counts["POST /v1/fine-tunes"] == 2 and again.id != job.id


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
    statuses: list[str] = []

    def on_update(info: api.JobInfo, new: list[str]) -> None:
        statuses.append(info.status)
        lines.extend(new)

    final = api.poll_job(together_client, job.id, CFG, on_update, sleep=no_sleep(waits))

    assert final.status == "completed" and final.model_output_name
    assert waits[:4] == [10, 15, 22.5, 33.75] and max(waits) == 60 and waits[-1] == 60
    assert any(line.startswith("job_complete") for line in lines)
    # Events and updates (the wait task's progress artifact writes) only on status changes, not per poll.
    assert fake_together.counts["GET /v1/fine-tunes/{id}/events"] == 6
    assert fake_together.counts["GET /v1/fine-tunes/{id}"] == 15  # 3 polls per state
    assert statuses == ["pending", "queued", "running", "compressing", "uploading", "completed"]


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


def test_the_estimate_asks_for_the_training_type_and_method_the_job_is_created_with(
    fake_together, together_client, files
):
    fake_together.script.job_polls_per_state = 0
    prices = {}
    for lora, suffix in ((True, "ew-games-e1-12121212"), (False, "ew-games-e1-34343434")):
        epoch = request(files, suffix, lora=lora, lora_r=8, train_on_inputs="auto")
        prices[lora] = api.estimate_price(together_client, epoch)
        ours = fake_together.state.estimates[-1]
        api.create_job(together_client, epoch, CFG, log=no_sleep())
        sdk = fake_together.state.estimates[-1]  # the SDK's create estimates the job it is about to create
        assert sdk is not ours
        assert ours["training_type"] == sdk["training_type"]
        assert ours["training_method"] == sdk["training_method"] == {"method": "sft", "train_on_inputs": "auto"}
        assert (ours["training_type"]["type"], ours["training_type"].get("lora_r")) == (
            ("Lora", 8) if lora else ("Full", None)
        )
    assert prices == {True: 1.5, False: 6.0}  # full fine-tuning: the fake's full_price_factor 4


def test_limits_name_each_setting_together_would_refuse_and_the_fake_refuses_them(
    fake_together, together_client, files
):
    limits = together_client.fine_tuning.model_limits(model_name=BASE)
    assert api.limit_problems(limits, HyperParams(), validation=True) == []
    wide = HyperParams(lora_r=128, learning_rate=2.0, n_evals=101, n_checkpoints=21)
    assert api.limit_problems(limits, wide, validation=True) == [
        "train.hyper.learning_rate 2 is outside Together's 1e-08..1",
        "train.hyper.n_evals 101 is above Together's max_num_evals 100",
        "train.hyper.n_checkpoints 21 is above Together's max_num_checkpoints 20",
        "train.hyper.lora_r 128 is above Together's max_rank 64",
    ]
    assert api.limit_problems(limits, HyperParams(lora=False, lora_r=128), validation=True) == []
    with pytest.raises(api.LimitsExceeded, match="max_rank 64"):
        api.check_limits(together_client, BASE, HyperParams(lora_r=65), validation=True)
    for too_much in ({"lora_r": 65}, {"learning_rate": 2.0}, {"n_checkpoints": 21}):  # what Together refuses
        with pytest.raises(api.TogetherFailure, match="Together refused|above|outside"):
            api.create_job(together_client, request(files, "ew-games-e1-56565656", **too_much), CFG, log=no_sleep())
    assert not fake_together.state.jobs


def test_estimate_price_and_fold_jobs(fake_together, together_client, files):
    fake_together.script.price_per_epoch_usd = 2.25
    assert api.estimate_price(together_client, request(files, "ew-games-e1-88888888")) == 2.25
    fake_together.script.job_polls_per_state = 0
    one, _ = api.create_job(together_client, request(files, "ew-games-e1-88888888"), CFG, log=no_sleep())
    two, _ = api.create_job(together_client, request(files, "ew-games-e2-88888888", parent=one.id), CFG, log=no_sleep())
    api.create_job(together_client, request(files, "ew-other-e1-88888888"), CFG, log=no_sleep())
    assert [(e, j.id) for e, j in api.fold_jobs(together_client, "games")] == [(1, one.id), (2, two.id)]
    assert api.cancel_job(together_client, two.id) == "completed"  # a finished job stays finished


# ---------------------------------------------------------------------------------------------------
# Outages while waiting
# ---------------------------------------------------------------------------------------------------


class Clock:
    """A monotonic clock that only moves when the guard sleeps."""

    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def refused() -> Exception:
    import httpx
    from together import APIConnectionError

    return APIConnectionError(request=httpx.Request("GET", "http://127.0.0.1:9/v1/fine-tunes/ft-1"))


def guard(clock: Clock, logged: list[str], tolerance_s: float = 300.0) -> api.OutageGuard:
    return api.OutageGuard(
        "job ft-1 keeps running",
        "http://api.example",
        tolerance_s,
        10.0,
        60.0,
        log=logged.append,
        sleep=clock.sleep,
        clock=clock,
    )


def test_outage_guard_retries_transient_failures_with_backoff_and_says_what_keeps_running():
    clock, logged = Clock(), []
    failures = [refused()] * 5

    def call() -> str:
        if failures:
            raise failures.pop()
        return "running"

    assert guard(clock, logged).call(call) == "running"
    assert clock.sleeps == [10.0, 20.0, 40.0, 60.0, 60.0]
    assert re.fullmatch(r"Together unreachable since \d\d:\d\d; job ft-1 keeps running \(.*\)", logged[0])
    assert logged[1] == "Together reachable again after 190 s; job ft-1 keeps running" and len(logged) == 2


def test_outage_guard_gives_up_after_the_tolerance_naming_job_base_and_rerun():
    clock, logged = Clock(), []

    def down() -> str:
        raise refused()

    with pytest.raises(api.TogetherUnreachable) as failure:
        guard(clock, logged, tolerance_s=100.0).call(down)
    message = str(failure.value)
    assert "job ft-1 keeps running at Together" in message and "http://api.example" in message
    assert "a rerun re-attaches" in message and "outage_tolerance_s=100" in message
    assert sum(clock.sleeps) == 100.0 and clock.sleeps[-1] == 30.0  # never sleeps past the tolerance
    assert len(logged) == 1


def test_outage_guard_retries_5xx_and_429_but_not_other_errors(fake_together, tmp_path, files):
    from together import NotFoundError, Together

    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=0)
    job, _ = api.create_job(client, request(files, "ew-games-e1-99999999"), CFG, log=no_sleep(), sleep=no_sleep())
    fake_together.burst("GET /v1/fine-tunes/{id}", [503, 429, 500])
    clock, logged = Clock(), []
    assert guard(clock, logged).call(lambda: api.get_job(client, job.id)).id == job.id
    assert "(HTTP 503)" in logged[0] and len(clock.sleeps) == 3

    clock, logged = Clock(), []
    with pytest.raises(NotFoundError):
        guard(clock, logged).call(lambda: api.get_job(client, "ft-does-not-exist"))
    assert clock.sleeps == [] and logged == []


def test_poll_job_rides_out_a_real_outage_and_the_job_is_not_duplicated(fake_together, files, together_client):
    from together import Together

    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=0)
    job, _ = api.create_job(client, request(files, "ew-games-e1-aaaaaaaa"), CFG, log=no_sleep(), sleep=no_sleep())
    fake_together.outage_after("GET /v1/fine-tunes/{id}", 2, seconds=1.0)
    cfg = CFG.model_copy(update={"poll_initial_s": 0.01, "poll_max_s": 0.05, "outage_tolerance_s": 120})
    logged: list[str] = []

    final = api.poll_job(client, job.id, cfg, lambda *_: None, log=logged.append)

    assert final.status == "completed" and len(fake_together.state.jobs) == 1
    assert fake_together.counts["POST /v1/fine-tunes"] == 1
    (outage,) = fake_together.outages
    assert outage.up_at is not None
    assert logged[0].startswith("Together unreachable since ") and f"job {job.id} keeps running" in logged[0]
    # the SDK's error and httpx's cause: a dropped connection, or one refused while the fake is down
    cause = r"\(APIConnectionError: (Server disconnected|.*[Cc]onnection refused|All connection attempts failed)"
    assert re.search(cause, logged[0]), logged[0]
    assert logged[1].startswith("Together reachable again")
