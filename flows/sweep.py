"""``sweep``: a hyper-parameter sweep of a fold, one epoch chain per trial, bad chains pruned between epochs.

Steps:
1. read the search space (YAML: config fields -> a value, a list, or a range), validate the fold; open
   the Optuna study in ``<fold>/sweeps/<name>/journal.log`` (created, or resumed: a trial a killed run
   left RUNNING is trained again first, with its recorded parameters);
2. Together: upload the fold's files once (the same cached uploads every trial's chain then finds) and
   price one chain with Together's estimate-price;
3. keep at most ``sweep.parallel`` trials training (a Prefect global concurrency limit
   ``epochwise-sweep-<fold>-<name>``): ask Optuna for a trial only when its chain's estimate fits in the
   budget left (spent + what running trials may still spend), then run ``epoch-train`` for it as a
   subflow (shown under this run in the UI). Each trial's epochs have their own epoch keys, so its jobs
   are its own; after each epoch it reports the validation loss, and the pruner (median) may stop it
   before the next epoch's job is submitted. The trial's ``train.budget_usd`` is what the sweep's budget
   leaves it, so epoch-train's own check stops it before an epoch that would exceed the sweep's budget;
4. publish ``<fold>-sweep`` (table: trial x epoch validation loss, parameters, state, price) and
   ``<fold>-sweep-plot`` (the picture), write ``sweep.png`` / ``sweep.md`` beside the journal, and
   return the best (trial, epoch) over all epochs of all trials, pruned ones included.

Resume rule: finished trials are never redone; a trial left RUNNING reruns its chain, which skips its
finished epochs (epoch-train's cache), re-attaches to a Together job still running (found by its
suffix) and takes the pruning decisions already recorded, so it creates no duplicate job. A failed
chain leaves its trial RUNNING (the rerun retries it) and fails the sweep after the other trials.

    epochwise sweep folds/games --space sweep.yaml --trials 6 --budget 20
    prefect deployment run sweep/games           # the space in <fold>/sweep.yaml; --param space=... for another
"""

from __future__ import annotations

import contextvars
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from prefect import flow

from epochwise import sweep as sw
from epochwise.config.data import DataConfig
from epochwise.config.harmony import HarmonyConfig
from epochwise.config.local import LocalConfig
from epochwise.config.ops import OpsConfig
from epochwise.config.sweep import SweepConfig
from epochwise.config.together import TogetherConfig
from epochwise.config.train import TrainConfig
from epochwise.epochs import val_stalled
from epochwise.fold import Fold
from epochwise.problems import UserError
from flows.epoch_train import epoch_train
from tasks.cancellation import stop_chains_on_interrupt
from tasks.data import validate_files
from tasks.locks import exclusive_lock
from tasks.methods import TrainContext, training_method
from tasks.sweep import (
    SweepRef,
    admit_trial,
    estimate_chain_usd,
    fail_trial,
    finish_trial,
    open_sweep,
    publish_sweep,
    trial_settings,
    trial_slot,
    trial_slots,
)
from tasks.together import resolve_backend

SPACE_FILE = "sweep.yaml"  # the search space the `sweep/<fold>` deployment reads from the fold by default
SWEEP_LOCK_WAIT_S = 10.0  # a second run of the same sweep fails after this, instead of training twice


@flow(name="sweep", log_prints=True, validate_parameters=True)
def sweep(
    fold: str,
    space: str | dict[str, Any],
    name: str | None = None,
    sweep: SweepConfig = SweepConfig(),
    train: TrainConfig = TrainConfig(),
    together: TogetherConfig = TogetherConfig(),
    local: LocalConfig = LocalConfig(),
    harmony: HarmonyConfig = HarmonyConfig(),
    ops: OpsConfig = OpsConfig(),
    data: DataConfig = DataConfig(),
) -> dict[str, Any]:
    """Sweep ``fold`` over ``space`` (a YAML file, or its mapping) with ``sweep.trials`` trials; returns
    the best (trial, epoch) and the trials' states."""
    parsed = sw.read_space(space) if isinstance(space, str) else sw.parse_space(space)
    name = name or (Path(space).stem if isinstance(space, str) else "sweep")
    backend = resolve_backend(train.backend, together)
    if train.method == "grpo":
        raise UserError("a sweep minimises the validation loss; GRPO epochs are ranked by reward (use sft or dpo)")
    train = train.model_copy(update={"backend": backend})  # every trial on the backend resolved once
    ctx = TrainContext(Fold.of(fold), fold, train, together, local, harmony, ops, data)
    validate_files(ctx.fold.jsonl, data.max_line_bytes)
    if sweep.sampler == "grid" and sweep.trials > parsed.grid_size():
        print(f"the grid has {parsed.grid_size()} point(s); {sweep.trials} trials asked, {parsed.grid_size()} run")
        sweep = sweep.model_copy(update={"trials": parsed.grid_size()})
    ref = SweepRef(fold, name, parsed, sweep)
    busy = UserError(f"sweep {name} of {ctx.fold.name} is already running (waited {SWEEP_LOCK_WAIT_S:.0f} s)")
    # A file lock in the sweep's own directory: a second run of the same sweep fails instead of training
    # its trials twice (the epoch jobs themselves are guarded by epoch-train's own locks and keys).
    with exclusive_lock("sweep", SWEEP_LOCK_WAIT_S, busy, ref.directory):
        resume = open_sweep(fold, parsed, name, sweep)
        estimate = None
        if backend == "together":
            training_method(ctx, backend).prepare(ctx)  # upload once: every trial's upload is then a cache hit
            estimate = estimate_chain_usd(fold, _priced(train, parsed), local, harmony, together)
            print(f"one chain: ~${estimate:.2f}" if estimate is not None else "one chain: no price estimate")
        parallel = sweep.parallel or (1 if backend == "local" else 2)
        limit = trial_slots(ref, parallel)
        states = _run_trials(ref, resume, parallel, limit, estimate, train, together, local, harmony, ops, data)
    summary = _summary(states, sweep)
    best = publish_sweep(ref, train.epochs, summary)
    print(summary)
    if best:
        print(f"best: trial {best['trial']} epoch {best['epoch']} (val loss {best.get('val_loss')}, model {best.get('model')})")
    failed = [n for n, s in states.items() if s.startswith("failed")]
    if failed:
        raise RuntimeError(f"trial(s) {', '.join(map(str, failed))} failed; rerun the sweep to retry them")
    return {"sweep": name, "best": best, "trials": states}


