"""A gated-SiLU MLP that keeps two activations per layer for the backward pass instead of four.

Llama-style MLPs compute ``down(silu(gate(x)) * up(x))``; autograd keeps ``gate(x)`` (for SiLU's
backward), ``silu(gate(x))`` and ``up(x)`` (for the product's), and LoRA on ``down`` keeps the
product: four ``tokens x intermediate`` tensors per layer, the largest activations of these models
(SmolLM2: intermediate 1,536 against hidden 576, 30 layers). `swiglu` keeps only ``gate(x)`` and
``up(x)`` and recomputes the sigmoid in its backward pass, the same forward values bit for bit.
When ``down`` is a LoRA linear that the fused LoRA forward computes (`lora.fusable`,
`lora.plain_adapter`, `lora.lora_linear`: dropout off), it runs as `lora._LoraLinear` given ``gate(x)``
and ``up(x)``, which recomputes the product from them for ``lora_A``'s weight gradient instead of
keeping it: two kept tensors per layer instead of three (on SmolLM2, 30 layers x 1,536 floats per
token; its peak RSS at seq 256 fell by about 200 MB in `bench/local_train.py`).
`fuse_swiglu` gives each such MLP this forward.
"""

from __future__ import annotations

from types import MethodType

import torch

from epochwise.local.lora import fusable, lora_linear, plain_adapter

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
        # At most two new tensors of the input's size exist at once (this runs at the memory peak, the
        # first layers of the backward pass): ``grad * up`` and SiLU's fused backward kernel (autograd's
        # own for SiLU: grad * sigmoid(g) * (1 + g * (1 - sigmoid(g)))), then ``silu(gate) * grad``.
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = torch.nn.functional.silu(gate).mul_(grad) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for the backward pass."""
    return _SwiGLU.apply(gate, up)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = swiglu(gate, up)
    down = self.down_proj
    name = plain_adapter(down) if fusable(down) else None
    fused = lora_linear(down, name, product, gate, up) if name is not None else None
    return fused if fused is not None else down(product)


def fuse_swiglu(model: torch.nn.Module) -> int:
    """Give every gated-SiLU MLP of ``model`` the `swiglu` forward; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU_CLASSES:
            module.forward = MethodType(_forward, module)
            changed += 1
    return changed
