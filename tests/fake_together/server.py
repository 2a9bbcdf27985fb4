"""A fake Together AI API on 127.0.0.1 that the real ``together`` SDK (3.1.1) talks to in tests.

Its routes are the ones together 3.1.1's resources call (base URL without ``/v1``). It is a real threaded HTTP server,
so every byte goes through the SDK's own client, retries and upload protocol. Everything a test needs
to arrange or check is on the `FakeTogether` object:

* ``fake.state``: files, jobs, models, endpoints and deployments as plain dataclasses and dicts;
* ``fake.counts["POST /v1/fine-tunes"]``: requests per route template (``{id}`` for path parameters);
* ``fake.script``: behaviour knobs (polls per job state, held jobs, scripted job failures, losses,
  prices, deployment start-up polls, refused deployment deletes) and ``fake.burst(route, [429, 500])``
  for error bursts, which carry ``Retry-After-Ms: 1`` so the SDK's own retries take milliseconds
  (``fake.clear_bursts()`` ends them);
* outages: ``fake.go_down()`` / ``fake.come_back()``, ``fake.outage(seconds)`` and
  ``fake.outage_after(route, calls, seconds)``. Down means what a dead API host means to a client: the
  listening socket is closed (connecting is refused) and open keep-alive connections are dropped; coming
  back re-binds the same port, and the state is kept;
* ``fake.script.list_delay_s``: an eventually consistent job list (a new job is listed only that many
  seconds after its creation), for races between runs on different machines, and
  ``fake.script.list_hold_creates``: the list shows no job until that many jobs were created (a race
  that happens on any machine, however slow, where a timed delay can run out before the other racer looks).

The v2 endpoint rules Together enforces are enforced here too: a deployment still in its endpoint's
traffic split cannot be deleted (400), nor an endpoint that still has deployments (400), and an
``etag`` that is sent must be the object's current one (409; body field on PATCH, query on DELETE).

The post-training routes (``/v1/rl/...``: model resources, sessions, idempotent operations, checkpoints,
payload URLs) and their rules live in `tests.fake_together.post_training` (state: ``post_training.state(fake)``).

Job and file progression is driven by polls (each ``GET`` of the object advances it), not by time, so a
test decides exactly how long things take and never sleeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Job states in the order Together reports them (the status literal of together's types/finetune_response.py).
JOB_STATES = ("pending", "queued", "running", "compressing", "uploading", "completed")
TERMINAL_JOB_STATES = ("completed", "cancelled", "error", "user_error")
PROJECT = {"id": "proj_1", "name": "Fake project", "slug": "me"}
USER = "me"
# What /v1/fine-tunes/models/limits answers for every model (the shape of together's FinetuneModelLimits).
MODEL_LIMITS: dict[str, Any] = {
    "default_gradient_accumulation_steps": 1,
    "max_num_epochs": 20,
    "max_num_evals": 100,
    "max_num_checkpoints": 20,
    "max_learning_rate": 1.0,
    "min_learning_rate": 1e-8,
    "max_seq_length_sft": 8192,
    "max_seq_length_dpo": 8192,
    "min_max_seq_length": 512,
    "merge_output_lora": True,
    "supports_full_training": True,
    "supports_reasoning": True,
    "supports_tools": True,
    "supports_vision": False,
    "lora_training": {
        "default_rank": 16,
        "max_rank": 64,
        "max_batch_size": 128,
        "max_batch_size_dpo": 64,
        "min_batch_size": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
    "full_training": {"max_batch_size": 96, "max_batch_size_dpo": 48, "min_batch_size": 8},
}
HARDWARE = [
    {"id": "1x_nvidia_h100_80gb_sxm", "name": "1x H100 80GB", "description": "fake", "gpuCount": 1,
     "gpuMemoryGib": 80, "gpuType": "H100", "priceCentsPerHour": 399, "regions": [{"name": "us-east"}]},
    {"id": "2x_nvidia_h100_80gb_sxm", "name": "2x H100 80GB", "description": "fake", "gpuCount": 2,
     "gpuMemoryGib": 160, "gpuType": "H100", "priceCentsPerHour": 798, "regions": [{"name": "us-east"}]},
]


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    """Raised by a handler to answer ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.extra = status, message, type_, extra


@dataclass
class JobFailure:
    """Make the next ``times`` jobs whose suffix contains ``match`` fail once they start running."""

    match: str
    message: str
    status: str = "error"  # or "user_error"
    times: int = 1


@dataclass
class Script:
    """Behaviour knobs; tests change them freely between requests."""

    file_polls: int = 1  # retrieves answered PENDING before a file's final status
    job_polls_per_state: int = 1  # retrieves per job state step; 0 = completed on the first retrieve
    # Wall-clock jobs (benchmarks): a job is completed this many seconds after its creation, however
    # often it is polled; None = poll-driven (job_polls_per_state), as tests want it.
    job_duration_s: float | None = None
    hold_jobs: bool = False  # jobs stop at "running" until this is set back to False
    dedup_uploads: bool = False  # answer 409 {"file_id"} for a checksum already uploaded
    price_per_epoch_usd: float = 1.5
    # Together prices DPO per token apart from SFT (docs.together.ai/docs/fine-tuning/pricing: the rate
    # depends on the training method); the fake's DPO estimate is the SFT one times this (a test knob).
    dpo_price_factor: float = 2.5
    # Full fine-tuning is priced apart from LoRA (the same pricing page lists a LoRA and a full rate per
    # model size); the fake's full estimate is the LoRA one times this. An estimate without
    # ``training_type`` is a LoRA estimate ("Defaults to LoRA if not provided": the SDK's
    # ``fine_tuning.estimate_price`` docstring).
    full_price_factor: float = 4.0
    failures: list[JobFailure] = field(default_factory=list)
    # Loss per chain depth (1 = job on the base model): (train loss, validation loss).
    losses: dict[int, tuple[float, float]] = field(default_factory=dict)
    # Loss of one job from its create body and chain depth, e.g. by learning rate (sweeps); overrides losses.
    loss_for: Callable[[dict[str, Any], int], tuple[float, float]] | None = None
    create_then_500: int = 0  # POST /v1/fine-tunes calls that create the job but answer 500 (lost reply)
    deployment_create_then_500: int = 0  # the same for deployment creates (POST .../deployments)
    create_reply_delay_s: float = 0.0  # POST /v1/fine-tunes: the job exists at once, its reply comes this late
    # Eventually consistent job list: a new job shows in GET /v1/fine-tunes only this many seconds after
    # its creation (GET /v1/fine-tunes/{id} finds it at once), as Together's list can lag a create.
    list_delay_s: float = 0.0
    # The job list shows no job at all until this many jobs were created (0: no hold). A race between two
    # hosts then always happens: neither finds the other's job before both created theirs.
    list_hold_creates: int = 0
    deployment_polls: int = 2  # retrieves before a deployment is READY
    deployment_fail: str | None = None  # message: deployments go to FAILED instead of READY
    chat_reply: str = "pong"
    # Chat completions answer this HTTP status for every model whose name contains the key (smoke-test failures).
    chat_errors: dict[str, int] = field(default_factory=dict)
    # Scripted answers: the reply to a conversation whose last message contains the key (first match wins;
    # otherwise chat_reply), and HTTP statuses answered for such a conversation (a row that keeps failing).
    chat_answers: dict[str, str] = field(default_factory=dict)
    chat_prompt_errors: dict[str, int] = field(default_factory=dict)
    # Deployment deletes answer 400 with this message while the deployment still has replicas
    # (Together refusing a delete for a reason other than live traffic); scaled to zero, it deletes.
    delete_refusal: str | None = None

    def loss_at(self, depth: int) -> tuple[float, float]:
        """Scripted loss, else a smooth decreasing default (train 2.0, 1.6, 1.33..., val a bit higher)."""
        return self.losses.get(depth, (round(2.0 / (1 + 0.25 * (depth - 1)), 4), round(2.1 / (1 + 0.2 * (depth - 1)), 4)))