def _run_trials(ref: SweepRef, resume: list[int], parallel: int, limit: str, estimate: float | None,
                *sections: Any) -> dict[int, str]:
    """Resume unfinished trials, then ask for new ones while there is room, the count and the budget.

    Each trial's chain runs in a thread of its own as a subflow of this run (the context copied, as
    Prefect's thread pool task runner does), not inside a task: a task's transaction would hold back
    the commits (and upload locks) of every task of the chain until the whole chain ended.
    """
    started = len(ref.open().trials())
    active: dict[Future, int] = {}
    states: dict[int, str] = {}
    budget_stop = False
    # Signals reach only this thread: a cancel's SIGTERM or Ctrl-C stops every trial's chain from here.
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="trial") as pool, stop_chains_on_interrupt():
        while True:
            while len(active) < parallel and (resume or (started < ref.cfg.trials and not budget_stop)):
                if resume:
                    number = resume.pop(0)
                else:
                    number = admit_trial(ref, estimate)
                    if number is None:  # the next chain would not fit in the budget
                        budget_stop = True
                        break
                    started += 1
                args = (ref, number, limit, estimate, *sections)
                active[pool.submit(contextvars.copy_context().run, _trial, *args)] = number
            if not active:
                return states
            done, _ = wait(active, return_when=FIRST_COMPLETED)
            for future in done:
                number = active.pop(future)
                try:
                    states[number] = future.result()
                except Exception as exc:  # the chain failed: its trial stays RUNNING for the next run
                    states[number] = f"failed: {exc}"
            budget_stop = False  # a finished trial may have left room (a pruned chain spends less)


def _trial(ref: SweepRef, number: int, limit: str, estimate: float | None, train: TrainConfig,
           together: TogetherConfig, local: LocalConfig, harmony: HarmonyConfig, ops: OpsConfig,
           data: DataConfig) -> str:
    """One trial: its settings, one slot of the sweep's limit, its epoch chain as a subflow."""
    trial_train, trial_local = trial_settings(ref, number, train, local, estimate)
    link = ref.link(number)
    chain = epoch_train.with_options(flow_run_name=link.label)
    with trial_slot(limit):
        try:  # the value the chain returned, not the state's copy of it (see epochwise.cli.common.run_ended)
            records = chain(ref.fold, trial_train, together, trial_local, harmony, ops, data, trial=link)
        except Exception as exc:
            fail_trial(ref, number, str(exc))
            raise
    stalled = val_stalled(records, trial_train.stop_when_val_worsens)
    return finish_trial(ref, number, records, trial_train.epochs, stalled)


def _priced(train: TrainConfig, space: sw.Space) -> TrainConfig:
    """The settings one chain is priced with: the space's fixed values, and its most epochs."""
    params = dict(space.fixed())
    epochs = next((d for d in space.varying if d.path == "train.epochs"), None)
    if epochs is not None:
        params["train.epochs"] = int(max(epochs.values))
    priced, _ = sw.trial_settings(params, train, LocalConfig())
    return priced


def _summary(states: dict[int, str], cfg: SweepConfig) -> str:
    counts: dict[str, int] = {}
    for state in states.values():
        key = "failed" if state.startswith("failed") else state
        counts[key] = counts.get(key, 0) + 1
    shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing to do"
    budget = f", budget ${cfg.budget_usd:.2f}" if cfg.budget_usd is not None else ""
    return f"{len(states)} trial(s) this run: {shown} ({cfg.sampler} sampler, {cfg.pruner} pruner{budget})"
