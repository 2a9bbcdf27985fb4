"""The post-training adapter (`epochwise.post_training`) against the fake's ``/v1/rl`` routes with the
real SDK: the rules Together enforces (Idempotency-Key, READY resources, running sessions, GRPO loss
inputs, force stop, payload URLs for big bodies, int64 as strings) and the pure GRPO pieces."""

from __future__ import annotations

import pytest
from together import BadRequestError, Together

from epochwise import post_training as pt
from epochwise.config.together import PostTrainingConfig
from epochwise.config.train import HyperParams
from tests.fake_together import post_training as fake_pt

CFG = PostTrainingConfig(poll_s=0.001, ready_deadline_s=10, op_deadline_s=10)


def ready_session(client: Together) -> tuple[str, str]:
    spec = pt.ResourceSpec("base/model", 1, 900)
    rid = pt.create_resource(client, spec).id
    pt.wait_ready(client, rid, CFG, log=lambda _: None)
    return rid, pt.create_session(client, rid, "ew-f-e1-00000000", HyperParams(), None, CFG).id


def sample(tokens: list[int], resp: list[int], *, length: int | None = None, **extra) -> dict:
    full = tokens + resp
    n = length if length is not None else len(full) - 1
    inputs = {
        "target_tokens": {"data": full[1:][:n], "dtype": "int64"},
        "logprobs": {"data": [0.0] * n, "dtype": "float32"},
        "advantages": {"data": [1.0] * n, "dtype": "float32"},
        **extra,
    }
    return {"model_input": {"chunks": [{"encoded_text": {"tokens": full[:-1]}}]}, "loss_fn_inputs": inputs}


GRPO = {"type": "LOSS_TYPE_GRPO", "grpo_params": {"beta": 0.0}}


def test_the_same_key_returns_the_same_operation_and_applies_it_once(fake_together, together_client):
    _, sid = ready_session(together_client)
    ops = pt.Operations(together_client, sid, CFG)
    body = {"loss": GRPO, "samples": [sample([1, 2], [97, 98])]}
    first = ops.run("forward-backward", "k1", body)
    again = ops.run("forward-backward", "k1", body)
    state = fake_pt.state(fake_together)
    assert first == again and state.applied["forward-backward"] == 1
    with pytest.raises(pt.PostTrainingFailure, match="422"):  # a used key with another body
        ops.run("forward-backward", "k1", {"loss": GRPO, "samples": [sample([1, 3], [97, 98])]})
    with pytest.raises(BadRequestError, match="Idempotency-Key header is required"):
        together_client.post(f"/v1/rl/training-sessions/{sid}/operations/optim-step", body={}, cast_to=object)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (dict(length=2), "has 2 values, model_input has 3 tokens"),
        (
            dict(weights={"data": [1.0] * 3, "dtype": "float32"}, mask={"data": [1] * 3, "dtype": "int64"}),
            "cannot contain both weights and mask",
        ),
    ],
)
def test_grpo_loss_inputs_are_checked(fake_together, together_client, change, reason):
    _, sid = ready_session(together_client)
    with pytest.raises(pt.PostTrainingFailure, match=f"INVALID_INPUT: .*{reason}"):
        pt.Operations(together_client, sid, CFG).run(
            "forward-backward", "k", {"loss": GRPO, "samples": [sample([1, 2], [97, 98], **change)]}
        )
    assert fake_pt.state(fake_together).applied["forward-backward"] == 0


def test_beta_above_zero_needs_reference_logprobs(fake_together, together_client):
    _, sid = ready_session(together_client)
    loss = {"type": "LOSS_TYPE_GRPO", "grpo_params": {"beta": 0.1}}
    ops = pt.Operations(together_client, sid, CFG)
    with pytest.raises(pt.PostTrainingFailure, match="misses reference_logprobs"):
        ops.run("forward-backward", "k", {"loss": loss, "samples": [sample([1, 2], [97, 98])]})
    ref = {"reference_logprobs": {"data": [0.0] * 3, "dtype": "float32"}}
    assert "loss" in ops.run("forward-backward", "k2", {"loss": loss, "samples": [sample([1, 2], [97, 98], **ref)]})


