"""Drafters: published formats load exactly, round-trip, fail clearly on a mismatch, and their
incremental (KV-only catch-up) drafts equal a from-scratch computation of the same spec."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import context_for, tiny_config, tiny_target, write_dflash_checkpoint, write_eagle3_checkpoint
from hybrid_sd.drafters import ARDrafter, BlockDrafter, NgramDrafter
from hybrid_sd.drafters.base import Context
from hybrid_sd.drafters.block import default_target_layer_ids
from hybrid_sd.errors import UserError
from hybrid_sd.models.transformer import apply_rope
from hybrid_sd.verify import Sampling

GREEDY = Sampling()


def sequence(n, seed=0, vocab=96):
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- from-scratch references (no cache, no KV-only pass), straight from formats.md --------

def rope_at(drafter, x, positions):
    return apply_rope(x, drafter.rope_cos[positions], drafter.rope_sin[positions])


def ar_reference(drafter: ARDrafter, ctx: Context, k: int) -> list[int]:
    n, layer = ctx.n, drafter.midlayer
    attn = layer.self_attn
    g_in = list(drafter.fuse(ctx.feature_rows(drafter.feature_layers, 0, n)))  # per row t: fc(f_t)
    toks = ctx.ids[1:n + 1]  # row t pairs f_t with x_{t+1}
    out = []
    for step in range(k):
        T = len(g_in)
        g = torch.stack(g_in)
        emb = drafter.embed[0](torch.tensor(toks))
        a = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(g)], -1)
        pos = torch.arange(T)
        q = rope_at(drafter, attn.q_proj(a).view(1, T, attn.n_heads, -1).transpose(1, 2), pos)
        kk = rope_at(drafter, attn.k_proj(a).view(1, T, attn.n_kv_heads, -1).transpose(1, 2), pos)
        v = attn.v_proj(a).view(1, T, attn.n_kv_heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, kk, v, is_causal=True, enable_gqa=True)
        residual = layer.hidden_norm(g) if layer.norm_before_residual else g
        h = residual + attn.o_proj(y.transpose(1, 2).reshape(T, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        d = int(drafter.to_target_ids(drafter.lm_head(drafter.norm(h[-1])).argmax()))
        out.append(d)
        g_in.append(h[-1])
        toks.append(d)
    return out


def block_reference(drafter: BlockDrafter, ctx: Context, k: int) -> list[int]:
    n, B = ctx.n, drafter.block_size
    embed, lm_head = drafter.target_io
    ctx_h = drafter.hidden_norm(drafter.fc(ctx.feature_rows(drafter.feature_layers, 0, n)))
    x = embed(torch.tensor([ctx.ids[n]] + [drafter.mask_token_id] * (B - 1)))
    pos = torch.arange(n + B)
    for layer in drafter.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(h).view(1, B, attn.n_heads, -1)).transpose(1, 2)
        q = rope_at(drafter, q, pos[n:])
        both = torch.cat([ctx_h, h])
        kk = attn.k_norm(attn.k_proj(both).view(1, n + B, attn.n_kv_heads, -1)).transpose(1, 2)
        kk = rope_at(drafter, kk, pos)
        v = attn.v_proj(both).view(1, n + B, attn.n_kv_heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, kk, v, enable_gqa=True)  # no mask: bidirectional block
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return lm_head(drafter.norm(x)[1:1 + k]).argmax(-1).tolist()


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_target(tmp_path_factory.mktemp("t"), "llama", pack=False)[0]


def load_ar(path, target):
    d = ARDrafter.from_pretrained(path, target)
    d.reset(128)
    return d


def load_block(path, target):
    d = BlockDrafter.from_pretrained(path, target)
    d.reset(128)
    return d


AR_VARIANTS = {
    "plain": {},
    "speculators-names": dict(speculators_names=True),
    "pinned-layers": dict(pinned_layers=[0, 3, 5]),
    "narrow-head-own-embedding": dict(hidden=32),
    "norm-before-residual": dict(norm_before_residual=True),
    "rope-theta": dict(rope_theta=50000.0),
}


@pytest.mark.parametrize("variant", list(AR_VARIANTS))
def test_ar_lazy_catch_up_equals_reference(llama, tmp_path, variant):
    drafter = load_ar(write_eagle3_checkpoint(tmp_path / "ar", llama.config, **AR_VARIANTS[variant]), llama)
    lagging = load_ar(tmp_path / "ar", llama)
    ids = sequence(30)
    for n in (3, 4, 9, 17, 29):  # catches up every "round"
        ctx = context_for(llama, ids[:n + 1], drafter.feature_layers)
        drafter.catch_up(ctx, n)
        got = drafter.draft(ctx, 5, GREEDY).tokens.tolist()
        assert got == ar_reference(drafter, ctx, 5), f"n={n}"
    lagging.catch_up(ctx, 29)  # one batched KV-only pass over everything it missed
    assert lagging.draft(ctx, 5, GREEDY).tokens.tolist() == got


@pytest.mark.parametrize("layer_ids", [None, [1, 4, 6]])
def test_block_lazy_catch_up_equals_reference(llama, tmp_path, layer_ids):
    path = write_dflash_checkpoint(tmp_path / "bl", llama.config, n_layers=2 if layer_ids is None else 3,
                                   target_layer_ids=layer_ids)
    drafter, lagging = load_block(path, llama), load_block(path, llama)
    ids = sequence(30, seed=1)
    for n in (1, 2, 8, 15, 29):
        ctx = context_for(llama, ids[:n + 1], drafter.feature_layers)
        drafter.catch_up(ctx, n)
        got = drafter.draft(ctx, 7, GREEDY).tokens.tolist()
        assert got == block_reference(drafter, ctx, 7), f"n={n}"
    lagging.catch_up(ctx, 29)
    assert lagging.draft(ctx, 7, GREEDY).tokens.tolist() == got


def test_feature_layer_conventions(llama, tmp_path):
    L = llama.config.num_hidden_layers
    ar = ARDrafter.from_pretrained(write_eagle3_checkpoint(tmp_path / "a", llama.config), llama)
    assert ar.feature_layers == (2, L // 2, L - 3)  # hidden states entering layers 2, L/2, L-3
    pinned = ARDrafter.from_pretrained(write_eagle3_checkpoint(tmp_path / "p", llama.config, pinned_layers=[1, 3, 5]),
                                       llama)
    assert pinned.feature_layers == (2, 4, 6)  # pinned ids are layer outputs
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # DFlash's Qwen3-8B-b16 ids
    block = BlockDrafter.from_pretrained(write_dflash_checkpoint(tmp_path / "b", llama.config, n_layers=2), llama)
    assert block.target_layer_ids == [1, L - 3] and block.feature_layers == (2, L - 2)


@pytest.mark.parametrize("kind", ["ar", "block"])
def test_round_trip_and_no_key_warnings(llama, tmp_path, kind):
    write = write_eagle3_checkpoint if kind == "ar" else write_dflash_checkpoint
    cls = ARDrafter if kind == "ar" else BlockDrafter
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a published-format checkpoint loads silently
        original = cls.from_pretrained(write(tmp_path / "src", llama.config), llama)
    original.save_pretrained(tmp_path / "saved", dtype=torch.float32)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    source = json.loads((tmp_path / "src" / "config.json").read_text())
    for key in ("architectures", "hidden_size", "num_attention_heads", "vocab_size"):
        assert saved[key] == source[key], key
    again = cls.from_pretrained(tmp_path / "saved", llama)
    for a, b in zip(original.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    ids = sequence(20, seed=2)
    ctx = context_for(llama, ids, original.feature_layers)
    drafts = []
    for d in (original, again):
        d.reset(128)
        d.catch_up(ctx, ctx.n)
        drafts.append(d.draft(ctx, 5, GREEDY).tokens.tolist())
    assert drafts[0] == drafts[1]


def test_mismatched_checkpoints_name_both_values(llama, tmp_path):
    other = tiny_config("llama", hidden_size=32, vocab_size=80)
    with pytest.raises(UserError, match=r"vocabulary size is 80 but the target's is 96"):
        ARDrafter.from_pretrained(write_eagle3_checkpoint(tmp_path / "a", other), llama)
    with pytest.raises(UserError, match=r"hidden size is 32 but the target's is 64"):
        BlockDrafter.from_pretrained(write_dflash_checkpoint(tmp_path / "b", tiny_config("llama", hidden_size=32)), llama)
    with pytest.raises(UserError, match=r"number of target layers is 4 but the target's is 8"):
        BlockDrafter.from_pretrained(write_dflash_checkpoint(tmp_path / "c", tiny_config("llama", num_hidden_layers=4)),
                                     llama)
    with pytest.raises(UserError, match="layers the target"):
        BlockDrafter.from_pretrained(write_dflash_checkpoint(tmp_path / "d", llama.config, target_layer_ids=[1, 9]),
                                     llama)
    with pytest.raises(UserError, match="not a drafter checkpoint"):
        ARDrafter.from_pretrained(tmp_path / "missing", llama)


def test_official_pytorch_bin_loads(llama, tmp_path):
    """The official EAGLE-3 heads ship fp16 pytorch_model.bin; it loads with weights_only=True."""
    from safetensors.torch import load_file
    path = write_eagle3_checkpoint(tmp_path / "bin", llama.config)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(path / "model.safetensors").items()}
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    drafter = ARDrafter.from_pretrained(path, llama)
    assert drafter.fc.weight.dtype == llama.lm_head.weight.dtype


def test_ngram_lookup_prefers_longest_recent_match():
    d = NgramDrafter(max_n=3)
    assert d.lookup([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]
    assert d.lookup([5, 6, 7], 3) == []
    assert d.lookup([4, 4], 2) == [4]
    assert d.lookup([1], 4) == []
