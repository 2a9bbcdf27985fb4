"""Prefect tasks for GRPO on Together's post-training API (`epochwise.post_training` does the calls).

What makes it safe with money:

* `ResourceLease.ensure` runs under the fold's host lock and server lease (`tasks.locks.fold_guard`):
  it first looks for a live model resource of this fold in Together's list (one carrying an
  ``ew-<fold>-...`` session, or one a flow run of this fold recorded with the tag
  ``together-resource:<id>``), and creates one only when there is none, so two runs or a rerun never
  pay for a second resource. Before creating, Together's ``estimate-cost`` is shown and checked
  against ``train.budget_usd`` (`BudgetExceeded`: nothing provisioned). A create whose reply is lost
  is not sent again: the resource it made is found in Together's list (`pt.create_resource`).
* The run stops the resource (``stop?force=true``) when it ends, in a ``finally``, unless another run
  of the fold is training on it (a live session that is not this run's): that run stops it when it
  ends. The `reap_model_resources` task stops a live resource whose owning flow runs are all finished
  (the backstop after a crash), and Together itself stops one after ``inactive_timeout`` without
  operations.
* `train_grpo_epoch` is cached on the epoch key and SERIALIZABLE (`grpo_epoch_policy`): a second run
  of the same epoch waits for the first one's result and uses it, so a finished epoch is never
  trained (or provisioned for) again. Without a cached result (another machine, wiped result storage)
  Together's own session list is asked first: a session of the epoch that saved its checkpoints is
  used as the epoch's result (`epochwise.post_training.finished_epoch`).
* Within an epoch each operation's ``Idempotency-Key`` comes from (fold, epoch key, step,
  operation), and a rerun re-attaches to the epoch's session while it is still RUNNING, so a step
  that was applied before a crash returns its original operations instead of being applied again; when
  the session is gone the epoch restarts from the previous epoch's training checkpoint. It re-attaches
  only to a session a run of this Prefect server created (each run tags itself ``grpo-session:<name>``
  before the create and ``grpo-session:<name>:<id>`` when Together returns it: `left_by_this_server`);
  an active session of the epoch that no run here created is driven by a run on another machine,
  which this run follows (below) instead of driving it too.
* Among the runs of one host and of one Prefect server (workers on several machines), one run drives
  an epoch's session: it holds the epoch's drive lease (`ResourceLease.drive`: a host lock and the
  server lease ``epochwise-grpo-drive.<fold>.<model>.e<k>``) from before it looks for the session until the
  epoch ends. A second run waits there, then finds the epoch finished and uses its checkpoints; a
  killed driver's lease expires after ``fold_lease_s`` and the rerun then re-attaches to its session.
* Runs on two machines that share no Prefect server have no common lock, so both may create a
  resource and a session for the same epoch. After creating its session each run reads Together's
  session list: the oldest session of the epoch's name is kept, and a run whose session is not the
  oldest stops it (and its own resource, when nothing else trains on it), waits for the other run's
  epoch and uses its checkpoints (`ResourceLease.settle`, `pt.wait_finished`). It then follows that
  run: for each later epoch it waits for that run's session (giving it ``list_catchup_s`` to appear)
  instead of creating or driving one, so a session has one driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.context import TaskRunContext

from blocks.credentials import together_client
from epochwise import post_training as pt
from epochwise.config.ops import OpsConfig
from epochwise.config.together import TogetherConfig
from epochwise.config.train import TrainConfig
from epochwise.endpoints_api import with_project
from epochwise.epochs import EpochRecord
from epochwise.fold import fold_slug
from epochwise.rewards import load_rewards, read_prompt_rows
from epochwise.together_api import BudgetExceeded, TogetherFailure
from tasks.cancellation import _current_run_id, refuse_if_stopping
from tasks.locks import HostOnly, LeaseLost, ServerLease, fold_guard, serialized_on_host
from tasks.together import EpochSpec

RESOURCE_TAG = "together-resource:"
FOLD_TAG = "grpo-fold:"
SESSION_TAG = "grpo-session:"
ALIVE_STATES = ("RUNNING", "PENDING", "SCHEDULED", "PAUSED", "CANCELLING")


def _tag_run(tags: list[str], log: Any) -> None:
    run_id = _current_run_id()
    if run_id is None:
        return
    try:
        with get_client(sync_client=True) as prefect:
            run = prefect.read_flow_run(run_id)  # type: ignore[arg-type]
            missing = [t for t in tags if t not in run.tags]
            if missing:
                prefect.update_flow_run(run.id, tags=[*run.tags, *missing])
    except Exception as exc:  # the resource is still stopped by this run's finally and by Together's timeout
        log.warning(f"could not tag flow run {run_id} with {tags} ({exc}); the reaper cannot see this resource")


def _runs_tagged(tag: str) -> list[Any]:
    with get_client(sync_client=True) as prefect:
        return prefect.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


def fold_tags(fold: str) -> set[str]:
    """Every tag of this fold's flow runs on this Prefect server (the runs tagged ``grpo-fold:<fold>``)."""
    return {t for run in _runs_tagged(FOLD_TAG + fold_slug(fold)) for t in run.tags}


