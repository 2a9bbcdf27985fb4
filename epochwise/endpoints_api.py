"""The endpoint adapter: the only module that creates, routes, calls, stops and deletes Together endpoints.

Together 3.x serves fine-tuned models through the v2 *project* API
(https://docs.together.ai/docs/post-training/deployment): an **endpoint** is a stable name ``<project_slug>/<endpoint>`` used as ``model=`` for chat
completions; it holds **deployments** (a model plus a config that pins the hardware), and its traffic
split routes requests to them.

Money rules, enforced here:

* Names are deterministic: one endpoint per fold and epoch (``ew-<fold>-e<k>``) and one deployment per
  model (``d-<model id>``). Together's own listing is checked before anything is created, and a name
  conflict on create means "someone else just made it": it is looked up and reused, never duplicated.
* Stopping means scaling the deployment to zero replicas (there is no ``state`` field in v2), so a
  stopped endpoint costs nothing and keeps its name.

Typed functions over a ``together.Together`` client; no Prefect here, so each is testable against the
fake server alone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from together import APIConnectionError, APIError, APIStatusError, ConflictError, NotFoundError, Together

from epochwise.config.deploy import DeployConfig
from epochwise.config.together import TogetherConfig
from epochwise.together_api import OutageGuard, TogetherUnreachable, api_base_url, api_message, fold_slug

PREFIX = "ew-"  # every endpoint epochwise creates starts with this; the reaper touches nothing else
READY = "DEPLOYMENT_STATE_READY"
FAILED = "DEPLOYMENT_STATE_FAILED"
STOPPED = ("DEPLOYMENT_STATE_STOPPED", "DEPLOYMENT_STATE_STOPPING")
DEPLOYMENT_CREATE_ATTEMPTS = 3  # a create whose reply is lost is looked up by name before the next try
_ENDPOINT_RE = re.compile(r"ew-(?P<fold>[a-z0-9-]+)-e(?P<epoch>\d+)")


class EndpointFailure(RuntimeError):
    """Together refused a deploy step, a deployment failed, or the smoke test failed; says which and why."""


# ---------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------

def endpoint_slug(fold: str, epoch: int) -> str:
    """``ew-<fold>-e<k>``: the endpoint of one fold's epoch, the same on every run and machine."""
    return f"{PREFIX}{fold_slug(fold)}-e{epoch}"


def short_name(name: str) -> str:
    """The endpoint part of ``<project_slug>/<endpoint>`` (deployments: the last path segment)."""
    return name.rsplit("/", 1)[-1]


def parse_endpoint(name: str) -> tuple[str, int] | None:
    """``(fold slug, epoch)`` when ``name`` is an epochwise endpoint, else None."""
    match = _ENDPOINT_RE.fullmatch(short_name(name))
    return (match.group("fold"), int(match.group("epoch"))) if match else None


def deployment_slug(model_id: str) -> str:
    """``d-<model id>``: one deployment per model on an endpoint, so a rerun finds it by name."""
    return "d-" + (re.sub(r"[^a-z0-9-]+", "-", model_id.lower()).strip("-") or "model")[:60]


# ---------------------------------------------------------------------------------------------------
# Project and model
# ---------------------------------------------------------------------------------------------------

def with_project(client: Together) -> Together:
    """The client bound to a project: ``project_id`` from the client (TOGETHER_PROJECT_ID or the
    credentials block), else the one ``whoami`` reports for the key."""
    if client.project_id:
        return client
    who = client.whoami()
    project = getattr(who, "project", None)
    project_id = getattr(project, "id", None)
    if not project_id:
        raise EndpointFailure(
            f"this key ({getattr(who, 'type', 'unknown type')}) has no project: set TOGETHER_PROJECT_ID "
            "or the credentials block's project_id"
        )
    return client.with_options(project_id=project_id)


