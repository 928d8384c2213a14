"""llama.cpp as a peer in the benchmark, when `llama-cpp-python` is installed (the optional
extra `peers`; nothing else needs it).

The peer decodes an F32 GGUF written from the same weights this engine runs: the embedded
GGUF's tensors dequantised to fp32 (as `models/embedded.py` does for the safetensors
checkpoint), its metadata and tokenizer copied. Written once into the conversion cache,
atomically. Two methods: plain greedy decoding, and llama-cpp-python's prompt-lookup decoding
(`LlamaPromptLookupDecoding`) next to this engine's n-gram drafter.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import UserError

LOOKUP_TOKENS = 10  # llama-cpp-python's default num_pred_tokens for prompt lookup
INSTALL = "pip install 'hybrid_sd[peers]' (builds llama-cpp-python from source: a few minutes)"


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise UserError(f"the llama.cpp methods need llama-cpp-python: {INSTALL}")


def f32_gguf_path() -> Path:
    from ..models.embedded import cache_root, gguf_path
    return cache_root() / (gguf_path().stem.split(".")[0] + ".F32.gguf")


def write_f32_gguf(src: Path, out: Path) -> Path:
    """`src` with every tensor dequantised to F32, metadata copied; `out` appears whole or not at all."""
    import gguf
    import numpy as np
    from tqdm import tqdm

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".tmp-", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # the writer writes these itself
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            contents = field.contents()
            if field.name == gguf.Keys.General.FILE_TYPE:
                contents = int(gguf.LlamaFileType.ALL_F32)  # what the tensors now are
            writer.add_key_value(field.name, contents, kind, sub_type=sub)
        for tensor in tqdm(reader.tensors, desc="F32 GGUF", unit="tensor"):
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            writer.add_tensor(tensor.name, data.reshape([int(d) for d in reversed(tensor.shape)]),
                              raw_dtype=gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def f32_gguf() -> Path:
    """The cached F32 GGUF of the embedded default (written on first use)."""
    from ..models.embedded import gguf_path
    out = f32_gguf_path()
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        write_f32_gguf(gguf_path(), out)
    return out


class LlamaCpp:
    """Greedy decoding of token ids with llama.cpp, optionally with its prompt lookup."""

    def __init__(self, path: Path, n_ctx: int, threads: int, lookup: bool = False):
        require()
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS) if lookup else None
        self.llm = Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         draft_model=draft, verbose=False)

    def generate(self, ids: list[int], max_new: int, eos) -> list[int]:
        out: list[int] = []
        for token in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                       reset=True):
            out.append(token)
            if token in eos or len(out) >= max_new:
                break
        return out
