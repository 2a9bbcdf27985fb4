"""The fake's post-training routes (``client.post_training`` of together 3.1.1, ``/v1/rl/...``).

Routes and shapes follow the SDK's generated resources (``together/resources/post_training/*.py``)
and its hand-written payload helper (``together/post_training/_payloads.py``). Rules enforced, as
Together documents them (docs.together.ai/docs/post-training/{concepts,limits-and-errors}):

* model resources go PENDING -> CREATING -> READY, one step per GET of the resource; they bill while
  READY (``state.billed_s`` per resource, ``billing()`` lists the ones billing now); ``extend-expiry``
  takes 60-86400 s and only while READY; ``stop`` refuses while a session is active unless
  ``?force=true`` (which stops those sessions), and refuses an already stopped resource;
* a training session needs a READY resource; ``resume_from_checkpoint_id`` must name a training
  checkpoint of the same base model and restores its policy and step;
* every operation POST needs an ``Idempotency-Key`` header: the same key on the same session and
  kind returns the original operation and is never applied twice (a different body under a used key
  is refused, 422); operations on a session that is not RUNNING are refused (400);
* operations answer PENDING and complete after ``script.op_polls`` GETs; the effect is applied once,
  when the operation is accepted (``state.applied[kind]`` counts applications);
* forward-backward checks its loss inputs: the loss type, for policy losses ``target_tokens``,
  ``logprobs`` and ``advantages``, ``reference_logprobs`` when ``grpo_params.beta > 0``, never both
  ``weights`` and ``mask``, every tensor 1-D and as long as the sample's ``model_input`` (a failed
  operation with ``TRAINING_OPERATION_ERROR_CODE_INVALID_INPUT`` otherwise);
* bodies over 0.5 MiB arrive through ``payloads/upload-url`` + a PUT without auth, referenced by
  ``payload_id``; a sample result over 0.5 MiB is answered by reference (``payload_id``) too;
* int64 fields (``step``, ``tokens``, ``weights_version``, ``trainer_step``) are emitted as strings,
  as a protobuf-JSON gateway does.

The "model" is a per-session bias over token ids: sampling draws each token from ``softmax(bias /
temperature)`` over ``script.vocab`` (a seeded RNG: same session, key and policy -> same tokens);
forward-backward accumulates ``advantage x mask`` per target token, optim-step adds
``learning_rate x script.policy_gain x gradient`` to the trainer's bias, and weights-sync copies it to
the sampler. So the policy really moves towards tokens with a positive advantage, and a reward that
favours some tokens rises over the steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.fake_together.server import PROJECT, USER, ApiError, Request, now_iso

if TYPE_CHECKING:
    from tests.fake_together.server import FakeTogether

LARGE_PAYLOAD = int(0.5 * 1024 * 1024)  # together/post_training/_payloads.py: _LARGE_PAYLOAD_THRESHOLD
RESOURCE_STEPS = ("MODEL_RESOURCES_STATUS_PENDING", "MODEL_RESOURCES_STATUS_CREATING", "MODEL_RESOURCES_STATUS_READY")
LIVE_RESOURCE = RESOURCE_STEPS
RUNNING = "TRAINING_SESSION_STATUS_RUNNING"
KINDS = (
    "forward-backward",
    "custom-forward-backward",
    "optim-step",
    "sample",
    "weights-sync",
    "training-checkpoint",
    "inference-checkpoint",
)
LOSS_TYPES = (
    "LOSS_TYPE_CROSS_ENTROPY",
    "LOSS_TYPE_GRPO",
    "LOSS_TYPE_IMPORTANCE_SAMPLING",
    "LOSS_TYPE_PPO",
    "LOSS_TYPE_CISPO",
    "LOSS_TYPE_DRO",
    "LOSS_TYPE_DPPO",
)


@dataclass
class PTScript:
    """Post-training knobs."""

    price_per_hour: float = 12.0
    op_polls: int = 1  # GETs an operation stays PENDING/RUNNING before COMPLETED
    vocab: tuple[int, ...] = tuple(range(97, 123))  # what sampling draws from (bytes 'a'..'z')
    stop_token: int | None = None  # ends a sequence early when drawn (STOP_REASON_STOP)
    policy_gain: float = 2.5e4  # bias moved per unit of learning_rate x gradient
    fail_ops: dict[str, str] = field(default_factory=dict)  # kind -> error code: the next op of it fails
    # kind -> N: operations of that kind after the N-th one applied stay PENDING (applied, not reported
    # done) until the entry is removed: a run can be killed while it waits on an applied operation.
    hold_after: dict[str, int] = field(default_factory=dict)
    # kind -> N: the next N operations of that kind are applied but answered 500 (a lost reply); the SDK
    # retries with the same Idempotency-Key.
    lose_replies: Counter = field(default_factory=Counter)
    hold_sessions_creating: bool = False  # new sessions stay CREATING (a run can be killed while one starts)
    # Resources stay PENDING until this many were created: two runs that share no lock both create one.
    hold_resources_until: int = 0
    create_then_500: int = 0  # resource creates that make the resource but answer 500 (a lost reply)


@dataclass
class Resource:
    id: str
    body: dict[str, Any]
    created_at: str
    status: str = RESOURCE_STEPS[0]
    ready_since: float | None = None  # time.monotonic() when it went READY (billing starts)
    billed_s: float = 0.0  # READY time already closed (stopped)
    expires_at: float | None = None
    stopped_at: str | None = None

    def billing(self) -> bool:
        return self.status == "MODEL_RESOURCES_STATUS_READY"

    def billed(self) -> float:
        return self.billed_s + (time.monotonic() - self.ready_since if self.ready_since is not None else 0.0)

    def to_json(self) -> dict[str, Any]:
        b = self.body
        out = {
            "id": self.id,
            "base_model": b["base_model"],
            "compute_config": {
                "num_generator_replicas": int((b.get("compute_config") or {}).get("num_generator_replicas", 0)),
                "gpu_type": (b.get("compute_config") or {}).get("gpu_type", "B200-SXM"),
            },
            "created_at": self.created_at,
            "created_by": USER,
            "inactive_timeout": int(b.get("inactive_timeout") or 3600),
            "lora_enabled": bool(b.get("lora_enabled", True)),
            "optimizer_config": b.get("optimizer_config") or {"adam": {}},
            "status": self.status,
            "status_details": {"queue_position": 0 if self.status == RESOURCE_STEPS[0] else None},
            "updated_at": now_iso(),
        }
        if self.expires_at is not None:
            out["expires_at"] = time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + self.expires_at - time.monotonic())
            )
        return out


@dataclass
class Session:
    id: str
    resource_id: str
    base_model: str
    body: dict[str, Any]
    created_at: str
    status: str = "TRAINING_SESSION_STATUS_CREATING"
    trainer_bias: dict[int, float] = field(default_factory=dict)
    sampler_bias: dict[int, float] = field(default_factory=dict)
    grad: dict[int, float] = field(default_factory=dict)
    step: int = 0
    weights_version: int = 0
    training_checkpoints: list[dict[str, Any]] = field(default_factory=list)
    inference_checkpoints: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "base_model": self.base_model,
            "created_at": self.created_at,
            "created_by": USER,
            "inference_checkpoints": self.inference_checkpoints,
            "training_checkpoints": self.training_checkpoints,
            "metadata": self.body.get("metadata") or {},
            "model_resources_id": self.resource_id,
            "policy_state": {
                "applied_weights_version": str(self.weights_version),
                "pending_publish": False,
                "target_weights_version": str(self.weights_version),
                "trainer_step": str(self.step),
            },
            "status": self.status,
            "step": str(self.step),
            "updated_at": now_iso(),
        }
        for key in ("display_name", "lora_config", "resume_from_checkpoint_id"):
            if self.body.get(key) is not None:
                out[key] = self.body[key]
        return out


@dataclass
class Operation:
    id: str
    kind: str
    session_id: str
    body_hash: str
    ordinal: int = 0  # how many operations of this kind were applied up to this one
    polls: int = 0
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    def to_json(self, done: bool) -> dict[str, Any]:
        if self.error is not None:
            return {"id": self.id, "status": "TRAINING_OPERATION_STATUS_FAILED", "error": self.error}
        if not done:
            return {"id": self.id, "status": "TRAINING_OPERATION_STATUS_PENDING"}
        return {"id": self.id, "status": "TRAINING_OPERATION_STATUS_COMPLETED", "output": self.output}


@dataclass
class PTState:
    """What the fake knows of post-training; tests read it directly."""

    script: PTScript = field(default_factory=PTScript)
    resources: dict[str, Resource] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    operations: dict[str, Operation] = field(default_factory=dict)
    keys: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (session, kind, key) -> op id
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> Checkpoint JSON (+ "_policy")
    payloads: dict[str, bytes] = field(default_factory=dict)
    applied: Counter = field(default_factory=Counter)  # kind -> operations applied (never twice per key)
    applied_keys: list[tuple[str, str]] = field(default_factory=list)  # (kind, Idempotency-Key) in order
    cost_estimates: int = 0

    def billing(self) -> list[str]:
        """Resources billing now (READY)."""
        return [r.id for r in self.resources.values() if r.billing()]


def token_probability(policy: dict[int, float], token: int, vocab: tuple[int, ...], temperature: float = 1.0) -> float:
    """The probability that the fake samples ``token`` under ``policy`` (a bias per token id)."""
    weights = _weights(policy, vocab, temperature)
    return weights[vocab.index(token)] / sum(weights)


def state(fake: FakeTogether) -> PTState:
    """The fake's post-training state, created on first use."""
    pt = getattr(fake, "post_training", None)
    if pt is None:
        pt = PTState()
        fake.post_training = pt  # type: ignore[attr-defined]
    return pt