@dataclass(frozen=True)
class DeployTarget:
    """The registry model a finished job produced, and what its deploy configs are listed against."""

    job_id: str
    model_id: str  # ml_...
    model_name: str  # <project_slug>/<name>
    model_path: str  # projects/<project>/models/<id>
    reference_model_id: str  # base model id for configs.list (the model itself when it has no base)


def model_from_job(client: Together, job_id: str) -> DeployTarget:
    """The deployable model of a completed job: its ``model_object_id`` (merged or full model), else its
    LoRA ``adapter_object_id`` (Together merges it into the base when deployed)."""
    job = client.fine_tuning.retrieve(job_id)
    data = job.model_dump(by_alias=True, warnings=False)
    if data.get("status") != "completed":
        raise EndpointFailure(f"job {job_id} is {data.get('status')}, not completed: nothing to deploy")
    model_id = data.get("model_object_id") or data.get("adapter_object_id")
    if not model_id:
        raise EndpointFailure(f"job {job_id} has no model_object_id or adapter_object_id in Together's reply")
    model = client.models.retrieve(model_id)
    return DeployTarget(
        job_id=job_id,
        model_id=model.id,
        model_name=model.name,
        model_path=f"projects/{model.project_id}/models/{model.id}",
        reference_model_id=model.base_model_id or short_name(model.base_model or "") or model.id,
    )


REGISTRY_MODEL = re.compile(r"projects/(?P<project>[^/]+)/models/(?P<id>[^/]+)(?:/revisions/(?P<rev>[^/]+))?")


def model_from_registry(client: Together, ref: str, path: str) -> DeployTarget:
    """A model-registry model or revision, ``projects/{p}/models/{id}[/revisions/{rev}]``: what a GRPO
    epoch's inference checkpoint registers (deployed as is: ``types/endpoints/deployment_create_params.py``
    takes such a path as ``model``). ``ref`` is the epoch's checkpoint, kept as the target's ``job_id``."""
    found = REGISTRY_MODEL.fullmatch(path)
    if found is None:
        raise EndpointFailure(f"{path!r} is not a model-registry path projects/<p>/models/<id>[/revisions/<rev>]")
    model = client.models.retrieve(found["id"])
    return DeployTarget(
        job_id=ref,
        model_id=model.id,
        model_name=model.name,
        model_path=path,
        reference_model_id=model.base_model_id or short_name(model.base_model or "") or model.id,
    )


def model_of_epoch(client: Together, job_id: str, model: str | None) -> DeployTarget:
    """The deployable model of an epoch: a registry path (GRPO's inference checkpoint), else its job's model."""
    if model and REGISTRY_MODEL.fullmatch(model):
        return model_from_registry(client, job_id, model)
    return model_from_job(client, job_id)


# ---------------------------------------------------------------------------------------------------
# Configs (hardware)
# ---------------------------------------------------------------------------------------------------

def config_hardware(config: Any) -> str:
    """Hardware of a deploy config: ``<count>x<accelerator>`` from its selectors (as Together's CLI
    builds it), else a plain ``hardware`` field, else ``"unknown"``."""
    selectors = {s.key: s.value for s in (getattr(config, "selectors", None) or [])}
    if selectors.get("accelerator_type") and selectors.get("accelerator_count"):
        return f"{selectors['accelerator_count']}x{selectors['accelerator_type']}"
    extra = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return str(extra.get("hardware") or "unknown")


def _hw_key(hardware: str) -> str:
    # "1x_nvidia_h100_80gb_sxm" and "1xnvidia-h100-80gb" are the same GPU to a user.
    return re.sub(r"[^a-z0-9]", "", hardware.lower().replace("nvidia", ""))


def config_path(config: Any) -> str:
    return f"projects/{config.project_id}/configs/{config.id}"


