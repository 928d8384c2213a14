"""A round's acceptance as one device result [a, token], read back with the round's one sync.

greedy:    a = length of the longest draft prefix equal to the target's argmax rows; token =
           argmax of row a (the bonus when every draft matched, else the correction).
rejection: draft i is accepted while u_i * q_i(d_i) < p_i(d_i) (u < p/q without dividing by
           a zero q); token is sampled from the residual max(p_a - q_a, 0) (p_k when every
           draft was accepted; p_a when the residual is empty, i.e. p_a == q_a) by inverse CDF
           with one more uniform. q = None means deterministic drafts (one-hot q).

Both are written once in PyTorch (the references: no host sync, no data-dependent shape, so
they can sit inside a CUDA graph) and once in Triton (one program, no [k, V] temporaries).
"""
from __future__ import annotations

import torch

from .row_stats import triton_usable


def greedy_accept_reference(draft: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """draft [k], argmax [k+1] -> int64 [2] = (a, token)."""
    k = draft.numel()
    a = (draft == argmax[:k]).long().cumprod(0).sum() if k else torch.zeros((), dtype=torch.long, device=argmax.device)
    return torch.stack([a, argmax[a]])


def rejection_accept_reference(draft: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None,
                               u: torch.Tensor) -> torch.Tensor:
    """draft [k], p [k+1, V] target probabilities, q [k, V] proposals (or None), u [k+1]
    uniforms in [0, 1) -> int64 [2] = (a, token)."""
    k, V = draft.numel(), p.shape[1]
    rows = torch.arange(k, device=p.device)
    p_d = p[rows, draft]
    q_d = q[rows, draft] if q is not None else torch.ones_like(p_d)
    a = (u[:k] * q_d < p_d).long().cumprod(0).sum()
    p_a = p[a]
    if k == 0:
        q_a = torch.zeros_like(p_a)
    else:  # row a of q, or of the one-hot drafts; zero after the last draft (a == k)
        row, inside = a.clamp_max(k - 1), (a < k).to(p.dtype)
        if q is not None:
            q_a = q[row] * inside
        else:
            q_a = torch.zeros_like(p_a).index_fill_(0, draft[row].view(1), 1.0) * inside
    residual = (p_a - q_a).clamp_min(0.0)
    total = residual.sum()
    residual = torch.where(total > 0, residual, p_a)
    cdf = residual.cumsum(0)
    token = torch.searchsorted(cdf, (u[k] * cdf[-1]).view(1), right=True).clamp_max(V - 1)[0]
    return torch.stack([a, token])


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def greedy_accept(draft: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """Same as `greedy_accept_reference`; the Triton kernel where it can run."""
    if not triton_usable(argmax):
        return greedy_accept_reference(draft, argmax)
    out = torch.empty(2, dtype=torch.int64, device=argmax.device)
    from .triton_kernels import greedy_accept_kernel
    greedy_accept_kernel[(1,)](draft.contiguous(), argmax.contiguous(), out, draft.numel(),
                               BLOCK=max(_next_pow2(draft.numel()), 16))
    return out


def rejection_accept(draft: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None, u: torch.Tensor,
                     block: int = 1024) -> torch.Tensor:
    """Same as `rejection_accept_reference` (up to float summation order); Triton where it can run."""
    if not triton_usable(p):
        return rejection_accept_reference(draft, p, q, u)
    p = p.contiguous().float()
    q = q.contiguous().float() if q is not None else None
    out = torch.empty(2, dtype=torch.int64, device=p.device)
    k, V = draft.numel(), p.shape[1]
    from .triton_kernels import rejection_accept_kernel
    rejection_accept_kernel[(1,)](draft.contiguous(), p, q if q is not None else p, u.contiguous().float(), out, k, V,
                                  p.stride(0), q.stride(0) if q is not None else 0, HAS_Q=q is not None,
                                  KBLOCK=max(_next_pow2(k), 16), BLOCK=block)
    return out