# ---------------------------------------------------------------------------------------------------
# Model resources
# ---------------------------------------------------------------------------------------------------


def _resource_body(req: Request) -> dict[str, Any]:
    body = req.json()
    if not body.get("base_model"):
        raise ApiError(400, "base_model is required")
    timeout = body.get("inactive_timeout")
    if timeout is not None and not 300 <= int(timeout) <= 86400:
        raise ApiError(400, f"inactive_timeout must be 300-86400 seconds, got {timeout}")
    replicas = (body.get("compute_config") or {}).get("num_generator_replicas", 0)
    if int(replicas) < 0:
        raise ApiError(400, "num_generator_replicas must be >= 0")
    return body


def resources_create(fake: FakeTogether, _: dict[str, str], req: Request):
    pt = state(fake)
    body = _resource_body(req)
    res = Resource(fake.new_id("mr"), body, now_iso())
    pt.resources[res.id] = res
    if pt.script.create_then_500 > 0:
        pt.script.create_then_500 -= 1
        raise ApiError(500, "upstream timeout after the model resource was created", "server_error")
    return 200, res.to_json()


def resources_estimate(fake: FakeTogether, _: dict[str, str], req: Request):
    pt = state(fake)
    body = _resource_body(req)
    pt.cost_estimates += 1
    replicas = int((body.get("compute_config") or {}).get("num_generator_replicas", 0))
    return 200, {"currency": "USD", "price_per_hour": pt.script.price_per_hour * (1 + replicas) / 2}