def fold_resource_ids(fold: str) -> set[str]:
    """Resource ids recorded by this fold's flow runs (tags ``together-resource:<id>``)."""
    return {t[len(RESOURCE_TAG) :] for t in fold_tags(fold) if t.startswith(RESOURCE_TAG)}


class ResourceLease:
    """The run's model resource: found or created on first need, stopped by `close`."""

    def __init__(self, fold: str, train: TrainConfig, together: TogetherConfig) -> None:
        self.fold, self.train, self.together = fold, train, together
        self.spec = pt.ResourceSpec.of(train.base_model, together.post_training, train.hyper.lora)
        self.resource_id: str | None = None
        self.price_per_hour: float | None = None
        self.sessions: set[str] = set()  # names of the sessions this run trained in
        # Set once another run's session of an epoch was older than this run's (`settle`): that run
        # trains the fold, and this one waits for its epochs instead of driving their sessions.
        self.following = False
        self.leftover: str | None = None  # this run's own resource, left when settle's stop of it failed

    def estimate(self, client: Any) -> float:
        if self.price_per_hour is None:
            self.price_per_hour = pt.price_per_hour(client, self.spec)
        return self.price_per_hour

    def ensure(self, client: Any, epoch: int, spent_usd: float) -> str:
        """The READY resource of this fold (found, else created after the budget check)."""
        log = get_run_logger()
        cfg = self.together.post_training
        price = self.estimate(client)
        epoch_usd = price * cfg.hours_per_epoch
        log.info(
            f"GRPO model resource: ${price:.2f}/hour, about ${epoch_usd:.2f} for epoch {epoch} "
            f"(post_training.hours_per_epoch={cfg.hours_per_epoch:g})"
        )
        budget = self.train.budget_usd
        if budget is not None and spent_usd + epoch_usd > budget:
            raise BudgetExceeded(
                f"epoch {epoch} would cost about ${epoch_usd:.2f} (${price:.2f}/hour x {cfg.hours_per_epoch:g} h); "
                f"${spent_usd:.2f} spent of the ${budget:.2f} budget"
            )
        if self.resource_id is not None and pt.resource_status(client, self.resource_id) == pt.READY:
            return self.resource_id
        self.resource_id = None  # stopped since (by another run of the fold, or by Together): find or create
        slug = fold_slug(self.fold)
        with self.guard():
            found = self._find(client, slug)
            if found is not None:
                log.info(f"re-using model resource {found.id} ({found.status}) of {self.fold}")
                rid = found.id
            else:
                refuse_if_stopping(f"a model resource for {self.fold}")
                created = pt.create_resource(
                    client,
                    self.spec,
                    lookup_s=self.together.list_catchup_s,
                    poll_s=self.together.list_poll_s,
                    claimed=lambda rid: bool(_runs_tagged(RESOURCE_TAG + rid)),
                )
                rid = created.id
                log.info(f"created model resource {rid} ({self.spec.generator_replicas} generator replica(s))")
            self.resource_id = rid
            _tag_run([RESOURCE_TAG + rid, FOLD_TAG + slug], log)  # before anything else can fail
            pt.wait_ready(client, rid, cfg, log=log.info)
        return rid

    def settle(self, client: Any, ours: pt.SessionInfo, log: Any) -> pt.SessionInfo:
        """The epoch's one session: ``ours``, or another run's older session of the epoch's name,
        whose epoch this run then waits for (`pt.wait_finished`).

        Runs on two machines that share no Prefect server hold no common lock: both can find no
        session of the epoch and create one, each on its own resource. Together's list then shows
        both, and every run keeps the oldest (`pt.active_sessions_named`, ``ours`` counted even when
        the list does not show it yet). A run whose session is not the oldest stops it, and its own
        resource when no other session is active there, leaves the fold's resource to the run that
        trains on it, and from then on waits for an active session of an epoch instead of driving it
        (`following`): one driver per session.
        """
        listed = {s.id: s for s in pt.active_sessions_named(client, ours.display_name or "")}
        first = min({**listed, ours.id: ours}.values(), key=lambda s: (s.created_at, s.id))
        if first.id == ours.id:
            return ours
        log.warning(
            f"session {first.id} of {ours.display_name} was created first (by another run, on resource "
            f"{first.resource_id}): stopping this run's session {ours.id} and waiting for that run's epoch"
        )
        pt.stop_session(client, ours.id)
        own, self.resource_id, self.following = self.resource_id, None, True
        _tag_run([RESOURCE_TAG + first.resource_id], log)  # this host's reaper sees a live owner meanwhile
        if own is not None and own != first.resource_id:
            busy = [s for s in pt.resource_sessions(client, own) if s.status in pt.SESSION_ACTIVE and s.id != ours.id]
            if not busy:
                try:
                    log.info(f"stopped model resource {own}: {pt.stop_resource(client, own)}")
                except Exception as exc:  # `close` tries again when the run ends
                    log.warning(f"could not stop model resource {own} yet ({exc})")
                    self.leftover = own
        return first

    def await_rival(self, client: Any, name: str, log: Any) -> pt.SessionInfo | None:
        """While following: the other run's session of epoch ``name`` once Together lists it, waiting up
        to ``list_catchup_s`` (that run may be between epochs); None when none appears (it is gone) or
        the epoch finished meanwhile (the caller's next look finds it)."""
        for read in range(math.ceil(self.together.list_catchup_s / self.together.list_poll_s) + 1):
            if read:
                time.sleep(self.together.list_poll_s)
            if pt.finished_epoch(client, name) is not None:
                return None
            active = pt.active_sessions_named(client, name)
            if active:
                return active[0]
        log.info(f"no session of {name} appeared in {self.together.list_catchup_s:.0f} s: this run trains it")
        return None

    def guard(self) -> Any:
        """The fold's host lock and server lease around a find-then-create (resource or session)."""
        wait = self.together.fold_lock_wait_s
        busy = TogetherFailure(f"fold {self.fold} is being provisioned by another run; waited {wait:.0f} s")
        return fold_guard(f"grpo-{fold_slug(self.fold)}", wait, self.together.fold_lease_s, busy)

    @contextlib.contextmanager
    def drive(self, epoch: int, finished: Callable[[], bool], log: Any) -> Iterator[ServerLease | HostOnly]:
        """Be the one run of this host and of this Prefect server that drives epoch ``epoch``'s session:
        hold the epoch's drive lease (`drive_lease_name`) until the epoch ends.

        A second run of the fold there, on another machine too, waits here for the first one's epoch
        and then finds it finished, instead of re-attaching to its running session as a second driver.
        While it waits it asks Together every ``list_poll_s`` whether the epoch ``finished()``, and goes
        on without the lease once it has: a slot its holder can no longer free (a Prefect server
        restarted with in-memory leases) holds nobody up after the epoch ends. A killed driver's hold
        ends with its process on its host and, on the server, when its lease expires (``fold_lease_s``);
        the rerun then re-attaches to the session it left. Yields the hold, whose ``check()`` the driver
        calls before each operation it sends (`still_driving`).
        """
        name, lease_s = drive_lease_name(self.fold, self.spec.base_model, epoch), self.together.fold_lease_s
        held = contextlib.ExitStack()
        hold: ServerLease | HostOnly = HostOnly()  # the epoch finished while this run waited: nothing to drive
        waiting = False
        while True:
            try:
                hold = held.enter_context(fold_guard(name, self.together.list_poll_s, lease_s, DriverBusy()))
                break
            except DriverBusy:
                if not waiting:
                    log.info(
                        f"epoch {epoch}: another run of {self.fold} drives its session (a killed run's hold "
                        f"ends within together.fold_lease_s={lease_s:.0f} s); waiting for that run's epoch"
                    )
                    waiting = True
                if finished():
                    break
        with held:
            yield hold

    def _find(self, client: Any, slug: str) -> pt.ResourceInfo | None:
        live = [
            r for r in pt.live_resources(client) if r.base_model == self.spec.base_model and r.generator_replicas >= 1
        ]
        if not live:
            return None
        tagged = fold_resource_ids(self.fold)
        for r in sorted(live, key=lambda r: (r.created_at, r.id)):
            if r.id in tagged or any(
                pt.fold_of_session(s.display_name) == slug for s in pt.resource_sessions(client, r.id)
            ):
                return r
        return None

    def close(self) -> None:
        """Stop this run's resources (and their sessions): a duplicate `settle` could not stop, and the
        fold's resource unless this run follows another one (which stops it); never raises."""
        if self.leftover is not None:
            self._stop(self.leftover)
            self.leftover = None
        if self.resource_id is None:
            return
        if self.following:  # the run this one followed trains on it, and stops it when it ends
            print(f"left model resource {self.resource_id} to the run training the fold on it")
        else:
            self._stop(self.resource_id)
        self.resource_id = None

    def _stop(self, resource_id: str) -> None:
        """Stop ``resource_id`` unless another run's session is active on it; says what to do when it could not."""
        try:
            client = together_client(self.together)
            others = [
                s.display_name
                for s in pt.resource_sessions(client, resource_id)
                if s.status in pt.SESSION_ACTIVE and s.display_name not in self.sessions
            ]
            if others:  # another run of the fold trains on it now; that run stops it when it ends
                print(f"left model resource {resource_id} running for session(s) {', '.join(map(str, others))}")
                return
            print(f"stopped model resource {resource_id}: {pt.stop_resource(client, resource_id)}")
        except Exception as exc:
            print(
                f"could not stop model resource {resource_id} ({exc}); the resource reaper stops it "
                "(prefect deployment run job-reaper/frequent), Together after post_training.inactive_timeout_s"
            )


