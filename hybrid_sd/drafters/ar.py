"""Autoregressive drafter in the EAGLE-3 format: one decoder layer over fused target features.

Row t of the draft layer pairs the target's features f_t (three layers, low|mid|high) with
the embedding of token x_{t+1}, at position t:
    g = fc(f_t);  a = [input_layernorm(embed(x_{t+1})) | hidden_norm(g)]
    g = g + o_proj(attn(a));  g = g + mlp(post_attention_layernorm(g));  logits = lm_head(norm(g))
Drafting feeds the output g back (instead of fc(f)) with the embedding of the token just
drafted, one position further. Only rows built from target features stay in the draft cache;
their K/V depend on the row input alone, so catching up is a KV-only pass (no queries,
attention output, MLP or logits for those rows).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
from transformers import LlamaConfig

from ..cache import KVCache
from ..config import TREE_WIDTH
from ..errors import UserError
from ..graphs import kv_bucket
from ..models.packed_linear import AfterPacking, graphing
from ..models.transformer import MLP, RMSNorm, apply_rope, attend, rope_inv_freq, rope_tables
from ..verify import Sampling
from .ar_chain import FusedChain, why_not_chained
from .base import Context, Draft, GraphedStep, pick_tokens
from .checkpoint import (build_config, check_architecture, check_fits, config_int, layer_id_list, load_strict,
                         read_checkpoint, require_tensors, write_checkpoint)

ARCHITECTURES = ("LlamaForCausalLM", "LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
# pinned aux layer ids name layer outputs in SGLang (+1: the hidden state entering layer id + 1)
# and the captured layer's input in vLLM (the hidden state entering layer id)
AUX_ID_SHIFT = {"sglang": 1, "vllm": 0}


def pinned_layer_ids(raw: dict, file) -> tuple[list | None, str]:
    """The pinned aux layer ids and where they were found: SGLang's eagle_config first, then
    the top-level key vLLM reads."""
    eagle = raw.get("eagle_config")
    if eagle is not None and not isinstance(eagle, dict):
        raise UserError(f"{file}: eagle_config is {eagle!r}, expected an object")
    key = "eagle_aux_hidden_state_layer_ids"
    if eagle and eagle.get(key):  # an empty list means "the default layers", as in vLLM
        return eagle[key], f"eagle_config.{key}"
    if raw.get(key):
        return raw[key], key
    return None, key


def default_aux_layers(n_target_layers: int) -> tuple[int, ...]:
    """Hidden states entering layers 2, L//2 and L-3 (transformers' hidden_states numbering)."""
    L = n_target_layers
    return (2, L // 2, L - 3)


class Eagle3Attention(nn.Module):
    def __init__(self, c: LlamaConfig, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, head_dim
        bias = bool(getattr(c, "attention_bias", False))
        self.q_proj = nn.Linear(2 * c.hidden_size, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(2 * c.hidden_size, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(2 * c.hidden_size, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, c.hidden_size, bias=bias)

    def kv(self, a, cos, sin):
        T = a.shape[0]
        k = self.k_proj(a).view(1, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(a).view(1, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, a, cos, sin, cache: KVCache, positions, kv_len: int, tree=None):
        """`tree` = (slots, mask [T, kv_len]): tree rows write at `slots` and see what the mask allows."""
        T = a.shape[0]
        k, v = self.kv(a, cos, sin)
        slots, mask = tree if tree is not None else (positions, None)
        k_all, v_all = cache.write(0, slots, k, v)
        q = apply_rope(self.q_proj(a).view(1, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        if mask is None:
            mask = torch.arange(kv_len, device=a.device)[None, :] <= positions[:, None]
        y = attend(q, k_all[:, :, :kv_len], v_all[:, :, :kv_len], mask)
        return self.o_proj(y.transpose(1, 2).reshape(T, -1))


class Eagle3Layer(nn.Module):
    def __init__(self, c: LlamaConfig, head_dim: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Eagle3Attention(c, head_dim)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, bool(getattr(c, "mlp_bias", False)))
        self.norm_before_residual = bool(getattr(c, "norm_before_residual", False))

    def row_input(self, g, emb):
        """The attention input [embed | hidden] and the residual the layer adds to."""
        g_normed = self.hidden_norm(g)
        a = torch.cat([self.input_layernorm(emb), g_normed], dim=-1)
        return a, (g_normed if self.norm_before_residual else g)


class ARDrafter(GraphedStep, AfterPacking):
    name = "ar"
    default_k = 6

    def __init__(self, config: LlamaConfig, embed: nn.Embedding, target_layers: int, head_dim: int | None = None,
                 feature_layers: tuple[int, ...] | None = None):
        super().__init__()
        c = self.config = config
        H = c.hidden_size
        self.head_dim = head_dim or getattr(c, "head_dim", None) or H // c.num_attention_heads
        self.target_hidden = getattr(c, "target_hidden_size", None) or H
        eagle = getattr(c, "eagle_config", None) or {}
        pinned = eagle.get("eagle_aux_hidden_state_layer_ids")
        # pinned ids name layer outputs; +1 gives the hidden state entering the next layer
        self.feature_layers = tuple(i + 1 for i in pinned) if pinned else default_aux_layers(target_layers)
        if feature_layers is not None:  # from_pretrained read them (see its aux_ids)
            self.feature_layers = tuple(feature_layers)
        n_aux = len(self.feature_layers)
        self.draft_vocab = getattr(c, "draft_vocab_size", None) or c.vocab_size
        self.fc = nn.Linear(n_aux * self.target_hidden, H, bias=bool(getattr(c, "bias", False)))
        # optional norms before fusing: one per target layer, or one over the concatenation
        self.fc_norm = (nn.ModuleList(RMSNorm(self.target_hidden, c.rms_norm_eps) for _ in range(n_aux))
                        if getattr(c, "fc_norm", False) else None)
        self.input_norm = RMSNorm(n_aux * self.target_hidden, c.rms_norm_eps) if getattr(c, "norm_before_fc", False) else None
        self.midlayer = Eagle3Layer(c, self.head_dim)
        self.norm = RMSNorm(H, c.rms_norm_eps)
        self.lm_head = nn.Linear(H, self.draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        self.norm_output = bool(getattr(c, "norm_output", False))
        self.embed = [embed]  # the target's embedding, held outside this module's state dict
        self.cache: KVCache | None = None
        self.frontier = 0
        self.chain: FusedChain | None = None  # the greedy chain through the CPU kernel, once packed
        self.init_graphs()

    def after_packing(self) -> None:
        self.chain = None if why_not_chained(self) else FusedChain(self)

    def in_kernel(self) -> bool:
        return self.chain is not None

    def bound_chain(self) -> FusedChain | None:
        """The kernel's chain pointed at this drafter's cache and RoPE tables; None where it cannot
        run (not packed for it, or inside a graph mode's trace or compile)."""
        if self.chain is None or graphing():
            return None
        self.chain.bind(self.cache, self.rope_cos, self.rope_sin)
        return self.chain

    # ---- checkpoint format -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, target, aux_ids: str | None = None) -> "ARDrafter":
        """`aux_ids` says how pinned layer ids are read: "sglang" (the default; id + 1, the
        hidden state entering layer id + 1) or "vllm" (id itself, the state entering layer id);
        the environment variable HYBRID_SD_EAGLE3_AUX_IDS sets it when the caller does not."""
        raw, state = read_checkpoint(path)
        file = Path(path) / "config.json"
        check_architecture(raw, path)
        if raw.get("architectures") and raw["architectures"][0] not in ARCHITECTURES:
            raise UserError(f"{path}: architecture {raw['architectures'][0]} is not an EAGLE-3 head "
                            f"(expected one of {', '.join(ARCHITECTURES)})")
        convention = aux_ids or os.environ.get("HYBRID_SD_EAGLE3_AUX_IDS") or "sglang"
        if convention not in AUX_ID_SHIFT:
            raise UserError(f"EAGLE-3 layer id convention {convention!r} is unknown (choose from {', '.join(AUX_ID_SHIFT)})")
        # a vLLM "speculators" export names the decoder layer layers.0 instead of midlayer
        state = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v for k, v in state.items()}
        for key in ("hidden_size", "intermediate_size", "num_attention_heads"):
            config_int(raw, key, path)
        n_heads = raw["num_attention_heads"]
        n_kv_heads = config_int(raw, "num_key_value_heads", path, default=n_heads)
        if n_heads % n_kv_heads:
            raise UserError(f"{file}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")
        for key in ("draft_vocab_size", "target_hidden_size"):
            if raw.get(key) is not None:
                config_int(raw, key, path)
        require_tensors(state, ("fc.weight", "midlayer.self_attn.q_proj.weight"), path)
        q_rows = state["midlayer.self_attn.q_proj.weight"].shape[0]
        if q_rows % n_heads:
            raise UserError(f"{path}: midlayer.self_attn.q_proj.weight has {q_rows} rows, not a multiple of "
                            f"num_attention_heads {n_heads} (from {file})")
        head_dim = q_rows // n_heads
        tc = target.config
        pinned, key = pinned_layer_ids(raw, file)
        shift = AUX_ID_SHIFT[convention]
        features = None
        if pinned is not None:
            # the engine has no hidden state past the last layer's input for an EAGLE-3 head
            ids = layer_id_list(pinned, key, path, tc.num_hidden_layers, tc.num_hidden_layers - 1 - shift)
            features = tuple(i + shift for i in ids)
        config = build_config(LlamaConfig, raw, path)
        embed = target.model.embed_tokens
        own_embedding = "embed_tokens.weight" in state
        if own_embedding:
            own = state["embed_tokens.weight"]
            if own.ndim != 2 or own.shape[0] != tc.vocab_size:
                raise UserError(f"{path}: embed_tokens.weight has shape {list(own.shape)}, expected "
                                f"[{tc.vocab_size}, hidden_size]")
            embed = nn.Embedding.from_pretrained(own, freeze=True)
        check_fits("vocabulary size", raw.get("vocab_size"), tc.vocab_size, path)
        check_fits("embedding width", config.hidden_size, embed.embedding_dim, path)
        drafter = cls(config, embed, tc.num_hidden_layers, head_dim, feature_layers=features)
        if own_embedding:
            drafter.embed_tokens = embed  # part of the checkpoint, saved back under the same name
        check_fits("target hidden size", drafter.target_hidden, tc.hidden_size, path)
        if max(drafter.feature_layers) >= tc.num_hidden_layers:
            check_fits("deepest feature layer", max(drafter.feature_layers), f"< {tc.num_hidden_layers}", path)
        if "d2t" in state and state["d2t"].is_floating_point():
            raise UserError(f"{path}: d2t holds {state['d2t'].dtype} values, expected integer token offsets")
        state.setdefault("t2d", drafter.t2d)  # training-only; some exports drop it
        load_strict(drafter, state, path)
        mapped = drafter.d2t + torch.arange(drafter.draft_vocab)
        lo, hi = int(mapped.min()), int(mapped.max())
        if lo < 0 or hi >= tc.vocab_size:
            raise UserError(f"{path}: d2t maps draft tokens to target ids {lo}..{hi}, outside the target's "
                            f"vocabulary of {tc.vocab_size}; this drafter was trained for another target")
        p = target.lm_head.weight
        return drafter.to(device=p.device, dtype=p.dtype).eval()

    def config_dict(self) -> dict:
        c = self.config
        out = {
            "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": 1, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size,
            "draft_vocab_size": self.draft_vocab, "target_hidden_size": self.target_hidden,
            "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": False,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in self.feature_layers]},
        }
        rope = getattr(c, "rope_parameters", None) or {}
        if rope.get("rope_theta") not in (None, 10000.0):
            out["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        for flag in ("norm_before_residual", "norm_output", "fc_norm", "norm_before_fc"):
            if getattr(c, flag, False):
                out[flag] = True
        return out

    def save_pretrained(self, path, dtype=torch.float16) -> None:
        state = {k: v for k, v in self.state_dict().items()}
        write_checkpoint(path, self.config_dict(), state, dtype=dtype)

    # ---- drafting ----------------------------------------------------------------------
    def reset(self, max_len: int, k_max: int = 64) -> None:
        p = self.lm_head.weight
        size = max_len + k_max
        if self.cache is None or self.cache.max_len < size:
            self.cache = KVCache(1, size, self.config.num_key_value_heads, self.head_dim, p.dtype, p.device)
            inv_freq, scale = rope_inv_freq(self.config, self.head_dim)
            cos, sin = rope_tables(inv_freq, scale, size)
            self.rope_cos, self.rope_sin = cos.to(p.device, p.dtype), sin.to(p.device, p.dtype)
            self.forget_graphs()  # captured over the old buffers
        self.frontier = 0

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """fc over the concatenated target features [T, n_aux * target_hidden]."""
        if self.fc_norm is not None:
            chunks = features.split(self.target_hidden, dim=-1)
            features = torch.cat([norm(x) for norm, x in zip(self.fc_norm, chunks)], dim=-1)
        if self.input_norm is not None:
            features = self.input_norm(features)
        return self.fc(features)

    def catchup_step(self, key: tuple[int], features, next_tokens, positions) -> None:
        """KV-only rows (GraphedStep.catch_up): norms, k/v projections and RoPE only; row t pairs
        the target's features at t with the token at t + 1."""
        chain = self.bound_chain()
        if chain is not None:
            chain.catch_up(self.fuse(features), next_tokens.contiguous(), positions.contiguous())
            return
        a, _ = self.midlayer.row_input(self.fuse(features), self.embed[0](next_tokens))
        k, v = self.midlayer.self_attn.kv(a, self.rope_cos[positions], self.rope_sin[positions])
        self.cache.write(0, positions, k, v)

    def step(self, g, emb, positions, kv_len, tree=None):
        """Full computation of rows (g, emb) at `positions` (a tree's rows: with (slots, mask)):
        new hidden g and draft-vocab logits."""
        layer = self.midlayer
        a, residual = layer.row_input(g, emb)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = residual + layer.self_attn(a, cos, sin, self.cache, positions, kv_len, tree)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        normed = self.norm(h)
        return (normed if self.norm_output else h), self.lm_head(normed).float()

    def graph_step(self, key: tuple[int, int, int], features, token, start, u, inv_temperature):
        """The whole draft as one bucketed graph, key (k, attention span, sampled): from the
        fused features of the last context row [1, C] and the bonus token [1] at position
        start [1], k steps, each embedding the last token, running the layer at the next
        position and picking the next token (`pick_tokens`: the argmax, or when sampled a
        sample of softmax(logits * inv_temperature [1]) with the uniform u[j]). Returns
        (target ids [k], their drafter probabilities [k], proposals [k, draft vocab] or None)."""
        k, kv_len, sampled = key
        g = self.fuse(features)
        tokens, confidence, proposals = [], [], []
        for j in range(k):
            g, logits = self.step(g, self.embed[0](token), start + j, kv_len)
            p = torch.softmax(logits * inv_temperature if sampled else logits, dim=-1)  # [1, draft vocab]
            d = pick_tokens(p, u[j:j + 1], not sampled)
            if sampled:
                proposals.append(p[0])
            token = self.to_target_ids(d)
            tokens.append(token)
            confidence.append(p[0, d])
        return torch.cat(tokens), torch.cat(confidence), (torch.stack(proposals) if proposals else None)

    def draft_key(self, n: int, k: int, sampled: bool) -> tuple[int, int, int]:
        return k, kv_bucket(n + k, self.cache.max_len, self.kv_block), int(sampled)

    def tree_step(self, key: tuple[int, int], g, tokens, positions, slots, mask):
        """One depth of a tree draft, key (rows, span): rows (g [R, H], token [R]) at RoPE
        `positions`, writing K/V at `slots` and attending where `mask` [R, span] allows. Returns
        (new g [R, H], log-probabilities [R, TREE_WIDTH] and target ids [R, TREE_WIDTH] of each
        row's best next tokens)."""
        chain = self.bound_chain()
        if chain is not None:
            g, logits = chain.tree_step(g, tokens, positions, slots, mask)
        else:
            g, logits = self.step(g, self.embed[0](tokens), positions, key[1], (slots, mask))
        logp, ids = torch.log_softmax(logits, dim=-1).topk(TREE_WIDTH, dim=-1)
        return g, logp, self.to_target_ids(ids)

    def draft_tree(self, ctx: Context, budget: int, depth: int, generator=None) -> Draft:
        """EAGLE-2's dynamic tree: the root row predicts depth 1; at each further depth the
        TREE_WIDTH most probable new nodes (by path probability) are run, each proposing its
        TREE_WIDTH best children; finally the `budget` most probable nodes of all proposed are
        kept, best first (a child is never more probable than its parent, so they form a tree).
        The frontier's rows sit in scratch slots past the context, each seeing the context and
        its own ancestors.

        A kept node's ancestors are kept too, so none lies deeper than `budget` or, at any depth,
        below the `budget` best: a smaller budget expands min(TREE_WIDTH, budget) nodes per depth,
        at most `budget` deep, and keeps the same nodes (the first `budget` of a larger tree) --
        bit for bit where the CPU kernel runs the steps (a row's result does not depend on the
        rows beside it); elsewhere rounding may order a near-tie differently, and near the cache's
        end a wider tree may be cut shallower."""
        n, device = ctx.n, self.lm_head.weight.device
        if budget <= 0 or depth <= 0 or n == 0:
            return Draft(torch.empty(0, dtype=torch.long, device=device), parents=[], scores=[])
        W = min(TREE_WIDTH, budget)
        depth = min(depth, budget, (self.cache.max_len - n) // W)  # the frontier's scratch slots must fit
        span = kv_bucket(n + (depth - 1) * W, self.cache.max_len, self.kv_block)
        context = torch.arange(span, device=device) < n
        g = self.fuse(ctx.feature_rows(self.feature_layers, n - 1, n))
        start = torch.full((1,), n - 1, dtype=torch.long, device=device)
        g, logp, ids = self.tree_graphs((1, span), g, ctx.tokens[n:n + 1], start, start, context[None])
        tokens, parents, scores = [], [], []  # all proposed nodes; scores: path log-probability

        def propose(token: int, parent: int, score: float) -> int:
            tokens.append(token)
            parents.append(parent)
            scores.append(score)
            return len(tokens) - 1

        # (node, row of g holding its parent's output, its ancestors' slots)
        roots = [(propose(t, -1, lp), 0, []) for lp, t in zip(logp[0].tolist(), ids[0].tolist())]
        frontier = roots[:W]  # topk sorted them, best first
        for d in range(1, depth):
            slots = [n + (d - 1) * W + i for i in range(len(frontier))]
            mask = context.expand(len(frontier), span).clone()
            for i, (_, _, ancestors) in enumerate(frontier):
                mask[i, ancestors + [slots[i]]] = True
            g, logp, ids = self.tree_graphs(
                (len(frontier), span), g[torch.tensor([r for _, r, _ in frontier], device=device)],
                torch.tensor([tokens[node] for node, _, _ in frontier], device=device), torch.full((len(frontier),), n - 1 + d, device=device),
                torch.tensor(slots, device=device), mask)
            candidates = []
            for i, (node, _, ancestors) in enumerate(frontier):
                for lp, t in zip(logp[i].tolist(), ids[i].tolist()):
                    child = propose(t, node, scores[node] + lp)
                    candidates.append((scores[child], child, i, ancestors + [slots[i]]))
            best = sorted(candidates, key=lambda c: -c[0])[:W]
            frontier = [(child, i, ancestors) for _, child, i, ancestors in best]
        # the budget most probable nodes, parents before children (ties: the earlier node)
        order = sorted(range(len(tokens)), key=lambda i: (-scores[i], i))[:budget]
        new_index = {old: i for i, old in enumerate(order)}
        kept_parents = [new_index[parents[i]] if parents[i] >= 0 else -1 for i in order]
        path_logp = [scores[i] for i in order]
        own = [scores[i] - (scores[parents[i]] if parents[i] >= 0 else 0.0) for i in order]
        return Draft(torch.tensor([tokens[i] for i in order], dtype=torch.long, device=device), None,
                     torch.tensor(own).exp(), kept_parents, torch.tensor(path_logp).exp().tolist())

    def draft_example(self, k: int) -> tuple[torch.Tensor, ...]:
        """Scratch (features, token, start) for the warm-up."""
        p = self.lm_head.weight
        zero = torch.zeros(1, dtype=torch.long, device=p.device)
        return torch.zeros(1, self.fc.in_features, device=p.device, dtype=p.dtype), zero, zero

    def tree_examples(self, spans: list[int], budget: int) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
        """The root (one row) and every later depth (min(TREE_WIDTH, budget) frontier rows) at
        each span."""
        p = self.lm_head.weight
        examples = {}
        for rows in {1, min(TREE_WIDTH, budget)}:
            index = torch.arange(rows, device=p.device)
            for span in spans:
                if span >= rows:
                    examples[(rows, span)] = (torch.zeros(rows, self.config.hidden_size, device=p.device, dtype=p.dtype),
                                              torch.zeros(rows, dtype=torch.long, device=p.device), index, index,
                                              torch.ones(rows, span, dtype=torch.bool, device=p.device))
        return examples

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def draft(self, ctx: Context, k: int, sampling: Sampling, generator=None) -> Draft:
        """k steps in one graph replay: the last context row (f_{n-1}, x_n) predicts x_{n+1}, then feed back."""
        n = ctx.n
        device = self.lm_head.weight.device
        if k <= 0 or n == 0:
            return Draft(torch.empty(0, dtype=torch.long, device=device))
        chain = self.bound_chain() if sampling.greedy else None
        if chain is not None:  # the whole chain in one kernel call, whatever the graphs mode: graph_step is its reference
            g = self.fuse(ctx.feature_rows(self.feature_layers, n - 1, n))
            tokens, confidence = chain(g[0], int(ctx.tokens[n]), n - 1, k)
            return Draft(tokens, None, confidence)
        start = torch.full((1,), n - 1, dtype=torch.long, device=device)
        tokens, confidence, proposals = self.replay_draft(n, k, sampling, generator, ctx.feature_rows(
            self.feature_layers, n - 1, n), ctx.tokens[n:n + 1], start)
        draft_probs = None
        if proposals is not None:  # on the target's vocabulary, for rejection sampling
            index = self.to_target_ids(torch.arange(self.draft_vocab, device=device)).expand(k, -1)
            draft_probs = torch.zeros(k, self.config.vocab_size, device=device).scatter_(1, index, proposals)
        return Draft(tokens, draft_probs, confidence)