def _resource(fake: FakeTogether, rid: str) -> Resource:
    res = state(fake).resources.get(rid)
    if res is None:
        raise ApiError(404, f"model resources {rid} not found", "not_found")
    _expire(fake, res)
    return res


def _expire(fake: FakeTogether, res: Resource) -> None:
    """Together stops a READY resource once ``inactive_timeout`` passed without operations."""
    if res.billing() and res.expires_at is not None and time.monotonic() > res.expires_at:
        _stop_resource(fake, res)


def _touch(res: Resource) -> None:
    if res.billing():
        deadline = time.monotonic() + int(res.body.get("inactive_timeout") or 3600)
        res.expires_at = max(res.expires_at or 0.0, deadline)


def resources_retrieve(fake: FakeTogether, p: dict[str, str], _: Request):
    res = _resource(fake, p["id"])
    if res.status in RESOURCE_STEPS[:-1] and len(state(fake).resources) >= state(fake).script.hold_resources_until:
        res.status = RESOURCE_STEPS[RESOURCE_STEPS.index(res.status) + 1]
        if res.billing():
            res.ready_since = time.monotonic()
            _touch(res)
    return 200, res.to_json()


def _page(items: list[dict[str, Any]], req: Request) -> dict[str, Any]:
    """One page of a post-training list: ``limit`` 1-100 (the fake's default, 20, is smaller than most
    lists in the tests, so a caller that ignores ``meta.has_more`` misses items), ``after`` = the
    ``next_cursor`` of the page before (the id of its last item)."""
    raw = req.query.get("limit") or "20"
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise ApiError(400, f"limit must be 1-100, got {raw!r}")
    limit, after = int(raw), req.query.get("after")
    start = 0
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(400, f"invalid cursor {after!r}")
        start = ids.index(after) + 1
    data = items[start : start + limit]
    more = start + limit < len(items)
    return {"data": data, "meta": {"has_more": more, "limit": limit, "next_cursor": data[-1]["id"] if more else None}}


