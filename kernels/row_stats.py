"""Per-row statistics of verify logits in one pass over the vocabulary: argmax, log-sum-exp,
entropy and top-1 probability of softmax(logits * inv_temperature).

These are what a round needs after the verify forward: the argmax rows decide greedy
acceptance and the bonus token, the log-sum-exp gives p(d) for rejection sampling, and
entropy / top-1 at the bonus row are the router's signals. The Triton kernel runs one program
per row with an online softmax (running max, rescaled sums), so the [rows, V] probabilities
are never written out. `row_stats_reference` is the plain PyTorch definition; on the CPU the
Triton version runs under TRITON_INTERPRET=1 (tests); otherwise the CPU kernel library's pass
(kernels/cpu_decoder.cpp, `row_stats_rows`) where it is loaded, else the reference.
"""
from __future__ import annotations

import functools
import os

import torch

from . import cpu_rows


def row_stats_reference(logits: torch.Tensor, inv_temperature: float = 1.0):
    """logits [R, V] -> (argmax [R] int64, lse [R], entropy [R], top1 [R]), all float32."""
    x = logits.float() * inv_temperature
    lse = torch.logsumexp(x, dim=-1)
    logp = x - lse[:, None]
    p = logp.exp()
    return x.argmax(-1), lse, -(p * logp).sum(-1), p.max(-1).values


@functools.cache
def triton_loads() -> bool:
    """Whether the Triton kernels import (no wheel for this platform: the references serve).
    Tried on first need only: importing triton costs ~0.4 s that a CPU run never needs."""
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(t: torch.Tensor) -> bool:
    return (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and triton_loads()


def row_stats(logits: torch.Tensor, inv_temperature: float = 1.0, block: int = 1024):
    """Same as `row_stats_reference`; the Triton kernel where it can run, on the CPU the kernel
    library's one pass where it is loaded (the reference makes five passes)."""
    if not triton_usable(logits):
        if cpu_rows.takes_logits(logits):
            return cpu_rows.row_stats(logits, inv_temperature)
        return row_stats_reference(logits, inv_temperature)
    logits = logits.contiguous()
    R, V = logits.shape
    argmax = torch.empty(R, dtype=torch.int64, device=logits.device)
    lse, entropy, top1 = (torch.empty(R, dtype=torch.float32, device=logits.device) for _ in range(3))
    from .triton_kernels import row_stats_kernel
    row_stats_kernel[(R,)](logits, argmax, lse, entropy, top1, V, logits.stride(0), float(inv_temperature),
                           BLOCK=block)
    return argmax, lse, entropy, top1


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row; the fused kernel on a device where Triton runs, the CPU kernel library's
    scan where it is loaded."""
    if triton_usable(logits):
        return row_stats(logits)[0]
    return cpu_rows.row_argmax(logits) if cpu_rows.takes_logits(logits) else logits.argmax(dim=-1)
