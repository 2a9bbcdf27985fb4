"""Helpers shared by several test modules: folds, test settings and log reading.

Test modules import from here, never from one another (a helper defined in a test module runs that
module's imports in every importer, and a ``test_``-named helper is collected as a test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from epochwise.config import load_settings
from epochwise.config.data import RecordMapping
from epochwise.config.deploy import DeployConfig
from epochwise.config.local import LocalConfig, TinyModel
from epochwise.config.together import PostTrainingConfig, TogetherConfig
from epochwise.config.train import GRPOParams, HyperParams, TrainConfig
from epochwise.prepare import prepare
from epochwise.records import read_records

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_RECORDS = REPO / "examples" / "records" / "games"
# The example records carry their own mapping (data.mapping) beside them; the project file sets the split.
EXAMPLE_MAPPING = EXAMPLE_RECORDS / "epochwise.yaml"

# --- Together backend -----------------------------------------------------------------------------

BASE = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
DEPLOY = DeployConfig(poll_s=0.001, ready_deadline_s=30)
# fold_lock_wait_s: a deadlock still fails the test, but a loaded CI box (the harness's SQLite answering
# "database is locked" for a while) is not one; 30 s once failed a parallel sweep trial there.
FAST = TogetherConfig(poll_initial_s=0.005, poll_max_s=0.02, file_poll_s=0.005, fold_lock_wait_s=120)


def train_with_losses(fake, root: Path, name: str, losses: dict[int, tuple[float, float]]) -> tuple[list, Path]:
    """A real ``epoch-train`` run of ``len(losses)`` epochs on the fake with scripted (train, val) losses."""
    from flows.epoch_train import epoch_train

    fake.script.losses = losses
    fold = make_fold(root, name, f"deploy-{name}")
    return epoch_train(str(fold), train_cfg(len(losses)), FAST), fold


def train_cfg(epochs: int = 3, **kw) -> TrainConfig:
    """Together-backend training settings on the fake's base model."""
    return TrainConfig(backend="together", base_model=BASE, epochs=epochs, **kw)


# A Together outage in the suite lasts this long (seconds); `EW_TEST_OUTAGE_S=40` runs the full-length one.
OUTAGE_S = float(os.environ.get("EW_TEST_OUTAGE_S", "3"))


def make_fold(root: Path, name: str, tag: str, n_train: int = 6, n_val: int = 2) -> Path:
    """A tiny valid fold; ``tag`` makes its content (and so every cache key) unique to one test."""
    fold = root / name
    fold.mkdir(parents=True)

    def convo(i: int) -> str:
        return json.dumps(
            {
                "messages": [
                    {"role": "system", "content": f"fold {tag}"},
                    {"role": "user", "content": f"What is {i} + {i}?"},
                    {"role": "assistant", "content": str(2 * i)},
                ]
            }
        )

    (fold / "train.jsonl").write_text("".join(convo(i) + "\n" for i in range(n_train)))
    (fold / "val.jsonl").write_text("".join(convo(100 + i) + "\n" for i in range(n_val)))
    return fold


def add_preference_files(fold: Path, tag: str, n_train: int = 6, n_val: int = 2) -> Path:
    """Write DPO preference rows (``train_dpo.jsonl`` / ``val_dpo.jsonl``) into ``fold`` (made with or
    without chat rows); ``tag`` makes their content unique to one test."""
    fold.mkdir(parents=True, exist_ok=True)

    def pair(i: int) -> str:
        return json.dumps(
            {
                "input": {
                    "messages": [
                        {"role": "system", "content": f"prefs {tag}"},
                        {"role": "user", "content": f"{i} + {i}?"},
                    ]
                },
                "preferred_output": [{"role": "assistant", "content": str(2 * i)}],
                "non_preferred_output": [{"role": "assistant", "content": f"maybe {2 * i + 1}, hard to say"}],
            }
        )

    (fold / "train_dpo.jsonl").write_text("".join(pair(i) + "\n" for i in range(n_train)))
    (fold / "val_dpo.jsonl").write_text("".join(pair(100 + i) + "\n" for i in range(n_val)))
    return fold


