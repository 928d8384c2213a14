"""Load a target (model + tokenizer) from a Hugging Face checkpoint directory."""
from __future__ import annotations

import json
import re
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


def one_line(e: BaseException) -> str:
    """The gist of an exception from a library (often several lines) for a one-line message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def read_json(path: Path, what: str = "a JSON object") -> dict:
    """A JSON object from a file, or one line naming the file and what is wrong."""
    try:
        value = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{path} is not text (expected {what})") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not {what}")
    return value


def check_config_numbers(config, path: Path, keys: tuple[str, ...]) -> None:
    """Sizes must be positive integers; the hidden size must split into whole heads."""
    file = path / "config.json"
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{file}: {key} is {value!r}, expected a positive integer")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % kv_heads:
        raise UserError(f"{file}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if not getattr(config, "head_dim", None) and config.hidden_size % heads:
        raise UserError(f"{file}: hidden_size {config.hidden_size} is not divisible by num_attention_heads {heads} "
                        "(and no head_dim is given)")
    act = getattr(config, "hidden_act", None) or "silu"
    if act != "silu":
        raise UserError(f"{file}: hidden_act {act!r} is not supported (only silu)")


def load_tensor_file(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise UserError(f"{file} is missing")
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and pickle raise their own types for a damaged file
        raise UserError(f"{file} is damaged or cut short ({one_line(e)}); download or copy it again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{file} does not hold a state dict of tensors")
    return state


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors (single or sharded) or pytorch_model.bin."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index} has no weight_map of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        state = {}
        for shard in shards:
            state.update(load_tensor_file(path / shard))
        return state
    files = sorted(path.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_tensor_file(f))
        return state
    if (path / "pytorch_model.bin").is_file():
        return load_tensor_file(path / "pytorch_model.bin")
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
    read_json(path / "config.json")  # a clear line for a file that is not JSON at all
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers' own checks: unknown model_type, bad field types, ...
        raise UserError(f"{path / 'config.json'}: {one_line(e)}") from None
    try:
        check_supported(config)
    except NotImplementedError as e:
        raise UserError(f"{path}: {e}") from None
    check_config_numbers(config, path, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "max_position_embeddings"))
    state = read_state_dict(path)
    if max_len is not None and max_len > config.max_position_embeddings:
        raise UserError(f"--max-context {max_len} exceeds the model's {config.max_position_embeddings} positions")
    with torch.device("meta"):
        model = Transformer(config, max_len=max_len)
    model = model.to_empty(device="cpu")  # built on meta: no time spent on random init
    try:  # assign: the loaded tensors become the parameters (no second copy of every weight)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{path}: weights do not match its config.json ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    unexpected = [k for k in unexpected if "rotary_emb" not in k]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match a {config.model_type} model "
                        f"({name_some('missing', missing)}{', ' if missing and unexpected else ''}"
                        f"{name_some('unexpected', unexpected)})")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope()  # RoPE tables are not in the checkpoint
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer_of(path) if load_tokenizer else None
    return model, tokenizer, eos_ids(path, config)


def name_some(what: str, keys: list[str], n: int = 4) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return f"{what} {', '.join(sorted(keys)[:n])}{more}"


def load_tokenizer_of(path: Path):
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a missing package (sentencepiece, tiktoken, protobuf) or damaged files
        raise UserError(f"{path}: its tokenizer cannot be loaded ({one_line(e)}); install the package it names, "
                        "or give the checkpoint a tokenizer.json") from None


def special_strings(tokenizer) -> list[str]:
    """The control tokens' strings (<|im_start|>, <|im_end|>, <|endoftext|>, ...), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {t.content for t in added.values() if getattr(t, "special", False)}
    found |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((s for s in found if s), key=len, reverse=True)


def _text_ids(tokenizer, text: str) -> list[int]:
    """Ids of plain text: control-token strings in it are text, never control tokens."""
    if not text:
        return []
    try:
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    except TypeError:  # a tokenizer without split_special_tokens
        return list(tokenizer.encode(text, add_special_tokens=False))


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat (a list of {role, content}) with the target's chat template, ready
    for the assistant's answer.

    The messages' text is text: a control-token string typed in it (`<|im_end|>`,
    `<|im_start|>`, ...) is encoded as the characters it is made of, never as a control token,
    so a prompt cannot close its own turn or open another role's, as chat front-ends do. A chat
    with no such string is encoded exactly as `apply_chat_template` does (the same ids); one
    with them is rendered by the template with placeholders, and only the template's own text
    is parsed for control tokens."""
    specials = special_strings(tokenizer)
    contents = [m.get("content") for m in messages]
    if not specials or not any(isinstance(c, str) and any(s in c for s in specials) for c in contents):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    # placeholders the template copies verbatim, then every message text in their place
    marks = [f"\ue000hybrid-sd-{i}\ue001" for i in range(len(messages))]
    masked = [{**m, "content": mark} if isinstance(m.get("content"), str) else m for m, mark in zip(messages, marks)]
    rendered = tokenizer.apply_chat_template(masked, add_generation_prompt=True, tokenize=False)
    pieces = re.split("(" + "|".join(re.escape(m) for m in marks) + ")", rendered)
    special_re = re.compile("|".join(re.escape(s) for s in specials))
    ids, text = [], ""  # text: pending plain text, up to the next control token of the template
    for piece in pieces:
        if piece in marks:
            text += contents[marks.index(piece)]
            continue
        last = 0
        for match in special_re.finditer(piece):
            ids += _text_ids(tokenizer, text + piece[last:match.start()])
            ids.append(tokenizer.convert_tokens_to_ids(match.group()))
            text, last = "", match.end()
        text += piece[last:]
    return ids + _text_ids(tokenizer, text)


def encode_prompt(tokenizer, text: str, chat: bool = True) -> list[int]:
    """One user turn through the chat template (where the tokenizer has one; control-token
    strings in the text stay text, see encode_chat), or raw text (chat=False: control-token
    strings in it are parsed as control tokens, so a caller can write its own template)."""
    if chat and getattr(tokenizer, "chat_template", None):
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return tokenizer.encode(text, add_special_tokens=True)


__all__ = ["encode_chat", "encode_prompt", "load_target", "parse_dtype", "read_state_dict", "SUPPORTED_MODEL_TYPES"]
