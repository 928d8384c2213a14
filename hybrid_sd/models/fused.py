"""A packed decoder's layers as one call into the CPU kernel library (kernels/cpu_decoder.cpp).

Once `pack_linears` has laid every product out as panels and turned the norms' kernel on,
a decoding step or a verify needs nothing from PyTorch between the embedding and the final
norm: `FusedLayers` hands the kernel every layer's weights (pointers gathered once) and runs
the whole stack for up to `MAX_ROWS` rows, with no Python, dispatch or allocation per op.
The module path stays the definition (`Transformer.forward` without it) and runs everything
else: longer prefills, training, graph modes, other dtypes and devices. One model decodes one
stream at a time: the kernel is pointed at one cache at a time (`bind`), as the engine uses it.
"""
from __future__ import annotations

import ctypes
import itertools
import weakref

import torch

from ..kernels import cpu_rows
from .packed_linear import graphing, kernel_panels, profiled_call

# rows per call: steps, verifies, trees up to 32 nodes and short prefills. The products read the
# weights once but compute 8 rows at a time, so oneDNN's blocked product overtakes them at some
# point, but the layers' other ops in PyTorch cost more until then: all layers, 2 threads, fused
# against the module forward (docs/performance.md, eighth session, when the kernel read the weights
# once per 12 rows): 12 rows 39.5 / 49.3 ms, 17 rows 60.6 / 80.8, 33 rows 103.0 / 115.8, 65 rows
# 205.5 / 167.0; since the fifteenth session 33 rows take 12 % less
MAX_ROWS = 33


def why_not_fused(target) -> str | None:
    """Why the kernel cannot run this packed Transformer's layers (None: it can)."""
    c, first = target.config, target.model.layers[0]
    attn = first.self_attn
    if target.lm_head.weight.dtype != torch.float32 or target.lm_head.weight.device.type != "cpu":
        return "not an fp32 CPU model"
    if not cpu_rows.vector_multiples(c.hidden_size, attn.head_dim, c.intermediate_size) or attn.n_heads % attn.n_kv_heads:
        return "hidden size, head size or MLP width off the kernel's vector multiples"
    for layer in target.model.layers:
        a, m = layer.self_attn, layer.mlp
        products = (a.qkv, a.o_proj, m.gate_up, m.down_proj)
        norms = (layer.input_layernorm, layer.post_attention_layernorm) + ((a.q_norm, a.k_norm) if a.has_qk_norm else ())
        if any(kernel_panels(p) is None for p in products) or not all(n.cpu_kernel for n in norms):
            return "a layer is not packed for the kernel"
    return None


# the graph op names its FusedLayers by a handle, weakly held (a dropped model is freed). A handle
# is a count, never an address: a compiled graph holds it as a constant, so it must name the same
# model in every process (or the compile cache never hits) and never a later one in this process.
_LAYERS: weakref.WeakValueDictionary[int, "FusedLayers"] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