def test_resources_sessions_and_stops_follow_togethers_rules(fake_together, together_client):
    P = together_client.with_options(max_retries=0).post_training
    rid = pt.create_resource(together_client, pt.ResourceSpec("base/model", 1, 900)).id
    with pytest.raises(BadRequestError, match="not READY"):
        P.sessions.create(model_resources_id=rid)
    with pytest.raises(BadRequestError, match="not READY"):
        P.model_resources.extend_expiry(rid, seconds=600)
    pt.wait_ready(together_client, rid, CFG, log=lambda _: None)
    with pytest.raises(BadRequestError, match="60-86400"):
        P.model_resources.extend_expiry(rid, seconds=30)
    pt.extend_expiry(together_client, rid, 600)
    sid = pt.create_session(together_client, rid, "ew-f-e1-00000000", HyperParams(), None, CFG).id
    raw = together_client.get(f"/v1/rl/training-sessions/{sid}", cast_to=object)
    assert raw["step"] == "0" and raw["policy_state"]["trainer_step"] == "0"  # int64 as strings
    with pytest.raises(BadRequestError, match="active training sessions"):
        P.model_resources.stop(rid)
    assert fake_pt.state(fake_together).billing() == [rid]
    assert pt.stop_resource(together_client, rid) == "MODEL_RESOURCES_STATUS_STOPPED"  # force=true
    assert pt.stop_resource(together_client, rid) == "MODEL_RESOURCES_STATUS_STOPPED"  # already stopped: no error
    res = fake_pt.state(fake_together).resources[rid]
    billed = res.billed()
    assert billed > 0 and res.billed() == billed and fake_pt.state(fake_together).billing() == []
    with pytest.raises(pt.PostTrainingFailure, match="400.*not RUNNING"):
        pt.Operations(together_client, sid, CFG).run("optim-step", "k", {})


def test_bodies_and_results_over_half_a_mebibyte_go_through_payload_urls(fake_together, together_client):
    _, sid = ready_session(together_client)
    ops = pt.Operations(together_client, sid, CFG)
    big = [sample(list(range(1, 2000)), [97] * 50) for _ in range(20)]  # several MiB of JSON
    out = ops.run("forward-backward", "big", {"loss": GRPO, "samples": big})
    counts = fake_together.counts
    assert counts["POST /v1/rl/training-sessions/{id}/payloads/upload-url"] == 1 and counts["PUT /_payloads/{pid}"] == 1
    assert out["metrics"]["tokens"] == 20 * 2048  # the server trained on the full body, not the inline stand-in
    fake_pt.state(fake_together).script.vocab = tuple(range(97, 123))
    body = {
        "model_inputs": [{"chunks": [{"encoded_text": {"tokens": [1, 2]}}]}] * 64,
        "num_samples": 8,
        "sampling_params": {"max_tokens": 64, "temperature": 1.0},
    }
    results = ops.run("sample", "s", body)["results"]
    assert counts["POST /v1/rl/training-sessions/{id}/payloads/{pid}/download-url"] == 1
    assert len(results) == 64 and all(len(s["tokens"]) == 64 for r in results for s in r["sequences"])


