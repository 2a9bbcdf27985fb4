"""The Together post-training adapter (``client.post_training``, together 3.1.1): model resources,
training sessions, idempotent operations, and the GRPO step built on them. No Prefect here.

Calls go through the SDK's client (``together/resources/post_training/*.py`` routes under ``/v1/rl``),
with the loop and its keys under epochwise's control rather than the hand-written
``together.post_training`` helpers, which poll every 10 s and key each checkpoint with a fresh
``uuid4`` (``together/post_training/clients/session.py``): a retried checkpoint there is a second one.

Money and safety rules that live here:

* every operation POST carries an ``Idempotency-Key`` derived from (fold, epoch key, step, operation)
  (`op_key`): the SDK's own retries and a re-run of the same step get the original operation back,
  so nothing is applied twice (Together: "a retry with the same key returns the original operation");
* bodies over 0.5 MiB go to a presigned URL first and the operation carries ``payload_id``
  (``together/post_training/_payloads.py``), results by reference are downloaded the same way;
* int64 fields (``step``, ``tokens``, ``weights_version``) may arrive as strings: always ``int()``;
* `stop_resource` uses ``force=true`` (``together/resources/post_training/model_resources.py``: without
  it the stop is refused while a session is active), and treats an already stopped resource as done.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
from together import APIConnectionError, APIStatusError, BadRequestError, NotFoundError, Omit, Together

from epochwise.config.together import PostTrainingConfig
from epochwise.config.train import GRPOParams, HyperParams
from epochwise.fold import fold_slug
from epochwise.rewards import Messages, Reward, as_completions, prompt_columns, score

LARGE_PAYLOAD = int(0.5 * 1024 * 1024)  # together/post_training/_payloads.py: _LARGE_PAYLOAD_THRESHOLD
LIVE = ("MODEL_RESOURCES_STATUS_PENDING", "MODEL_RESOURCES_STATUS_CREATING", "MODEL_RESOURCES_STATUS_READY")
READY = "MODEL_RESOURCES_STATUS_READY"
RUNNING = "TRAINING_SESSION_STATUS_RUNNING"
SESSION_ACTIVE = ("TRAINING_SESSION_STATUS_CREATING", RUNNING)
SESSION_PREFIX = "ew-"


class PostTrainingFailure(RuntimeError):
    """Together refused a post-training call or an operation failed; the message is Together's own."""


# ---------------------------------------------------------------------------------------------------
# Model resources
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceSpec:
    """What a model resource is created (and its cost estimated) from."""

    base_model: str
    generator_replicas: int
    inactive_timeout_s: int
    gpu_type: str | None = None
    lora: bool = True

    @classmethod
    def of(cls, base_model: str, cfg: PostTrainingConfig, lora: bool = True) -> ResourceSpec:
        return cls(base_model, cfg.generator_replicas, cfg.inactive_timeout_s, cfg.gpu_type, lora)

    def body(self) -> dict[str, Any]:
        compute: dict[str, Any] = {"num_generator_replicas": self.generator_replicas}
        if self.gpu_type:
            compute["gpu_type"] = self.gpu_type
        return {
            "base_model": self.base_model,
            "compute_config": compute,
            "inactive_timeout": self.inactive_timeout_s,
            "lora_enabled": self.lora,
        }


@dataclass(frozen=True)
class ResourceInfo:
    id: str
    base_model: str
    status: str
    generator_replicas: int
    created_at: str = ""


def _resource(r: Any) -> ResourceInfo:
    return ResourceInfo(
        r.id, r.base_model, str(r.status), int(r.compute_config.num_generator_replicas), _instant(r.created_at)
    )


def price_per_hour(client: Together, spec: ResourceSpec) -> float:
    """Together's price per hour of the resource ``spec`` describes (``estimate-cost``), in USD."""
    answer = client.post_training.model_resources.estimate_cost(**spec.body())
    if str(answer.currency).upper() != "USD":
        raise PostTrainingFailure(f"Together priced the resource in {answer.currency}, not USD")
    return float(answer.price_per_hour)


def all_pages(list_page: Callable[..., Any], page_size: int = 100, **params: Any) -> Iterator[Any]:
    """Every item of a paginated post-training list (``limit`` at most 100; ``after`` = the last ``next_cursor``)."""
    after: str | Omit = Omit()
    while True:
        page = list_page(limit=page_size, after=after, **params)
        yield from page.data or []
        meta = page.meta
        if not (meta and meta.has_more and meta.next_cursor):
            return
        after = meta.next_cursor