@dataclass
class FakeFile:
    id: str
    filename: str
    purpose: str
    file_type: str
    checksum: str
    created_at: int
    data: bytes = b""
    uploaded: bool = False
    processing_status: str = "PENDING"
    final_status: str = "COMPLETED"
    error: str | None = None
    polls: int = 0
    nlines: int = 0
    dataset_format: str | None = None  # set by the server check: CONVERSATION, PREFERENCE_OPENAI, ...

    def to_json(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "valid": self.final_status == "COMPLETED",
            "dataset_format": self.dataset_format or ("CONVERSATION" if self.file_type == "jsonl" else "TOKENIZED"),
            "nlines": self.nlines, "file_id": self.id, "error": None, "error_type": None,
            "dataset_has_tools": False,
        }
        if self.processing_status in ("INVALID_FORMAT", "FAILED"):
            report.update(valid=False, error=self.error, error_type=self.processing_status)
        return {
            "id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
            "filename": self.filename, "FileType": self.file_type, "purpose": self.purpose,
            "processing_status": self.processing_status,
            "validation_report": report if self.processing_status != "PENDING" else None,
        }


@dataclass
class FakeJob:
    id: str
    request: dict[str, Any]  # the create body as received (wandb_key included, for assertions)
    model: str  # root base model
    output_name: str
    depth: int  # 1 = trained from the base model, k = k-th job of a from_checkpoint chain
    created_at: str
    status: str = "pending"
    polls: int = 0
    failure: JobFailure | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    updated_at: str = ""
    cancelled_at: float | None = None  # time.time() of the first cancel request (tests measure from it)
    listed_from: float = 0.0  # time.monotonic() from which GET /v1/fine-tunes shows the job
    created_mono: float = field(default_factory=time.monotonic)  # for Script.job_duration_s
    completed_mono: float | None = None  # time.monotonic() of the retrieve that first saw it completed (benchmarks)

    @property
    def suffix(self) -> str | None:
        return self.request.get("suffix")

    def to_json(self) -> dict[str, Any]:
        req = self.request
        done = self.status == "completed"
        body: dict[str, Any] = {
            "id": self.id, "object": "fine-tune", "status": self.status, "user_id": "u_1",
            "created_at": self.created_at, "updated_at": self.updated_at or self.created_at,
            "started_at": self.created_at, "model": self.model, "model_output_name": self.output_name,
            "suffix": self.suffix, "training_file": req.get("training_file"),
            "validation_file": req.get("validation_file") or None, "n_epochs": req.get("n_epochs", 1),
            "n_evals": req.get("n_evals", 0), "n_checkpoints": req.get("n_checkpoints", 1),
            "batch_size": req.get("batch_size"), "learning_rate": req.get("learning_rate"),
            "lr_scheduler": req.get("lr_scheduler"), "warmup_ratio": req.get("warmup_ratio"),
            "max_grad_norm": req.get("max_grad_norm"), "weight_decay": req.get("weight_decay"),
            "training_type": req.get("training_type"), "training_method": req.get("training_method"),
            "from_checkpoint": req.get("from_checkpoint"),
            "wandb_project_name": req.get("wandb_project_name"),
            "epochs_completed": 1 if done else 0, "events": self.events,
            "total_price": None,
        }
        if done:
            body.update(
                model_object_id=f"ml_{self.id}", model_object_name=f"{PROJECT['slug']}/{self.output_name.split('/')[-1]}",
                model_object_revision_id=f"rv_{self.id}", adapter_object_id=f"ml_ad_{self.id}",
                model_output_path=f"s3://fake/{self.id}/merged", total_price=1.5,
            )
        return body


@dataclass
class FakeState:
    """Everything the fake knows; tests read it directly (take ``fake.lock`` only for multi-step edits)."""

    files: dict[str, FakeFile] = field(default_factory=dict)
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> deployment JSON
    deployment_polls: Counter = field(default_factory=Counter)
    chats: list[dict[str, Any]] = field(default_factory=list)
    estimates: list[dict[str, Any]] = field(default_factory=list)  # estimate-price request bodies
    uploads: int = 0  # completed presigned PUTs, i.e. real uploads

    def jobs_in_order(self) -> list[FakeJob]:
        return list(self.jobs.values())