def resources_list(fake: FakeTogether, _: dict[str, str], req: Request):
    pt = state(fake)
    for res in pt.resources.values():
        _expire(fake, res)
    wanted = req.query.get("status")
    data = [r.to_json() for r in pt.resources.values() if not wanted or r.status == wanted]
    return 200, _page(data, req)


def resources_extend(fake: FakeTogether, p: dict[str, str], req: Request):
    res = _resource(fake, p["id"])
    seconds = req.json().get("seconds")
    if not isinstance(seconds, int) or not 60 <= seconds <= 86400:
        raise ApiError(400, f"seconds must be 60-86400, got {seconds!r}")
    if not res.billing():
        raise ApiError(400, f"model resources {res.id} is {res.status}, not READY")
    res.expires_at = max(res.expires_at or 0.0, time.monotonic() + seconds)
    return 200, res.to_json()


def _active_sessions(fake: FakeTogether, rid: str) -> list[Session]:
    return [
        s
        for s in state(fake).sessions.values()
        if s.resource_id == rid and s.status in ("TRAINING_SESSION_STATUS_CREATING", RUNNING)
    ]


def _stop_resource(fake: FakeTogether, res: Resource) -> None:
    for sess in _active_sessions(fake, res.id):
        sess.status = "TRAINING_SESSION_STATUS_STOPPED"
    if res.ready_since is not None:
        res.billed_s += time.monotonic() - res.ready_since
        res.ready_since = None
    res.status, res.stopped_at = "MODEL_RESOURCES_STATUS_STOPPED", now_iso()


def resources_stop(fake: FakeTogether, p: dict[str, str], req: Request):
    res = _resource(fake, p["id"])
    if res.status in ("MODEL_RESOURCES_STATUS_STOPPED", "MODEL_RESOURCES_STATUS_ERROR"):
        raise ApiError(400, f"model resources {res.id} is already {res.status}")
    force = req.query.get("force", "false").lower() == "true"
    if _active_sessions(fake, res.id) and not force:
        raise ApiError(400, f"model resources {res.id} has active training sessions: stop them or pass force=true")
    _stop_resource(fake, res)
    return 200, res.to_json()


# ---------------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------------


def sessions_create(fake: FakeTogether, _: dict[str, str], req: Request):
    pt = state(fake)
    body = req.json()
    res = _resource(fake, str(body.get("model_resources_id") or ""))
    if not res.billing():
        raise ApiError(400, f"model resources {res.id} is {res.status}, not READY")
    sess = Session(fake.new_id("sess"), res.id, res.body["base_model"], body, now_iso())
    resume = body.get("resume_from_checkpoint_id")
    if resume:
        ckpt = pt.checkpoints.get(resume)
        if ckpt is None or ckpt["type"] != "CHECKPOINT_TYPE_TRAINING":
            raise ApiError(400, f"resume_from_checkpoint_id {resume} is not a training checkpoint")
        if ckpt["base_model"] != sess.base_model:
            raise ApiError(400, f"checkpoint {resume} is of {ckpt['base_model']}, not {sess.base_model}")
        sess.trainer_bias = dict(ckpt["_policy"])
        sess.sampler_bias = dict(ckpt["_policy"])
        sess.step = int(ckpt["step"])
    pt.sessions[sess.id] = sess
    _touch(res)
    return 200, sess.to_json()


def _session(fake: FakeTogether, sid: str) -> Session:
    sess = state(fake).sessions.get(sid)
    if sess is None:
        raise ApiError(404, f"training session {sid} not found", "not_found")
    res = state(fake).resources.get(sess.resource_id)
    if res is not None:
        _expire(fake, res)
    return sess