class DriverBusy(Exception):
    """The epoch's drive lease is held by another run (`ResourceLease.drive`)."""


def drive_lease_name(fold: str, base_model: str, epoch: int) -> str:
    """``grpo-drive.<fold>.<8 hex of the base model>.e<k>``: one lease per fold, base model and epoch
    number, so the server keeps a bounded set of limits; runs of one fold and model with other settings
    take turns on an epoch, on the fold's one resource. (Dots never occur in a fold slug, so no fold's
    ``grpo-<fold>`` guard has this name.)"""
    model = hashlib.sha256(base_model.encode()).hexdigest()[:8]
    return f"grpo-drive.{fold_slug(fold)}.{model}.e{epoch}"


_LEASES: dict[str, ResourceLease] = {}


def register_lease(lease: ResourceLease) -> str:
    name = f"{lease.fold}|{id(lease)}"
    _LEASES[name] = lease
    return name


def release_lease(name: str) -> None:
    _LEASES.pop(name, None)


def session_claims(fold: str, name: str) -> tuple[bool, set[str]]:
    """What this Prefect server's runs of ``fold`` recorded about creating the session ``name``: whether
    one set out to (tag ``grpo-session:<name>``, written before the create) and the ids Together gave
    them (``grpo-session:<name>:<id>``, written as the create returns)."""
    tag, tags = SESSION_TAG + name, fold_tags(fold)
    return tag in tags, {t[len(tag) + 1 :] for t in tags if t.startswith(tag + ":")}