class _Server(ThreadingHTTPServer):
    """The HTTP server, keeping its open connections so that an outage can drop them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A connection dropped by an outage is expected; anything else is still printed.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self.connections_lock:
            open_now = list(self.connections)
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


@dataclass
class Outage:
    """One outage: ``time.monotonic()`` when the fake went down and came back (None while down)."""

    down_at: float
    up_at: float | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.up_at is None else self.up_at - self.down_at


Handler = Callable[["FakeTogether", dict[str, str], "Request"], tuple[int, Any] | tuple[int, Any, dict[str, str]]]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        if not self.body:
            return {}
        try:
            value = json.loads(self.body)
        except ValueError as exc:
            raise ApiError(400, f"invalid JSON body: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "JSON body must be an object")
        return value


class FakeTogether:
    """The running fake: ``with FakeTogether() as fake: Together(base_url=fake.base_url, api_key=fake.api_key)``."""

    def __init__(self, api_key: str = "fake-together-key", host: str = "127.0.0.1", port: int = 0) -> None:
        self.api_key = api_key
        self.script = Script()
        self.state = FakeState()
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.lock = threading.RLock()
        self._bursts: dict[str, list[int]] = {}
        self._ids: Counter[str] = Counter()
        fake = self

        class _Handler(_RequestHandler):
            owner = fake

        self._handler = _Handler
        self._server: _Server | None = _Server((host, port), _Handler)
        self._address: tuple[str, int] = self._server.server_address[:2]  # the port stays across outages
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._timer: threading.Timer | None = None
        self._outage_trigger: tuple[str, int, float] | None = None  # (route, calls, seconds)
        self._outage_due: float | None = None  # seconds of outage to start once the current reply is sent
        self.up = threading.Event()  # set while the fake accepts connections
        self.outages: list[Outage] = []

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """What the SDK's ``base_url`` / ``TOGETHER_BASE_URL`` takes: no ``/v1``, like https://api.together.ai."""
        host, port = self._address
        return f"http://{host}:{port}"

    def start(self) -> FakeTogether:
        assert self._server is not None
        # A short poll interval: going down (shutdown) waits for the serve loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-together", daemon=True
        )
        self.up.set()
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeTogether:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- outages -----------------------------------------------------------------------------------
    def go_down(self) -> None:
        """Stop accepting connections: close the listening socket (a connect is refused) and drop every
        open connection, as a dead API host does. The state and the port are kept for `come_back`."""
        with self.lock:
            server, self._server = self._server, None
            if server is None:
                return
            self.up.clear()
            self.outages.append(Outage(time.monotonic()))
        server.shutdown()
        server.server_close()
        server.drop_connections()

    def come_back(self) -> None:
        """Re-bind the same port and serve again (no-op when up or stopped)."""
        with self.lock:
            if self._server is not None or self._stopped:
                return
            for attempt in range(100):
                try:
                    self._server = _Server(self._address, self._handler)
                    break
                except OSError:  # the port is still being released; it is ours, nobody else binds it
                    if attempt == 99:
                        raise
                    time.sleep(0.05)
            if self.outages and self.outages[-1].up_at is None:
                self.outages[-1].up_at = time.monotonic()
        self.start()

    def outage(self, seconds: float) -> None:
        """Go down now and come back after ``seconds`` (a timer thread)."""
        self.go_down()
        with self.lock:
            if self._stopped:
                return
            self._timer = threading.Timer(seconds, self.come_back)
            self._timer.daemon = True
            self._timer.start()

    def outage_after(self, route: str, calls: int, seconds: float) -> None:
        """Once ``route`` (e.g. ``"GET /v1/fine-tunes/{id}"``) has been answered ``calls`` times in all, go
        down for ``seconds``, starting right after that reply went out."""
        with self.lock:
            self._outage_trigger = (route, calls, seconds)

    def wait_up(self, timeout: float = 300.0) -> None:
        """Block until the fake accepts connections again (a generous bound, not a timing assertion)."""
        if not self.up.wait(timeout):
            raise TimeoutError(f"the fake Together stayed down for more than {timeout} s")

    def _start_due_outage(self) -> None:
        with self.lock:
            seconds, self._outage_due = self._outage_due, None
        if seconds is not None:
            self.outage(seconds)

    # -- scripting ---------------------------------------------------------------------------------
    def burst(self, route: str, statuses: list[int]) -> None:
        """Answer the next ``len(statuses)`` requests to ``route`` (e.g. ``"POST /v1/fine-tunes"``, or
        ``"*"`` for any route) with these error statuses before serving normally."""
        with self.lock:
            self._bursts.setdefault(route, []).extend(statuses)

    def clear_bursts(self) -> None:
        """Drop every scripted error not yet served (the outage is over)."""
        with self.lock:
            self._bursts.clear()

    def fail_jobs(self, match: str, message: str, *, status: str = "error", times: int = 1) -> None:
        """The next ``times`` jobs whose suffix contains ``match`` fail with ``message`` when they start."""
        with self.lock:
            self.script.failures.append(JobFailure(match, message, status, times))

    def release_jobs(self) -> None:
        """Let held jobs (``script.hold_jobs``) continue to completion."""
        self.script.hold_jobs = False

    def new_id(self, prefix: str) -> str:
        with self.lock:
            self._ids[prefix] += 1
            return f"{prefix}-{self._ids[prefix]:04d}{uuid.uuid4().hex[:6]}"

    def job_by_suffix(self, fragment: str) -> list[FakeJob]:
        return [j for j in self.state.jobs.values() if fragment in (j.suffix or "")]

    # -- dispatch ----------------------------------------------------------------------------------
    def handle(self, req: Request) -> tuple[int, bytes, dict[str, str]]:
        for method, pattern, name, handler in ROUTES:
            if method != req.method:
                continue
            match = pattern.fullmatch(req.path)
            if not match:
                continue
            with self.lock:
                self.counts[name] += 1
                trigger = self._outage_trigger
                if trigger is not None and trigger[0] == name and self.counts[name] >= trigger[1]:
                    self._outage_trigger, self._outage_due = None, trigger[2]
                burst = self._bursts.get(name) or self._bursts.get("*")
                status = burst.pop(0) if burst else None
            if status is not None:
                body = {"error": {"message": f"scripted {status} for {name}", "type": "rate_limit" if status == 429 else "server_error"}}
                return status, json.dumps(body).encode(), {"Retry-After-Ms": "1", "Content-Type": "application/json"}
            presigned = name == "PUT /_upload/{id}" or name in post_training.UNAUTHENTICATED
            if not presigned and req.headers.get("authorization") != f"Bearer {self.api_key}":
                return _error(ApiError(401, "Invalid API key provided", "invalid_api_key"))
            try:
                with self.lock:
                    result = handler(self, match.groupdict(), req)
            except ApiError as exc:
                return _error(exc)
            if name == "POST /v1/fine-tunes" and self.script.create_reply_delay_s:
                time.sleep(self.script.create_reply_delay_s)  # outside the lock: other calls go on meanwhile
            status, payload, *rest = result
            headers = rest[0] if rest else {}
            if isinstance(payload, bytes):
                return status, payload, headers
            return status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
        with self.lock:
            self.counts[f"{req.method} {req.path} (unrouted)"] += 1
        return _error(ApiError(404, f"no route {req.method} {req.path}", "not_found"))


def _error(exc: ApiError) -> tuple[int, bytes, dict[str, str]]:
    body = {"error": {"message": exc.message, "type": exc.type}, **exc.extra}
    # 409 carries the existing file id at the top level, as Together does (the SDK retrieves ``e.file_id``).
    return exc.status, json.dumps(body).encode(), {"Content-Type": "application/json", "x-should-retry": "false"}


class _RequestHandler(BaseHTTPRequestHandler):
    owner: FakeTogether
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without TCP_NODELAY each response waits ~40 ms for
        # the client's delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr access logs
        return

    def _serve(self) -> None:
        if not self.owner.up.is_set():
            # Accepted in the moment between going down and the listening socket closing: dropped unanswered.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        req = Request(self.command, parts.path, query, {k.lower(): v for k, v in self.headers.items()}, body)
        status, payload, headers = self.owner.handle(req)
        self.owner.log.append((req.method, req.path, status))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        # An outage due after this reply starts here, before this connection can read another request.
        self.owner._start_due_outage()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def _multipart_fields(req: Request) -> dict[str, str]:
    raw = b"Content-Type: " + req.headers.get("content-type", "").encode() + b"\r\n\r\n" + req.body
    message = BytesParser(policy=HTTP).parsebytes(raw)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[name] = part.get_content().strip() if isinstance(part.get_content(), str) else part.get_content().decode()
    return fields


