"""A compact, graph-friendly decoder for Llama, Qwen2 and Qwen3 dense checkpoints.

Module and parameter names equal transformers' (`model.layers.0.self_attn.q_proj.weight`,
...), so a Hugging Face state dict loads as it is. The forward has no data-dependent Python
control flow: shapes depend only on the number of tokens and on `kv_len`, a host-side bound
on the positions that can be attended (a bucket, later a CUDA-graph key).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..cache import KVCache
from . import fused
from .packed_linear import AfterPacking, KernelNorm, Projections

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RMSNorm(KernelNorm):
    """The decoders' RMSNorm (fp32: torch's fused op, or the CPU kernel once packed); in half
    precision computed in fp32 as transformers does."""


def rope_parameters(config) -> dict:
    """RoPE settings of a config, for transformers 4.x (`rope_scaling`) and 5.x (`rope_parameters`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def rope_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scale; scaled variants come from transformers itself."""
    params = rope_parameters(config)
    kind = params["rope_type"]
    if kind == "default":
        theta = float(params.get("rope_theta", 10000.0))
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        return inv_freq, 1.0
    if kind not in STATIC_ROPE_TYPES:
        raise NotImplementedError(f"RoPE type {kind!r} is not supported (supported: {STATIC_ROPE_TYPES})")
    return ROPE_INIT_FUNCTIONS[kind](config)


def rope_tables(inv_freq: torch.Tensor, scale: float, max_len: int):
    """cos/sin [max_len, head_dim] in the rotate-half layout, computed as transformers does."""
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [B, heads, T, dim]; cos/sin [T, dim] (or broadcastable)."""
    return x * cos + rotate_half(x) * sin


def signed_sin(sin):
    """sin with its first half negated: rotate_half(x) * sin == x.roll(dim / 2, -1) * signed_sin(sin),
    bit for bit (a negation is exact), in one op instead of three."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope_signed(x, cos, sin_signed):
    """apply_rope with the sign folded into the table (see signed_sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def attend(q, k, v, mask):
    """Scaled dot-product attention with grouped KV heads; mask True = may attend; mask None =
    causal over as many keys as queries (SDPA's is_causal, which skips the masked half)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=bool(q.shape[1] != k.shape[1]))


class Attention(Projections):
    fused_groups = {"qkv": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        H = config.hidden_size
        qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=o_bias)
        self.has_qk_norm = config.model_type == "qwen3"
        if self.has_qk_norm:  # per-head RMSNorm on queries and keys
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def project(self, x):
        """q, k, v as [B, T, heads, head_dim] (views of one product when packed)."""
        B, T, _ = x.shape
        if self.qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv(x).split((self.n_heads * self.head_dim, kv, kv), dim=-1)
        return (q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv_heads, self.head_dim),
                v.view(B, T, self.n_kv_heads, self.head_dim))

    def rotate_queries_keys(self, x, cos, sin_signed):
        """RoPE'd q and k, [B, T, heads, head_dim]; cos/sin_signed [T, 1, head_dim]. Packed and
        without per-head norms, q and k are adjacent columns of one product: one RoPE pass."""
        if self.qkv is not None and not self.has_qk_norm:
            B, T, _ = x.shape
            heads = self.qkv(x).view(B, T, -1, self.head_dim)
            qk = apply_rope_signed(heads[:, :, :self.n_heads + self.n_kv_heads], cos, sin_signed)
            q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)
            return q, k, heads[:, :, self.n_heads + self.n_kv_heads:]
        q, k, v = self.project(x)
        q = apply_rope_signed(self.q_norm(q), cos, sin_signed)
        k = apply_rope_signed(self.k_norm(k), cos, sin_signed)
        return q, k, v

    def forward(self, x, cos, sin_signed, mask, cache: KVCache | None, slots, kv_len: int | None):
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.rotate_queries_keys(x, cos, sin_signed))
        if cache is not None:
            k_all, v_all = cache.write(self.layer_idx, slots, k, v)
            k, v = k_all[:, :, :kv_len], v_all[:, :, :kv_len]
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(Projections):
    fused_groups = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, hidden: int, inner: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        if self.gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, bool(getattr(config, "mlp_bias", False)))

    def forward(self, h, cos, sin, mask, cache, slots, kv_len):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, slots, kv_len)
        return h + self.mlp(self.post_attention_layernorm(h))


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device the loader builds on: meta has
    no normal_ kernel, and torch's Python stand-in for it imports torch._dynamo (~1 s of every
    start-up that eager decoding never uses). Elsewhere the same draws as nn.Embedding."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Backbone(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_supported(config):
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"architecture {kind!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        raise NotImplementedError("sliding-window attention layers are not supported")
    rope_kind = rope_parameters(config)["rope_type"]
    if rope_kind not in STATIC_ROPE_TYPES:
        raise NotImplementedError(f"RoPE type {rope_kind!r} is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})")


class Transformer(AfterPacking):
    """The target. `forward` returns final-normed hidden states and the requested features.
    Once packed for the CPU kernel library, a step or a verify of up to `fused.MAX_ROWS` rows
    runs every layer in one kernel call (models/fused.py); the layers' forward is its reference."""

    def __init__(self, config, max_len: int | None = None):
        super().__init__()
        check_supported(config)
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.head_dim = head_dim_of(config)
        self.max_len = max_len or config.max_position_embeddings
        self.init_rope()
        self.fused_layers: fused.FusedLayers | None = None

    def after_packing(self) -> None:
        self.fused_layers = None if fused.why_not_fused(self) else fused.FusedLayers(self)

    def init_rope(self):
        with torch.device("cpu"):  # real numbers even while the module is built on meta
            inv_freq, scale = rope_inv_freq(self.config, self.head_dim)
            cos, sin = rope_tables(inv_freq, scale, self.max_len)
        device = self.lm_head.weight.device if self.lm_head.weight.device.type != "meta" else "cpu"
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin_signed", signed_sin(sin).to(device), persistent=False)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin at `positions` [T] or [B, T], shaped [..., T, 1, head_dim]: RoPE runs on
        [B, T, heads, head_dim], before the heads move forward."""
        return self.rope_cos[positions].unsqueeze(-2), self.rope_sin_signed[positions].unsqueeze(-2)

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    def new_cache(self, max_len: int | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.n_layers, max_len or self.max_len, self.config.num_key_value_heads,
                       self.head_dim, p.dtype, p.device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                kv_len: int | None = None, capture: tuple[int, ...] = (), causal: bool = False,
                tree: tuple[torch.Tensor, torch.Tensor] | None = None):
        """tokens [B, T] at `positions` [T].

        With a cache (B = 1): K/V are written at `positions`, queries attend to cache
        positions [0, kv_len) up to their own position. Without one: plain causal attention
        over the T tokens (training). `capture` names hidden states in transformers'
        numbering (0 = embeddings, i = output of layer i-1, before the final norm); they are
        returned concatenated in that order, [B, T, len(capture) * hidden].
        `causal`: the caller promises positions = 0..T-1 (a prefill from the start of the
        cache): attention is causal over those T cache positions (SDPA's is_causal skips the
        masked half: the same keys and, measured, the same result as the positional mask, at
        a third of the time for a 2k-token prompt on the CPU).
        `tree` = (slots [T], mask [T, kv_len]): a draft tree's rows, whose RoPE positions repeat
        (siblings share a depth) -- K/V are written at the cache `slots` instead of `positions`
        and the mask (True = may attend) says which cache slots each row sees.
        Returns (final-normed hidden [B, T, H], features or None).
        """
        if (self.fused_layers is not None and cache is not None and tokens.shape[0] == 1
                and 0 < tokens.shape[1] <= fused.MAX_ROWS and positions.dim() == 1
                and positions.dtype == torch.int64 and not torch.is_grad_enabled()):
            return self.fused_forward(tokens, positions, cache, capture, tree)
        cos, sin = self.rope(positions)
        slots = positions
        if cache is not None and tree is not None:
            slots, mask = tree
            kv_len = mask.shape[-1]
        elif cache is not None and causal:
            kv_len, mask = tokens.shape[1], None
        elif cache is not None:
            kv_len = kv_len or cache.max_len
            key_pos = torch.arange(kv_len, device=positions.device)
            mask = key_pos[None, :] <= positions[:, None]
        else:
            mask = positions[None, :] <= positions[:, None]
        h = self.model.embed_tokens(tokens)
        kept = {0: h} if 0 in capture else {}
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, cache, slots, kv_len)
            if i + 1 in capture:
                kept[i + 1] = h
        features = torch.cat([kept[i] for i in capture], dim=-1) if capture else None
        return self.model.norm(h), features

    def span_free(self, rows: int) -> bool:
        """Whether a cached forward of `rows` rows reads the cache by position alone (through the
        kernel), so that the attention span shapes nothing: one graph serves every span."""
        return self.fused_layers is not None and 0 < rows <= fused.MAX_ROWS

    def fused_forward(self, tokens, positions, cache, capture, tree):
        """`forward` with a cache, through the kernel: the same rows, keys and returns. Row r sees
        cache positions 0..positions[r] (the positional mask, and the causal one of a prefill
        from 0) or, for a tree, what its mask row allows; `kv_len` only bounds what the module
        path reads, and every caller's covers its positions, so the kernel needs none."""
        slots, mask = tree if tree is not None else (positions, None)
        h = self.model.embed_tokens(tokens[0])  # a fresh [T, H] that the kernel overwrites
        h, features = self.fused_layers(h, self.rope_cos[positions], self.rope_sin_signed[positions], positions,
                                        slots, mask, cache, capture)
        return self.model.norm(h)[None], None if features is None else features[None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