def sessions_retrieve(fake: FakeTogether, p: dict[str, str], _: Request):
    sess = _session(fake, p["id"])
    if sess.status == "TRAINING_SESSION_STATUS_CREATING" and not state(fake).script.hold_sessions_creating:
        sess.status = RUNNING
    return 200, sess.to_json()


def sessions_list(fake: FakeTogether, _: dict[str, str], req: Request):
    rid = req.query.get("model_resources_id")
    data = [s.to_json() for s in state(fake).sessions.values() if not rid or s.resource_id == rid]
    return 200, _page(data, req)


def sessions_stop(fake: FakeTogether, p: dict[str, str], _: Request):
    sess = _session(fake, p["id"])
    if sess.status in ("TRAINING_SESSION_STATUS_CREATING", RUNNING):
        sess.status = "TRAINING_SESSION_STATUS_STOPPED"
    return 200, sess.to_json()


# ---------------------------------------------------------------------------------------------------
# Payloads (bodies over 0.5 MiB)
# ---------------------------------------------------------------------------------------------------


def payload_upload_url(fake: FakeTogether, p: dict[str, str], _: Request):
    _session(fake, p["id"])
    pid = fake.new_id("pl")
    return 200, {"payload_id": pid, "upload_url": f"{fake.base_url}/_payloads/{pid}"}


def payload_download_url(fake: FakeTogether, p: dict[str, str], _: Request):
    _session(fake, p["id"])
    if p["pid"] not in state(fake).payloads:
        raise ApiError(404, f"payload {p['pid']} not found", "not_found")
    return 200, {"download_url": f"{fake.base_url}/_payloads/{p['pid']}"}


def payload_put(fake: FakeTogether, p: dict[str, str], req: Request):
    if req.headers.get("authorization"):
        raise ApiError(400, "presigned URLs take no Authorization header")
    state(fake).payloads[p["pid"]] = req.body
    return 200, b""


def payload_get(fake: FakeTogether, p: dict[str, str], _: Request):
    data = state(fake).payloads.get(p["pid"])
    if data is None:
        raise ApiError(404, f"payload {p['pid']} not found", "not_found")
    return 200, data, {"Content-Type": "application/octet-stream"}


# ---------------------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------------------


class InvalidInput(Exception):
    """An operation that is accepted but fails (FAILED, INVALID_INPUT)."""


def _full_body(fake: FakeTogether, req: Request) -> dict[str, Any]:
    body = req.json()
    pid = body.get("payload_id")
    if pid:
        raw = state(fake).payloads.get(pid)
        if raw is None:
            raise ApiError(400, f"payload {pid} was not uploaded")
        body = json.loads(raw)
    elif len(req.body) > LARGE_PAYLOAD:
        raise ApiError(413, "request body over 0.5 MiB: upload it through payloads/upload-url and send payload_id")
    return body


def operation_create(kind: str):
    def handler(fake: FakeTogether, p: dict[str, str], req: Request):
        pt = state(fake)
        key = req.headers.get("idempotency-key")
        if not key:
            raise ApiError(400, "the Idempotency-Key header is required")
        sess = _session(fake, p["id"])
        body = _full_body(fake, req)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        known = pt.keys.get((sess.id, kind, key))
        if known is not None:
            op = pt.operations[known]
            if op.body_hash != digest:
                raise ApiError(422, f"Idempotency-Key {key} was used for a different {kind} request")
            return 200, op.to_json(_done(pt, op))
        if sess.status != RUNNING:
            raise ApiError(400, f"training session {sess.id} is {sess.status}, not RUNNING")
        op = Operation(fake.new_id("op"), kind, sess.id, digest)
        pt.keys[(sess.id, kind, key)] = op.id
        pt.operations[op.id] = op
        failing = pt.script.fail_ops.pop(kind, None)
        try:
            if failing:
                raise InvalidInput(failing)
            op.output = APPLY[kind](fake, sess, body, key)
            pt.applied[kind] += 1
            pt.applied_keys.append((kind, key))
            op.ordinal = pt.applied[kind]
        except InvalidInput as exc:
            code = (
                str(exc)
                if str(exc).startswith("TRAINING_OPERATION_ERROR_CODE_")
                else "TRAINING_OPERATION_ERROR_CODE_INVALID_INPUT"
            )
            op.error = {"code": code, "message": str(exc)}
        res = pt.resources.get(sess.resource_id)
        if res is not None:
            _touch(res)
        if pt.script.lose_replies[kind] > 0:
            pt.script.lose_replies[kind] -= 1
            error = {"error": {"message": f"scripted lost reply for {kind}", "type": "server_error"}}
            return 500, error, {"Retry-After-Ms": "1"}
        return 200, op.to_json(False)

    return handler