def files_create(fake: FakeTogether, _: dict[str, str], req: Request):
    fields = _multipart_fields(req)
    for key in ("purpose", "file_name", "file_type", "checksum"):
        if not fields.get(key):
            raise ApiError(400, f"missing form field {key!r}")
    if fake.script.dedup_uploads:
        for f in fake.state.files.values():
            if f.checksum == fields["checksum"] and f.purpose == fields["purpose"] and f.uploaded:
                raise ApiError(409, "file already exists", file_id=f.id)
    fid = fake.new_id("file")
    fake.state.files[fid] = FakeFile(
        fid, fields["file_name"], fields["purpose"], fields["file_type"], fields["checksum"], int(time.time())
    )
    return 302, b"", {"Location": f"{fake.base_url}/_upload/{fid}", "X-Together-File-Id": fid}


def files_put(fake: FakeTogether, p: dict[str, str], req: Request):
    f = fake.state.files.get(p["id"])
    if f is None:
        raise ApiError(404, "unknown upload url")
    if hashlib.sha256(req.body).hexdigest() != f.checksum:
        raise ApiError(400, "checksum mismatch")
    f.data, f.uploaded = req.body, True
    fake.state.uploads += 1
    return 200, b""


def files_preprocess(fake: FakeTogether, p: dict[str, str], _: Request):
    f = _file(fake, p["id"])
    if not f.uploaded:
        raise ApiError(400, f"file {f.id} has no content yet")
    f.final_status, f.error, f.nlines = _server_check(f)
    f.processing_status = "PENDING" if fake.script.file_polls > 0 else f.final_status
    return 200, f.to_json()


def _server_check(f: FakeFile) -> tuple[str, str | None, int]:
    """Together's server-side validation: its ``check_file`` plus one known format per JSONL line."""
    from together.lib import check_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload.{f.file_type}"
        path.write_bytes(f.data)
        report = check_file(path, purpose=f.purpose)
    if not report["is_check_passed"] or report.get("load_parquet") not in (None, True):
        detail = report.get("load_parquet") if report.get("load_parquet") not in (None, True) else report["message"]
        return "INVALID_FORMAT", str(detail), int(report.get("num_samples") or 0)
    if f.file_type == "jsonl":
        lines = [line for line in f.data.decode().splitlines() if line.strip()]
        formats = set()
        for number, line in enumerate(lines, 1):
            row = json.loads(line)
            if all(k in row for k in PREFERENCE_KEYS):
                formats.add("PREFERENCE_OPENAI")
                reason = _preference_rule_broken(row)
            elif any(all(k in row for k in keys) for keys in (("messages",), ("prompt", "completion"), ("text",))):
                formats.add("CONVERSATION" if "messages" in row else "INSTRUCTION" if "prompt" in row else "GENERAL")
                reason = _message_rule_broken(row.get("messages"))
            else:
                return "INVALID_FORMAT", f"line {number}: no known dataset format", len(lines)
            if len(formats) > 1:
                return "INVALID_FORMAT", f"line {number}: mixed dataset formats ({', '.join(sorted(formats))})", len(lines)
            if reason:
                return "INVALID_FORMAT", f"line {number}: {reason}", len(lines)
        f.dataset_format = next(iter(formats), None)
        return "COMPLETED", None, len(lines)
    return "COMPLETED", None, int(report.get("num_samples") or 0)


PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")


def _preference_rule_broken(row: dict[str, Any]) -> str | None:
    """Together's preference format (docs.together.ai/docs/fine-tuning/preference-tuning; the rules of the
    SDK's former ``validate_preference_openai``, together-python PR #262): ``input.messages`` not ending
    with the assistant, each output exactly one assistant message with content, no other columns."""
    extra = sorted(set(row) - set(PREFERENCE_KEYS))
    if extra:
        return f"unexpected columns {extra} in a preference row"
    messages = row["input"].get("messages") if isinstance(row["input"], dict) else None
    if not isinstance(messages, list) or not messages:
        return "input.messages must be a non-empty list"
    if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        return "input.messages must not end with an assistant message"
    for key in ("preferred_output", "non_preferred_output"):
        out = row[key]
        if not (isinstance(out, list) and len(out) == 1 and isinstance(out[0], dict)
                and out[0].get("role") == "assistant" and out[0].get("content")):
            return f"{key} must hold exactly one assistant message with content"
    return None


def _message_rule_broken(messages: Any) -> str | None:
    """The message rules of Together's function-calling, reasoning and vision data formats."""
    if not isinstance(messages, list):
        return None
    previous = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        if m.get("role") == "tool" and previous not in ("assistant", "tool"):
            return f"messages[{i}]: a tool message must follow an assistant or tool message"
        for key in ("reasoning", "reasoning_content", "thinking"):
            if key in m and not isinstance(m[key], str):
                return f"messages[{i}]: {key} must be a string"
        parts = m.get("content") if isinstance(m.get("content"), list) else []
        if m.get("role") != "user" and any(isinstance(p, dict) and p.get("type") == "image_url" for p in parts):
            return f"messages[{i}]: images are only allowed in user messages"
        previous = m.get("role")
    return None


def _file(fake: FakeTogether, fid: str) -> FakeFile:
    f = fake.state.files.get(fid)
    if f is None:
        raise ApiError(404, f"file {fid} not found", "not_found")
    return f


def files_list(fake: FakeTogether, _: dict[str, str], __: Request):
    return 200, {"object": "list", "data": [f.to_json() for f in fake.state.files.values() if f.uploaded]}


def files_retrieve(fake: FakeTogether, p: dict[str, str], _: Request):
    f = _file(fake, p["id"])
    if f.processing_status == "PENDING" and f.uploaded:
        f.polls += 1
        if f.polls >= fake.script.file_polls:
            f.processing_status = f.final_status
    return 200, f.to_json()


def files_delete(fake: FakeTogether, p: dict[str, str], _: Request):
    _file(fake, p["id"])
    del fake.state.files[p["id"]]
    return 200, {"id": p["id"], "deleted": True}


def files_content(fake: FakeTogether, p: dict[str, str], _: Request):
    return 200, _file(fake, p["id"]).data, {"Content-Type": "application/octet-stream"}


# ---------------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------------

def limits(fake: FakeTogether, _: dict[str, str], req: Request):
    name = req.query.get("model_name", "")
    return 200, {"model_name": name, **MODEL_LIMITS}


def _ready_file(fake: FakeTogether, fid: str, role: str) -> FakeFile:
    f = fake.state.files.get(fid)
    if f is None:
        raise ApiError(400, f"{role} file {fid} not found")
    if f.processing_status != "COMPLETED":
        raise ApiError(400, f"{role} file {fid} is not validated (processing_status {f.processing_status})")
    return f