def run_logs(state) -> list[str]:
    """Every log line of a flow run (its task runs included), read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    run_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=run_filter)]


# --- Harmony ---------------------------------------------------------------------------------------

# The mapping of the games records onto a story -> context conversation.
STORY = RecordMapping(
    system_prompt="You turn game stories into JSON context.",
    user_template="Generate a detailed socialized context for the following story:\n\n{story}",
    assistant_field="context",
)

# --- Local backend ---------------------------------------------------------------------------------

# A very small tiny model so CPU tests stay fast; same code path as the default one.
TEST_TINY = TinyModel(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

# A higher LR than the default so the random-init test model learns visibly in 2 short epochs.
HYPER = HyperParams(learning_rate=2e-3, lr_scheduler="cosine", warmup_ratio=0.1, min_lr_ratio=0.1)


def example_fold(target: Path) -> Path:
    """The README's example fold (games records -> train.jsonl + val.jsonl) under ``target``."""
    prepare(
        read_records(EXAMPLE_RECORDS).records,
        target,
        load_settings(REPO / "epochwise.yaml", records_file=EXAMPLE_MAPPING).data,
    )
    return target


def local_config(tmp_path: Path, **changes) -> LocalConfig:
    """Settings used by the local tests: the test tiny model cached under ``tmp_path``, one thread."""
    base = dict(
        cache_dir=tmp_path / "models",
        tiny=TEST_TINY,
        seq_length=256,
        micro_batch_size=4,
        threads=1,
        sample_max_new_tokens=8,
        checkpoint_every=2,
    )
    base.update(changes)
    return LocalConfig(**base)


def resume_config(root: Path) -> LocalConfig:
    """One row per step, so the epoch has enough steps to be killed in the middle."""
    return local_config(root, micro_batch_size=1, packing=False, checkpoint_every=3)


