"""A gated-SiLU MLP that keeps two activations per layer for the backward pass instead of four.

Llama-style MLPs compute ``down(silu(gate(x)) * up(x))``; autograd keeps ``gate(x)`` (for SiLU's
backward), ``silu(gate(x))`` and ``up(x)`` (for the product's), and LoRA on ``down`` keeps the
product: four ``tokens x intermediate`` tensors per layer, the largest activations of these models
(SmolLM2: intermediate 1,536 against hidden 576, 30 layers). `swiglu` keeps only ``gate(x)`` and
``up(x)`` and recomputes the sigmoid in its backward pass, the same forward values bit for bit.
`fuse_swiglu` gives each such MLP this forward.
"""

from __future__ import annotations

from types import MethodType

import torch

# transformers' MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
GATED_MLPS = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}
SILU_CLASSES = {"SiLU", "SiLUActivation"}


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        grad_up = grad * gate * sigmoid if ctx.needs_input_grad[1] else None
        # d silu(g) / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = (1 - sigmoid).mul_(gate).add_(1).mul_(sigmoid).mul_(grad).mul_(up)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for the backward pass."""
    return _SwiGLU.apply(gate, up)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def fuse_swiglu(model: torch.nn.Module) -> int:
    """Give every gated-SiLU MLP of ``model`` the `swiglu` forward; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU_CLASSES:
            module.forward = MethodType(_forward, module)
            changed += 1
    return changed
