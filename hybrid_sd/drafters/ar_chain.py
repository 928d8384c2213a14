"""An EAGLE-3 head's greedy chain, each depth of its draft tree and its KV-only catch-up rows,
each as one call into the CPU kernel library (kernels/cpu_decoder.cpp).

A chain of k draft tokens is k runs of the head's layer, norm, draft-vocab head and argmax,
each fed the last: in PyTorch ~25 ops and a host round trip a token (~1.7 ms on SmolLM2's
head, most of it dispatch); as one kernel call, what the arithmetic costs. `ARDrafter.graph_step`,
`step` and `catchup_step` stay the references and run sampled chains and every graph mode.
"""
from __future__ import annotations

import torch

from ..kernels import cpu_rows
from ..models.packed_linear import kernel_panels, profiled_call
from ..models.transformer import signed_sin


def why_not_chained(drafter) -> str | None:
    """Why the kernel cannot run this packed drafter's greedy chain (None: it can)."""
    layer, c = drafter.midlayer, drafter.config
    attn = layer.self_attn
    products = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.gate_up, layer.mlp.down_proj,
                drafter.lm_head)
    norms = (layer.input_layernorm, layer.hidden_norm, layer.post_attention_layernorm, drafter.norm)
    if any(kernel_panels(p) is None for p in products) or not all(n.cpu_kernel for n in norms):
        return "not packed for the kernel"
    embed = drafter.embed[0].weight
    if embed.dtype != torch.float32 or not embed.is_contiguous() or embed.shape[1] != c.hidden_size:
        return "its embedding is not a contiguous fp32 table of the head's width"
    if not cpu_rows.vector_multiples(c.hidden_size, drafter.head_dim, c.intermediate_size) or attn.n_heads % attn.n_kv_heads:
        return "hidden size, head size or MLP width off the kernel's vector multiples"
    return None


class FusedChain:
    """A packed ARDrafter's greedy chain through the kernel; `bind` points it at the drafter's
    cache and RoPE tables (rebuilt by `reset`)."""

    def __init__(self, drafter):
        layer, c = drafter.midlayer, drafter.config
        attn = layer.self_attn
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        qkv_bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        # catch-up rows need only K and V: their own panels (a third of q|k|v's here)
        n_q = attn.q_proj.out_features
        self.kv_panels = cpu_rows.panels_of(qkv[n_q:])
        self.kv_bias = None if qkv_bias is None else qkv_bias[n_q:].contiguous()
        self.shape = cpu_rows.DraftShape(
            hidden=c.hidden_size, heads=attn.n_heads, kv_heads=attn.n_kv_heads, head_dim=drafter.head_dim,
            inner=c.intermediate_size, draft_vocab=drafter.draft_vocab, vocab=drafter.embed[0].weight.shape[0], cache_len=0,
            norm_before_residual=int(layer.norm_before_residual), norm_output=int(drafter.norm_output),
            eps=float(c.rms_norm_eps))
        tensors = dict(input_norm=layer.input_layernorm.weight, hidden_norm=layer.hidden_norm.weight,
                       post_norm=layer.post_attention_layernorm.weight, final_norm=drafter.norm.weight,
                       qkv=cpu_rows.panels_of(qkv), qkv_bias=qkv_bias, o=attn.o_proj.panels, o_bias=attn.o_proj.bias,
                       gate_up=layer.mlp.gate_up.panels, gate_up_bias=layer.mlp.gate_up.bias,
                       down=layer.mlp.down_proj.panels, down_bias=layer.mlp.down_proj.bias,
                       lm_head=drafter.lm_head.panels, embed=drafter.embed[0].weight, d2t=drafter.d2t)
        self.weights = cpu_rows.DraftWeights(**cpu_rows.pointers(tensors))
        self.kept = list(tensors.values())  # held: the kernel reads them through raw pointers
        self.bound: tuple = ()  # the cache buffers and RoPE tables bound (held: never freed under the kernel)
        self.tables = ()

    def bind(self, cache, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> None:
        """Point the kernel at the drafter's cache and RoPE tables (again whenever they are other tensors)."""
        bound = (cache.k[0], cache.v[0], rope_cos, rope_sin)
        if len(bound) == len(self.bound) and all(a is b for a, b in zip(bound, self.bound)):
            return
        k, v = cache.k[0], cache.v[0]
        shape = (1, self.shape.kv_heads, cache.max_len, self.shape.head_dim)
        if tuple(k.shape) != shape or tuple(v.shape) != shape or k.dtype != torch.float32 or not (
                k.is_contiguous() and v.is_contiguous()):
            raise ValueError(f"the CPU drafter chain needs the drafter's contiguous fp32 cache of {shape}")
        if rope_cos.shape[0] < cache.max_len:  # every cache position needs its RoPE row
            raise ValueError(f"RoPE tables of {rope_cos.shape[0]} positions for a {cache.max_len}-position cache")
        self.tables = (rope_cos.contiguous(), signed_sin(rope_sin).contiguous())
        self.weights.cos, self.weights.sin_signed = (t.data_ptr() for t in self.tables)
        self.weights.k_cache, self.weights.v_cache = k.data_ptr(), v.data_ptr()
        self.shape.cache_len = cache.max_len
        self.bound = bound

    def catch_up(self, g: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """KV-only rows: g [n, hidden] (fc of the target features), the next tokens and positions [n]."""
        profiled_call("hybrid_sd::eagle3_catch_up", cpu_rows.eagle3_catch_up, self.shape, self.weights,
                      self.kv_panels, self.kv_bias, g, tokens, positions)

    def tree_step(self, g: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                  mask: torch.Tensor):
        """One depth of a tree: (new g [R, hidden], draft-vocab logits [R, V]) of rows g [R, hidden]."""
        g = g.clone(memory_format=torch.contiguous_format)  # the kernel overwrites it; the caller's rows may be a view
        logits = profiled_call("hybrid_sd::eagle3_tree_step", cpu_rows.eagle3_tree_step, self.shape, self.weights, g,
                               tokens.contiguous(), positions.contiguous(), slots.contiguous(), mask.contiguous())
        return g, logits

    def __call__(self, g: torch.Tensor, token: int, start: int, k: int):
        """(target ids [k], drafter probabilities [k]) of the greedy chain from fused features
        g [hidden] and the token at position `start`."""
        return profiled_call("hybrid_sd::eagle3_chain", cpu_rows.eagle3_chain, self.shape, self.weights, g, token,
                             start, k)