def list_resources(client: Together) -> list[ResourceInfo]:
    """Every model resource of the caller, all pages."""
    return [_resource(r) for r in all_pages(client.post_training.model_resources.list, created_by="me")]


def live_resources(client: Together) -> list[ResourceInfo]:
    """Resources that are provisioning or READY (the ones that bill or will)."""
    return [r for r in list_resources(client) if r.status in LIVE]


def fold_resources(client: Together, slug: str) -> list[ResourceInfo]:
    """Live resources carrying a session of the fold ``slug`` (``ew-<slug>-e<k>-...``)."""
    return [
        r
        for r in live_resources(client)
        if any(fold_of_session(s.display_name) == slug for s in resource_sessions(client, r.id))
    ]


# How far Together's clock may be behind ours when a lost create's resource is looked for by its time.
CLOCK_SKEW_S = 120.0


def create_resource(
    client: Together,
    spec: ResourceSpec,
    lookup_s: float = 0.0,
    poll_s: float = 1.0,
    claimed: Callable[[str], bool] = lambda _: False,
    sleep: Callable[[float], None] = time.sleep,
) -> ResourceInfo:
    """Create one resource, without SDK retries: a resent create would be a second resource.

    A resource carries no name, so a create whose reply is lost (a 5xx, 408, a reset or timed-out
    connection) is answered from Together's list instead (`made_by_lost_create`, read for up to
    ``lookup_s`` seconds): the one resource of this spec with no session, created since the request
    left (less `CLOCK_SKEW_S`), that no run has ``claimed``, seen alone on two reads a poll apart
    (another machine's may be listed before ours). Several such resources cannot be told
    apart and none is the error, naming them. A refusal (4xx) or a connection that never opened made
    nothing.
    """
    once = client.with_options(max_retries=0)
    sent = datetime.now(UTC)
    try:
        return _resource(once.post_training.model_resources.create(**spec.body()))
    except APIStatusError as exc:
        if exc.status_code < 500 and exc.status_code != 408:
            raise PostTrainingFailure(
                f"Together refused the model resource ({exc.status_code}): {_message(exc)}"
            ) from None
        lost: Exception = exc
    except APIConnectionError as exc:
        if isinstance(exc.__cause__, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):  # never sent
            raise PostTrainingFailure(f"could not reach Together to create the model resource: {exc}") from None
        lost = exc
    for read in range(math.ceil(lookup_s / poll_s) + 1):  # the list may show a new resource late
        if read:
            sleep(poll_s)
        made = made_by_lost_create(client, spec, sent, claimed)
        if len(made) == 1:  # read again after a poll: a resource another machine made may show first
            sleep(poll_s)
            again = made_by_lost_create(client, spec, sent, claimed)
            if [r.id for r in again] == [made[0].id]:
                return made[0]
            made = again
        if len(made) > 1:
            raise PostTrainingFailure(
                f"the reply to the model resource create was lost ({lost}) and {len(made)} new resources of "
                f"this spec have no session yet: {', '.join(r.id for r in made)}; one may be another run's. "
                f"Together stops an unused one after post_training.inactive_timeout_s ({spec.inactive_timeout_s} s)"
            )
    raise PostTrainingFailure(
        f"the reply to the model resource create was lost ({lost}) and Together's list shows no new "
        f"resource of this spec after {lookup_s:.0f} s; should one appear, Together stops it unused after "
        f"post_training.inactive_timeout_s ({spec.inactive_timeout_s} s)"
    )


def made_by_lost_create(
    client: Together, spec: ResourceSpec, sent: datetime, claimed: Callable[[str], bool]
) -> list[ResourceInfo]:
    """Live resources that a create of ``spec`` sent at ``sent`` may have made: same base model and
    generator replicas, created since ``sent`` less `CLOCK_SKEW_S`, no session, not ``claimed``."""
    since = _instant(sent - timedelta(seconds=CLOCK_SKEW_S))
    return [
        r
        for r in live_resources(client)
        if r.base_model == spec.base_model
        and r.generator_replicas == spec.generator_replicas
        and r.created_at >= since
        and not resource_sessions(client, r.id)
        and not claimed(r.id)
    ]


