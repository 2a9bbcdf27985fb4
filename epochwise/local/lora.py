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


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = self.active_adapters
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(adapters) != 1
        or adapters[0] not in self.lora_A
        or adapters[0] in self.lora_variant
        or self.lora_B[adapters[0]].bias is not None
        or self.lora_A[adapters[0]].weight.dtype != self.base_layer.weight.dtype
    ):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    result = self.base_layer(x)
    low = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    flat = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        low.reshape(-1, low.shape[-1]),
        lora_b.weight.t(),
        alpha=self.scaling[name],
    )
    return flat.view(result.shape)


def fuse_lora_updates(model: torch.nn.Module) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the fused forward; returns how many were changed."""
    from peft.tuners.lora import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear and isinstance(module.base_layer, torch.nn.Linear):
            if not getattr(module, "fan_in_fan_out", False):
                module.forward = MethodType(_fused_forward, module)
                changed += 1
    return changed
