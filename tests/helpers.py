"""Tiny random targets and drafters, built and saved in the published checkpoint formats."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from hybrid_sd.config import EngineConfig
from hybrid_sd.drafters import ARDrafter, BlockDrafter, NgramDrafter
from hybrid_sd.drafters.base import Context, Draft, Drafter
from hybrid_sd.engine import Engine
from hybrid_sd.models.loading import load_target
from hybrid_sd.models.packed_linear import pack_linears
from hybrid_sd.models.transformer import Transformer
from hybrid_sd.verify import Sampling, target_probs

VOCAB = 96
EOS = 3


def tiny_config(family: str = "llama", **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, initializer_range=0.15, eos_token_id=EOS, bos_token_id=1,
                  pad_token_id=0)
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        common.setdefault("head_dim", 24)
        return Qwen3Config(**common)
    raise ValueError(family)


def hf_model(config, seed: int = 0):
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


def save_hf_checkpoint(path: Path, config, seed: int = 0) -> Path:
    hf = hf_model(config, seed)
    hf.save_pretrained(path)
    return path


def tiny_target(tmp_path: Path, family: str = "llama", seed: int = 0, pack: bool = True, **overrides):
    """A random HF checkpoint on disk, loaded through the product's own loader."""
    path = save_hf_checkpoint(tmp_path / f"target-{family}-{seed}", tiny_config(family, **overrides), seed)
    model, _, eos = load_target(path, load_tokenizer=False)
    return (pack_linears(model) if pack else model), eos


# how the tests' engines run their steps unless a test says: HYBRID_SD_TEST_GRAPHS=compile runs the
# lossless suites with compiled steps (docs/performance.md), against plain decoding run eager
TEST_GRAPHS = os.environ.get("HYBRID_SD_TEST_GRAPHS", "eager")


def engine(target: Transformer, eos=(), drafters=(), k: int | None = None, router=None, **config) -> Engine:
    """An engine over injected drafters (one drafter at `k`, else its default) with
    EngineConfig(**config), its steps run as TEST_GRAPHS unless `graphs` is given."""
    drafters = [drafters] if isinstance(drafters, Drafter) else list(drafters)
    if k is not None:
        config["draft_k"] = {d.name: k for d in drafters}
    config.setdefault("graphs", TEST_GRAPHS)
    return Engine(target, eos, drafters, router=router, config=EngineConfig(**config))


_plain_outputs: dict = {}


def plain_greedy(target: Transformer, eos, prompt: list[int], max_new: int, max_len: int | None = None) -> list[int]:
    """The target decoding alone (memoised: many tests compare against the same outputs)."""
    key = (id(target), tuple(eos), tuple(prompt), max_new, max_len)
    if key not in _plain_outputs:
        _plain_outputs[key] = engine(target, eos, max_len=max_len, graphs="eager").generate(prompt, max_new).token_ids
    return list(_plain_outputs[key])


def random_prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 24) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = lo if i == 0 else int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append(torch.randint(4, VOCAB, (length,), generator=g).tolist())
    # a few prompts that repeat themselves, so prompt lookup has something to find
    for i in range(0, n, 5):
        out[i] = (out[i] * 3)[: max(len(out[i]) * 3, 2)]
    return out