def _done(pt: PTState, op: Operation) -> bool:
    held = pt.script.hold_after.get(op.kind)
    if held is not None and op.ordinal > held:
        return False
    return op.polls >= pt.script.op_polls


def operation_retrieve(fake: FakeTogether, p: dict[str, str], _: Request):
    pt = state(fake)
    sess = _session(fake, p["id"])
    op = pt.operations.get(p["op"])
    if op is None or op.session_id != sess.id or op.kind != p["kind"]:
        raise ApiError(404, f"{p['kind']} operation {p['op']} not found", "not_found")
    op.polls += 1
    payload = op.to_json(_done(pt, op))
    if op.kind == "sample" and payload.get("output") and len(json.dumps(payload["output"])) > LARGE_PAYLOAD:
        pid = fake.new_id("pl")
        pt.payloads[pid] = json.dumps(payload["output"]).encode()
        payload["output"] = {"results": [], "payload_id": pid}
    return 200, payload


def _tokens(model_input: Any) -> list[int]:
    try:
        return [int(t) for chunk in model_input["chunks"] for t in chunk["encoded_text"]["tokens"]]
    except (KeyError, TypeError, ValueError):
        raise InvalidInput("model_input must be {chunks: [{encoded_text: {tokens: [int, ...]}}]}") from None


def _weights(bias: dict[int, float], vocab: tuple[int, ...], temperature: float) -> list[float]:
    top = max((bias.get(t, 0.0) for t in vocab), default=0.0)
    return [math.exp((bias.get(t, 0.0) - top) / temperature) for t in vocab]


def apply_sample(fake: FakeTogether, sess: Session, body: dict[str, Any], key: str) -> dict[str, Any]:
    if not body.get("model_inputs"):
        raise InvalidInput("model_inputs is required")
    params = body.get("sampling_params") or {}
    n = int(body.get("num_samples") or 1)
    max_tokens = int(params.get("max_tokens") or 16)
    temperature = float(params.get("temperature") or 1.0)
    script = state(fake).script
    vocab = script.vocab
    weights = _weights(sess.sampler_bias, vocab, temperature)
    total = sum(weights)
    # Same key, seed and policy version -> same tokens (session ids are random, so they are left out).
    rng = random.Random(f"{key}|{params.get('seed')}|{sess.weights_version}")
    results = []
    for model_input in body["model_inputs"]:
        _tokens(model_input)
        sequences = []
        for _ in range(n):
            tokens, logprobs, reason = [], [], "STOP_REASON_LENGTH"
            for _ in range(max_tokens):
                token = rng.choices(vocab, weights)[0]
                tokens.append(str(token))
                logprobs.append(math.log(weights[vocab.index(token)] / total))
                if script.stop_token is not None and token == script.stop_token:
                    reason = "STOP_REASON_STOP"
                    break
            sequences.append(
                {"tokens": tokens, "logprobs": logprobs, "stop_reason": reason, "prompt_cache_hit_tokens": "0"}
            )
        results.append(
            {"policy_segments": [{"start_token": "0", "version": str(sess.weights_version)}], "sequences": sequences}
        )
    return {"results": results}


def _tensor(sample: dict[str, Any], name: str, length: int, label: str) -> list[float] | None:
    inputs = sample.get("loss_fn_inputs") or {}
    if name not in inputs:
        return None
    tensor = inputs[name]
    data = tensor.get("data") if isinstance(tensor, dict) else None
    if not isinstance(data, list) or tensor.get("dtype") not in ("int64", "float32"):
        raise InvalidInput(f"{label}: loss_fn_inputs[{name!r}] must be {{data: [...], dtype: int64|float32}}")
    if len(data) != length:
        raise InvalidInput(f"{label}: loss_fn_inputs[{name!r}] has {len(data)} values, model_input has {length} tokens")
    values = [float(v) for v in data]
    if not all(math.isfinite(v) for v in values):
        raise InvalidInput(f"{label}: loss_fn_inputs[{name!r}] holds a non-finite value")
    return values


