"""oneDNN-prepacked fp32 linears for the CPU.

A plain `nn.Linear` on the CPU re-lays its weight for every call; packing it once into
oneDNN's blocked layout makes a 1-token step ~1.6x faster and a 16-token verify ~1.7x
faster on an AVX2 machine (measured on SmolLM2's MLP), which is what makes speculation pay
on the CPU. The module keeps its `weight` parameter (state dicts are unchanged) and only
adds the packed copy used by `forward`.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None),
                             persistent=False)

    def forward(self, x):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias,
                                               "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def pack_linears(module: nn.Module) -> nn.Module:
    """Swap every fp32 CPU nn.Linear inside `module` for a PackedLinear (in place); no-op elsewhere."""
    if not onednn_available():
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32:
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
    return module
