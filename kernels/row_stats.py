"""Per-row statistics of verify logits in one pass over the vocabulary: argmax, log-sum-exp,
entropy and top-1 probability of softmax(logits * inv_temperature).

These are what a round needs after the verify forward: the argmax rows decide greedy
acceptance and the bonus token, the log-sum-exp gives p(d) for rejection sampling, and
entropy / top-1 at the bonus row are the router's signals. The Triton kernel runs one program
per row with an online softmax (running max, rescaled sums), so the [rows, V] probabilities
are never written out. `row_stats_reference` is the plain PyTorch definition; on the CPU the
Triton version runs under TRITON_INTERPRET=1 (tests) and the reference is used otherwise.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no wheel for this platform: the reference serves
    triton = None


def row_stats_reference(logits: torch.Tensor, inv_temperature: float = 1.0):
    """logits [R, V] -> (argmax [R] int64, lse [R], entropy [R], top1 [R]), all float32."""
    x = logits.float() * inv_temperature
    lse = torch.logsumexp(x, dim=-1)
    logp = x - lse[:, None]
    p = logp.exp()
    return x.argmax(-1), lse, -(p * logp).sum(-1), p.max(-1).values


if triton is not None:
    @triton.jit
    def _row_stats_kernel(x_ptr, argmax_ptr, lse_ptr, entropy_ptr, top1_ptr, V, stride, inv_t,
                          BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = float("-inf")   # running max
        s = 0.0             # sum of exp(x - m)
        t = 0.0             # sum of exp(x - m) * x
        best = 0
        for start in range(0, V, BLOCK):
            mask = start + offs < V
            x = tl.load(x_ptr + row * stride + start + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            cmax, cidx = tl.max(x, axis=0, return_indices=True)
            best = tl.where(cmax > m, start + cidx, best)  # strict: the first maximum wins, as torch.argmax
            m_new = tl.maximum(m, cmax)
            e = tl.where(mask, tl.exp(x - m_new), 0.0)
            scale = tl.exp(m - m_new)
            s = s * scale + tl.sum(e, axis=0)
            t = t * scale + tl.sum(e * tl.where(mask, x, 0.0), axis=0)  # no -inf * 0 in padding
            m = m_new
        tl.store(argmax_ptr + row, best)
        tl.store(lse_ptr + row, m + tl.log(s))
        tl.store(entropy_ptr + row, tl.log(s) + m - t / s)
        tl.store(top1_ptr + row, 1.0 / s)


def triton_usable(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def row_stats(logits: torch.Tensor, inv_temperature: float = 1.0, block: int = 1024):
    """Same as `row_stats_reference`; the Triton kernel where it can run."""
    if not triton_usable(logits):
        return row_stats_reference(logits, inv_temperature)
    logits = logits.contiguous()
    R, V = logits.shape
    argmax = torch.empty(R, dtype=torch.int64, device=logits.device)
    lse, entropy, top1 = (torch.empty(R, dtype=torch.float32, device=logits.device) for _ in range(3))
    _row_stats_kernel[(R,)](logits, argmax, lse, entropy, top1, V, logits.stride(0), float(inv_temperature),
                            BLOCK=block)
    return argmax, lse, entropy, top1
