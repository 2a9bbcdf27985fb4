"""Per-conversation attention over packed rows equals SDPA with the block-diagonal mask, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epochwise.local.attention import segment_attention, segments_enabled, segments_of
from epochwise.local.trainer import attention_bias


def test_segments_follow_position_resets_and_padding():
    packed = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segments_of(packed, None) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    padded = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert segments_of(packed[:, :4], padded) == [[(0, 3), (3, 4)], [(0, 4)]]


@pytest.mark.parametrize("padding", [False, True])
def test_segment_attention_matches_masked_sdpa(padding):
    generator = torch.Generator().manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    mask = torch.tensor([[1] * 7 + [0] * 3, [1] * 10]) if padding else None
    if padding:
        positions = torch.arange(10).expand(2, 10)
    q = torch.randn(2, 4, 10, 8, generator=generator, requires_grad=True)
    k = torch.randn(2, 2, 10, 8, generator=generator, requires_grad=True)
    v = torch.randn(2, 2, 10, 8, generator=generator, requires_grad=True)
    bias = attention_bias(positions, mask, torch.float32)
    reference = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=bias, scale=0.3
    ).transpose(1, 2)
    out, _ = segment_attention(None, q, k, v, None, scaling=0.3, segments=segments_of(positions, mask))
    real = mask.bool() if padding else torch.ones(2, 10, dtype=torch.bool)  # pad queries are never used
    assert out.shape == reference.shape
    assert torch.allclose(out[real], reference[real], atol=1e-6)
    weights = torch.randn(out.shape, generator=generator) * real[:, :, None, None]
    want = torch.autograd.grad((reference * weights).sum(), (q, k, v))
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_only_plain_causal_sdpa_models_use_segments():
    from transformers import LlamaConfig, Qwen2Config

    class Model:
        def __init__(self, config):
            self.config = config

    llama = LlamaConfig(num_hidden_layers=1)
    llama._attn_implementation = "sdpa"
    assert segments_enabled(Model(llama))
    llama._attn_implementation = "eager"
    assert not segments_enabled(Model(llama))
    qwen = Qwen2Config(num_hidden_layers=1, use_sliding_window=True, sliding_window=64)
    qwen._attn_implementation = "sdpa"
    assert not segments_enabled(Model(qwen))


def test_batch_loss_gradients_match_the_models_own_loss_on_packed_rows():
    """Through `batch_loss` (segments, sparse head) the LoRA gradients are those of transformers' own loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from epochwise.local.data import TokenRow, collate
    from epochwise.local.lora import building_peft_model, fuse_lora_updates
    from epochwise.local.trainer import batch_loss

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with building_peft_model():
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    fuse_lora_updates(model)
    assert segments_enabled(model.get_base_model())
    generator = torch.Generator().manual_seed(1)

    def row(n: int) -> TokenRow:
        ids = torch.randint(3, 96, (n,), generator=generator).tolist()
        return TokenRow(ids, [-100] * (n // 2) + ids[n // 2 :])

    batch = collate([[row(7), row(5), row(9)], [row(12), row(4)]], 0, packing=True)

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, n = batch_loss(model, batch)
    ours = grads(loss / n)
    reference = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=attention_bias(batch.position_ids, None, torch.float32),
        labels=batch.labels,
        use_cache=False,
    ).loss
    assert float(loss.detach()) / n == pytest.approx(float(reference.detach()), rel=1e-5)
    theirs = grads(reference)
    assert ours.keys() == theirs.keys()
    for name, grad in theirs.items():
        assert torch.allclose(ours[name], grad, rtol=1e-4, atol=1e-6), name