def wait_ready(
    client: Together,
    resource_id: str,
    cfg: PostTrainingConfig,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> ResourceInfo:
    """Poll until READY; raise on ERROR/STOPPED or after ``cfg.ready_deadline_s``."""
    deadline = time.monotonic() + cfg.ready_deadline_s
    last = None
    while True:
        r = client.post_training.model_resources.retrieve(resource_id)
        info = _resource(r)
        if info.status != last:
            queue = getattr(r.status_details, "queue_position", None)
            log(
                f"model resource {resource_id}: {info.status}" + ("" if queue is None else f" (queue position {queue})")
            )
            last = info.status
        if info.status == READY:
            return info
        if info.status not in LIVE:
            error = getattr(r, "error", None)
            raise PostTrainingFailure(f"model resource {resource_id} is {info.status}: {getattr(error, 'message', '')}")
        if time.monotonic() > deadline:
            raise PostTrainingFailure(
                f"model resource {resource_id} still {info.status} after {cfg.ready_deadline_s:.0f} s"
            )
        sleep(cfg.poll_s)


def resource_status(client: Together, resource_id: str) -> str:
    """The resource's status now (``MODEL_RESOURCES_STATUS_...``), or ``gone`` when Together has no such resource."""
    try:
        return str(client.post_training.model_resources.retrieve(resource_id).status)
    except NotFoundError:
        return "gone"


def stop_resource(client: Together, resource_id: str) -> str:
    """Stop the resource and every session on it (``force=true``); returns its status. An already
    stopped or failed resource is left as it is (Together answers 400 for those)."""
    try:
        return str(client.post_training.model_resources.stop(resource_id, force=True).status)
    except NotFoundError:
        return "gone"
    except BadRequestError:
        status = str(client.post_training.model_resources.retrieve(resource_id).status)
        if status in LIVE:
            raise
        return status


def extend_expiry(client: Together, resource_id: str, seconds: int) -> None:
    """Keep a READY resource from stopping for inactivity for ``seconds`` more (60-86400)."""
    client.post_training.model_resources.extend_expiry(resource_id, seconds=seconds)


# ---------------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------------


def session_name(fold: str, epoch: int, key: str) -> str:
    """``ew-<fold>-e<k>-<8 hex of the epoch key>``: the session of one epoch, found again by a rerun."""
    return f"{SESSION_PREFIX}{fold_slug(fold)}-e{epoch}-{key[:8]}"


_SESSION_NAME = re.compile(rf"{re.escape(SESSION_PREFIX)}(?P<slug>.+)-e\d+-[^-]+")


def fold_of_session(name: str | None) -> str | None:
    """The fold slug of an epochwise session name, else None. Anchored on the ``-e<k>-<key>`` tail, so
    a key that starts with ``e`` (1 in 16) or a slug holding ``-e`` still gives the right fold."""
    found = _SESSION_NAME.fullmatch(name or "")
    return found["slug"] if found else None


@dataclass(frozen=True)
class SessionInfo:
    id: str
    resource_id: str
    status: str
    display_name: str | None
    step: int
    created_at: str = ""


def _session(s: Any) -> SessionInfo:
    return SessionInfo(s.id, s.resources_id, str(s.status), s.display_name, int(s.step or 0), _instant(s.created_at))


def _instant(value: Any) -> str:
    """A creation time as a string that sorts in time order (UTC, microseconds always written)."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)  # Together's times are UTC
        return aware.astimezone(UTC).isoformat(timespec="microseconds")
    return str(value or "")


def resource_sessions(client: Together, resource_id: str) -> list[SessionInfo]:
    return [_session(s) for s in all_pages(client.post_training.sessions.list, model_resources_id=resource_id)]


def active_sessions_named(client: Together, name: str) -> list[SessionInfo]:
    """The caller's sessions named ``name`` that are starting or running, on any resource, oldest first
    (``created_at``, then id: every machine that reads the list orders them alike)."""
    found = [
        _session(s)
        for s in all_pages(client.post_training.sessions.list, created_by="me")
        if s.display_name == name and str(s.status) in SESSION_ACTIVE
    ]
    return sorted(found, key=lambda s: (s.created_at, s.id))


@dataclass(frozen=True)
class FinishedEpoch:
    """An epoch's end as Together's session list shows it: what its `GRPOEpoch.checkpoints` saved."""

    session_id: str
    training_checkpoint: str
    model_path: str  # models/<id>/revisions/<rev> of the registered inference checkpoint
    step: int


def finished_epoch(client: Together, name: str) -> FinishedEpoch | None:
    """The session named ``name`` that holds a training checkpoint and a registered inference
    checkpoint (the epoch ran to its end, in any run, on any machine), from Together's list of every
    session of the caller (all pages, any resource, stopped ones included); None when there is none."""
    for s in all_pages(client.post_training.sessions.list, created_by="me"):
        if s.display_name != name or not s.training_checkpoints:
            continue
        for infer in s.inference_checkpoints:
            reg = infer.registration
            artifact = reg and (reg.model or reg.adapter)
            if artifact:
                train = s.training_checkpoints[-1]
                path = f"models/{artifact.id}/revisions/{artifact.revision_id}"
                return FinishedEpoch(s.id, train.id, path, int(train.step))
    return None


def wait_finished(
    client: Together, rival: SessionInfo, poll_s: float, sleep: Callable[[float], None] = time.sleep
) -> FinishedEpoch:
    """Wait for another run's session ``rival`` to finish its epoch (`finished_epoch` of its name); an
    error when the session, or the resource it runs on, ends without the epoch's checkpoints (that run
    failed or was stopped)."""
    name = rival.display_name or ""
    while True:
        done = finished_epoch(client, name)
        if done is not None:
            return done
        try:
            status = str(client.post_training.sessions.retrieve(rival.id).status)
        except NotFoundError:
            status = "gone"
        if status in SESSION_ACTIVE and (host := resource_status(client, rival.resource_id)) not in LIVE:
            status = f"on resource {rival.resource_id}, which is {host}"
        if status not in SESSION_ACTIVE:
            done = finished_epoch(client, name)  # it may have finished between the reads
            if done is not None:
                return done
            raise PostTrainingFailure(
                f"session {rival.id} of {name}, which another run was training, is {status} without the "
                "epoch's checkpoints; rerun to train the epoch"
            )
        sleep(poll_s)


def create_session(
    client: Together,
    resource_id: str,
    name: str,
    hyper: HyperParams,
    resume_from: str | None,
    cfg: PostTrainingConfig,
    sleep: Callable[[float], None] = time.sleep,
    wandb_project: str | None = None,
    created: Callable[[str], None] | None = None,
) -> SessionInfo:
    """A LoRA training session on the READY resource, resumed from ``resume_from`` (a training
    checkpoint, with its optimizer state) when given; waits until RUNNING. ``wandb_project`` goes into
    the session's ``metadata.wandb`` (project, run name = the session name, group = the fold).
    ``created`` is called with the new session's id as soon as Together returns it, before the wait."""
    lora = {
        "rank": hyper.lora_r,
        "alpha": hyper.effective_lora_alpha,
        "dropout": hyper.lora_dropout,
        "seed": hyper.seed,
    }
    extra: dict[str, Any] = {}
    if resume_from:
        extra = {"resume_from_checkpoint_id": resume_from, "load_optimizer": True}
    if wandb_project:
        extra["metadata"] = {
            "wandb": {"project": wandb_project, "run_name": name, "group": f"{SESSION_PREFIX}{fold_of_session(name)}"}
        }
    once = client.with_options(max_retries=0)  # a lost reply is found again by name (caller holds the lock)
    try:
        session = once.post_training.sessions.create(
            model_resources_id=resource_id, display_name=name, lora_config=lora, **extra
        )
    except APIStatusError as exc:
        raise PostTrainingFailure(
            f"Together refused the training session ({exc.status_code}): {_message(exc)}"
        ) from None
    if created is not None:
        created(session.id)
    return wait_session(client, session.id, cfg, sleep)


