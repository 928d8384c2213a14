"""The project's CPU kernel library (x86 with AVX2): a few rows times a linear's weight, the
product of every decoding step and every verify (see cpu_rows.cpp for the kernel and why its
layout); RMSNorm in one call (torch runs it on the CPU as seven small ops, ~45 us for one row,
61 times a step); and whole layers for those few rows in one call (cpu_decoder.cpp): a
Llama-family target's stack and an EAGLE-3 head's greedy chain, which leave no Python or
dispatch between a step's ops.

The kernel is C++, built once per machine with the system's g++ into a cache directory and
loaded with ctypes; it links torch's own OpenMP runtime, so its threads are torch's. Where it
cannot be built (no compiler, no AVX2, no OpenMP runtime inside torch) `load` says why and the
callers keep their PyTorch paths. `rows_times_panels_reference` is the plain-PyTorch definition.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

PANEL = 8  # output columns per panel: one AVX2 register of fp32
# rows that PackedLinear sends to the kernel (the fused decoder sends up to fused.MAX_ROWS). The
# kernel reads the weights once whatever the rows, but computes them 8 at a time, and past 12 rows
# oneDNN's blocked product is faster on its own (SmolLM2's head at 13 rows: 5.2 against 6.9 ms;
# docs/performance.md, fifteenth session)
MAX_ROWS = 12
SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_rows.cpp", "cpu_decoder.cpp"))
# --as-needed: -fopenmp also asks for the system's libgomp, which must not load beside torch's
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-fno-exceptions", "-fno-rtti",
         "-Wl,--as-needed"]
ENV_SWITCH = "HYBRID_SD_CPU_KERNEL"  # =off keeps the PyTorch paths (for A/B runs)

_library = None  # the loaded library (its entry points typed), once `load` succeeded
_why_not: str | None = None  # why it did not, once it failed


def vector_multiples(*sizes: int) -> bool:
    """Sizes the whole-layer kernels take: each a multiple of the vector width (the panel's)."""
    return all(size % PANEL == 0 for size in sizes)


def panels_of(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> panels [N / 8, K, 8]: each panel's 8 columns for one k side by side."""
    n, k = weight.shape
    return weight.detach().reshape(n // PANEL, PANEL, k).transpose(1, 2).contiguous()


def rows_times_panels_reference(rows: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None):
    """rows [M, K] @ the weight that `panels` holds, transposed (+ bias) -> [M, N]."""
    weight = panels.transpose(1, 2).reshape(-1, panels.shape[1])
    return F.linear(rows, weight, bias)


def fits(weight: torch.Tensor) -> bool:
    """A linear's weight [N, K] that panels can hold."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.shape[0] % PANEL == 0


def fits_norm(weight: torch.Tensor) -> bool:
    """A norm's weight [D] that `rms_norm` reads as it is."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 1 and weight.is_contiguous()


def rows_times_panels(rows: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None = None):
    """The kernel (after a successful `load`): rows [M, K] contiguous fp32 -> [M, N]."""
    m, k = rows.shape
    n = panels.shape[0] * PANEL
    if rows.dtype != torch.float32 or not rows.is_contiguous() or k != panels.shape[1] or rows.device.type != "cpu":
        # the kernel reads raw memory: a wrong input must fail here, not read out of bounds
        raise ValueError(f"the CPU row kernel takes contiguous fp32 CPU rows [M, {panels.shape[1]}], "
                         f"got {rows.dtype} {tuple(rows.shape)} on {rows.device}")
    out = torch.empty(m, n, dtype=torch.float32)
    _library.rows_times_panels(rows.data_ptr(), m, k, panels.data_ptr(), None if bias is None else bias.data_ptr(),
                       out.data_ptr(), n, torch.get_num_threads())
    return out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (after a successful `load`): contiguous fp32 CPU x."""
    d = weight.shape[0]
    if x.dtype != torch.float32 or not x.is_contiguous() or x.shape[-1] != d or x.device.type != "cpu":
        raise ValueError(f"the CPU RMSNorm takes contiguous fp32 CPU rows [..., {d}], "
                         f"got {x.dtype} {tuple(x.shape)} on {x.device}")
    out = torch.empty_like(x)
    _library.rms_norm_rows(x.data_ptr(), x.numel() // d, d, weight.data_ptr(), eps, out.data_ptr())
    return out


class DecoderShape(ctypes.Structure):
    """cpu_decoder.cpp's DecoderShape: the sizes of a decoder and of its K/V cache."""
    _fields_ = [(name, ctypes.c_int) for name in
                ("layers", "hidden", "heads", "kv_heads", "head_dim", "inner", "cache_len")] + [("eps", ctypes.c_float)]


class LayerWeights(ctypes.Structure):
    """cpu_decoder.cpp's LayerWeights: one layer's norm weights and panels (null: no such bias or norm)."""
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("input_norm", "post_norm", "q_norm", "k_norm", "qkv", "qkv_bias", "o", "o_bias",
                 "gate_up", "gate_up_bias", "down", "down_bias")]


def pointers(tensors: dict[str, torch.Tensor | None]) -> dict[str, int | None]:
    """A structure's fields from named tensors (None: a null pointer, no such bias or norm)."""
    return {name: None if t is None else t.data_ptr() for name, t in tensors.items()}


def _checked(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> int:
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"the CPU decoder takes {what} as contiguous {dtype} CPU {shape}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t.data_ptr()


# the kernels read and write raw memory: indices out of range must fail here, before they run
def _check_within(values: torch.Tensor, limit: int, what: str, span: int = 0) -> None:
    """values (and a mask's span) inside 0..limit-1."""
    low, high = (int(v) for v in torch.aminmax(values))
    if low < 0 or max(high, span - 1) >= limit:
        raise ValueError(f"{what} {low}..{max(high, span - 1)} are outside 0..{limit - 1}")


def _check_mask(mask: torch.Tensor, m: int) -> int:
    """A tree mask's pointer, once every row sees something: a softmax over no key has no value."""
    ptr = _checked(mask, torch.bool, (m, mask.shape[-1]), "the mask")
    if not bool(mask.any(-1).all()):
        raise ValueError("every mask row must let its row see at least one cache position")
    return ptr


def decoder_layers(shape: DecoderShape, weights, caches, h: torch.Tensor, cos: torch.Tensor,
                   sin_signed: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                   mask: torch.Tensor | None, capture, n_capture: int, features: torch.Tensor | None) -> None:
    """Every layer of a decoder for the rows h [M, hidden] (after a successful `load`), in place:
    h becomes the last layer's output, K/V land in the cache at `slots`, captured hidden states
    in `features` [M, n_capture * hidden]. `weights` is a LayerWeights array, `caches` the layers'
    K and V pointers (ctypes arrays that models/fused.py builds once); cos/sin_signed [M, head_dim];
    positions, slots int64 [M]; mask bool [M, span] or None (row r sees positions 0..positions[r]).
    The reference is the decoder's PyTorch forward (models/transformer.py)."""
    m, hd = h.shape[0], shape.head_dim
    if m == 0:
        raise ValueError("the CPU decoder needs at least one row")
    ptrs = [_checked(h, torch.float32, (m, shape.hidden), "h"),
            _checked(cos, torch.float32, (m, hd), "cos"), _checked(sin_signed, torch.float32, (m, hd), "sin"),
            _checked(positions, torch.int64, (m,), "positions"), _checked(slots, torch.int64, (m,), "slots")]
    span = 0 if mask is None else mask.shape[-1]
    mask_ptr = None if mask is None else _check_mask(mask, m)
    out = None
    if n_capture:
        out = _checked(features, torch.float32, (m, n_capture * shape.hidden), "features")
    # slots are written; without a mask, positions bound the keys read
    _check_within(slots if mask is not None else torch.cat((slots, positions)), shape.cache_len, "cache positions", span)
    done = _library.decoder_layers(ctypes.byref(shape), weights, caches, ptrs[0], m, ptrs[1], ptrs[2], ptrs[3],
                                   ptrs[4], mask_ptr, span, capture, n_capture, out, torch.get_num_threads())
    if done != 0:
        raise MemoryError("the CPU decoder could not allocate its scratch")


class DraftShape(ctypes.Structure):
    """cpu_decoder.cpp's DraftShape: an EAGLE-3 head's sizes and flags, and its cache's length."""
    _fields_ = [(name, ctypes.c_int) for name in
                ("hidden", "heads", "kv_heads", "head_dim", "inner", "draft_vocab", "vocab", "cache_len",
                 "norm_before_residual", "norm_output")] + [("eps", ctypes.c_float)]


class DraftWeights(ctypes.Structure):
    """cpu_decoder.cpp's DraftWeights: an EAGLE-3 head's weights, tables and cache (null: no such bias)."""
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("input_norm", "hidden_norm", "post_norm", "final_norm", "qkv", "qkv_bias", "o", "o_bias",
                 "gate_up", "gate_up_bias", "down", "down_bias", "lm_head", "embed", "d2t", "cos", "sin_signed",
                 "k_cache", "v_cache")]


def eagle3_chain(shape: DraftShape, weights: DraftWeights, g: torch.Tensor, token: int, start: int, k: int):
    """An EAGLE-3 head's greedy chain of k tokens (after a successful `load`): from g [hidden]
    (fused target features; overwritten) and `token` at position `start`. Returns (target ids
    [k] int64, drafter probabilities [k]). The reference is ARDrafter.graph_step, greedy."""
    _checked(g, torch.float32, (shape.hidden,), "g")
    if start < 0 or start + k > shape.cache_len:
        raise ValueError(f"a chain at positions {start}..{start + k} does not fit a {shape.cache_len}-position cache")
    if not 0 <= token < shape.vocab:
        raise ValueError(f"token {token} is outside the {shape.vocab}-token vocabulary")
    tokens, confidence = torch.empty(k, dtype=torch.int64), torch.empty(k, dtype=torch.float32)
    if _library.eagle3_chain(ctypes.byref(shape), ctypes.byref(weights), g.data_ptr(), token, start, k, tokens.data_ptr(),
                     confidence.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError("the CPU drafter chain could not allocate its scratch")
    return tokens, confidence


def eagle3_catch_up(shape: DraftShape, weights: DraftWeights, kv_panels: torch.Tensor, kv_bias: torch.Tensor | None,
                    g: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> None:
    """An EAGLE-3 head's KV-only rows (after a successful `load`): g [n, hidden] (fc of the target
    features), tokens and positions int64 [n]; K/V land in the drafter's cache at `positions`.
    The reference is ARDrafter.catchup_step."""
    n = g.shape[0]
    ptrs = (_checked(g, torch.float32, (n, shape.hidden), "g"), _checked(tokens, torch.int64, (n,), "tokens"),
            _checked(positions, torch.int64, (n,), "positions"))
    _check_within(positions, shape.cache_len, "cache positions")
    _check_within(tokens, shape.vocab, "tokens (the vocabulary)")
    if _library.eagle3_catch_up(ctypes.byref(shape), ctypes.byref(weights), kv_panels.data_ptr(),
                        None if kv_bias is None else kv_bias.data_ptr(), *ptrs, n, torch.get_num_threads()) != 0:
        raise MemoryError("the CPU drafter catch-up could not allocate its scratch")


def eagle3_tree_step(shape: DraftShape, weights: DraftWeights, g: torch.Tensor, tokens: torch.Tensor,
                     positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One depth of an EAGLE-3 head's tree (after a successful `load`): rows g [M, hidden]
    (overwritten with their new hidden states), tokens, RoPE positions and cache slots int64
    [M], mask bool [M, span]. Returns the draft-vocab logits [M, draft_vocab]. The reference is
    ARDrafter.tree_step."""
    m, span = g.shape[0], mask.shape[-1]
    ptrs = (_checked(g, torch.float32, (m, shape.hidden), "g"), _checked(tokens, torch.int64, (m,), "tokens"),
            _checked(positions, torch.int64, (m,), "positions"), _checked(slots, torch.int64, (m,), "slots"),
            _check_mask(mask, m))
    _check_within(torch.cat((positions, slots)), shape.cache_len, "cache positions", span)
    _check_within(tokens, shape.vocab, "tokens (the vocabulary)")
    logits = torch.empty(m, shape.draft_vocab, dtype=torch.float32)
    if _library.eagle3_step(ctypes.byref(shape), ctypes.byref(weights), ptrs[0], ptrs[1], m, ptrs[2], ptrs[3], ptrs[4],
                         span, logits.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError("the CPU drafter tree step could not allocate its scratch")
    return logits


def takes_logits(logits: torch.Tensor) -> bool:
    """Logits that `row_stats`/`row_argmax` read as they are (once loaded; never builds anything)."""
    return (_library is not None and logits.dtype == torch.float32 and logits.device.type == "cpu"
            and logits.dim() == 2 and logits.shape[1] > 0 and logits.is_contiguous())


def row_stats(logits: torch.Tensor, inv_temperature: float = 1.0):
    """kernels.row_stats_reference through the library: logits [R, V] contiguous fp32 CPU ->
    (argmax [R] int64, lse [R], entropy [R], top1 [R])."""
    r, v = logits.shape
    argmax = torch.empty(r, dtype=torch.int64)
    lse, entropy, top1 = (torch.empty(r, dtype=torch.float32) for _ in range(3))
    _library.row_stats_rows(logits.data_ptr(), r, v, inv_temperature, 0, argmax.data_ptr(), lse.data_ptr(),
                    entropy.data_ptr(), top1.data_ptr())
    return argmax, lse, entropy, top1


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch's argmax per row (the first of equal maxima) through the library: [R, V] -> [R] int64."""
    r, v = logits.shape
    argmax = torch.empty(r, dtype=torch.int64)
    _library.row_stats_rows(logits.data_ptr(), r, v, 1.0, 1, argmax.data_ptr(), None, None, None)
    return argmax


def load(build_dir: Path) -> bool:
    """Build (first time on this machine) and load the kernel; False, with `why_not()`, where it
    cannot run here. Tried once per process."""
    global _library, _why_not
    if _library is not None or _why_not is not None:
        return _library is not None
    try:
        _library = _load(build_dir)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _why_not = str(e).strip() or type(e).__name__
        if not turned_off():
            print(f"hybrid_sd: the CPU row kernel is off ({_why_not}); decoding steps use PyTorch's "
                  "products (slower: docs/performance.md, the CPU row kernel)", file=sys.stderr)
    return _library is not None


def turned_off() -> bool:
    return os.environ.get(ENV_SWITCH, "").lower() in ("0", "off", "false", "no")


def why_not() -> str | None:
    return _why_not


def _cpu_has_avx2_fma() -> bool:
    """The hardware's flags (torch's own capability follows ATEN_CPU_CAPABILITY, a user setting)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


def _openmp_runtime() -> Path:
    """torch's own libgomp: linking it (not the system's) keeps one thread pool in the process."""
    lib = Path(torch.__file__).parent / "lib"
    found = sorted(lib.glob("libgomp*.so*"))
    if not found:
        raise RuntimeError(f"torch ships no libgomp in {lib} (another OpenMP runtime)")
    return found[0]


def _load(build_dir: Path):
    if turned_off():
        raise RuntimeError(f"turned off by {ENV_SWITCH}")
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise RuntimeError(f"built for Linux x86_64 only, not {platform.system()} {platform.machine()}")
    if not _cpu_has_avx2_fma():
        raise RuntimeError("this CPU has no AVX2/FMA")
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH; install one, or set CXX")
    gomp = _openmp_runtime()
    command = [compiler, *FLAGS, *map(str, SOURCES), "-nodefaultlibs", f"-L{gomp.parent}",
               f"-Wl,-rpath,{gomp.parent}", f"-l:{gomp.name}", "-lc", "-lm"]
    key = hashlib.sha256("\0".join(command + [source.read_text() for source in SOURCES]).encode()).hexdigest()[:16]
    path = Path(build_dir) / f"cpu_rows-{key}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print("hybrid_sd: building the CPU row kernel (once per machine, a few seconds)", file=sys.stderr)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        os.close(fd)
        try:
            done = subprocess.run([*command, "-o", tmp], capture_output=True, text=True, timeout=300)
            if done.returncode:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.chmod(tmp, 0o755)  # mkstemp made it private: a shared cache's other users load it too
            os.replace(tmp, path)  # whole or not at all: another process may be loading it
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    library = ctypes.CDLL(str(path))
    pointer, count, c_int, c_float = ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_float
    draft = [ctypes.POINTER(DraftShape), ctypes.POINTER(DraftWeights)]
    signatures = {  # name: (result, arguments), as cpu_rows.cpp and cpu_decoder.cpp declare them
        "rows_times_panels": (None, [pointer, count, count, pointer, pointer, pointer, count, c_int]),
        "rms_norm_rows": (None, [pointer, count, count, pointer, c_float, pointer]),
        "decoder_layers": (c_int, [ctypes.POINTER(DecoderShape), ctypes.POINTER(LayerWeights), pointer, pointer, count,
                                   pointer, pointer, pointer, pointer, pointer, count, pointer, count, pointer, c_int]),
        "eagle3_chain": (c_int, draft + [pointer, ctypes.c_int64, ctypes.c_int64, count, pointer, pointer, c_int]),
        "eagle3_catch_up": (c_int, draft + [pointer, pointer, pointer, pointer, pointer, count, c_int]),
        "eagle3_step": (c_int, draft + [pointer, pointer, count, pointer, pointer, pointer, count, pointer, c_int]),
        "row_stats_rows": (None, [pointer, count, count, c_float, c_int, pointer, pointer, pointer, pointer]),
    }
    for name, (result, arguments) in signatures.items():
        function = getattr(library, name)
        function.restype, function.argtypes = result, arguments
    return library
