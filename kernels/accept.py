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

from .row_stats import triton, triton_usable

if triton is not None:
    import triton.language as tl


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


if triton is not None:
    @triton.jit
    def _greedy_accept_kernel(draft_ptr, argmax_ptr, out_ptr, k, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        valid = offs < k
        d = tl.load(draft_ptr + offs, mask=valid, other=0)
        t = tl.load(argmax_ptr + offs, mask=valid, other=0)
        a = tl.min(tl.where(valid & (d != t), offs, k), axis=0)  # first mismatch, or k
        tl.store(out_ptr, a.to(tl.int64))
        tl.store(out_ptr + 1, tl.load(argmax_ptr + a))

    @triton.jit
    def _row_a(p_ptr, q_ptr, a, d_a, c, m, q_row, p_stride, q_stride, HAS_Q: tl.constexpr):
        """Columns c of p[a] and of q[a] (one-hot at the draft d_a when there is no q)."""
        p_a = tl.load(p_ptr + a * p_stride + c, mask=m, other=0.0)
        if HAS_Q:
            q_a = tl.load(q_ptr + a * q_stride + c, mask=m & q_row, other=0.0)
        else:
            q_a = tl.where(c == d_a, 1.0, 0.0)
        return p_a, q_a

    @triton.jit
    def _rejection_accept_kernel(draft_ptr, p_ptr, q_ptr, u_ptr, out_ptr, k, V, p_stride, q_stride,
                                 HAS_Q: tl.constexpr, KBLOCK: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, KBLOCK)
        valid = offs < k
        d = tl.load(draft_ptr + offs, mask=valid, other=0)
        p_d = tl.load(p_ptr + offs * p_stride + d, mask=valid, other=0.0)
        if HAS_Q:
            q_d = tl.load(q_ptr + offs * q_stride + d, mask=valid, other=0.0)
        else:
            q_d = tl.where(valid, 1.0, 0.0)
        u = tl.load(u_ptr + offs, mask=valid, other=1.0)
        a = tl.min(tl.where(valid & (u * q_d >= p_d), offs, k), axis=0)  # first rejection, or k
        d_a = tl.where(a < k, tl.sum(tl.where(offs == a, d, 0), axis=0), -1)  # draft at the rejection
        cols = tl.arange(0, BLOCK)
        q_row = (tl.zeros([BLOCK], dtype=tl.int32) + a) < k  # row a of q exists (a < k)
        total = 0.0  # residual mass
        for start in range(0, V, BLOCK):
            c = start + cols
            m = c < V
            p_a, q_a = _row_a(p_ptr, q_ptr, a, d_a, c, m, q_row, p_stride, q_stride, HAS_Q)
            total += tl.sum(tl.maximum(p_a - q_a, 0.0), axis=0)
        use_p = total <= 0.0  # p_a == q_a: sample from p_a itself (its mass is 1)
        mass = tl.where(use_p, 1.0, total)
        target = tl.load(u_ptr + k) * mass
        seen = 0.0
        token = V - 1
        found = 0
        for start in range(0, V, BLOCK):  # inverse CDF: the first column whose running mass passes u
            c = start + cols
            m = c < V
            p_a, q_a = _row_a(p_ptr, q_ptr, a, d_a, c, m, q_row, p_stride, q_stride, HAS_Q)
            r = tl.where(use_p, p_a, tl.maximum(p_a - q_a, 0.0))
            cdf = seen + tl.cumsum(r, axis=0)
            hit = tl.min(tl.where((cdf > target) & m, c, V), axis=0)
            token = tl.where((found == 0) & (hit < V), hit, token)
            found = tl.where(hit < V, 1, found)
            seen += tl.sum(r, axis=0)
        tl.store(out_ptr, a.to(tl.int64))
        tl.store(out_ptr + 1, token.to(tl.int64))


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def greedy_accept(draft: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """Same as `greedy_accept_reference`; the Triton kernel where it can run."""
    if not triton_usable(argmax):
        return greedy_accept_reference(draft, argmax)
    out = torch.empty(2, dtype=torch.int64, device=argmax.device)
    _greedy_accept_kernel[(1,)](draft.contiguous(), argmax.contiguous(), out, draft.numel(),
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
    _rejection_accept_kernel[(1,)](draft.contiguous(), p, q if q is not None else p, u.contiguous().float(), out, k, V,
                                   p.stride(0), q.stride(0) if q is not None else 0, HAS_Q=q is not None,
                                   KBLOCK=max(_next_pow2(k), 16), BLOCK=block)
    return out