def pick_config(configs: list[Any], hardware: str | None, model: str) -> Any:
    """The one config to deploy with: the only one, or the one whose hardware matches ``hardware``.

    Raises `EndpointFailure` listing the candidates (``id: hardware``) when none or several fit.
    """
    listing = "; ".join(f"{c.id}: {config_hardware(c)}" for c in configs)
    if not configs:
        raise EndpointFailure(f"Together has no deploy config for {model}")
    if hardware is None:
        if len(configs) == 1:
            return configs[0]
        raise EndpointFailure(
            f"{model} has {len(configs)} deploy configs ({listing}); choose one with deploy.hardware / --hardware"
        )
    want = _hw_key(hardware)
    exact = [c for c in configs if _hw_key(config_hardware(c)) == want]
    close = exact or [c for c in configs if _hw_key(config_hardware(c)).startswith(want)]
    if len(close) == 1:
        return close[0]
    if not close:
        raise EndpointFailure(f"no deploy config of {model} runs on {hardware!r}; available: {listing}")
    several = "; ".join(f"{c.id}: {config_hardware(c)}" for c in close)
    raise EndpointFailure(f"{len(close)} deploy configs of {model} match {hardware!r} ({several}); be more specific")


def choose_config(client: Together, target: DeployTarget, hardware: str | None) -> Any:
    """List the model's deploy configs (``models.configs.list``) and pick one (see `pick_config`)."""
    configs = list(client.models.configs.list(reference_model_id=target.reference_model_id))
    return pick_config(configs, hardware, target.model_name)


# ---------------------------------------------------------------------------------------------------
# Endpoints and deployments
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeploymentInfo:
    """One deployment as the CLI, the artifact and the reaper show it."""

    id: str
    name: str
    model: str
    hardware: str
    state: str
    message: str
    min_replicas: int
    max_replicas: int
    inactive_timeout_min: int | None = None

    @property
    def stopped(self) -> bool:
        return self.max_replicas == 0 or self.state in STOPPED


@dataclass(frozen=True)
class EndpointInfo:
    """An endpoint with its creation time and deployments."""

    id: str
    name: str  # <project_slug>/<endpoint>: what client.chat.completions.create(model=...) takes
    created_at: datetime
    etag: str
    traffic: tuple[tuple[str, float], ...]  # (deployment id, weight)
    deployments: tuple[DeploymentInfo, ...] = field(default_factory=tuple)

    @property
    def epochwise(self) -> bool:
        return parse_endpoint(self.name) is not None

    def age_s(self, now: datetime | None = None) -> float:
        return ((now or datetime.now(UTC)) - self.created_at).total_seconds()