def left_by_this_server(existing: list[pt.SessionInfo], intent: bool, ids: set[str]) -> pt.SessionInfo | None:
    """Of an epoch's active sessions (oldest first), the one a run of this Prefect server created and
    left (killed or failed), which a rerun re-attaches to; None when they are all another machine's.

    A session this server's runs recorded is theirs. When one set out to create the session but
    recorded no id, it was killed before Together's reply reached it: the oldest session is taken as
    that one (a rival created in those same milliseconds would be driven twice, its steps still
    applied once by their idempotency keys). Any other session is a run's on a machine with another
    Prefect server, still driving it: this run follows it.
    """
    claimed = [s for s in existing if s.id in ids]
    if claimed:
        return claimed[0]
    return existing[0] if intent and not ids else None


def grpo_epoch_key(ctx: TaskRunContext, params: dict) -> str:
    return "together-grpo-epoch-" + params["spec"].key


def grpo_record(
    spec: EpochSpec, end: pt.FinishedEpoch, client: Any, metrics: dict[str, float] | None = None, **measured: Any
) -> EpochRecord:
    """The completed GRPO epoch ending at ``end``'s checkpoints; ``metrics`` and ``measured`` (losses,
    rewards, price, times) are what the run that trained it measured, when this run did."""
    return EpochRecord(
        fold=spec.fold,
        epoch=spec.epoch,
        backend="together",
        method="grpo",
        status="completed",
        job_id=end.training_checkpoint,
        model=f"projects/{with_project(client).project_id}/{end.model_path}",
        parent=spec.parent,
        metrics=metrics if metrics is not None else {"step": float(end.step)},
        **measured,
    )