def write_eagle3_checkpoint(path: Path, target_config, hidden: int | None = None, draft_vocab: int = 48,
                            seed: int = 0, speculators_names: bool = False, pinned_layers=None, **extra) -> Path:
    """A random EAGLE-3 head with the published config keys and weight names."""
    torch.manual_seed(seed)
    Ht = target_config.hidden_size
    h = hidden or Ht
    nH, nKV, hd, inner = 4, 2, 16, 96
    used = sorted(torch.randperm(target_config.vocab_size)[:draft_vocab].tolist())
    d2t = torch.tensor([t - i for i, t in enumerate(used)], dtype=torch.long)
    t2d = torch.zeros(target_config.vocab_size, dtype=torch.bool)
    t2d[used] = True
    s = 0.2
    layer = "layers.0." if speculators_names else "midlayer."
    state = {
        "fc.weight": torch.randn(h, 3 * Ht) * s / 3,
        layer + "input_layernorm.weight": 1 + 0.1 * torch.randn(h),
        layer + "hidden_norm.weight": 1 + 0.1 * torch.randn(h),
        layer + "self_attn.q_proj.weight": torch.randn(nH * hd, 2 * h) * s,
        layer + "self_attn.k_proj.weight": torch.randn(nKV * hd, 2 * h) * s,
        layer + "self_attn.v_proj.weight": torch.randn(nKV * hd, 2 * h) * s,
        layer + "self_attn.o_proj.weight": torch.randn(h, nH * hd) * s,
        layer + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(h),
        layer + "mlp.gate_proj.weight": torch.randn(inner, h) * s,
        layer + "mlp.up_proj.weight": torch.randn(inner, h) * s,
        layer + "mlp.down_proj.weight": torch.randn(h, inner) * s,
        "norm.weight": 1 + 0.1 * torch.randn(h),
        "lm_head.weight": torch.randn(draft_vocab, h) * s,
        "d2t": d2t, "t2d": t2d,
    }
    if h != Ht:  # a head narrower than the target brings its own embedding
        state["embed_tokens.weight"] = torch.randn(target_config.vocab_size, h) * s
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inner, "num_hidden_layers": 1, "num_attention_heads": nH,
              "num_key_value_heads": nKV, "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "vocab_size": target_config.vocab_size, "draft_vocab_size": draft_vocab,
              "max_position_embeddings": 2048, "tie_word_embeddings": False, **extra}
    if hidden is not None:
        config["target_hidden_size"] = Ht
    if pinned_layers is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(pinned_layers)}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def write_dflash_checkpoint(path: Path, target_config, n_layers: int = 2, block_size: int = 8, mask_token_id: int = 2,
                            seed: int = 0, target_layer_ids=None) -> Path:
    """A random DFlash block drafter with the published config keys and weight names."""
    torch.manual_seed(seed)
    H = target_config.hidden_size
    nH, nKV, hd, inner = 4, 2, 16, 96
    n_feat = len(target_layer_ids) if target_layer_ids is not None else n_layers
    s = 0.2
    state = {"fc.weight": torch.randn(H, n_feat * H) * s / 2, "hidden_norm.weight": 1 + 0.1 * torch.randn(H),
             "norm.weight": 1 + 0.1 * torch.randn(H)}
    for i in range(n_layers):
        p = f"layers.{i}."
        state.update({
            p + "input_layernorm.weight": 1 + 0.1 * torch.randn(H),
            p + "self_attn.q_proj.weight": torch.randn(nH * hd, H) * s,
            p + "self_attn.k_proj.weight": torch.randn(nKV * hd, H) * s,
            p + "self_attn.v_proj.weight": torch.randn(nKV * hd, H) * s,
            p + "self_attn.o_proj.weight": torch.randn(H, nH * hd) * s,
            p + "self_attn.q_norm.weight": 1 + 0.1 * torch.randn(hd),
            p + "self_attn.k_norm.weight": 1 + 0.1 * torch.randn(hd),
            p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(H),
            p + "mlp.gate_proj.weight": torch.randn(inner, H) * s,
            p + "mlp.up_proj.weight": torch.randn(inner, H) * s,
            p + "mlp.down_proj.weight": torch.randn(H, inner) * s,
        })
    dflash = {"mask_token_id": mask_token_id}
    if target_layer_ids is not None:
        dflash["target_layer_ids"] = list(target_layer_ids)
    config = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "block_size": block_size,
              "dflash_config": dflash, "num_target_layers": target_config.num_hidden_layers,
              "num_hidden_layers": n_layers, "hidden_size": H, "intermediate_size": inner,
              "num_attention_heads": nH, "num_key_value_heads": nKV, "head_dim": hd, "hidden_act": "silu",
              "rms_norm_eps": 1e-6, "rope_theta": 1e6, "attention_bias": False,
              "vocab_size": target_config.vocab_size, "tie_word_embeddings": False,
              "max_position_embeddings": 2048, "layer_types": ["full_attention"] * n_layers}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


