"""A leaner forward for peft's LoRA linear layers: the low-rank update joins the base output in one GEMM.

peft computes ``base(x) + lora_B(lora_A(x)) * scaling``: three temporaries the size of the layer's
output (``lora_B``'s product, its scaled copy, the sum) per LoRA linear, seven linears per decoder
layer. `fuse_lora_updates` makes each plain LoRA linear compute
``addmm(base(x), lora_A(x), lora_B.weight.T, alpha=scaling)`` instead: one output-sized tensor and
one GEMM less elementwise work. The same values up to float rounding, the same saved tensors for
the backward pass (``x`` for ``lora_A``, the rank-``r`` product for ``lora_B``), and the same
adapter weights on disk; anything else (DoRA and other variants, several active adapters, merged
or disabled adapters, mixed-batch arguments, a ``lora_B`` bias, adapters in another dtype than the
base weights, as peft keeps them in fp32 on a bf16 model) runs peft's own forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch


@contextmanager
def building_peft_model() -> Iterator[None]:
    """Around ``get_peft_model`` / ``PeftModel.from_pretrained``: hides the one FutureWarning they cause.

    peft 0.21's ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, an alias transformers 5
    deprecated (its replacement is ``is_activation_checkpointing``), so every epoch warned although
    epochwise never calls it and never checkpoints activations. The read happens inside peft, so it
    cannot be avoided from here; this filter matches only that message, and only while peft builds the
    model.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def fusable(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA ``Linear`` over a ``torch.nn.Linear`` (not ``fan_in_fan_out``):
    what the fused forward can compute, given a `plain_adapter` at call time."""
    from peft.tuners.lora import Linear as LoraLinear

    return (
        type(module) is LoraLinear
        and isinstance(module.base_layer, torch.nn.Linear)
        and not getattr(module, "fan_in_fan_out", False)
    )


def plain_adapter(module: torch.nn.Module, *args, **kwargs) -> str | None:
    """The name of a `fusable` ``module``'s one active adapter when the fused forward computes it, else None.

    That is one active plain adapter (no variant such as DoRA, no ``lora_B`` bias, the base weights'
    dtype), neither merged nor disabled, called without extra arguments (``args``, ``kwargs``).
    """
    adapters = module.active_adapters
    if (
        args
        or kwargs
        or module.disable_adapters
        or module.merged
        or len(adapters) != 1
        or adapters[0] not in module.lora_A
        or adapters[0] in module.lora_variant
        or module.lora_B[adapters[0]].bias is not None
        or module.lora_A[adapters[0]].weight.dtype != module.base_layer.weight.dtype
    ):
        return None
    return adapters[0]


def add_low_rank(module: torch.nn.Module, name: str, result: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``result + lora_B(low) * scaling`` of adapter ``name`` in one ``addmm``, shaped like ``result``."""
    flat = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        low.reshape(-1, low.shape[-1]),
        module.lora_B[name].weight.t(),
        alpha=module.scaling[name],
    )
    return flat.view(result.shape)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = plain_adapter(self, *args, **kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    lora_a = self.lora_A[name]
    low = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    return add_low_rank(self, name, self.base_layer(x), low)


def fuse_lora_updates(model: torch.nn.Module) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the fused forward; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if fusable(module):
            module.forward = MethodType(_fused_forward, module)
            changed += 1
    return changed