def adopted_record(spec: EpochSpec, done: pt.FinishedEpoch, client: Any, log: Any) -> EpochRecord:
    """The record of an epoch that another run finished (Together's session list shows its checkpoints)."""
    log.warning(
        f"epoch {spec.epoch} already ran to its end in session {done.session_id} (no result of it in this "
        "machine's Prefect storage): using its checkpoints; its rewards and losses stay in that run's logs"
    )
    return grpo_record(spec, done, client)


def followed_record(
    spec: EpochSpec, rival: pt.SessionInfo, client: Any, together: TogetherConfig, log: Any
) -> EpochRecord:
    """The record of epoch ``spec`` once another run's session ``rival`` finished it (`pt.wait_finished`)."""
    log.info(f"epoch {spec.epoch}: waiting for session {rival.id} of another run to finish the epoch")
    return adopted_record(spec, pt.wait_finished(client, rival, together.poll_max_s), client, log)


def grpo_epoch_policy() -> CachePolicy:
    """Cached on the epoch key, `serialized_on_host`: a second run of the same epoch on this host waits
    for the first one's result and uses it, instead of training (and paying for) the epoch again. Runs
    on other machines are covered by the fold guard and Together's lists (`train_grpo_epoch`)."""
    return serialized_on_host(grpo_epoch_key)