def test_group_advantages_and_keys():
    assert pt.group_advantages([1.0, 0.0, 1.0, 0.0], scale=False) == [0.5, -0.5, 0.5, -0.5]
    scaled = pt.group_advantages([1.0, 0.0, 1.0, 0.0], scale=True)
    assert scaled[0] == pytest.approx(1.0, abs=1e-3) and pt.group_advantages([2.0, 2.0], scale=True) == [0.0, 0.0]
    assert pt.op_key("f", "k", 3, "sample") == pt.op_key("f", "k", 3, "sample") != pt.op_key("f", "k", 4, "sample")
    prompt, seq = [1, 2, 3], {"tokens": ["97", "98"], "logprobs": [-0.5, -0.6]}
    (s,) = pt.grpo_samples(prompt, [seq], [0.7])
    assert s["model_input"]["chunks"][0]["encoded_text"]["tokens"] == [1, 2, 3, 97]
    assert s["loss_fn_inputs"]["target_tokens"]["data"] == [2, 3, 97, 98]
    assert s["loss_fn_inputs"]["mask"]["data"] == [0, 0, 1, 1]
    assert s["loss_fn_inputs"]["advantages"]["data"] == [0.0, 0.0, 0.7, 0.7]
    assert pt.fold_of_session("ew-my-fold-e12-abcdef01") == "my-fold" and pt.fold_of_session("other") is None


@pytest.mark.parametrize(
    ("fold", "key"),
    [("ga", "e3f9a0b1c2"), ("my-eval", "0123abcd"), ("a-e2", "e1234567"), ("x", "deadbeef")],
)
def test_a_session_name_gives_back_its_fold_whatever_the_key_starts_with(fold, key):
    # A key starting with "e" (1 in 16) once made `abort` and the fold's lease miss a billing resource.
    assert pt.fold_of_session(pt.session_name(fold, 3, key)) == fold


def test_an_hf_tokenizer_directory_renders_the_chat_prompt_and_decodes(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "user", "assistant", "hello"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}assistant{% endif %}"
    )
    fast.save_pretrained(tmp_path)
    loaded = pt.load_tokenizer(str(tmp_path))
    assert loaded.prompt_tokens([{"role": "user", "content": "hello"}]) == [1, 3, 2]  # user hello assistant
    assert loaded.decode([3, 3]) == "hello hello"


def test_lists_are_read_page_by_page_and_a_finished_epoch_is_found_on_any_page(fake_together, together_client):
    rid, first = ready_session(together_client)
    names = [f"ew-f-e{k}-0000000{k}" for k in range(2, 6)]
    for name in names:
        pt.create_session(together_client, rid, name, HyperParams(), None, CFG)
    listed = [s.display_name for s in pt.all_pages(together_client.post_training.sessions.list, page_size=2)]
    assert listed == ["ew-f-e1-00000000", *names]  # 3 pages of 2, nothing missed or repeated
    with pytest.raises(BadRequestError, match="limit must be 1-100"):
        together_client.post_training.sessions.list(limit=101)

    last = next(s for s in fake_pt.state(fake_together).sessions.values() if s.body["display_name"] == names[-1])
    assert pt.finished_epoch(together_client, names[-1]) is None  # running, no checkpoints yet
    ops = pt.Operations(together_client, last.id, CFG)
    ops.run("training-checkpoint", "k-train", {})
    assert pt.finished_epoch(together_client, names[-1]) is None  # no registered inference checkpoint yet
    ops.run("inference-checkpoint", "k-infer", {})
    done = pt.finished_epoch(together_client, names[-1])
    assert done is not None and done.session_id == last.id and done.model_path.startswith("models/ml_")


def test_a_lost_create_reply_is_answered_by_the_one_new_sessionless_resource_of_its_spec(
    fake_together, together_client
):
    state = fake_pt.state(fake_together)
    spec = pt.ResourceSpec("base/model", 1, 900)
    busy, _ = ready_session(together_client)  # an older resource of the spec, with a session
    other_spec = pt.create_resource(together_client, pt.ResourceSpec("base/other", 1, 900)).id
    claimed = pt.create_resource(together_client, spec).id  # another run recorded this one as its own
    state.script.create_then_500 = 1

    made = pt.create_resource(together_client, spec, claimed=lambda rid: rid == claimed)

    assert made.id not in (busy, other_spec, claimed) and made.id in state.resources
    assert fake_together.counts["POST /v1/rl/model-resources"] == 4  # the lost create was not sent again