class OracleDrafter(Drafter):
    """Hands the target's own future tokens back as drafts: every draft must be accepted."""

    name = "oracle"
    default_k = 4

    def __init__(self, reference: list[int]):
        self.reference, self.frontier = reference, 0

    def reset(self, max_len: int) -> None:
        self.frontier = 0

    def draft(self, ctx, k, sampling, generator=None):
        n = ctx.n
        assert ctx.ids == self.reference[:n + 1], "the committed context left the target's own output"
        return Draft(torch.tensor(self.reference[n + 1:n + 1 + k], dtype=torch.long))


class TargetAsDrafter(Drafter):
    """Drafts by running the target itself (its own cache); samples at T > 0 and reports q.

    Its proposal is close to the target's distribution, so rejection sampling accepts often
    and both its accept and its residual paths get exercised.
    """

    name = "self"
    default_k = 3

    def __init__(self, target):
        self.target, self.frontier, self.cache = target, 0, None

    def reset(self, max_len: int) -> None:
        self.cache, self.frontier = self.target.new_cache(max_len + 64), 0

    def catch_up(self, ctx, end: int) -> None:
        if end > self.frontier:
            self.target(ctx.tokens[self.frontier:end][None], torch.arange(self.frontier, end), self.cache, end + 64)
            self.frontier = end

    def draft(self, ctx, k, sampling, generator=None):
        n, token, tokens, probs = ctx.n, ctx.tokens[ctx.n:ctx.n + 1], [], []
        for j in range(k):
            hidden, _ = self.target(token[None], torch.tensor([n + j]), self.cache, n + j + 64)
            logits = self.target.logits(hidden[0, -1])
            if sampling.greedy:
                token = logits.argmax().view(1)
            else:
                p = torch.softmax(logits / sampling.temperature, -1)
                token = torch.multinomial(p, 1, generator=generator)
                probs.append(p)
            tokens.append(token)
        return Draft(torch.cat(tokens), torch.stack(probs) if probs else None)


class MixedDrafter(Drafter):
    """Runs a real drafter, then overwrites a random prefix of its draft with the target's own
    tokens, so that its catch-up sees every acceptance length, not only the rare lucky one.
    `follow` points it at the target's output of the next prompt."""

    def __init__(self, inner: Drafter, reference: list[int] = (), seed: int = 0):
        self.inner = inner
        self.name, self.feature_layers = inner.name, inner.feature_layers
        self.follow(reference, seed)

    def follow(self, reference: list[int], seed: int = 0) -> None:
        self.reference, self.g = list(reference), torch.Generator().manual_seed(seed)

    @property
    def frontier(self):
        return self.inner.frontier

    @property
    def default_k(self):
        return self.inner.default_k

    @property
    def max_draft(self):
        return self.inner.max_draft

    def reset(self, max_len):
        self.inner.reset(max_len)

    def catch_up(self, ctx, end):
        self.inner.catch_up(ctx, end)

    def rewind(self, position):
        self.inner.rewind(position)

    def lookahead(self, ctx, k_max):
        return self.inner.lookahead(ctx, k_max)

    def use_graphs(self, mode, kv_block, device, pad=None):
        self.inner.use_graphs(mode, kv_block, device, pad)

    def warm_up_plan(self, max_len, k_max, trees=0):
        return self.inner.warm_up_plan(max_len, k_max, trees)

    def draft_tree(self, ctx, budget, depth, generator=None):
        """The inner tree with the truth written along the path to a random node, up to a
        random depth: accepted paths that are not the first nodes (their rows move in the cache)."""
        d = self.inner.draft_tree(ctx, budget, depth, generator)
        if not d.parents:
            return d
        n = ctx.n
        path, node = [], int(torch.randint(0, len(d.parents), (1,), generator=self.g))
        while node >= 0:
            path.append(node)
            node = d.parents[node]
        path.reverse()
        truth = self.reference[n + 1:n + 1 + len(path)]
        m = int(torch.randint(0, len(truth) + 1, (1,), generator=self.g))
        tokens = d.tokens.clone()
        for node, t in zip(path[:m], truth[:m]):
            tokens[node] = t
        return Draft(tokens, None, d.confidence, d.parents, d.scores)

    def draft(self, ctx, k, sampling, generator=None):
        d = self.inner.draft(ctx, k, sampling, generator)
        n, kd = ctx.n, d.tokens.numel()
        truth = torch.tensor(self.reference[n + 1:n + 1 + kd], dtype=torch.long)
        m = int(torch.randint(0, truth.numel() + 1, (1,), generator=self.g))
        d.tokens = torch.cat([truth[:m], d.tokens[m:truth.numel()]])
        return d