@task(cache_policy=grpo_epoch_policy(), persist_result=True)
def train_grpo_epoch(
    spec: EpochSpec,
    lease_name: str,
    train_path: str,
    val_path: str,
    train: TrainConfig,
    together: TogetherConfig,
    spent_usd: float = 0.0,
) -> EpochRecord:
    """One GRPO epoch on the fold's model resource; cached on the epoch key (a done epoch is never redone)."""
    log = get_run_logger()
    lease = _LEASES[lease_name]
    client = together_client(together)
    name = pt.session_name(spec.fold, spec.epoch, spec.key)
    lease.sessions.add(name)
    # Prefect's cache (this task is SERIALIZABLE on the epoch key: `grpo_epoch_policy`) answers a rerun on
    # this machine; Together's own session list answers one elsewhere or after the results were wiped.
    done = pt.finished_epoch(client, name)
    if done is not None:
        return adopted_record(spec, done, client, log)
    if lease.following and (rival := lease.await_rival(client, name, log)) is not None:
        return followed_record(spec, rival, client, together, log)
    with lease.drive(spec.epoch, lambda: pt.finished_epoch(client, name) is not None, log) as hold:
        return drive_grpo_epoch(spec, lease, hold, client, name, train_path, val_path, train, together, spent_usd)


def drive_grpo_epoch(
    spec: EpochSpec,
    lease: ResourceLease,
    hold: ServerLease | HostOnly,
    client: Any,
    name: str,
    train_path: str,
    val_path: str,
    train: TrainConfig,
    together: TogetherConfig,
    spent_usd: float,
) -> EpochRecord:
    """`train_grpo_epoch` under the epoch's drive lease: the epoch's session (found, left by a killed
    run of this server, or created), every step of it, and the record; or another run's record."""
    log = get_run_logger()
    cfg = together.post_training
    done = pt.finished_epoch(client, name)  # the run this one waited for (`ResourceLease.drive`) finished it
    if done is not None:
        return adopted_record(spec, done, client, log)
    rid = lease.ensure(client, spec.epoch, spent_usd)
    started = datetime.now(UTC)
    clock = time.monotonic()
    with lease.guard():  # find-then-create of the epoch's session, one at a time across machines too
        done = pt.finished_epoch(client, name)  # another machine's run may have finished it meanwhile
        if done is not None:
            return adopted_record(spec, done, client, log)
        existing = sorted(  # oldest first, as every machine orders them (`pt.active_sessions_named`)
            (s for s in pt.resource_sessions(client, rid) if s.display_name == name and s.status in pt.SESSION_ACTIVE),
            key=lambda s: (s.created_at, s.id),
        )
        mine: pt.SessionInfo | None = None
        left = None
        if existing and not lease.following:
            left = left_by_this_server(existing, *session_claims(spec.fold, name))
        if existing and left is None:  # another run trains the epoch: the one this run follows, or another machine's
            oldest = existing[0]
            lease.following = True
        else:
            if left is not None:  # left by a killed or failed run here (still starting, or running)
                mine = left if left.status == pt.RUNNING else pt.wait_session(client, left.id, cfg)
                log.info(
                    f"epoch {spec.epoch}: re-attaching to session {mine.id} (step {mine.step}); "
                    "applied steps are not repeated"
                )
            else:
                refuse_if_stopping(f"epoch {spec.epoch}'s session")
                _tag_run([SESSION_TAG + name], log)  # before the create: a kill before its reply is still ours
                mine = pt.create_session(
                    client,
                    rid,
                    name,
                    train.hyper,
                    spec.parent,
                    cfg,
                    wandb_project=train.wandb_project,
                    created=lambda sid: _tag_run([f"{SESSION_TAG}{name}:{sid}"], log),
                )
                log.info(
                    f"epoch {spec.epoch}: session {mine.id}" + (f" resumed from {spec.parent}" if spec.parent else "")
                )
            oldest = lease.settle(client, mine, log)
    if mine is None or oldest.id != mine.id:  # another run trains this epoch: wait for it, outside the fold guard
        return followed_record(spec, oldest, client, together, log)
    session, rid = mine, mine.resource_id
    lease.following = False  # this run drives the epoch's session (the run it followed, if any, is gone)
    rewards = load_rewards(train.rewards)
    rows = read_prompt_rows(train_path)
    tokenizer = pt.load_tokenizer(train.grpo.tokenizer or train.base_model)
    ops = pt.Operations(client, session.id, cfg, before_post=lambda: still_driving(hold, lease))
    epoch = pt.GRPOEpoch(
        ops,
        tokenizer,
        rows,
        rewards,
        train.grpo,
        train.hyper,
        spec.fold,
        spec.key,
        before_rewards=lambda: pt.extend_expiry(client, rid, cfg.extend_expiry_s),
    )
    progress = create_progress_artifact(0.0, description=f"{spec.fold} GRPO epoch {spec.epoch}: steps done")
    results = []
    for index in range(epoch.n_steps):
        result = epoch.step(index)
        results.append(result)
        update_progress_artifact(
            progress,
            100 * (index + 1) / epoch.n_steps,
            description=f"{spec.fold} GRPO epoch {spec.epoch}: step {index + 1}/{epoch.n_steps}, "
            f"mean reward {result.mean_reward:.3f}",
        )
        log.info(
            f"epoch {spec.epoch} step {index + 1}/{epoch.n_steps}: mean reward {result.mean_reward:.4f}, "
            f"loss {result.loss:.4f}, {result.zero_std_groups}/{result.groups} groups with equal rewards"
        )
    val_reward = epoch.evaluate(read_prompt_rows(val_path))
    end = epoch.checkpoints()
    pt.stop_session(client, session.id)
    hours = (time.monotonic() - clock) / 3600
    zero = sum(r.zero_std_groups for r in results) / max(sum(r.groups for r in results), 1)
    if zero > 0.5:
        log.warning(f"epoch {spec.epoch}: {zero:.0%} of prompt groups had equal rewards and taught nothing")
    metrics = {
        "train_reward": sum(r.mean_reward for r in results) / max(len(results), 1),
        "frac_reward_zero_std": zero,
        "step": float(end.step),
    }
    for r in results:
        for k, v in r.reward_means.items():
            metrics[k] = metrics.get(k, 0.0) + v / len(results)
    return grpo_record(
        spec,
        end,
        client,
        train_loss=results[-1].loss if results else None,
        val_reward=val_reward,
        metrics=metrics,
        price_usd=round((lease.price_per_hour or 0.0) * hours, 4),
        started_at=started,
        finished_at=datetime.now(UTC),
    )