def apply_forward_backward(fake: FakeTogether, sess: Session, body: dict[str, Any], key: str) -> dict[str, Any]:
    loss = body.get("loss") or {}
    kind = loss.get("type")
    if kind not in LOSS_TYPES:
        raise InvalidInput(f"loss.type must be one of {', '.join(LOSS_TYPES)}, got {kind!r}")
    samples = body.get("samples") or []
    if not samples:
        raise InvalidInput("samples is required")
    policy = kind != "LOSS_TYPE_CROSS_ENTROPY"
    beta = float((loss.get("grpo_params") or {}).get("beta") or 0.0)
    required = ("target_tokens", "logprobs", "advantages") if policy else ("target_tokens", "weights")
    if kind == "LOSS_TYPE_GRPO" and beta > 0:
        required += ("reference_logprobs",)
    grad: dict[int, float] = {}
    total_adv, counted = 0.0, 0
    for i, sample in enumerate(samples):
        label = f"samples[{i}]"
        length = len(_tokens(sample.get("model_input")))
        names = set((sample.get("loss_fn_inputs") or {}).keys())
        if "weights" in names and "mask" in names:
            raise InvalidInput(f"{label} cannot contain both weights and mask")
        missing = [n for n in required if n not in names]
        if missing:
            raise InvalidInput(f"{label}: loss_fn_inputs misses {', '.join(missing)}")
        tensors = {n: _tensor(sample, n, length, label) for n in names}
        targets = tensors["target_tokens"] or []
        adv = tensors.get("advantages") or [1.0] * length
        mask = tensors.get("mask") or tensors.get("weights") or [1.0] * length
        for t, a, m in zip(targets, adv, mask, strict=True):
            if m:
                grad[int(t)] = grad.get(int(t), 0.0) + a * m
                total_adv += a * m
                counted += 1
    if not body.get("forward_only"):
        for t, g in grad.items():
            sess.grad[t] = sess.grad.get(t, 0.0) + g / max(counted, 1)
    return {"loss": -total_adv / max(counted, 1), "metrics": {"tokens": float(counted)}}


def apply_optim_step(fake: FakeTogether, sess: Session, body: dict[str, Any], key: str) -> dict[str, Any]:
    lr = float((body.get("adam_params") or {}).get("learning_rate") or 1e-5)
    gain = state(fake).script.policy_gain
    for t, g in sess.grad.items():
        sess.trainer_bias[t] = sess.trainer_bias.get(t, 0.0) + lr * gain * g
    sess.grad.clear()
    sess.step += 1
    return {"step": str(sess.step)}


def apply_weights_sync(fake: FakeTogether, sess: Session, body: dict[str, Any], key: str) -> dict[str, Any]:
    if body.get("weight_sync_type") not in (
        "WEIGHT_SYNC_TYPE_SYNCHRONOUS",
        "WEIGHT_SYNC_TYPE_BACKGROUND_PUBLISH",
        "WEIGHT_SYNC_TYPE_PIPELINE",
    ):
        raise InvalidInput(f"weight_sync_type {body.get('weight_sync_type')!r} is not a WeightSyncType")
    sess.sampler_bias = dict(sess.trainer_bias)
    sess.weights_version += 1
    return {"weights_version": str(sess.weights_version)}


def _checkpoint(fake: FakeTogether, sess: Session, type_: str) -> dict[str, Any]:
    ckpt = {
        "id": fake.new_id("ckpt"),
        "base_model": sess.base_model,
        "created_at": now_iso(),
        "session_id": sess.id,
        "step": str(sess.step),
        "type": type_,
        "lora_rank": int((sess.body.get("lora_config") or {}).get("rank") or 16),
    }
    state(fake).checkpoints[ckpt["id"]] = {**ckpt, "_policy": dict(sess.trainer_bias)}
    return ckpt


def apply_training_checkpoint(fake: FakeTogether, sess: Session, body: dict[str, Any], key: str) -> dict[str, Any]:
    ckpt = _checkpoint(fake, sess, "CHECKPOINT_TYPE_TRAINING")
    entry = {"id": ckpt["id"], "created_at": ckpt["created_at"], "step": ckpt["step"]}
    sess.training_checkpoints.append(entry)
    return {"checkpoint": entry}


