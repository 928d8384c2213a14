"""The compact target equals transformers' own forward, and its cache arithmetic is exact."""
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import hf_model, save_hf_checkpoint, tiny_config
from hybrid_sd.errors import UserError
from hybrid_sd.models.loading import load_target
from hybrid_sd.models.packed_linear import pack_linears
from hybrid_sd.models.transformer import Transformer

FAMILIES = {
    "llama": {},
    "llama-rope-llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                              rope_theta=500000.0),
    "llama-tied-bias": dict(tie_word_embeddings=True, attention_bias=True),
    "qwen2": {},
    "qwen3": {},
}


def build(name):
    family = name.split("-")[0]
    config = tiny_config(family, **FAMILIES[name])
    hf = hf_model(config)
    ours = Transformer(config).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)
    if config.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    return config, hf, ours


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_and_features_equal_transformers(name):
    config, hf, ours = build(name)
    tokens = torch.randint(0, config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    ref = hf(tokens, output_hidden_states=True)
    hidden, feats = ours(tokens, torch.arange(37), capture=(2, 4, 6))
    torch.testing.assert_close(ours.logits(hidden), ref.logits, rtol=1e-5, atol=1e-5)
    expected = torch.cat([ref.hidden_states[i] for i in (2, 4, 6)], dim=-1)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    # with the cache (batch 1) the same numbers come out
    hidden_c, _ = ours(tokens[:1], torch.arange(37), ours.new_cache(64), kv_len=64)
    torch.testing.assert_close(ours.logits(hidden_c), ref.logits[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
@pytest.mark.parametrize("packed", [False, True])
def test_prefill_then_steps_equal_one_long_forward(name, packed):
    config, _, ours = build(name)
    if packed:
        pack_linears(ours)
    tokens = torch.randint(0, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    full, _ = ours(tokens, torch.arange(40), ours.new_cache(128), kv_len=128)
    cache = ours.new_cache(128)
    parts = [ours(tokens[:, :10], torch.arange(10), cache, kv_len=64)[0]]
    for t in range(10, 40):
        parts.append(ours(tokens[:, t:t + 1], torch.tensor([t]), cache, kv_len=64)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "llama-tied-bias", "qwen2", "qwen3"])
def test_packing_keeps_outputs_and_state_dict(name):
    """Packed (q|k|v and gate|up fused; one row through the per-thread slabs, several through
    oneDNN) = unpacked, for one row and for several, and the state dict is unchanged."""
    config, _, ours = build(name)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    tokens = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    expected = [ours.logits(ours(tokens[:, :n], torch.arange(n))[0]) for n in (1, 9)]
    pack_linears(ours)
    attn, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
    assert attn.qkv is not None and mlp.gate_up is not None
    assert attn.qkv.out_features == attn.q_proj.out_features + 2 * attn.k_proj.out_features
    assert (attn.qkv.bias is not None) == (attn.q_proj.bias is not None)
    for n, ref in zip((1, 9), expected):
        torch.testing.assert_close(ours.logits(ours(tokens[:, :n], torch.arange(n))[0]), ref, rtol=1e-5, atol=1e-5)
    after = ours.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_block_after_rollback_equals_uninterrupted(name):
    """Write a rejected block, roll back by length only, write another: as if never rejected."""
    config, _, ours = build(name)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, config.vocab_size, (1, 20), generator=g)
    wrong = torch.randint(0, config.vocab_size, (1, 6), generator=g)
    right = torch.randint(0, config.vocab_size, (1, 5), generator=g)
    reference_cache = ours.new_cache(64)
    ours(prefix, torch.arange(20), reference_cache, kv_len=64)
    expected, _ = ours(right, torch.arange(20, 25), reference_cache, kv_len=64)

    cache = ours.new_cache(64)
    ours(prefix, torch.arange(20), cache, kv_len=64)
    cache.length = 20
    ours(wrong, torch.arange(20, 26), cache, kv_len=64)  # a draft that will be rejected
    cache.length = 20  # rollback = set the length
    got, _ = ours(right, torch.arange(20, 25), cache, kv_len=64)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_loader_rejects_bad_checkpoints(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_target(tmp_path, load_tokenizer=False)
    bad = tiny_config("llama")
    bad.model_type = "gpt2"
    (tmp_path / "config.json").write_text(bad.to_json_string().replace('"llama"', '"gpt2"'))
    with pytest.raises(UserError, match="not supported"):
        load_target(tmp_path, load_tokenizer=False)


def test_loader_rejects_mismatched_weights(tmp_path):
    path = save_hf_checkpoint(tmp_path / "a", tiny_config("llama"))
    other = save_hf_checkpoint(tmp_path / "b", tiny_config("llama", num_hidden_layers=2))
    (path / "model.safetensors").unlink()
    (other / "model.safetensors").rename(path / "model.safetensors")
    with pytest.raises(UserError, match="do not match"):
        load_target(path, load_tokenizer=False)


def test_loading_a_target_does_not_import_dynamo(tmp_path):
    """Built on the meta device, nn.Embedding's own init would run meta's normal_, which imports
    torch._dynamo: ~1 s of every start-up that eager decoding never uses."""
    path = save_hf_checkpoint(tmp_path / "t", tiny_config("llama"))
    check = textwrap.dedent(f"""
        import sys
        from hybrid_sd.models.loading import load_target
        load_target({str(path)!r}, load_tokenizer=False)
        assert "torch._dynamo" not in sys.modules, "torch._dynamo was imported"
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]


def test_a_target_built_on_the_cpu_draws_its_embedding_as_nn_embedding_does():
    """The meta-device shortcut must not change a target built for real (tests seed on it)."""
    config = tiny_config("llama")
    torch.manual_seed(3)
    ours = Transformer(config).model.embed_tokens.weight
    torch.manual_seed(3)
    reference = torch.nn.Embedding(config.vocab_size, config.hidden_size).weight
    assert torch.equal(ours, reference) and ours.requires_grad


@pytest.mark.parametrize("out_features", [7, 96])
def test_packed_linear_one_row_and_several(out_features):
    """A lone PackedLinear without the row kernel (odd outputs: one slab; even: one per thread)
    = nn.Linear for one row and for several rows, with a bias."""
    from hybrid_sd.models.packed_linear import PackedLinear, onednn_available
    if not onednn_available():
        pytest.skip("oneDNN is not available in this torch build")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        linear = torch.nn.Linear(40, out_features).eval()
        packed = PackedLinear(linear, row_kernel=False)
    finally:
        torch.set_num_threads(threads)
    assert packed.panels is None and packed.slabs.shape[0] == (1 if out_features % 2 else 2)
    for rows in (1, 5):
        x = torch.randn(1, rows, 40, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_packed_linear_keeps_the_one_row_call():
    """Under torch.compile the one-row product stays one opaque call (inductor's own loop for
    it was slower) and gives the eager numbers."""
    from hybrid_sd.models.packed_linear import PackedLinear, onednn_available
    if not onednn_available():
        pytest.skip("oneDNN is not available in this torch build")
    packed = PackedLinear(torch.nn.Linear(64, 96)).eval()
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        compiled = torch.compile(packed, dynamic=False)
        torch.testing.assert_close(compiled(x), packed(x), rtol=1e-5, atol=1e-5)