def _when(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _deployment_info(dep: Any) -> DeploymentInfo:
    status = getattr(dep, "status", None)
    scaling = getattr(dep, "autoscaling", None)
    return DeploymentInfo(
        id=dep.id, name=dep.name, model=getattr(dep, "model", "") or "", hardware=getattr(dep, "hardware", "") or "",
        state=str(getattr(status, "state", "") or ""), message=str(getattr(status, "message", "") or ""),
        min_replicas=int(getattr(scaling, "min_replicas", None) or 0),
        max_replicas=int(getattr(scaling, "max_replicas", None) or 0),
        inactive_timeout_min=getattr(dep, "inactive_timeout", None),
    )


def get_deployment(client: Together, endpoint_id: str, deployment_id: str) -> DeploymentInfo:
    return _deployment_info(client.endpoints.deployments.retrieve(deployment_id, endpoint_id=endpoint_id))


def list_deployments(client: Together, endpoint_id: str) -> list[DeploymentInfo]:
    return [_deployment_info(d) for d in client.endpoints.deployments.list(endpoint_id)]


def _endpoint_info(client: Together, ep: Any, with_deployments: bool) -> EndpointInfo:
    traffic = tuple((s.deployment_id, float(s.weight)) for s in (getattr(ep, "traffic_split", None) or []))
    deployments = tuple(list_deployments(client, ep.id)) if with_deployments else ()
    return EndpointInfo(ep.id, ep.name, _when(ep.created_at), getattr(ep, "etag", "") or "", traffic, deployments)


def list_endpoints(client: Together, with_deployments: bool = False) -> list[EndpointInfo]:
    """Every endpoint of the project (the listing auto-pages)."""
    return [_endpoint_info(client, ep, with_deployments) for ep in client.endpoints.list()]


def epochwise_endpoints(client: Together, fold: str | None = None) -> list[EndpointInfo]:
    """Endpoints epochwise created (all folds, or one fold's), with their deployments, oldest first."""
    found = []
    for ep in client.endpoints.list():
        parsed = parse_endpoint(ep.name)
        if parsed is None or (fold is not None and parsed[0] != fold_slug(fold)):
            continue
        found.append(_endpoint_info(client, ep, with_deployments=True))
    return sorted(found, key=lambda e: e.created_at)


def find_endpoint(client: Together, slug: str) -> EndpointInfo | None:
    """The endpoint named ``slug`` in Together's listing (compared without the project prefix)."""
    return next((e for e in list_endpoints(client) if short_name(e.name) == slug), None)


def ensure_endpoint(client: Together, slug: str) -> tuple[EndpointInfo, bool]:
    """The endpoint named ``slug``: found in the listing, else created. Returns ``(endpoint, created)``.

    A 409 on create means another run made it in between: it is looked up, never created twice.
    """
    existing = find_endpoint(client, slug)
    if existing is not None:
        return existing, False
    try:
        ep = client.endpoints.create(name=slug)
    except ConflictError:
        existing = find_endpoint(client, slug)
        if existing is None:
            raise EndpointFailure(f"Together says endpoint {slug} exists but does not list it") from None
        return existing, False
    return _endpoint_info(client, ep, with_deployments=False), True


def ensure_deployment(client: Together, endpoint: EndpointInfo, target: DeployTarget, config: Any,
                      cfg: DeployConfig, sleep: Callable[[float], None] = time.sleep) -> tuple[DeploymentInfo, bool]:
    """The endpoint's deployment of ``target``: reused, else created. Returns ``(deployment, created)``.

    A reused deployment gets the configured replicas and idle timeout (so a stopped one starts again);
    one of this model that FAILED earlier is taken out of the traffic split and deleted first, so the
    new one can take its name.
    """
    slug = deployment_slug(target.model_id)
    scaling = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas}
    for dep in list_deployments(client, endpoint.id):
        if dep.model != target.model_path and short_name(dep.name) != slug:
            continue
        if dep.state == FAILED:  # out of the traffic split first: Together deletes nothing still routed
            if any(d == dep.id for d, _ in endpoint.traffic):
                set_traffic(client, endpoint.id, [t for t in endpoint.traffic if t[0] != dep.id])
            delete_deployment(client, endpoint.id, dep.id)
            break
        changes: dict[str, Any] = {}
        if (dep.min_replicas, dep.max_replicas) != (cfg.min_replicas, cfg.max_replicas):
            changes["autoscaling"] = scaling
        if (dep.inactive_timeout_min or 0) != cfg.inactive_timeout_min:
            changes["inactive_timeout"] = cfg.inactive_timeout_min
        if changes:
            mask = ",".join("inactiveTimeout" if k == "inactive_timeout" else k for k in changes)
            dep = _deployment_info(client.endpoints.deployments.update(
                dep.id, endpoint_id=endpoint.id, update_mask=mask, **changes))
        return dep, False
    # No SDK retries: a 5xx, a timeout or a dropped connection may come after Together created the
    # deployment, and a blind resend would make a second one (or a 409 on its name). Each retry looks
    # the deployment up by its name first; one found is this run's (its name is this model's slug).
    once = client.with_options(max_retries=0)
    last: Exception | None = None
    for attempt in range(DEPLOYMENT_CREATE_ATTEMPTS):
        if last is not None:
            found = next((d for d in list_deployments(client, endpoint.id) if short_name(d.name) == slug), None)
            if found is not None:
                return found, True
        try:
            created = once.endpoints.deployments.create(
                endpoint.id, name=slug, model=target.model_path, config=config_path(config), autoscaling=scaling,
                inactive_timeout=cfg.inactive_timeout_min,
            )
            return _deployment_info(created), True
        except APIStatusError as exc:
            if exc.status_code < 500 and exc.status_code not in (408, 409, 429):
                raise EndpointFailure(f"Together refused the deployment of {target.model_name} ({exc.status_code}): "
                                      f"{api_message(exc)}") from None
            last = exc
        except APIConnectionError as exc:
            last = exc
        sleep(2.0 * (attempt + 1))
    raise EndpointFailure(f"could not create the deployment of {target.model_name}: {last}")


