"""Chunked LM-head cross-entropy equals the full-logits one: loss and gradients, in chunks or not."""

from __future__ import annotations

import pytest
import torch

from epochwise.local.loss import linear_cross_entropy, reference_cross_entropy


@pytest.mark.parametrize("chunk", [3, 7, 1024])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_cross_entropy_matches_full_logits(chunk, train_head):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=train_head)
    targets = torch.randint(0, 50, (10,), generator=generator)
    loss = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    reference = reference_cross_entropy(hidden, weight, targets)
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    inputs = (hidden, weight) if train_head else (hidden,)
    got = torch.autograd.grad(loss * 0.37, inputs)  # a scaled loss, as the trainer's 1/label_tokens
    want = torch.autograd.grad(reference * 0.37, inputs)
    for a, b in zip(got, want, strict=True):
        assert a.abs().sum() > 0
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_labelled_position_gives_zero_loss_and_gradients():
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(8, 4)
    loss = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and hidden.grad.shape == (0, 4)


def test_without_grad_only_the_loss_is_computed():
    generator = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(5, 8, generator=generator), torch.randn(20, 8, generator=generator)
    targets = torch.randint(0, 20, (5,), generator=generator)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk=2)
    assert float(loss) == pytest.approx(float(reference_cross_entropy(hidden, weight, targets)), rel=1e-6)


def test_a_target_whose_probability_underflows_keeps_its_exact_loss():
    # logit gaps of about 200 and 3,000: softmax gives the target exactly 0 in fp32, the loss is finite
    hidden = torch.tensor([[10.0, 0.0], [0.0, 150.0], [1.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[20.0, 0.0], [0.0, 20.0], [-1.0, 0.5]])
    targets = torch.tensor([1, 0, 2])
    loss = linear_cross_entropy(hidden, weight, targets, chunk=2)
    reference = reference_cross_entropy(hidden, weight, targets)
    assert float(reference) > 3000
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    (got,) = torch.autograd.grad(loss, hidden)
    (want,) = torch.autograd.grad(reference, hidden)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