class FusedLayers:
    """Every decoder layer of a packed Transformer for a few rows, as one kernel call."""

    def __init__(self, target):
        c = target.config
        attn = target.model.layers[0].self_attn
        self.hidden = c.hidden_size
        self.shape = cpu_rows.DecoderShape(layers=len(target.model.layers), hidden=c.hidden_size,
                                           heads=attn.n_heads, kv_heads=attn.n_kv_heads, head_dim=attn.head_dim,
                                           inner=c.intermediate_size, cache_len=0, eps=float(c.rms_norm_eps))
        layer_weights = []
        self.kept = []  # every tensor behind a pointer, held so that none is freed under the kernel
        for layer in target.model.layers:
            a, m = layer.self_attn, layer.mlp
            tensors = dict(input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
                           q_norm=a.q_norm.weight if a.has_qk_norm else None,
                           k_norm=a.k_norm.weight if a.has_qk_norm else None,
                           qkv=a.qkv.panels, qkv_bias=a.qkv.bias, o=a.o_proj.panels, o_bias=a.o_proj.bias,
                           gate_up=m.gate_up.panels, gate_up_bias=m.gate_up.bias,
                           down=m.down_proj.panels, down_bias=m.down_proj.bias)
            layer_weights.append(cpu_rows.LayerWeights(**cpu_rows.pointers(tensors)))
            self.kept += [t for t in tensors.values() if t is not None]
        self.weights = (cpu_rows.LayerWeights * len(layer_weights))(*layer_weights)
        self.bound: tuple = ()  # the cache buffers `cache_pointers` points at (held: never freed under the kernel)
        self.cache_pointers = None
        self.captures: dict[tuple[int, ...], ctypes.Array] = {}
        self.handle = next(_HANDLES)  # this object's name for the graph op
        _LAYERS[self.handle] = self

    def bind(self, cache_tensors: list[torch.Tensor]) -> None:
        """Point the kernel at a cache's buffers, `KVCache.tensors()` (every layer's K, then every
        layer's V), again whenever they are other tensors."""
        n = len(cache_tensors) // 2
        buffers = tuple(t for pair in zip(cache_tensors[:n], cache_tensors[n:]) for t in pair)
        if len(buffers) == len(self.bound) and all(a is b for a, b in zip(buffers, self.bound)):
            return
        shape = (1, self.shape.kv_heads, cache_tensors[0].shape[2], self.shape.head_dim)
        if len(cache_tensors) != 2 * self.shape.layers or any(
                tuple(b.shape) != shape or b.dtype != torch.float32 or not b.is_contiguous() for b in buffers):
            raise ValueError(f"the CPU decoder needs a contiguous fp32 cache of {shape} per layer's K and V")
        self.bound, self.shape.cache_len = buffers, buffers[0].shape[2]
        self.cache_pointers = (ctypes.c_void_p * len(buffers))(*(b.data_ptr() for b in buffers))

    def capture_ids(self, capture: tuple[int, ...]) -> ctypes.Array:
        ids = self.captures.get(capture)
        if ids is None:
            if any(not 0 <= i <= self.shape.layers for i in capture):
                raise ValueError(f"capture {capture} names hidden states outside 0..{self.shape.layers}")
            ids = self.captures[capture] = (ctypes.c_int * len(capture))(*capture)
        return ids

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, mask: torch.Tensor | None, cache, capture: tuple[int, ...]):
        """h [T, hidden]; returns (the last layer's output [T, hidden], features [T, C * hidden] or
        None). Eager, h itself is overwritten and returned; under a graph mode the kernel runs as
        one opaque op (`hybrid_sd::decoder_layers`), which the trace or the compiled graph holds."""
        if graphing():
            out, features = decoder_layers_op(self.handle, h, cos, sin_signed, positions, slots, mask,
                                              cache.tensors(), list(capture))
            return out, (features if capture else None)
        return h, self.run(h, cos, sin_signed, positions, slots, mask, cache.tensors(), tuple(capture))

    def run(self, h, cos, sin_signed, positions, slots, mask, cache_tensors, capture: tuple[int, ...],
            profiled: bool = True):
        """The kernel call: h overwritten in place; returns the features or None. `profiled`: name the
        call in the profiler's tables (the graph op is named there already)."""
        self.bind(cache_tensors)
        features = capture_ids = None
        if capture:
            capture_ids = self.capture_ids(capture)
            features = torch.empty(h.shape[0], len(capture) * self.hidden, dtype=torch.float32)
        args = (self.shape, self.weights, self.cache_pointers, h, cos, sin_signed, positions, slots, mask, capture_ids,
                len(capture), features)
        if profiled:
            profiled_call("hybrid_sd::decoder_layers", cpu_rows.decoder_layers, *args)
        else:
            cpu_rows.decoder_layers(*args)
        return features


@torch.library.custom_op("hybrid_sd::decoder_layers", mutates_args=("cache",))
def decoder_layers_op(handle: int, h: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                      positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor | None,
                      cache: list[torch.Tensor], capture: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FusedLayers `handle` on a copy of h, writing K/V into `cache` (KVCache.tensors()): the
    output rows and the features ([T, 0] when nothing is captured)."""
    layers = _LAYERS.get(handle)
    if layers is None:  # a graph outlived the model it was built for
        raise RuntimeError(f"hybrid_sd::decoder_layers: no live model under handle {handle}; "
                           "steps traced or compiled for a dropped model must be rebuilt")
    out = h.contiguous().clone()
    features = layers.run(out, cos, sin_signed, positions, slots, mask, cache, tuple(capture), profiled=False)
    return out, (features if features is not None else h.new_empty(h.shape[0], 0))


@decoder_layers_op.register_fake
def _(handle, h, cos, sin_signed, positions, slots, mask, cache, capture):
    return h.new_empty(h.shape), h.new_empty(h.shape[0], len(capture) * h.shape[1])