def wait_session(
    client: Together, session_id: str, cfg: PostTrainingConfig, sleep: Callable[[float], None] = time.sleep
) -> SessionInfo:
    deadline = time.monotonic() + cfg.ready_deadline_s
    while True:
        info = _session(client.post_training.sessions.retrieve(session_id))
        if info.status == RUNNING:
            return info
        if info.status not in SESSION_ACTIVE:
            raise PostTrainingFailure(f"training session {session_id} is {info.status}")
        if time.monotonic() > deadline:
            raise PostTrainingFailure(
                f"training session {session_id} still {info.status} after {cfg.ready_deadline_s:.0f} s"
            )
        sleep(cfg.poll_s)


def stop_session(client: Together, session_id: str) -> None:
    try:
        client.post_training.sessions.stop(session_id)
    except (NotFoundError, BadRequestError):
        pass


# ---------------------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------------------


def op_key(fold: str, epoch_key: str, step: int | str, operation: str) -> str:
    """The ``Idempotency-Key`` of one operation of one step of one epoch: the same on every retry and rerun."""
    digest = hashlib.sha256(f"{fold}|{epoch_key}|{step}|{operation}".encode()).hexdigest()[:32]
    return f"ew-{digest}"


@dataclass
class Operations:
    """Submit-and-wait for the operations of one session (``/operations/{kind}`` + ``Idempotency-Key``)."""

    client: Together
    session_id: str
    cfg: PostTrainingConfig
    sleep: Callable[[float], None] = time.sleep
    posted: list[tuple[str, str]] = field(default_factory=list)  # (kind, key), for logs and tests
    # called before each POST: raises when this run may no longer send (another run drives the session)
    before_post: Callable[[], None] = lambda: None

    @property
    def _base(self) -> str:
        return f"/v1/rl/training-sessions/{self.session_id}"

    def run(self, kind: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST the operation (``body`` uploaded first when over 0.5 MiB), poll it to COMPLETED and return
        its output; `PostTrainingFailure` with Together's error code when it FAILED."""
        body = self._offload(body)
        self.before_post()
        try:
            op = self.client.post(
                f"{self._base}/operations/{kind}",
                body=body,
                cast_to=object,
                options={"headers": {"Idempotency-Key": key}},
            )
        except APIStatusError as exc:
            raise PostTrainingFailure(f"{kind} refused ({exc.status_code}): {_message(exc)}") from None
        self.posted.append((kind, key))
        deadline = time.monotonic() + self.cfg.op_deadline_s
        while True:
            status = op.get("status")  # type: ignore[union-attr]
            if status == "TRAINING_OPERATION_STATUS_COMPLETED":
                return self._resolve(op.get("output") or {})  # type: ignore[union-attr]
            if status == "TRAINING_OPERATION_STATUS_FAILED":
                error = op.get("error") or {}  # type: ignore[union-attr]
                raise PostTrainingFailure(
                    f"{kind} operation {op['id']} failed: {error.get('code')}: {error.get('message')}"
                )  # type: ignore[index]
            if time.monotonic() > deadline:
                raise PostTrainingFailure(
                    f"{kind} operation {op['id']} still {status} after {self.cfg.op_deadline_s:.0f} s"
                )  # type: ignore[index]
            self.sleep(self.cfg.poll_s)
            op = self.client.get(f"{self._base}/operations/{kind}/{op['id']}", cast_to=object)  # type: ignore[index]

    def _offload(self, body: dict[str, Any]) -> dict[str, Any]:
        raw = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        if len(raw) <= LARGE_PAYLOAD:
            return body
        info: Any = self.client.post(f"{self._base}/payloads/upload-url", cast_to=object)
        self.client.put(info["upload_url"], content=raw, cast_to=object, options={"headers": {"Authorization": Omit()}})
        return {**_shrink(body), "payload_id": info["payload_id"]}

    def _resolve(self, output: dict[str, Any]) -> dict[str, Any]:
        pid = output.get("payload_id")
        if not pid:
            return output
        info: Any = self.client.post(f"{self._base}/payloads/{pid}/download-url", cast_to=object)
        raw = self.client.get(info["download_url"], cast_to=object, options={"headers": {"Authorization": Omit()}})
        data = raw if isinstance(raw, dict) else json.loads(raw)
        return {**{k: v for k, v in output.items() if k != "payload_id"}, **data}


def _shrink(data: Any, keep: int = 8) -> Any:
    """The inline stand-in of an uploaded body: numeric lists cut to ``keep`` (as the SDK's
    ``_shrink_for_validation`` does; the server reads the full body from the payload)."""
    if isinstance(data, dict):
        return {k: _shrink(v, keep) for k, v in data.items() if k not in ("shape",)}
    if isinstance(data, list):
        if data and isinstance(data[0], int | float):
            return data[:keep]
        return [_shrink(v, keep) for v in data]
    return data


def _message(exc: APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(exc)


# ---------------------------------------------------------------------------------------------------
# Tokens <-> text
# ---------------------------------------------------------------------------------------------------


class Tokenizer(Protocol):
    def prompt_tokens(self, messages: Messages) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (``role: content`` lines, then ``assistant: ``): an offline stand-in
    for tests. A real model's ids differ, so never use it against Together itself."""

    def prompt_tokens(self, messages: Messages) -> list[int]:
        text = "".join(f"{m.get('role')}: {m.get('content')}\n" for m in messages) + "assistant: "
        return list(text.encode())

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer: the chat template renders the prompt (with the generation prompt)."""

    def __init__(self, name: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            from epochwise.problems import UserError

            raise UserError(
                f"GRPO on Together needs a tokenizer for {name}: install transformers (pip install -e '.[local]') "
                "or set train.grpo.tokenizer to a local tokenizer directory"
            ) from None
        self.tok = AutoTokenizer.from_pretrained(name)

    def prompt_tokens(self, messages: Messages) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=True)


def load_tokenizer(name: str) -> Tokenizer:
    """``bytes`` -> `ByteTokenizer`; anything else is an HF id or directory (`HFTokenizer`)."""
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)


# ---------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------


def group_advantages(rewards: Sequence[float], scale: bool) -> list[float]:
    """``r - mean(group)``, divided by the group's std (+1e-4) when ``scale`` (TRL's ``scale_rewards``)."""
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if not scale:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / len(centred))
    return [c / (std + 1e-4) for c in centred]


def total_rewards(
    rewards: Sequence[Reward], prompts: list[Messages], texts: list[str], columns: dict[str, list[Any]]
) -> tuple[list[float], dict[str, float]]:
    """The sum of every reward per completion (None counts 0, as TRL's nansum), and each reward's mean."""
    completions = as_completions(texts)
    totals = [0.0] * len(texts)
    means: dict[str, float] = {}
    for reward in rewards:
        values = score(reward, prompts, completions, columns)
        given = [v for v in values if v is not None]
        means[f"reward/{reward.name}"] = sum(given) / len(given) if given else 0.0
        totals = [t + (v or 0.0) for t, v in zip(totals, values, strict=True)]
    return totals, means


def grpo_samples(prompt: list[int], sequences: list[dict[str, Any]], advantages: list[float]) -> list[dict[str, Any]]:
    """Forward-backward samples of one group: ``model_input = (prompt + response)[:-1]``, targets shifted by
    one, the sampler's logprobs and the advantage on response positions, ``mask`` 1 there (the layout of
    ``together/post_training/_losses.py``: every tensor as long as ``model_input``)."""
    out = []
    n = len(prompt) - 1
    for seq, adv in zip(sequences, advantages, strict=True):
        resp = [int(t) for t in seq["tokens"]]
        if not resp:
            continue
        full = prompt + resp
        logprobs = [float(x) for x in (seq.get("logprobs") or [0.0] * len(resp))]
        out.append(
            {
                "model_input": {"chunks": [{"encoded_text": {"tokens": full[:-1]}}]},
                "loss_fn_inputs": {
                    "target_tokens": {"data": full[1:], "dtype": "int64"},
                    "logprobs": {"data": [0.0] * n + logprobs, "dtype": "float32"},
                    "advantages": {"data": [0.0] * n + [adv] * len(resp), "dtype": "float32"},
                    "mask": {"data": [0] * n + [1] * len(resp), "dtype": "int64"},
                },
            }
        )
    return out


@dataclass
class StepResult:
    step: int
    mean_reward: float
    loss: float
    zero_std_groups: int
    groups: int
    reward_means: dict[str, float]


@dataclass
class GRPOEpoch:
    """One GRPO epoch on a RUNNING session: ``steps()`` yields each step's result; every operation is
    keyed by `op_key` (fold, epoch key, step, operation)."""

    ops: Operations
    tokenizer: Tokenizer
    rows: list[dict[str, Any]]
    rewards: list[Reward]
    grpo: GRPOParams
    hyper: HyperParams
    fold: str
    epoch_key: str
    before_rewards: Callable[[], None] = lambda: None  # e.g. extend the resource's expiry

    @property
    def n_steps(self) -> int:
        return math.ceil(len(self.rows) / self.grpo.prompts_per_step)

    def sample(self, rows: list[dict[str, Any]], key: str, n: int, seed: int) -> tuple[list[list[int]], list[dict]]:
        prompts, _ = prompt_columns(rows)
        tokens = [self.tokenizer.prompt_tokens(m) for m in prompts]
        body = {
            "model_inputs": [{"chunks": [{"encoded_text": {"tokens": t}}]} for t in tokens],
            "num_samples": n,
            "sampling_params": {
                "max_tokens": self.grpo.max_new_tokens,
                "temperature": self.grpo.temperature,
                "seed": seed,
            },
        }
        return tokens, self.ops.run("sample", key, body)["results"]

    def score(self, rows: list[dict[str, Any]], results: list[dict]) -> tuple[list[list[float]], dict[str, float]]:
        """Rewards per group (one list per prompt) and each reward's mean over the batch."""
        prompts, columns = prompt_columns(rows)
        g = [len(r["sequences"]) for r in results]
        flat_prompts = [p for p, k in zip(prompts, g, strict=True) for _ in range(k)]
        flat_columns = {c: [v for v, k in zip(vals, g, strict=True) for _ in range(k)] for c, vals in columns.items()}
        texts = [self.tokenizer.decode([int(t) for t in s["tokens"]]) for r in results for s in r["sequences"]]
        self.before_rewards()
        totals, means = total_rewards(self.rewards, flat_prompts, texts, flat_columns)
        groups, i = [], 0
        for k in g:
            groups.append(totals[i : i + k])
            i += k
        return groups, means

    def step(self, index: int) -> StepResult:
        size = self.grpo.prompts_per_step
        rows = self.rows[index * size : (index + 1) * size]
        key = lambda op: op_key(self.fold, self.epoch_key, index, op)  # noqa: E731
        tokens, results = self.sample(rows, key("sample"), self.grpo.num_generations, self.hyper.seed + index)
        groups, means = self.score(rows, results)
        samples: list[dict[str, Any]] = []
        zero_std = 0
        for prompt, result, rewards in zip(tokens, results, groups, strict=True):
            if max(rewards) == min(rewards):
                zero_std += 1
            samples += grpo_samples(prompt, result["sequences"], group_advantages(rewards, self.grpo.scale_rewards))
        loss = {
            "type": "LOSS_TYPE_GRPO",
            "grpo_params": {
                "beta": self.grpo.beta,
                "clip_low_threshold": 1 - self.grpo.epsilon,
                "clip_high_threshold": 1 + self.grpo.epsilon,
            },
        }
        out = self.ops.run("forward-backward", key("forward-backward"), {"loss": loss, "samples": samples})
        adam = {
            "learning_rate": self.hyper.learning_rate,
            "grad_clip_norm": self.hyper.max_grad_norm,
            "weight_decay": self.hyper.weight_decay,
        }
        self.ops.run("optim-step", key("optim-step"), {"adam_params": adam})
        self.ops.run("weights-sync", key("weights-sync"), {"weight_sync_type": "WEIGHT_SYNC_TYPE_SYNCHRONOUS"})
        flat = [r for g in groups for r in g]
        return StepResult(index, sum(flat) / len(flat), float(out.get("loss") or 0.0), zero_std, len(groups), means)

    def evaluate(self, rows: list[dict[str, Any]]) -> float | None:
        """Mean total reward of ``num_generations`` completions per val prompt under the current weights."""
        if not rows:
            return None
        _, results = self.sample(
            rows, op_key(self.fold, self.epoch_key, "val", "sample"), self.grpo.num_generations, self.hyper.seed
        )
        groups, _ = self.score(rows, results)
        flat = [r for g in groups for r in g]
        return sum(flat) / len(flat)

    def checkpoints(self) -> FinishedEpoch:
        """The epoch's end: its training checkpoint (what the next epoch resumes from) and the registry
        model of its inference checkpoint (the epoch's deployable model), at the trainer's step."""
        train = self.ops.run("training-checkpoint", op_key(self.fold, self.epoch_key, "end", "training-checkpoint"), {})
        infer = self.ops.run(
            "inference-checkpoint", op_key(self.fold, self.epoch_key, "end", "inference-checkpoint"), {}
        )
        reg = infer["checkpoint"].get("registration") or {}
        artifact = reg.get("model") or reg.get("adapter")
        if not artifact:
            raise PostTrainingFailure(
                f"inference checkpoint {infer['checkpoint']['id']} was not registered in the model registry"
            )
        return FinishedEpoch(
            self.ops.session_id,
            train["checkpoint"]["id"],
            f"models/{artifact['id']}/revisions/{artifact['revision_id']}",
            int(train["checkpoint"]["step"]),
        )