def labelled_spans(row) -> list[list[int]]:
    """Runs of consecutive labelled token ids of a `epochwise.local.data.TokenRow`."""
    from epochwise.local.data import IGNORE

    spans, current = [], []
    for token, label in zip(row.input_ids, row.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def epoch_train_child(
    fold: Path,
    epochs: int,
    train: TrainConfig | None = None,
    together: TogetherConfig | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    **train_kw,
) -> subprocess.Popen:
    """``epoch-train`` on the Together backend in a child process sharing this test's Prefect API and
    result storage, so a test can SIGKILL or SIGTERM it mid-run (``train``/``together``: other settings;
    ``log``: where its output goes, else nowhere; ``env``: the child's environment instead, e.g. a real
    server's and the fake's; ``train_kw``: changes to the default ``train_cfg``, e.g. ``method="dpo"``)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH

    params = {
        "fold": str(fold),
        "train": (train or train_cfg(epochs, **train_kw)).model_dump(mode="json"),
        "together": (together or FAST).model_dump(mode="json"),
    }
    if env is None:
        env = {
            **os.environ,
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()),
        }
    env = {**env, "PYTHONPATH": str(REPO)}
    code = "import json,sys; from flows.epoch_train import epoch_train; epoch_train(**json.loads(sys.argv[1]))"
    out = log.open("w") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(params)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        )
    finally:
        if log:
            out.close()


# --- Counting work at a library boundary ----------------------------------------------------------


class FileHashCounter:
    """Counts how often each of ``paths`` had its bytes run through ``hashlib.sha256``, by wrapping
    hashlib itself (the boundary), not the project's code: a digest equal to a file's sha256 is a hash
    of that file's bytes, whoever computed it. ``counter.of(path)``."""

    def __init__(self, monkeypatch, *paths: Path) -> None:
        import hashlib

        real = hashlib.sha256
        self.digests: list[str] = []
        self.wanted = {str(p): real(Path(p).read_bytes()).hexdigest() for p in paths}
        seen = self.digests

        class Counting:
            def __init__(self, data: bytes = b"", **kwargs) -> None:
                self._inner = real(data, **kwargs)

            def update(self, data) -> None:
                self._inner.update(data)

            def hexdigest(self) -> str:
                digest = self._inner.hexdigest()
                seen.append(digest)
                return digest

            def digest(self) -> bytes:
                digest = self._inner.digest()
                seen.append(digest.hex())
                return digest

            def __getattr__(self, name):
                return getattr(self._inner, name)

        monkeypatch.setattr(hashlib, "sha256", Counting)

    def reset(self) -> None:
        self.digests.clear()

    def of(self, path: Path) -> int:
        """Hashes of ``path``'s bytes (as they were when the counter was made) since the last reset."""
        return self.digests.count(self.wanted[str(path)])


def count_check_file(monkeypatch) -> list[str]:
    """Paths passed to the together SDK's ``check_file`` (the last step of a full validation), by
    wrapping the SDK's function; the real check still runs."""
    import together.lib

    real = together.lib.check_file
    calls: list[str] = []

    def counting(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(together.lib, "check_file", counting)
    return calls


HOST = """
import json, sys, threading, time
from pathlib import Path
from prefect import flow
from epochwise.config.together import TogetherConfig
from epochwise.config.train import TrainConfig
from flows.epoch_train import epoch_train

folds, train, together, ready, go = json.loads(sys.argv[1])

@flow
def warm_up() -> None:  # starts this host's own ephemeral API before the race
    pass

warm_up()
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.05)
jobs = {}

def run(fold):
    records = epoch_train(fold, TrainConfig(**train), TogetherConfig(**together))
    jobs[Path(fold).name] = [r.job_id for r in records]

threads = [threading.Thread(target=run, args=(fold,)) for fold in folds]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("JOBS " + json.dumps(jobs), flush=True)
"""


T = TypeVar("T")


def wait_for(
    done: Callable[[], T],
    what: str,
    *,
    alive: Sequence[subprocess.Popen] = (),
    explain: Callable[[], str] = str,
    timeout_s: float = 300.0,
    every_s: float = 0.05,
) -> T:
    """Call ``done`` every ``every_s`` until it returns something true, and return that. Fails with
    ``what`` (and ``explain()``, e.g. a log's tail) after ``timeout_s``, a hang guard on a loaded machine
    rather than a speed assertion, or as soon as a process in ``alive`` exits first."""
    deadline = time.monotonic() + timeout_s
    while not (found := done()):
        for child in alive:
            assert child.poll() is None, f"{what} (a process exited with {child.returncode})\n{explain()}"
        assert time.monotonic() < deadline, f"{what} (within {timeout_s:.0f} s)\n{explain()}"
        time.sleep(every_s)
    return found


class Hosts:
    """Processes standing for machines: each its own PREFECT_HOME (own file locks, caches and result
    storage) and its own ephemeral API unless ``api_url`` names a shared Prefect server."""

    def __init__(
        self,
        tmp_path: Path,
        names: list[str],
        folds: list[str],
        epochs: int = 2,
        api_url: str | None = None,
        train: TrainConfig | None = None,
        together: TogetherConfig | None = None,
    ):
        """``train`` defaults to `train_cfg` of ``epochs``, ``together`` to `FAST` with a 50 ms list poll."""
        self.homes, self.children = [], []
        fast = together or FAST.model_copy(update={"list_poll_s": 0.05})
        train = train or train_cfg(epochs)
        for name in names:
            home = tmp_path / name
            home.mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
            env.update(
                PREFECT_HOME=str(home),
                PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
                PYTHONPATH=str(REPO),
            )
            if api_url:
                env["PREFECT_API_URL"] = api_url
            args = [folds, train.model_dump(mode="json"), fast.model_dump(mode="json")]
            args += [str(home / "ready"), str(home / "go")]
            with (home / "out.log").open("w") as out:
                child = subprocess.Popen(
                    [sys.executable, "-c", HOST, json.dumps(args)], env=env, cwd=REPO, stdout=out, stderr=out
                )
            self.homes.append(home)
            self.children.append(child)

    def log(self, i: int) -> str:
        return (self.homes[i] / "out.log").read_text()

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """`wait_for` while every host lives; a host that exits fails the test with its log's tail."""
        wait_for(condition, what, alive=self.children, explain=self.exited_logs)

    def exited_logs(self) -> str:
        return "\n".join(self.log(i)[-3000:] for i, child in enumerate(self.children) if child.poll() is not None)

    def wait_ready(self) -> None:
        self.wait_for(lambda: all((home / "ready").exists() for home in self.homes), "a host never started")

    def go(self, i: int) -> None:
        (self.homes[i] / "go").touch()

    def finish(self) -> list[dict[str, list[str]]]:
        """Wait for every host; the job ids per epoch each one reported, per fold."""
        for i, child in enumerate(self.children):
            assert child.wait(timeout=600) == 0, self.log(i)[-3000:]
        reported = []
        for i in range(len(self.children)):
            (line,) = [x for x in self.log(i).splitlines() if x.startswith("JOBS ")]
            reported.append(json.loads(line.removeprefix("JOBS ")))
        return reported

    def kill(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()


# --- GRPO on Together's post-training API ------------------------------------------------------

PT = FAST.model_copy(update={"post_training": PostTrainingConfig(poll_s=0.001, ready_deadline_s=30, op_deadline_s=30)})
# For two hosts, each starting its own Prefect API: host B may take a while to start its flow run on a
# loaded machine, and host A waits that long for READY or on a held step (hang guards, not speed).
HOSTS_PT = PT.model_copy(
    update={
        "list_poll_s": 0.05,
        "post_training": PostTrainingConfig(poll_s=0.02, ready_deadline_s=300, op_deadline_s=300),
    }
)
REWARDS = '''
def letter_a(prompts, completions, target, **kwargs):
    """Share of the completion's characters that are the row's target letter."""
    return [c[0]["content"].count(t) / max(len(c[0]["content"]), 1) for c, t in zip(completions, target)]
'''


def grpo_fold(root: Path, name: str, tag: str, n_train: int = 8, n_val: int = 2) -> tuple[Path, str]:
    """A fold of prompt rows (``messages`` + a ``target`` column) and a reward file beside it."""
    fold = root / name
    fold.mkdir(parents=True)

    def row(i: int) -> str:
        return json.dumps(
            {
                "messages": [
                    {"role": "system", "content": f"fold {tag}"},
                    {"role": "user", "content": f"Write letters, prompt {i}"},
                ],
                "target": "a",
            }
        )

    (fold / "train.jsonl").write_text("".join(row(i) + "\n" for i in range(n_train)))
    (fold / "val.jsonl").write_text("".join(row(100 + i) + "\n" for i in range(n_val)))
    (root / "rewards.py").write_text(REWARDS)
    return fold, f"{root / 'rewards.py'}:letter_a"


def grpo_cfg(reward: str, epochs: int = 2, **kw):
    return train_cfg(
        epochs,
        method="grpo",
        rewards=[reward],
        hyper=HyperParams(learning_rate=1e-4),
        grpo=GRPOParams(num_generations=4, max_new_tokens=8, prompts_per_step=2, tokenizer="bytes"),
        **kw,
    )


def epoch_sessions(pt, fold: str, epoch: int) -> list:
    return [s for s in pt.sessions.values() if s.body["display_name"].startswith(f"ew-{fold}-e{epoch}-")]


def operation_posts(fake) -> int:
    """How many operation POSTs the fake received, resends included (one driver sends each once)."""
    return sum(n for route, n in fake.counts.items() if route.startswith("POST") and "/operations/" in route)


# --- the installed CLI and a records directory ------------------------------------------------


def run_cli(args: list[str], storage: Path, cwd: Path) -> tuple[int, list[str]]:
    """Run the ``epochwise`` script against the test harness's API; returns (exit code, screen lines)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(storage)}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "epochwise"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )
    return done.returncode, [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def records_dir(tmp_path: Path) -> Path:
    """A records directory under ``tmp_path`` with its own mapping (``epochwise.yaml``) beside 20 rows."""
    records = tmp_path / "records"
    records.mkdir()
    rows = [{"q": f"question {i}", "a": f"answer {i}", "b": f"other {i}"} for i in range(20)]
    (records / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (records / "epochwise.yaml").write_text("data:\n  mapping:\n    user_template: 'Q: {q}'\n    assistant_field: a\n")
    return records


# --- local LoRA (torch, peft and transformers imported by the caller's first use) ------------------


def lora_model(seed: int = 0, dropout: float = 0.0, **config_extra):
    """A 2-layer Llama with peft LoRA on every linear and non-zero ``lora_B`` (peft starts it at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **config_extra,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():  # peft starts lora_B at zero: make the update non-zero so it is tested
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model
