"""The two-activation gated-SiLU MLP gives autograd's values and gradients."""

from __future__ import annotations

import copy

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