def estimate_price(fake: FakeTogether, _: dict[str, str], req: Request):
    body = req.json()
    fake.state.estimates.append(body)
    training_type = (body.get("training_type") or {}).get("type", "Lora")
    if training_type not in ("Lora", "Full"):
        raise ApiError(400, f"unknown training_type {training_type!r}: Lora or Full")
    f = fake.state.files.get(body.get("training_file", ""))
    if f is None or f.processing_status != "COMPLETED":
        return 200, {"estimation_available": False, "unavailable_reason": "train_file_not_validated"}
    n_epochs = int(body.get("n_epochs") or 1)
    tokens = len(f.data) // 4 * n_epochs
    method = (body.get("training_method") or {}).get("method", "sft")
    factor = fake.script.dpo_price_factor if method == "dpo" else 1.0
    factor *= fake.script.full_price_factor if training_type == "Full" else 1.0
    return 200, {
        "estimation_available": True, "allowed_to_proceed": True,
        "estimated_total_price": round(fake.script.price_per_epoch_usd * n_epochs * factor, 4),
        "estimated_train_token_count": tokens, "estimated_eval_token_count": 0, "user_limit": 1000.0,
    }


def _parent(fake: FakeTogether, ref: str) -> FakeJob:
    """Resolve ``from_checkpoint`` (``job_id``, ``output_name``, either with ``:step``); must be completed."""
    base = ref.split(":")[0]
    job = fake.state.jobs.get(base) or next((j for j in fake.state.jobs.values() if j.output_name == base), None)
    if job is None:
        raise ApiError(400, f"from_checkpoint {ref!r}: no such job or model")
    if job.status != "completed":
        raise ApiError(400, f"from_checkpoint {ref!r}: job {job.id} is {job.status}, not completed")
    return job


def _training_method(body: dict[str, Any], files: list[FakeFile]) -> None:
    """The ``training_method`` object of a create (together/lib/types/fine_tuning.py TrainingMethodSFT /
    TrainingMethodDPO; the SDK's create_finetune_request refuses other methods and train_on_inputs for
    DPO). A DPO job trains on preference files (docs.together.ai/docs/fine-tuning/preference-tuning);
    ``from_checkpoint`` may name an SFT job (SFT first, then DPO from its checkpoint, same guide)."""
    method = body.get("training_method")
    if method is None:
        return  # SFT, the default
    if not isinstance(method, dict) or method.get("method") not in ("sft", "dpo"):
        raise ApiError(400, f"training_method must be an object with method 'sft' or 'dpo', got {method!r}")
    if method["method"] == "sft":
        unknown = set(method) - {"method", "train_on_inputs"}
    else:
        unknown = set(method) - {"method", "dpo_beta", "dpo_normalize_logratios_by_length", "dpo_reference_free",
                                 "rpo_alpha", "simpo_gamma"}
        if "train_on_inputs" in method:
            raise ApiError(400, "train_on_inputs is only supported for SFT training")
        for key in ("rpo_alpha", "simpo_gamma"):  # the SDK's own checks, repeated for a raw request
            value = method.get(key)
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise ApiError(400, f"{key} should be non-negative (got {value!r})")
        for f in files:
            if f.dataset_format != "PREFERENCE_OPENAI":
                raise ApiError(400, f"DPO training needs a preference dataset; file {f.id} is {f.dataset_format}")
    if unknown:
        raise ApiError(400, f"unknown training_method fields {sorted(unknown)} for {method['method']}")


def _within_limits(body: dict[str, Any]) -> None:
    """The model limits Together checks when a job is created (the SDK checks only the batch size and
    the sequence length before sending): learning rate, epochs, evaluations, checkpoints, LoRA rank,
    and full training only where the model supports it."""
    limits, lora = MODEL_LIMITS, MODEL_LIMITS["lora_training"]
    lr = float(body.get("learning_rate") or limits["min_learning_rate"])
    if not limits["min_learning_rate"] <= lr <= limits["max_learning_rate"]:
        raise ApiError(400, f"learning_rate {lr} is outside [{limits['min_learning_rate']}, {limits['max_learning_rate']}]")
    for field_, most in (("n_epochs", "max_num_epochs"), ("n_evals", "max_num_evals"), ("n_checkpoints", "max_num_checkpoints")):
        if int(body.get(field_) or 0) > limits[most]:
            raise ApiError(400, f"{field_} {body[field_]} is above the model's {most} {limits[most]}")
    training_type = body.get("training_type") or {}
    if training_type.get("type") == "Lora" and int(training_type.get("lora_r") or 0) > lora["max_rank"]:
        raise ApiError(400, f"lora_r {training_type['lora_r']} is above the model's max_rank {lora['max_rank']}")
    if training_type.get("type") == "Full" and not limits["supports_full_training"]:
        raise ApiError(400, "this model does not support full training")


def jobs_create(fake: FakeTogether, _: dict[str, str], req: Request):
    body = req.json()
    files = [_ready_file(fake, body.get("training_file", ""), "training")]
    if body.get("validation_file"):
        files.append(_ready_file(fake, body["validation_file"], "validation"))
    elif int(body.get("n_evals") or 0) > 0:
        raise ApiError(400, "n_evals > 0 needs a validation_file")
    _training_method(body, files)
    if bool(body.get("model")) == bool(body.get("from_checkpoint")):
        raise ApiError(400, "exactly one of model and from_checkpoint is required")
    _within_limits(body)
    suffix = body.get("suffix") or ""
    if len(suffix) > 40:
        raise ApiError(400, "suffix is longer than 40 characters")
    if body.get("from_checkpoint"):
        parent = _parent(fake, body["from_checkpoint"])
        model, depth = parent.model, parent.depth + 1
    else:
        model, depth = body["model"], 1
    jid = fake.new_id("ft")
    output = f"{USER}/{model.split('/')[-1]}-{suffix + '-' if suffix else ''}{jid[-6:]}"
    failure = next((f for f in fake.script.failures if f.times > 0 and f.match in suffix), None)
    if failure is not None:
        failure.times -= 1
    job = FakeJob(jid, body, model, output, depth, now_iso(), failure=failure)
    job.listed_from = time.monotonic() + fake.script.list_delay_s
    job.events.append(_event("job_pending", f"Fine-tuning job {jid} created"))
    fake.state.jobs[jid] = job
    if fake.script.job_polls_per_state == 0:
        _advance(fake, job, to_end=True)
    if fake.script.create_then_500 > 0:
        fake.script.create_then_500 -= 1
        raise ApiError(500, "upstream timeout after the job was created", "server_error")
    return 200, job.to_json()


def _event(type_: str, message: str, level: str = "info", step: int | None = None) -> dict[str, Any]:
    return {"object": "fine-tune-event", "created_at": now_iso(), "type": type_, "level": level,
            "message": message, "step": step, "total_steps": 10}


