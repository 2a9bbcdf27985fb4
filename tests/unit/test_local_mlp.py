"""The two-activation gated-SiLU MLP gives autograd's values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from epochwise.local.mlp import fuse_swiglu, swiglu


def test_swiglu_matches_silu_times_up():
    generator = torch.Generator().manual_seed(0)
    gate = torch.randn(6, 10, generator=generator, requires_grad=True)
    up = torch.randn(6, 10, generator=generator, requires_grad=True)
    weights = torch.randn(6, 10, generator=generator)
    out = swiglu(gate, up)
    reference = torch.nn.functional.silu(gate) * up
    assert torch.equal(out, reference)
    got = torch.autograd.grad((out * weights).sum(), (gate, up))
    want = torch.autograd.grad((reference * weights).sum(), (gate, up))
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_model_matches_and_keeps_fewer_activations():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2
    )
    reference = LlamaForCausalLM(config)
    fused = copy.deepcopy(reference)
    assert fuse_swiglu(fused) == 2
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))

    def run(model):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss, grads, sum(saved)

    loss, grads, saved = run(reference)
    fused_loss, fused_grads, fused_saved = run(fused)
    assert torch.equal(fused_loss, loss)
    for a, b in zip(fused_grads, grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert fused_saved < saved


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_lora_down_projection_keeps_only_gate_and_up_and_matches_peft(dropout):
    from epochwise.local.lora import fuse_lora_updates
    from tests.helpers import lora_model

    reference = lora_model(dropout=dropout)
    fused = copy.deepcopy(reference)
    fuse_lora_updates(fused)
    assert fuse_swiglu(fused) == 2
    width = reference.config.intermediate_size
    ids = torch.randint(0, reference.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))

    def run(model):
        kept: dict[int, torch.Tensor] = {}  # tensors of the MLP's width kept for the backward pass, by storage

        def pack(tensor):
            if tensor.numel() == ids.numel() * width:
                kept[tensor.untyped_storage().data_ptr()] = tensor
            return tensor

        torch.manual_seed(2)  # the same dropout masks for both models
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        trained = [p for p in model.parameters() if p.requires_grad]
        return out.logits, torch.autograd.grad(out.loss, trained), len(kept)

    logits, grads, kept = run(reference)
    fused_logits, fused_grads, fused_kept = run(fused)
    assert torch.allclose(fused_logits, logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, grads, strict=True):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # per layer, peft keeps gate(x), silu(gate(x)), up(x) and the product (with dropout, also the mask
    # and the dropped product); fused: gate(x) and up(x), and without dropout nothing more
    if dropout == 0:
        assert (kept, fused_kept) == (2 * 4, 2 * 2)
    else:
        assert fused_kept == kept - 2 * 1  # only silu(gate(x)) is saved: lora_A's input must be kept