def still_driving(hold: ServerLease | HostOnly, lease: ResourceLease) -> None:
    """Raise `LeaseLost` when the epoch's drive lease expired under this run (a Prefect server away for
    longer than ``fold_lease_s``): another run may have taken it and re-attached to this session, so this
    one sends nothing more. It leaves the fold's resource to a run that holds the lease now, which stops
    it when it ends; with none, `ResourceLease.close` stops it as after any failure."""
    try:
        hold.check()
    except LeaseLost:
        lease.following = isinstance(hold, ServerLease) and hold.taken()
        raise


def _owners_alive(resource_id: str) -> bool | None:
    """True when a flow run owning the resource is still alive, False when all are finished, None: no owner known."""
    runs = _runs_tagged(RESOURCE_TAG + resource_id)
    if not runs:
        return None
    return any((r.state.type.value if r.state else "") in ALIVE_STATES for r in runs)


@task(cache_policy=NO_CACHE, tags=[OpsConfig().together_api_tag])
def reap_model_resources(together: TogetherConfig) -> list[str]:
    """Stop (``force=true``) every live model resource of this project's runs that no live run owns:
    its owning flow runs all finished, or it carries ``ew-`` sessions and no owner is known."""
    log = get_run_logger()
    client = together_client(together)
    stopped = []
    for r in pt.live_resources(client):
        alive = _owners_alive(r.id)
        ours = alive is not None or any(pt.fold_of_session(s.display_name) for s in pt.resource_sessions(client, r.id))
        if not ours or alive:
            continue
        log.warning(f"stopping model resource {r.id} ({r.status}, {r.base_model}): no live run owns it")
        try:
            pt.stop_resource(client, r.id)
            stopped.append(r.id)
        except Exception as exc:
            log.error(f"could not stop model resource {r.id}: {exc}")
    return stopped