def route_traffic(client: Together, endpoint_id: str, deployment_id: str) -> EndpointInfo:
    """Send all of the endpoint's traffic to ``deployment_id`` (an endpoint without a split is unrouted)."""
    ep = client.endpoints.retrieve(endpoint_id)
    current = [(s.deployment_id, float(s.weight)) for s in (ep.traffic_split or [])]
    if current != [(deployment_id, 1.0)]:
        ep = client.endpoints.update(endpoint_id, traffic_split=[{"deployment_id": deployment_id, "weight": 1}],
                                     update_mask="trafficSplit", etag=ep.etag)
    return _endpoint_info(client, ep, with_deployments=False)


def set_traffic(client: Together, endpoint_id: str, split: Iterable[tuple[str, float]], attempts: int = 3) -> None:
    """Make the endpoint's traffic split exactly ``split`` (empty: unrouted), sent with the endpoint's
    current ``etag``; when Together answers 409 (it changed since it was read) it is read again and the
    update retried, at most ``attempts`` times."""
    wanted = [(d, float(w)) for d, w in split]
    for attempt in range(1, attempts + 1):
        ep = client.endpoints.retrieve(endpoint_id)
        if [(s.deployment_id, float(s.weight)) for s in (ep.traffic_split or [])] == wanted:
            return
        try:
            client.endpoints.update(endpoint_id, traffic_split=[{"deployment_id": d, "weight": w} for d, w in wanted],
                                    update_mask="trafficSplit", etag=ep.etag)
            return
        except ConflictError:
            if attempt == attempts:
                raise


class RollbackFailure(EndpointFailure):
    """A rollback step failed, so a deployment may still be live: names it, its endpoint and the command
    that stops it."""


def _reason(exc: Exception) -> str:
    if isinstance(exc, APIStatusError):
        return f"Together answered {exc.status_code}: {api_message(exc)}"
    return str(exc) or type(exc).__name__


def rollback_deployment(client: Together, endpoint_id: str, deployment_id: str,
                        previous_traffic: Iterable[tuple[str, float]], endpoint_created: bool,
                        describe: str, stop_command: str) -> list[str]:
    """Undo a deploy in the order Together accepts, and return what was done:

    1. put the endpoint's traffic split back as it was before (without this deployment, and only
       deployments that still exist; empty when there were none), with the current etag;
    2. delete the deployment (Together refuses to delete one that still receives traffic); when it
       refuses for another reason, scale it to zero replicas and delete again;
    3. delete the endpoint when this deploy created it and no deployment is left on it.

    When a step still fails, the deployment is scaled to zero if at all possible, and `RollbackFailure`
    says which step failed, whether ``describe`` (the deployment and endpoint, by name) is still live,
    and ``stop_command``.
    """
    done: list[str] = []
    step = "restore the traffic split"
    try:
        try:
            alive = {d.id for d in list_deployments(client, endpoint_id)}
        except NotFoundError:
            return ["endpoint already gone"]
        if deployment_id not in alive:
            done.append("deployment already gone")
        split = [(d, w) for d, w in previous_traffic if d != deployment_id and d in alive]
        set_traffic(client, endpoint_id, split)
        done.append(f"traffic split restored ({len(split)} deployment(s))")
        if deployment_id in alive:
            step = "delete the deployment"
            try:
                delete_deployment(client, endpoint_id, deployment_id)
            except APIStatusError:
                step = "scale the deployment to zero before deleting it"
                scale_to_zero(client, endpoint_id, deployment_id)
                done.append("scaled to zero")
                step = "delete the deployment after scaling it to zero"
                delete_deployment(client, endpoint_id, deployment_id)
            done.append("deployment deleted")
        if endpoint_created:
            step = "delete the endpoint this deploy created"
            if delete_endpoint_if_empty(client, endpoint_id):
                done.append("endpoint deleted")
    except (APIError, EndpointFailure) as exc:
        stopped = "scaled to zero" in done or _try_scale_to_zero(client, endpoint_id, deployment_id)
        if step.startswith("delete the endpoint"):
            left = "the deployment is deleted; the empty endpoint costs nothing but is left in the listing"
        elif stopped:
            left = f"{describe} is stopped (0 replicas, not billing) but not deleted"
        else:
            left = f"{describe} is still live and may keep billing"
        raise RollbackFailure(f"rollback failed to {step} ({_reason(exc)}); {left}. "
                              f"Stop it with: {stop_command} (`epochwise endpoints --reap` stops it too)") from None
    return done