def apply_inference_checkpoint(fake: FakeTogether, sess: Session, body: dict[str, Any], key: str) -> dict[str, Any]:
    """Saves the policy and registers it in the model registry (a model with one revision)."""
    ckpt = _checkpoint(fake, sess, "CHECKPOINT_TYPE_INFERENCE")
    mid, rev = f"ml_{ckpt['id']}", f"rv_{ckpt['id']}"
    fake.state.models[mid] = {
        "id": mid,
        "name": f"{PROJECT['slug']}/{sess.base_model.split('/')[-1]}-{ckpt['id']}",
        "projectId": PROJECT["id"],
        "organizationId": "org_1",
        "visibility": "VISIBILITY_PRIVATE",
        "weights": {},
        "baseModel": "projects/proj_public/models/ml_base",
        "baseModelId": "ml_base",
        "createdAt": now_iso(),
        "updatedAt": now_iso(),
        "revisions": [rev],
    }
    registration = {"model": {"id": mid, "revision_id": rev}}
    state(fake).checkpoints[ckpt["id"]]["inference_registration"] = registration
    entry = {"id": ckpt["id"], "created_at": ckpt["created_at"], "step": ckpt["step"], "registration": registration}
    sess.inference_checkpoints.append(entry)
    return {"checkpoint": entry}


def apply_custom(fake: FakeTogether, sess: Session, body: dict[str, Any], key: str) -> dict[str, Any]:
    return {}


APPLY = {
    "sample": apply_sample,
    "forward-backward": apply_forward_backward,
    "optim-step": apply_optim_step,
    "weights-sync": apply_weights_sync,
    "training-checkpoint": apply_training_checkpoint,
    "inference-checkpoint": apply_inference_checkpoint,
    "custom-forward-backward": apply_custom,
}


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def _public(ckpt: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ckpt.items() if not k.startswith("_")}


def checkpoints_list(fake: FakeTogether, _: dict[str, str], req: Request):
    q = req.query
    data = [
        _public(c)
        for c in reversed(list(state(fake).checkpoints.values()))
        if (not q.get("session_id") or c["session_id"] == q["session_id"])
        and (not q.get("type") or c["type"] == q["type"])
        and (not q.get("base_model") or c["base_model"] == q["base_model"])
    ]
    return 200, _page(data, req)


def checkpoints_retrieve(fake: FakeTogether, p: dict[str, str], _: Request):
    ckpt = state(fake).checkpoints.get(p["id"])
    if ckpt is None:
        raise ApiError(404, f"checkpoint {p['id']} not found", "not_found")
    return 200, _public(ckpt)


def routes(route) -> list:
    """The post-training routes, built with the server's ``_route``."""
    s = "/v1/rl/training-sessions/{id}"
    out = [
        route("POST", "/v1/rl/model-resources/estimate-cost", resources_estimate),
        route("POST", "/v1/rl/model-resources", resources_create),
        route("GET", "/v1/rl/model-resources", resources_list),
        route("GET", "/v1/rl/model-resources/{id}", resources_retrieve),
        route("POST", "/v1/rl/model-resources/{id}/extend-expiry", resources_extend),
        route("POST", "/v1/rl/model-resources/{id}/stop", resources_stop),
        route("POST", "/v1/rl/training-sessions", sessions_create),
        route("GET", "/v1/rl/training-sessions", sessions_list),
        route("GET", s, sessions_retrieve),
        route("POST", s + "/stop", sessions_stop),
        route("POST", s + "/payloads/upload-url", payload_upload_url),
        route("POST", s + "/payloads/{pid}/download-url", payload_download_url),
        route("PUT", "/_payloads/{pid}", payload_put),
        route("GET", "/_payloads/{pid}", payload_get),
        route("GET", s + "/operations/{kind}/{op}", operation_retrieve),
        route("GET", "/v1/rl/checkpoints", checkpoints_list),
        route("GET", "/v1/rl/checkpoints/{id}", checkpoints_retrieve),
    ]
    out += [route("POST", f"{s}/operations/{kind}", operation_create(kind)) for kind in KINDS]
    return out


UNAUTHENTICATED = ("PUT /_payloads/{pid}", "GET /_payloads/{pid}")  # presigned URLs: no Authorization
