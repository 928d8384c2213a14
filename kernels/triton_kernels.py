"""The Triton side of the kernels (their references and dispatch: row_stats.py, accept.py).

Imported only when a kernel is about to run on a device Triton serves (or under
TRITON_INTERPRET=1): importing triton costs ~0.4 s of every start-up, and the CPU never needs it.
"""
import triton
import triton.language as tl


@triton.jit
def row_stats_kernel(x_ptr, argmax_ptr, lse_ptr, entropy_ptr, top1_ptr, V, stride, inv_t,
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


@triton.jit
def greedy_accept_kernel(draft_ptr, argmax_ptr, out_ptr, k, BLOCK: tl.constexpr):
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
def rejection_accept_kernel(draft_ptr, p_ptr, q_ptr, u_ptr, out_ptr, k, V, p_stride, q_stride,
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