def _try_scale_to_zero(client: Together, endpoint_id: str, deployment_id: str) -> bool:
    """Best effort while a rollback is failing: True when the deployment is now at zero replicas or gone."""
    try:
        scale_to_zero(client, endpoint_id, deployment_id)
    except NotFoundError:
        return True
    except APIError:
        return False
    return True


def wait_ready(client: Together, endpoint_id: str, deployment_id: str, cfg: DeployConfig,
               on_update: Callable[[DeploymentInfo], None] = lambda d: None,
               sleep: Callable[[float], None] = time.sleep,
               outage: TogetherConfig | None = None, log: Callable[[str], None] = print) -> DeploymentInfo:
    """Poll the deployment every ``cfg.poll_s`` until READY; `EndpointFailure` with Together's message on
    FAILED, on being stopped, or after ``cfg.ready_deadline_s``.

    The status calls are read-only, so a Together outage is ridden out (`OutageGuard`) for
    ``outage.outage_tolerance_s``, backing off like the job polls; without ``outage``, the first
    transient failure ends the wait."""
    guard = OutageGuard(
        f"deployment {deployment_id} keeps starting", api_base_url(client),
        outage.outage_tolerance_s if outage is not None else 0.0,
        outage.poll_initial_s if outage is not None else cfg.poll_s,
        outage.poll_max_s if outage is not None else cfg.poll_s, log=log, sleep=sleep,
    )
    deadline = time.monotonic() + cfg.ready_deadline_s
    while True:
        try:
            raw = guard.call(lambda: client.endpoints.deployments.retrieve(deployment_id, endpoint_id=endpoint_id))
        except TogetherUnreachable as exc:
            raise EndpointFailure(str(exc)) from None
        dep = _deployment_info(raw)
        on_update(dep)
        if dep.state == READY:
            return dep
        if dep.state == FAILED:
            raise EndpointFailure(f"deployment {dep.name} failed: {dep.message or 'no message'}")
        if dep.state in STOPPED:
            raise EndpointFailure(f"deployment {dep.name} was stopped while starting ({dep.message})")
        if time.monotonic() + cfg.poll_s > deadline:
            raise EndpointFailure(f"deployment {dep.name} still {dep.state} after {cfg.ready_deadline_s:.0f} s")
        sleep(cfg.poll_s)


def smoke_chat(client: Together, model: str, cfg: DeployConfig) -> str:
    """One chat completion against ``model`` (the endpoint name); returns the reply text.

    Raises `EndpointFailure` with Together's status and message when the call fails or the reply is empty.
    """
    try:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": cfg.smoke_prompt}],
            max_tokens=cfg.smoke_max_tokens, temperature=0,
        )
    except APIStatusError as exc:
        raise EndpointFailure(f"smoke test of {model} failed ({exc.status_code}): {api_message(exc)}") from None
    except APIConnectionError as exc:
        raise EndpointFailure(f"smoke test of {model} failed: {exc}") from None
    text = (reply.choices[0].message.content or "") if reply.choices else ""
    if not text.strip():
        raise EndpointFailure(f"smoke test of {model} returned an empty reply")
    return text


