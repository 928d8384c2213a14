"""Random-weight targets at real sizes, with drafters of the published shapes.

For measuring what does not depend on the weights -- graph capture, replay against eager,
per-round latency, host and switching overhead -- on a machine with no checkpoints and no
network (a lent GPU, CI). Configs are written here; weights are drawn at random.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, Qwen3Config

from ..drafters import NgramDrafter
from ..drafters.ar import ARDrafter
from ..drafters.block import BlockDrafter
from ..models.transformer import Transformer

LLAMA_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})
QWEN3_8B = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False)
TINY_LLAMA = dict(LLAMA_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2)
TINY_QWEN3 = dict(QWEN3_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TARGETS = {"llama-3.1-8b": LLAMA_8B, "qwen3-8b": QWEN3_8B, "tiny-llama": TINY_LLAMA, "tiny-qwen3": TINY_QWEN3}
BLOCK_SIZE, BLOCK_LAYERS = 16, 5   # z-lab/Qwen3-8B-DFlash-b16
DRAFT_VOCAB = 32000                # the published EAGLE-3 heads for Llama-3.1 / Qwen3


def build(name: str, device: str, dtype: torch.dtype, max_len: int):
    """(target, [AR drafter, block drafter, n-gram drafter]) for a name in TARGETS."""
    if name not in TARGETS:
        raise ValueError(f"unknown synthetic target {name!r} (one of {', '.join(TARGETS)})")
    cfg = TARGETS[name]
    config = (LlamaConfig if cfg["model_type"] == "llama" else Qwen3Config)(**cfg)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the final dtype: no fp32 copy of 8B weights
    try:
        with torch.device(device), torch.no_grad():
            return build_in(config, dtype, max_len)
    finally:
        torch.set_default_dtype(default)


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():  # small random weights keep bf16 activations finite
        if p.dim() == 2:
            p.normal_(0, 0.02)
    return module.eval()


def build_in(config, dtype, max_len):
    target = randomize(Transformer(config, max_len).to(dtype))
    L, H, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    head = LlamaConfig(hidden_size=H, intermediate_size=config.intermediate_size, num_hidden_layers=1,
                       num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                       head_dim=getattr(config, "head_dim", None) or H // config.num_attention_heads,
                       rms_norm_eps=config.rms_norm_eps, vocab_size=V, draft_vocab_size=min(DRAFT_VOCAB, V),
                       max_position_embeddings=config.max_position_embeddings)
    ar = randomize(ARDrafter(head, target.model.embed_tokens, L).to(dtype))
    ar.d2t.zero_()  # draft id i is target id i
    spacing = [1 + round(i * (L - 4) / (BLOCK_LAYERS - 1)) for i in range(BLOCK_LAYERS)]
    dflash = Qwen3Config(hidden_size=H, intermediate_size=config.intermediate_size, num_hidden_layers=BLOCK_LAYERS,
                         num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                         head_dim=head.head_dim, rms_norm_eps=config.rms_norm_eps, vocab_size=V, rope_theta=1e6,
                         max_position_embeddings=config.max_position_embeddings)
    block = randomize(BlockDrafter(dflash, target, spacing, mask_token_id=V - 1, block_size=BLOCK_SIZE).to(dtype))
    return target, [ar, block, NgramDrafter(max_n=3, device=target.lm_head.weight.device)]