def test_a_lost_create_reply_with_two_candidates_names_both_and_creates_nothing_more(fake_together, together_client):
    state = fake_pt.state(fake_together)
    spec = pt.ResourceSpec("base/model", 1, 900)
    concurrent = pt.create_resource(together_client, spec).id  # another machine's, still without a session
    state.script.create_then_500 = 1

    with pytest.raises(pt.PostTrainingFailure, match="2 new resources of this spec have no session") as failed:
        pt.create_resource(together_client, spec)

    ours = next(rid for rid in state.resources if rid != concurrent)
    assert concurrent in str(failed.value) and ours in str(failed.value)
    assert fake_together.counts["POST /v1/rl/model-resources"] == 2


def test_a_refused_create_and_a_lost_one_that_made_nothing_fail_without_a_second_create(fake_together, together_client):
    spec = pt.ResourceSpec("base/model", 1, 900)
    fake_together.burst("POST /v1/rl/model-resources", [400])
    with pytest.raises(pt.PostTrainingFailure, match=r"Together refused the model resource \(400\)"):
        pt.create_resource(together_client, spec)
    fake_together.burst("POST /v1/rl/model-resources", [503])  # answered before anything was made
    slept = []
    with pytest.raises(pt.PostTrainingFailure, match="shows no new resource of this spec after 3 s"):
        pt.create_resource(together_client, spec, lookup_s=3, poll_s=1, sleep=slept.append)
    assert slept == [1, 1, 1]  # the list was read 4 times over the 3 s
    assert fake_together.counts["POST /v1/rl/model-resources"] == 2 and fake_pt.state(fake_together).resources == {}


def test_waiting_for_another_runs_epoch_ends_with_its_checkpoints_or_an_error_when_its_session_stops(
    fake_together, together_client
):
    rid, sid = ready_session(together_client)
    name = "ew-f-e1-00000000"
    rival = pt.SessionInfo(sid, rid, pt.RUNNING, name, 0)
    slept = []

    def stop_on_second_wait(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 2:
            pt.stop_session(together_client, sid)  # that run failed before its checkpoints

    with pytest.raises(
        pt.PostTrainingFailure,
        match=f"session {sid} of {name}, which another run was training, is "
        "TRAINING_SESSION_STATUS_STOPPED without the epoch's checkpoints; rerun",
    ):
        pt.wait_finished(together_client, rival, 7.0, sleep=stop_on_second_wait)
    assert slept == [7.0, 7.0]

    rid, sid = ready_session(together_client)  # a second session of the name, on its own resource
    rival = pt.SessionInfo(sid, rid, pt.RUNNING, name, 0)
    # Its resource stopped (e.g. Together's inactive timeout after that run died) while the session
    # still reads RUNNING: the fake's own stop ends the sessions too, so the state is set here.
    fake_pt.state(fake_together).resources[rid].status = "MODEL_RESOURCES_STATUS_STOPPED"
    assert together_client.post_training.sessions.retrieve(sid).status == pt.RUNNING
    with pytest.raises(
        pt.PostTrainingFailure,
        match=f"session {sid} of {name}, .* is on resource {rid}, which is "
        "MODEL_RESOURCES_STATUS_STOPPED without the epoch's checkpoints",
    ):
        pt.wait_finished(together_client, rival, 7.0, sleep=slept.append)

    rid, sid = ready_session(together_client)  # a third, which saves its checkpoints
    ops = pt.Operations(together_client, sid, CFG)
    ops.run("training-checkpoint", "k-train", {})
    ops.run("inference-checkpoint", "k-infer", {})
    done = pt.wait_finished(together_client, pt.SessionInfo(sid, rid, pt.RUNNING, name, 0), 7.0, sleep=slept.append)
    assert done.session_id == sid and len(slept) == 2  # found at once