def scale_to_zero(client: Together, endpoint_id: str, deployment_id: str) -> DeploymentInfo:
    """Stop a deployment: min and max replicas 0 (nothing runs, nothing bills; the name stays)."""
    return _deployment_info(client.endpoints.deployments.update(
        deployment_id, endpoint_id=endpoint_id, autoscaling={"min_replicas": 0, "max_replicas": 0},
        update_mask="autoscaling",
    ))


def stop_endpoint(client: Together, endpoint: EndpointInfo) -> list[DeploymentInfo]:
    """Scale every running deployment of ``endpoint`` to zero; returns those it stopped."""
    return [scale_to_zero(client, endpoint.id, d.id) for d in endpoint.deployments if d.max_replicas > 0]


def delete_deployment(client: Together, endpoint_id: str, deployment_id: str) -> bool:
    """Delete a deployment; False when it was already gone."""
    try:
        client.endpoints.deployments.delete(deployment_id, endpoint_id=endpoint_id)
    except NotFoundError:
        return False
    return True


def delete_endpoint_if_empty(client: Together, endpoint_id: str) -> bool:
    """Delete an endpoint that has no deployment left (an empty endpoint only clutters the listing)."""
    try:
        if list_deployments(client, endpoint_id):
            return False
        client.endpoints.delete(endpoint_id)
    except NotFoundError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# What the artifact shows (pure)
# ---------------------------------------------------------------------------------------------------

def endpoint_rows(endpoints: list[EndpointInfo], replies: dict[str, str] | None = None,
                  notes: dict[str, str] | None = None) -> list[dict[str, str]]:
    """Rows of the ``<fold>-endpoints`` table: one per deployment (an endpoint without one gets a row too)."""
    replies, notes = replies or {}, notes or {}
    rows = []
    for ep in endpoints:
        parsed = parse_endpoint(ep.name)
        live = {d for d, w in ep.traffic if w > 0}
        for dep in ep.deployments or (None,):
            rows.append({
                "endpoint": ep.name,
                "epoch": str(parsed[1]) if parsed else "",
                "state": "" if dep is None else dep.state.removeprefix("DEPLOYMENT_STATE_"),
                "routed": "" if dep is None else ("yes" if dep.id in live else "no"),
                "hardware": "" if dep is None else dep.hardware,
                "replicas": "" if dep is None else f"{dep.min_replicas}-{dep.max_replicas}",
                "model": "" if dep is None else dep.model,
                "created": ep.created_at.strftime("%Y-%m-%d %H:%M UTC"),
                "smoke reply": replies.get(ep.name, ""),
                "note": notes.get(ep.name, ""),
            })
    return rows


def failure_row(endpoint: str, epoch: int, reason: str, rolled_back: bool = True) -> dict[str, str]:
    """The ``<fold>-endpoints`` row of a failed deploy: rolled back (nothing runs), or ROLLBACK FAILED
    (what is left is in the endpoint's own rows); ``reason`` says why."""
    return {"endpoint": endpoint, "epoch": str(epoch), "state": "ROLLED BACK" if rolled_back else "ROLLBACK FAILED",
            "routed": "no" if rolled_back else "", "hardware": "", "replicas": "0-0" if rolled_back else "",
            "model": "", "created": "", "smoke reply": "", "note": reason}


def local_row(path: str, epoch: int, adapter: str, reply: str) -> dict[str, str]:
    """The ``<fold>-endpoints`` row of a local epoch: an exported merged model instead of an endpoint."""
    return {"endpoint": path, "epoch": str(epoch), "state": "EXPORTED", "routed": "", "hardware": "local",
            "replicas": "", "model": adapter, "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "smoke reply": reply, "note": "merged model: transformers AutoModelForCausalLM.from_pretrained(path)"}
