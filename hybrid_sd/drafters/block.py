"""Block-diffusion drafter in the DFlash format: a whole block of drafts in one forward pass.

The target's features of each context position are fused once, ctx = hidden_norm(fc(f)),
and enter every draft layer only as keys and values (k_norm(k_proj(ctx)), v_proj(ctx), RoPE
at the absolute position). The block [bonus, MASK, ..., MASK] sits at the next positions;
its queries see all context and the whole block (no causal mask). The target's LM head on
norm(h) at block slot i >= 1 predicts the token at that slot. Context K/V depend on ctx alone,
so catching up is a KV-only pass and the per-layer context K/V are cached across rounds.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers import Qwen3Config

from ..cache import KVCache
from ..config import TREE_TOP
from ..errors import UserError
from ..graphs import kv_bucket
from ..models.transformer import MLP, RMSNorm, apply_rope, attend, rope_inv_freq, rope_tables
from ..tree import best_first
from ..verify import Sampling
from .base import Context, Draft, GraphedStep, pick_tokens
from .checkpoint import (build_config, check_architecture, check_fits, config_int, layer_id_list, load_strict,
                         read_checkpoint, require_tensors, write_checkpoint)


def default_target_layer_ids(n_target_layers: int, n_draft_layers: int) -> list[int]:
    """Evenly spaced layer outputs from 1 to L-3 (one per draft layer), as DFlash does."""
    L, n = n_target_layers, n_draft_layers
    if n == 1:
        return [L // 2]
    return [int(round(1 + i * (L - 4) / (n - 1))) for i in range(n)]


class BlockAttention(nn.Module):
    def __init__(self, c: Qwen3Config, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, head_dim
        H, bias = c.hidden_size, bool(getattr(c, "attention_bias", False))
        self.q_proj = nn.Linear(H, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, H, bias=bias)
        self.q_norm = RMSNorm(head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, c.rms_norm_eps)

    def kv(self, x, cos, sin):
        T = x.shape[0]
        k = self.k_norm(self.k_proj(x).view(1, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(1, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v


class BlockLayer(nn.Module):
    def __init__(self, c: Qwen3Config, head_dim: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = BlockAttention(c, head_dim)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)


class BlockDrafter(GraphedStep, nn.Module):
    name = "block"

    def __init__(self, config: Qwen3Config, target, target_layer_ids: list[int], mask_token_id: int,
                 block_size: int):
        super().__init__()
        c = self.config = config
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.target_layer_ids = list(target_layer_ids)
        self.feature_layers = tuple(i + 1 for i in target_layer_ids)  # output of layer i
        self.mask_token_id, self.block_size = mask_token_id, block_size
        self.layers = nn.ModuleList(BlockLayer(c, self.head_dim) for _ in range(c.num_hidden_layers))
        self.fc = nn.Linear(len(target_layer_ids) * target.config.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.target_io = [target.model.embed_tokens, target.lm_head]  # shared, not in our state dict
        self.num_target_layers = target.config.num_hidden_layers
        # DFlash reads transformers' hidden_states[id + 1], which for the last layer is after the
        # final norm; the engine captures every layer before it, so that column is normed here
        self.final_norm = [target.model.norm]  # shared, not in our state dict
        self.normed_columns = [j for j, i in enumerate(self.target_layer_ids) if i == self.num_target_layers - 1]
        self.cache: KVCache | None = None
        self.frontier = 0
        self.init_graphs()

    # ---- checkpoint format -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, target) -> "BlockDrafter":
        raw, state = read_checkpoint(path)
        file = Path(path) / "config.json"
        check_architecture(raw, path)
        if raw.get("architectures") and raw["architectures"][0] != "DFlashDraftModel":
            raise UserError(f"{path}: architecture {raw['architectures'][0]} is not DFlashDraftModel")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            config_int(raw, key, path)
        n_heads = raw["num_attention_heads"]
        n_kv_heads = config_int(raw, "num_key_value_heads", path, default=n_heads)
        if n_heads % n_kv_heads:
            raise UserError(f"{file}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")
        if raw.get("head_dim") is not None:
            config_int(raw, "head_dim", path)
        elif raw["hidden_size"] % n_heads:
            raise UserError(f"{file}: hidden_size {raw['hidden_size']} is not divisible by num_attention_heads "
                            f"{n_heads} (and no head_dim is given)")
        config = build_config(Qwen3Config, raw, path)
        tc = target.config
        dflash = raw.get("dflash_config") or {}
        if not isinstance(dflash, dict):
            raise UserError(f"{file}: dflash_config is {dflash!r}, expected an object")
        n_target = config_int(raw, "num_target_layers", path, default=tc.num_hidden_layers)
        check_fits("number of target layers", n_target, tc.num_hidden_layers, path)
        check_fits("vocabulary size", raw.get("vocab_size", tc.vocab_size), tc.vocab_size, path)
        check_fits("hidden size", config.hidden_size, tc.hidden_size, path)
        ids = dflash.get("target_layer_ids") or default_target_layer_ids(n_target, config.num_hidden_layers)
        ids = layer_id_list(ids, "target_layer_ids", path, tc.num_hidden_layers, tc.num_hidden_layers - 1)
        mask_id = dflash.get("mask_token_id", raw.get("mask_token_id"))
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < tc.vocab_size:
            raise UserError(f"{path}: mask_token_id {mask_id!r} is not a token of the target's vocabulary of {tc.vocab_size}")
        block = dflash.get("block_size", raw.get("block_size", 16))
        if isinstance(block, bool) or not isinstance(block, int) or block < 2:
            raise UserError(f"{file}: block_size is {block!r}, expected an integer >= 2 (the bonus and a mask slot)")
        require_tensors(state, ("fc.weight",), path)
        drafter = cls(config, target, ids, mask_id, block)
        check_fits("fused feature width (fc input)", state["fc.weight"].shape[1], drafter.fc.in_features, path)
        load_strict(drafter, state, path)
        p = target.lm_head.weight
        return drafter.to(device=p.device, dtype=p.dtype).eval()

    def config_dict(self) -> dict:
        c = self.config
        return {
            "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "block_size": self.block_size,
            "dflash_config": {"mask_token_id": self.mask_token_id, "target_layer_ids": self.target_layer_ids},
            "num_target_layers": self.num_target_layers, "num_hidden_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 1e6),
            "attention_bias": False, "vocab_size": c.vocab_size, "tie_word_embeddings": False,
            "max_position_embeddings": c.max_position_embeddings,
            "layer_types": ["full_attention"] * c.num_hidden_layers,
        }

    def save_pretrained(self, path, dtype=torch.float16) -> None:
        write_checkpoint(path, self.config_dict(), self.state_dict(), dtype=dtype)

    # ---- drafting ----------------------------------------------------------------------
    def reset(self, max_len: int) -> None:
        p = self.fc.weight
        size = max_len + self.block_size
        if self.cache is None or self.cache.max_len < size:
            c = self.config
            self.cache = KVCache(c.num_hidden_layers, size, c.num_key_value_heads, self.head_dim, p.dtype, p.device)
            inv_freq, scale = rope_inv_freq(c, self.head_dim)
            cos, sin = rope_tables(inv_freq, scale, size)
            self.rope_cos, self.rope_sin = cos.to(p.device, p.dtype), sin.to(p.device, p.dtype)
            self.forget_graphs()  # captured over the old buffers
        self.frontier = 0

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """ctx = hidden_norm(fc(f)) of captured features [T, n_ids * target hidden], with the
        last layer's output final-normed as DFlash reads it."""
        if self.normed_columns:
            columns = list(features.chunk(len(self.target_layer_ids), dim=-1))
            for j in self.normed_columns:
                columns[j] = self.final_norm[0](columns[j])
            features = torch.cat(columns, dim=-1)
        return self.hidden_norm(self.fc(features))

    def catchup_step(self, key: tuple[int], features, next_tokens, positions) -> None:
        """KV-only context rows (GraphedStep.catch_up) in every draft layer; the block drafter
        reads features only (next_tokens is unused)."""
        c = self.context(features)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.kv(c, cos, sin)
            self.cache.write(i, positions, k, v)

    def graph_step(self, key: tuple[int, int, int], bonus, positions, u, inv_temperature):
        """The whole draft as one bucketed graph, key (k, attention span, sampled): the block
        [bonus, MASK...] at `positions` attends to the first kv_len cache positions up to its own
        last one (context + the whole block); the target's LM head on slots 1..k and
        `pick_tokens` (the argmax, or when sampled a sample of softmax(logits * inv_temperature)
        with the uniforms u [k]) give (target ids [k], their probabilities [k], proposals [k, V]
        or None)."""
        k, kv_len, sampled = key
        logits = self.target_io[1](self.forward_block(bonus, positions, kv_len)[1:1 + k]).float()
        p = torch.softmax(logits * inv_temperature if sampled else logits, dim=-1)
        tokens = pick_tokens(p, u, not sampled)
        return tokens, p.gather(1, tokens[:, None]).view(-1), (p if sampled else None)

    def draft_key(self, n: int, k: int, sampled: bool) -> tuple[int, int, int]:
        return k, kv_bucket(n + self.block_size, self.cache.max_len, self.kv_block), int(sampled)

    def tree_step(self, key: tuple[int, int], bonus, positions):
        """One block forward, key (depth, span): the log-probabilities and ids of the TREE_TOP
        best tokens of slots 1..depth, [depth, TREE_TOP] each."""
        depth, kv_len = key
        logits = self.target_io[1](self.forward_block(bonus, positions, kv_len)[1:1 + depth]).float()
        return torch.log_softmax(logits, dim=-1).topk(TREE_TOP, dim=-1)

    def draft_tree(self, ctx: Context, budget: int, depth: int, generator=None) -> Draft:
        """DDTree: from the slots' distributions of one block forward, the `budget` most probable
        prefixes (best-first over the product of the slots' marginals), best first."""
        device = self.fc.weight.device
        depth = min(depth, self.max_draft)
        if budget <= 0 or depth <= 0:
            return Draft(torch.empty(0, dtype=torch.long, device=device), parents=[], scores=[])
        n = ctx.n
        positions = torch.arange(n, n + self.block_size, device=device)
        key = (depth, kv_bucket(n + self.block_size, self.cache.max_len, self.kv_block))
        top_logp, top_ids = self.tree_graphs(key, ctx.tokens[n:n + 1], positions)
        tokens, parents, logp = best_first(top_logp.cpu(), top_ids.cpu(), budget)
        own = [lp - (logp[p] if p >= 0 else 0.0) for lp, p in zip(logp, parents)]
        return Draft(torch.tensor(tokens, dtype=torch.long, device=device), None, torch.tensor(own).exp(), parents,
                     torch.tensor(logp).exp().tolist())

    def forward_block(self, bonus: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """norm(h) [block, H] of the block [bonus, MASK...] at `positions`, after the cached context."""
        B = self.block_size
        embed, _ = self.target_io
        block = torch.cat([bonus, torch.full((B - 1,), self.mask_token_id, dtype=torch.long, device=bonus.device)])
        x = embed(block)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        visible = (torch.arange(kv_len, device=bonus.device) <= positions[-1])[None, :]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_norm(attn.q_proj(h).view(1, B, attn.n_heads, attn.head_dim)).transpose(1, 2)
            q = apply_rope(q, cos, sin)
            k, v = attn.kv(h, cos, sin)
            k_all, v_all = self.cache.write(i, positions, k, v)  # block K/V are scratch past the frontier
            y = attend(q, k_all[:, :, :kv_len], v_all[:, :, :kv_len], visible)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(B, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    @property
    def max_draft(self) -> int:
        return self.block_size - 1

    @property
    def default_k(self) -> int:  # the whole block: the forward costs the same for any k
        return self.block_size - 1

    def draft_example(self, k: int) -> tuple[torch.Tensor, ...]:
        """Scratch (bonus, positions) for the warm-up."""
        device = self.fc.weight.device
        return torch.zeros(1, dtype=torch.long, device=device), torch.arange(self.block_size, device=device)

    def tree_examples(self, spans: list[int], budget: int) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
        """Every tree depth (1..max_draft) at each span the block fits in (one block forward
        whatever the budget)."""
        bonus, positions = self.draft_example(self.max_draft)
        return {(depth, span): (bonus, positions) for depth in range(1, self.max_draft + 1)
                for span in spans if span >= self.block_size}

    def draft(self, ctx: Context, k: int, sampling: Sampling, generator=None) -> Draft:
        """Up to block_size - 1 tokens from one forward of [bonus, MASK...] after the cached context."""
        device = self.fc.weight.device
        k = min(k, self.max_draft)
        if k <= 0:
            return Draft(torch.empty(0, dtype=torch.long, device=device))
        n = ctx.n
        positions = torch.arange(n, n + self.block_size, device=device)
        tokens, confidence, proposals = self.replay_draft(n, k, sampling, generator, ctx.tokens[n:n + 1], positions)
        return Draft(tokens, proposals, confidence)
