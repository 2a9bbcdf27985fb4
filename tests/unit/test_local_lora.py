"""The fused LoRA forward gives peft's outputs and gradients, and leaves peft's own path where it cannot."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from epochwise.local.lora import fuse_lora_updates
from tests.helpers import lora_model


def loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("biases", [False, True])  # Qwen2-style q/k/v biases, Llama's mlp_bias
def test_fused_forward_matches_peft_outputs_and_gradients(biases):
    reference = lora_model(attention_bias=biases, mlp_bias=biases)
    assert (reference.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias is not None) == biases
    fused = copy.deepcopy(reference)
    assert fuse_lora_updates(fused) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(1))
    logits, grads = loss_and_grads(reference, ids)
    fused_logits, fused_grads = loss_and_grads(fused, ids)
    assert torch.allclose(fused_logits, logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == fused_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_fused_forward_in_bf16_is_as_close_to_fp32_as_peft():
    """A CUDA user trains in bf16, where the in-place sums round differently from peft's separate ops:
    the fused gradients must stay as close to the fp32 ones as peft's own bf16 gradients are."""
    reference = lora_model(attention_bias=True, mlp_bias=True)
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(1))
    _, exact = loss_and_grads(reference, ids)
    peft_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    fused_bf16 = copy.deepcopy(peft_bf16)
    assert fuse_lora_updates(fused_bf16) == 2 * 7

    def error(grads):  # the worst relative error of any parameter's gradient against fp32
        return max(((grads[n].float() - exact[n]).norm() / exact[n].norm()).item() for n in exact)

    peft_error, fused_error = error(loss_and_grads(peft_bf16, ids)[1]), error(loss_and_grads(fused_bf16, ids)[1])
    assert 0 < peft_error < 0.05
    assert fused_error <= 1.25 * peft_error, (fused_error, peft_error)


def test_disabled_adapters_run_the_base_model_only():
    model = lora_model()
    fuse_lora_updates(model)
    no_update = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in no_update.named_parameters():
            if "lora_B" in name:
                param.zero_()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with_lora = model(input_ids=ids).logits
        with model.disable_adapter():  # falls back to peft's own forward
            disabled = model(input_ids=ids).logits
        base = no_update(input_ids=ids).logits
    assert not torch.allclose(with_lora, disabled)
    assert torch.allclose(disabled, base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_forward_applies_lora_dropout_like_peft(dropout):
    reference = lora_model()
    for module in reference.modules():  # same dropout probability in every LoRA layer
        if hasattr(module, "lora_dropout") and dropout:
            module.lora_dropout["default"] = torch.nn.Dropout(dropout)
    fused = copy.deepcopy(reference)
    fuse_lora_updates(fused)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    logits, _ = loss_and_grads(reference, ids)
    torch.manual_seed(5)
    fused_logits, _ = loss_and_grads(fused, ids)
    assert torch.allclose(fused_logits, logits, rtol=1e-5, atol=1e-5)


def test_building_a_peft_model_does_not_emit_transformers_deprecation_warning():
    """peft reads ``is_gradient_checkpointing``, which transformers deprecated; the trainer's guard
    hides that one warning (and only it) while peft builds the model."""
    import warnings

    from epochwise.local.lora import building_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    tiny = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with warnings.catch_warnings(record=True) as bare:
        warnings.simplefilter("always")
        get_peft_model(LlamaForCausalLM(tiny), config)
    assert any("is_gradient_checkpointing" in str(w.message) for w in bare)  # what the guard is for
    with warnings.catch_warnings(record=True) as guarded:
        warnings.simplefilter("always")
        with building_peft_model():
            get_peft_model(LlamaForCausalLM(tiny), config)
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in guarded if issubclass(w.category, FutureWarning)] == ["another FutureWarning"]