def _advance(fake: FakeTogether, job: FakeJob, to_end: bool = False) -> None:
    """Move a job along JOB_STATES: one step per ``job_polls_per_state`` retrieves."""
    if job.status in TERMINAL_JOB_STATES:
        return
    if job.status == "cancel_requested":
        job.status = "cancelled"
        job.events.append(_event("job_stopped", "Job was cancelled"))
        return
    job.polls += 1
    per_state = fake.script.job_polls_per_state
    target = len(JOB_STATES) - 1 if to_end or per_state == 0 else min(job.polls // per_state, len(JOB_STATES) - 1)
    duration = fake.script.job_duration_s
    if duration is not None and not to_end:  # by the clock: running until the duration is over
        elapsed = time.monotonic() - job.created_mono
        target = len(JOB_STATES) - 1 if elapsed >= duration else JOB_STATES.index("running")
    if fake.script.hold_jobs:
        target = min(target, JOB_STATES.index("running"))
    current = JOB_STATES.index(job.status)
    for index in range(current + 1, target + 1):
        state = JOB_STATES[index]
        if state == "running" and job.failure is not None:
            job.status = job.failure.status
            job.events.append(_event("job_error", job.failure.message, "error"))
            job.updated_at = now_iso()
            return
        job.status = state
        job.events.append(_event({"queued": "job_pending", "running": "training_start", "compressing": "epoch_complete",
                                  "uploading": "model_uploading", "completed": "job_complete"}[state],
                                 f"{state}", step=10 if state != "running" else 0))
        if state == "completed":
            job.completed_mono = time.monotonic()
            _register_model(fake, job)
    job.updated_at = now_iso()


def _register_model(fake: FakeTogether, job: FakeJob) -> None:
    mid = f"ml_{job.id}"
    fake.state.models[mid] = {
        "id": mid, "name": f"{PROJECT['slug']}/{job.output_name.split('/')[-1]}", "projectId": PROJECT["id"],
        "organizationId": "org_1", "visibility": "VISIBILITY_PRIVATE", "weights": {},
        "baseModel": "projects/proj_public/models/ml_base", "baseModelId": "ml_base",
        "createdAt": now_iso(), "updatedAt": now_iso(),
    }


def _job(fake: FakeTogether, jid: str) -> FakeJob:
    job = fake.state.jobs.get(jid)
    if job is None:
        raise ApiError(404, f"fine-tune job {jid} not found", "not_found")
    return job


def jobs_list(fake: FakeTogether, _: dict[str, str], __: Request):
    if len(fake.state.jobs) < fake.script.list_hold_creates:
        return 200, {"data": []}
    now = time.monotonic()
    return 200, {"data": [j.to_json() for j in fake.state.jobs.values() if j.listed_from <= now]}


def jobs_retrieve(fake: FakeTogether, p: dict[str, str], _: Request):
    job = _job(fake, p["id"])
    _advance(fake, job)
    return 200, job.to_json()


def jobs_cancel(fake: FakeTogether, p: dict[str, str], _: Request):
    job = _job(fake, p["id"])
    if job.status not in TERMINAL_JOB_STATES:
        if job.cancelled_at is None:
            job.cancelled_at = time.time()
        job.status = "cancel_requested"
        job.events.append(_event("cancel_requested", "Cancel requested"))
    return 200, job.to_json()


def jobs_delete(fake: FakeTogether, p: dict[str, str], _: Request):
    _job(fake, p["id"])
    del fake.state.jobs[p["id"]]
    return 200, {"message": "deleted"}


def jobs_events(fake: FakeTogether, p: dict[str, str], _: Request):
    return 200, {"data": _job(fake, p["id"]).events}


def jobs_checkpoints(fake: FakeTogether, p: dict[str, str], _: Request):
    job = _job(fake, p["id"])
    if job.status != "completed":
        return 200, {"data": []}
    return 200, {"data": [
        {"checkpoint_type": "Final Merged", "created_at": job.updated_at, "path": f"s3://fake/{job.id}/merged",
         "step": 10, "checkpoint": "model", "object_id": f"ml_{job.id}"},
        {"checkpoint_type": "Final Adapter", "created_at": job.updated_at, "path": f"s3://fake/{job.id}/adapter",
         "step": 10, "checkpoint": "adapter", "object_id": f"ml_ad_{job.id}"},
    ]}


def jobs_metrics(fake: FakeTogether, p: dict[str, str], _: Request):
    """Ten training steps ending at the scripted train loss, and one eval row per ``n_evals``."""
    job = _job(fake, p["id"])
    if job.status not in ("compressing", "uploading", "completed"):
        return 200, {"metrics": []}
    loss_for = fake.script.loss_for
    train, val = loss_for(job.request, job.depth) if loss_for else fake.script.loss_at(job.depth)
    rows: list[dict[str, float]] = [
        {"train/global_step": float(step), "train/loss": round(train + 0.05 * (10 - step), 4)} for step in range(1, 11)
    ]
    if job.request.get("validation_file") and int(job.request.get("n_evals") or 0) > 0:
        rows.append({"train/global_step": 10.0, "eval/loss": val})
    return 200, {"metrics": rows}


# ---------------------------------------------------------------------------------------------------
# Chat, projects (v2/v3): models, configs, endpoints, deployments, hardware
# ---------------------------------------------------------------------------------------------------

def chat(fake: FakeTogether, _: dict[str, str], req: Request):
    body = req.json()
    model = body.get("model", "")
    routable = {ep["name"] for ep in fake.state.endpoints.values() if any(
        fake.state.deployments.get(s.get("deploymentId"), {}).get("status", {}).get("state") == "DEPLOYMENT_STATE_READY"
        for s in ep.get("trafficSplit", []))}
    routable |= {d["name"] for d in fake.state.deployments.values() if d["status"]["state"] == "DEPLOYMENT_STATE_READY"}
    if model not in routable:
        raise ApiError(404, f"Unable to access model {model}. Please visit https://api.together.ai/models", "model_not_available")
    for fragment, status in fake.script.chat_errors.items():
        if fragment in model:
            raise ApiError(status, f"scripted {status}: {model} is not answering", "server_error")
    messages = body.get("messages") or []
    last = str(messages[-1].get("content", "")) if messages else ""
    for fragment, status in fake.script.chat_prompt_errors.items():
        if fragment in last:
            raise ApiError(status, f"scripted {status} for this conversation", "server_error")
    fake.state.chats.append(body)
    answer = next((a for fragment, a in fake.script.chat_answers.items() if fragment in last), fake.script.chat_reply)
    return 200, {
        "id": fake.new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def whoami(fake: FakeTogether, _: dict[str, str], __: Request):
    return 200, {"type": "project_api_key", "project": PROJECT,
                 "organization": {"id": "org_1", "name": "O", "slug": "o"}, "api_key": {"id": "k"}}


def hardware(fake: FakeTogether, _: dict[str, str], __: Request):
    return 200, {"object": "list", "data": HARDWARE}


def _project(p: dict[str, str]) -> None:
    if p["project"] != PROJECT["id"]:
        raise ApiError(404, f"project {p['project']} not found", "not_found")


def models_list(fake: FakeTogether, p: dict[str, str], _: Request):
    _project(p)
    return 200, {"data": list(fake.state.models.values()), "next_cursor": None}


def models_retrieve(fake: FakeTogether, p: dict[str, str], _: Request):
    _project(p)
    model = fake.state.models.get(p["id"])
    if model is None:
        raise ApiError(404, f"model {p['id']} not found", "not_found")
    return 200, model


def configs_list(fake: FakeTogether, p: dict[str, str], req: Request):
    _project(p)
    ref = req.query.get("referenceModel") or req.query.get("reference_model") or ""
    ref_id = req.query.get("referenceModelId") or ref.rsplit("/", 1)[-1]
    # Configs belong to deployable reference models: a fine-tuned model is deployed on its base model's
    # configs (a model without a base is its own reference); anything else lists none.
    references = {"ml_base"} | {mid for mid, m in fake.state.models.items() if not m.get("baseModelId")}
    if ref_id not in references:
        return 200, {"data": [], "next_cursor": None}
    return 200, {"data": [{"id": "cr_1", "projectId": "proj_public", "referenceModel": ref or f"projects/proj_public/models/{ref_id}",
                           "referenceModelId": ref_id, "certifications": [], "selectors": [],
                           "hardware": HARDWARE[0]["id"]}], "next_cursor": None}


def endpoints_create(fake: FakeTogether, p: dict[str, str], req: Request):
    _project(p)
    body = req.json()
    name = body.get("name")
    if not name:
        raise ApiError(400, "name is required")
    full = f"{PROJECT['slug']}/{name}"
    if any(ep["name"] == full for ep in fake.state.endpoints.values()):
        raise ApiError(409, f"endpoint {full} already exists", "conflict")
    eid = fake.new_id("ep")
    ep = {"id": eid, "name": full, "projectId": PROJECT["id"], "createdAt": now_iso(), "updatedAt": now_iso(),
          "deployments": [], "endpointType": "ENDPOINT_TYPE_DEDICATED", "etag": "e1", "trafficSplit": [],
          "visibility": body.get("visibility", "VISIBILITY_PRIVATE")}
    fake.state.endpoints[eid] = ep
    return 200, ep


def endpoints_list(fake: FakeTogether, p: dict[str, str], _: Request):
    _project(p)
    return 200, {"data": list(fake.state.endpoints.values()), "next_cursor": None}


def _endpoint(fake: FakeTogether, p: dict[str, str]) -> dict[str, Any]:
    _project(p)
    ep = fake.state.endpoints.get(p["eid"])
    if ep is None:
        raise ApiError(404, f"endpoint {p['eid']} not found", "not_found")
    return ep


def endpoints_retrieve(fake: FakeTogether, p: dict[str, str], _: Request):
    return 200, _endpoint(fake, p)


def _check_etag(obj: dict[str, Any], etag: str | None, what: str) -> None:
    """Optimistic concurrency: an ``etag`` that is sent must be the object's current one, else 409."""
    if etag and etag != obj["etag"]:
        raise ApiError(409, f"{what} {obj['id']} changed since it was read (etag {etag} is not {obj['etag']})", "conflict")


def _update_fields(req: Request, body: dict[str, Any], updatable: tuple[str, ...]) -> list[str]:
    """The fields a PATCH changes: those its ``updateMask`` names, else every field the body populates
    ("If not set, the fields populated on `deployment` are updated": the SDK's ``update_mask`` docstring).
    A masked field the body does not carry, or one that cannot be updated, is refused (400)."""
    mask = [f.strip() for f in req.query.get("updateMask", "").split(",") if f.strip()]
    fields = mask or [k for k in body if k != "etag"]
    for key in fields:
        if key not in updatable:
            raise ApiError(400, f"update mask path {key!r} is not updatable; one of {', '.join(updatable)}")
        if key not in body:
            raise ApiError(400, f"update mask names {key!r} but the request body has no {key!r}")
    return fields


def endpoints_update(fake: FakeTogether, p: dict[str, str], req: Request):
    ep = _endpoint(fake, p)
    body = req.json()
    _check_etag(ep, body.get("etag"), "endpoint")
    for key in _update_fields(req, body, ("trafficSplit", "name", "displayName", "visibility")):
        if key == "trafficSplit":
            for split in body.get("trafficSplit", []):
                if split.get("deploymentId") not in fake.state.deployments:
                    raise ApiError(400, f"unknown deployment {split.get('deploymentId')}")
        if key in body:
            ep[key] = body[key]
    ep["etag"] = f"e{int(ep['etag'][1:]) + 1}"
    ep["updatedAt"] = now_iso()
    return 200, ep


def endpoints_delete(fake: FakeTogether, p: dict[str, str], req: Request):
    ep = _endpoint(fake, p)
    _check_etag(ep, req.query.get("etag"), "endpoint")  # the SDK sends a delete's etag as a query parameter
    if ep["deployments"]:
        raise ApiError(400, f"endpoint {ep['name']} still has deployments: delete the endpoint's deployments first")
    del fake.state.endpoints[ep["id"]]
    return 200, {}


def deployments_create(fake: FakeTogether, p: dict[str, str], req: Request):
    ep = _endpoint(fake, p)
    body = req.json()
    model = body.get("model", "")
    # projects/{p}/models/{id}, or a revision of it: projects/{p}/models/{id}/revisions/{rev}
    # (the form post-training inference checkpoints register; types/endpoints/deployment_create_params.py)
    found = re.fullmatch(r"projects/[^/]+/models/([^/]+)(?:/revisions/([^/]+))?", model)
    model_id, revision = (found.group(1), found.group(2)) if found else (model.rsplit("/", 1)[-1], None)
    if model_id not in fake.state.models:
        raise ApiError(404, f"model {model} not found", "not_found")
    if revision and revision not in fake.state.models[model_id].get("revisions", []):
        raise ApiError(404, f"model {model_id} has no revision {revision}", "not_found")
    if req.query.get("validateOnly") == "true":
        return 200, {}
    did = fake.new_id("dep")
    name = body.get("name") or did
    # A deployment's name is unique in its endpoint (AIP-133: creating a resource that exists is ALREADY_EXISTS).
    if any(fake.state.deployments[d]["name"] == f"{ep['name']}/{name}" for d in ep["deployments"]):
        raise ApiError(409, f"deployment {name} already exists in endpoint {ep['name']}", "conflict")
    dep = {"id": did, "name": f"{ep['name']}/{name}", "endpointId": ep["id"], "projectId": PROJECT["id"], "etag": "d1",
           "config": body.get("config", ""), "configId": "", "model": model, "modelId": model_id, "modelRevisionId": revision or "",
           "hardware": HARDWARE[0]["id"], "autoscaling": body.get("autoscaling", {"minReplicas": 1, "maxReplicas": 1}),
           "inactiveTimeout": body.get("inactiveTimeout"), "createdAt": now_iso(), "updatedAt": now_iso(),
           "trafficMode": "TRAFFIC_MODE_LIVE",
           "status": {"state": "DEPLOYMENT_STATE_PROVISIONING", "message": "provisioning", "readyReplicas": 0}}
    fake.state.deployments[did] = dep
    ep["deployments"].append(did)
    if fake.script.deployment_create_then_500 > 0:
        fake.script.deployment_create_then_500 -= 1
        raise ApiError(500, "upstream timeout after the deployment was created", "server_error")
    return 200, dep


def deployments_list(fake: FakeTogether, p: dict[str, str], _: Request):
    ep = _endpoint(fake, p)
    return 200, {"data": [fake.state.deployments[d] for d in ep["deployments"]], "next_cursor": None}


def _deployment(fake: FakeTogether, p: dict[str, str]) -> dict[str, Any]:
    ep = _endpoint(fake, p)
    if p["did"] not in ep["deployments"]:
        raise ApiError(404, f"deployment {p['did']} not found", "not_found")
    return fake.state.deployments[p["did"]]


def deployments_retrieve(fake: FakeTogether, p: dict[str, str], _: Request):
    dep = _deployment(fake, p)
    status = dep["status"]
    if status["state"] in ("DEPLOYMENT_STATE_PROVISIONING", "DEPLOYMENT_STATE_SCALING"):
        fake.state.deployment_polls[dep["id"]] += 1
        if fake.state.deployment_polls[dep["id"]] >= fake.script.deployment_polls:
            if fake.script.deployment_fail:
                status.update(state="DEPLOYMENT_STATE_FAILED", message=fake.script.deployment_fail, readyReplicas=0)
            else:
                status.update(state="DEPLOYMENT_STATE_READY", message="ready",
                              readyReplicas=dep["autoscaling"].get("minReplicas", 1))
    elif status["state"] == "DEPLOYMENT_STATE_STOPPING":
        status.update(state="DEPLOYMENT_STATE_STOPPED", message="stopped", readyReplicas=0)
    return 200, dep


def deployments_update(fake: FakeTogether, p: dict[str, str], req: Request):
    dep = _deployment(fake, p)
    body = req.json()
    _check_etag(dep, body.get("etag"), "deployment")
    fields = _update_fields(req, body, ("autoscaling", "inactiveTimeout", "name", "maxConcurrentRequestsPerReplica"))
    if "autoscaling" in fields:
        dep["autoscaling"] = body["autoscaling"]
        if int(body["autoscaling"].get("maxReplicas", 1)) == 0:
            dep["status"].update(state="DEPLOYMENT_STATE_STOPPING", message="stopping", readyReplicas=0)
        elif dep["status"]["state"] in ("DEPLOYMENT_STATE_STOPPED", "DEPLOYMENT_STATE_STOPPING"):
            dep["status"].update(state="DEPLOYMENT_STATE_SCALING", message="starting")
            fake.state.deployment_polls[dep["id"]] = 0
    for key in fields:
        if key != "autoscaling":
            dep[key] = body[key]
    dep["etag"] = f"d{int(dep['etag'][1:]) + 1}"
    dep["updatedAt"] = now_iso()
    return 200, dep


def deployments_delete(fake: FakeTogether, p: dict[str, str], req: Request):
    """Together deletes only a deployment outside the endpoint's traffic split ("Remove the deployment
    from live traffic first", the SDK's docstring of ``deployments.delete``)."""
    dep = _deployment(fake, p)
    _check_etag(dep, req.query.get("etag"), "deployment")
    ep = fake.state.endpoints[dep["endpointId"]]
    if any(s.get("deploymentId") == dep["id"] for s in ep.get("trafficSplit", [])):
        raise ApiError(400, f"deployment {dep['name']} is in the traffic split of {ep['name']}: "
                            "remove the deployment from live traffic first")
    if fake.script.delete_refusal and int(dep["autoscaling"].get("maxReplicas", 1)) > 0:
        raise ApiError(400, fake.script.delete_refusal)
    ep["deployments"].remove(dep["id"])
    del fake.state.deployments[dep["id"]]
    return 200, {}


def _route(method: str, template: str, handler: Handler) -> tuple[str, re.Pattern[str], str, Handler]:
    pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
    return method, re.compile(pattern), f"{method} {template}", handler


_P = "/v2/projects/{project}"
ROUTES = [
    _route("POST", "/v1/files", files_create),
    _route("PUT", "/_upload/{id}", files_put),
    _route("POST", "/v1/files/{id}/preprocess", files_preprocess),
    _route("GET", "/v1/files", files_list),
    _route("GET", "/v1/files/{id}", files_retrieve),
    _route("DELETE", "/v1/files/{id}", files_delete),
    _route("GET", "/v1/files/{id}/content", files_content),
    _route("GET", "/v1/fine-tunes/models/limits", limits),
    _route("POST", "/v1/fine-tunes/estimate-price", estimate_price),
    _route("POST", "/v1/fine-tunes", jobs_create),
    _route("GET", "/v1/fine-tunes", jobs_list),
    _route("GET", "/v1/fine-tunes/{id}", jobs_retrieve),
    _route("POST", "/v1/fine-tunes/{id}/cancel", jobs_cancel),
    _route("DELETE", "/v1/fine-tunes/{id}", jobs_delete),
    _route("GET", "/v1/fine-tunes/{id}/events", jobs_events),
    _route("GET", "/v1/fine-tunes/{id}/checkpoints", jobs_checkpoints),
    _route("GET", "/v1/fine-tunes/{id}/metrics", jobs_metrics),
    _route("POST", "/v1/chat/completions", chat),
    _route("GET", "/v3/whoami", whoami),
    _route("GET", "/v2/public/inference-instance-types", hardware),
    _route("GET", _P + "/models", models_list),
    _route("GET", _P + "/models/{id}", models_retrieve),
    _route("GET", _P + "/configs", configs_list),
    _route("POST", _P + "/endpoints", endpoints_create),
    _route("GET", _P + "/endpoints", endpoints_list),
    _route("GET", _P + "/endpoints/{eid}", endpoints_retrieve),
    _route("PATCH", _P + "/endpoints/{eid}", endpoints_update),
    _route("DELETE", _P + "/endpoints/{eid}", endpoints_delete),
    _route("POST", _P + "/endpoints/{eid}/deployments", deployments_create),
    _route("GET", _P + "/endpoints/{eid}/deployments", deployments_list),
    _route("GET", _P + "/endpoints/{eid}/deployments/{did}", deployments_retrieve),
    _route("PATCH", _P + "/endpoints/{eid}/deployments/{did}", deployments_update),
    _route("DELETE", _P + "/endpoints/{eid}/deployments/{did}", deployments_delete),
]


# The post-training routes (``/v1/rl/...``) live in their own module.
from tests.fake_together import post_training  # noqa: E402

ROUTES += post_training.routes(_route)
