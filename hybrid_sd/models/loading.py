"""Load a target (model + tokenizer) from a Hugging Face checkpoint directory."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from ..errors import UserError
from .transformer import SUPPORTED_MODEL_TYPES, Transformer, check_supported

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors (single or sharded) or pytorch_model.bin."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    files = sorted(path.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"no weights in {path} (expected *.safetensors or pytorch_model.bin)")


def eos_ids(path: Path, config) -> tuple[int, ...]:
    """End-of-sequence ids, preferring generation_config.json as `generate` does."""
    eos = None
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except (OSError, ValueError):
        pass
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def load_target(path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
                max_len: int | None = None, load_tokenizer: bool = True):
    """Returns (model, tokenizer, eos_ids). `path=None` loads the embedded default."""
    if path is None:
        from .embedded import default_target_dir
        path = default_target_dir()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    try:
        check_supported(config)
    except NotImplementedError as e:
        raise UserError(f"{path}: {e}") from None
    state = read_state_dict(path)
    if max_len is not None and max_len > config.max_position_embeddings:
        raise UserError(f"--max-context {max_len} exceeds the model's {config.max_position_embeddings} positions")
    with torch.device("meta"):
        model = Transformer(config, max_len=max_len)
    model = model.to_empty(device="cpu")  # built on meta: no time spent on random init
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{path}: weights do not match its config.json ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    unexpected = [k for k in unexpected if "rotary_emb" not in k]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match a {config.model_type} model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope()  # RoPE tables are not in the checkpoint
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if load_tokenizer else None
    return model, tokenizer, eos_ids(path, config)


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat (a list of {role, content}) with the target's chat template, ready
    for the assistant's answer."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def encode_prompt(tokenizer, text: str, chat: bool = True) -> list[int]:
    """One user turn through the chat template (where the tokenizer has one), or raw text."""
    if chat and getattr(tokenizer, "chat_template", None):
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return tokenizer.encode(text, add_special_tokens=True)


__all__ = ["encode_chat", "encode_prompt", "load_target", "parse_dtype", "read_state_dict", "SUPPORTED_MODEL_TYPES"]