def write_selfdistilled_data(path: Path, target, n_train: int = 12, n_heldout: int = 4, max_new: int = 24) -> Path:
    """A data directory in hybrid_sd.train.data's layout, answered by the tiny target itself."""
    import json as _json
    for split, n, seed in (("train", n_train, 1), ("heldout", n_heldout, 2)):
        rows = []
        for i, prompt in enumerate(random_prompts(n, seed=seed, lo=3, hi=12)):
            response = plain_greedy(target, (), prompt, max_new)
            rows.append({"category": ["code", "math", "structured", "chat"][i % 4], "prompt": "",
                         "prompt_ids": prompt, "response_ids": response})
        (path / split).mkdir(parents=True, exist_ok=True)
        (path / split / "mix-000.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    return path


def context_for(target, ids: list[int], layers, max_len=128):
    """Committed context ids[0..n] with the target's features of positions 0..n-1."""
    capture = tuple(sorted(set(layers)))
    _, feats = target(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1), capture=capture)
    features = torch.zeros(max_len, len(capture), target.config.hidden_size)
    features[:len(ids) - 1] = feats[0].view(len(ids) - 1, len(capture), -1)
    tokens = torch.zeros(max_len + 1, dtype=torch.long)
    tokens[:len(ids)] = torch.tensor(ids)
    return Context(list(ids), tokens, features, capture)


def make_drafter(kind: str, target, tmp_path: Path) -> Drafter:
    """A drafter of each built-in kind for a tiny target: random checkpoints in the published formats."""
    if kind == "ngram":
        return NgramDrafter(max_n=3)
    if kind == "ar":
        return pack_linears(ARDrafter.from_pretrained(write_eagle3_checkpoint(tmp_path / "ar", target.config), target))
    if kind == "block":
        return pack_linears(BlockDrafter.from_pretrained(
            write_dflash_checkpoint(tmp_path / "bl", target.config, block_size=8), target))
    raise ValueError(kind)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's test, bins with expected count < 5 pooled."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] < 5:  # the pooled bin may still be tiny
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


def second_token_marginal(target, prompt, s: Sampling) -> torch.Tensor:
    """Exact P(second generated token) = sum_x1 p(x1 | prompt) p(x2 | prompt, x1)."""
    V = target.config.vocab_size
    P = len(prompt)
    hidden, _ = target(torch.tensor([prompt]), torch.arange(P))
    p1 = target_probs(target.logits(hidden[0, -1]), s)
    batch = torch.cat([torch.tensor(prompt).expand(V, P), torch.arange(V)[:, None]], dim=1)
    hidden, _ = target(batch, torch.arange(P + 1))
    p2 = target_probs(target.logits(hidden[:, -1]), s)
    return p1 @ p2
