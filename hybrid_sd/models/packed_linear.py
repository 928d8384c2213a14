"""fp32 linears laid out once for the CPU shapes a decoder meets.

A plain `nn.Linear` on the CPU re-lays its weight for every call. `PackedLinear` keeps two
copies made once, one per regime (measured on SmolLM2's shapes, 2-core AVX2 machine):

- up to 12 rows (a decoding step, a verify, which only stream the weights): panels of 8
  output columns for the project's CPU row kernel (`kernels/cpu_rows`), which reads each
  panel once for all the rows. Against the layouts below, 1.7x faster for one row and 1.5x
  for seven at two threads, and a row's result does not depend on how many rows share the
  call. Where the kernel cannot be built, one row uses the transposed weight cut into one slab
  per thread, [slabs, in, out / slabs], run as one batched matmul (MKL's matrix-vector product
  stays on one thread), and several rows use oneDNN.
- more rows (a prefill, a large tree): oneDNN's blocked layout. Against `nn.Linear`, ~1.7x
  faster for a 16-token verify.

Linears that read the same input (q|k|v, gate|up) pack into one `PackedLinear`: one weight
pass and one call instead of three. A module declares such groups by subclassing
`Projections`. The original linears keep their parameters, so state dicts are unchanged;
the packed copies are buffers that are never saved.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import cpu_rows
from .embedded import cache_root

# bump when the kernels change what a step costs: cached latency tables key on it
LAYOUT_VERSION = 7  # 1: oneDNN only; 2: + one-row slabs, fused q|k|v and gate|up; 3: + row kernel; 4: + norms;
# 5: + fused decoder layers and AR chain (models/fused.py, drafters/ar_chain.py), prefetching products;
# 6: fused layers up to 33 rows; 7: past 8 rows, blocks of 8 inside each panel (one pass over the weights)


@torch.library.custom_op("hybrid_sd::row_times_slabs", mutates_args=())
def row_times_slabs(row: torch.Tensor, slabs: torch.Tensor) -> torch.Tensor:
    """row [1, in] @ slabs [n, in, out / n] -> [1, out] (the slabs' outputs side by side in memory)."""
    return torch.matmul(row, slabs).view(1, -1)


@row_times_slabs.register_fake
def _(row, slabs):
    return row.new_empty(1, slabs.shape[0] * slabs.shape[2])


@torch.library.custom_op("hybrid_sd::rows_times_panels", mutates_args=())
def rows_times_panels_op(rows: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU row kernel as one opaque op for graph modes (a trace cannot see a ctypes call)."""
    return cpu_rows.rows_times_panels(rows.contiguous(), panels, bias)


@rows_times_panels_op.register_fake
def _(rows, panels, bias):
    return rows.new_empty(rows.shape[0], panels.shape[0] * cpu_rows.PANEL)


@torch.library.custom_op("hybrid_sd::rms_norm_rows", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The CPU RMSNorm as one opaque op for graph modes and the profiler."""
    return cpu_rows.rms_norm(x.contiguous(), weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)  # contiguous, as the kernel's output


# oneDNN's packed weights are opaque tensors that a TorchScript trace cannot hold as constants:
# a trace names their PackedLinear by a handle instead (weakly held: a dropped model is freed)
_PACKED: weakref.WeakValueDictionary[int, "PackedLinear"] = weakref.WeakValueDictionary()


@torch.library.custom_op("hybrid_sd::rows_times_packed", mutates_args=())
def rows_times_packed(rows: torch.Tensor, handle: int) -> torch.Tensor:
    """The eager several-row product (bias included) of the PackedLinear registered under `handle`."""
    linear = _PACKED[handle]
    return torch.ops.mkldnn._linear_pointwise(rows, linear.packed, linear.bias, "none", [], "")


def cpu_kernels_ready() -> bool:
    """The CPU kernel library, built into the user cache the first time (see kernels/cpu_rows)."""
    return cpu_rows.load(cache_root() / "kernels")


def graphing() -> bool:
    """A torch.compile or a TorchScript trace is running: it cannot hold a ctypes call."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def graphed_or_profiled() -> bool:
    """A graph mode or the profiler is watching: ctypes calls are invisible to them."""
    return graphing() or torch.autograd._profiler_enabled()


def profiled_call(name: str, function, *args):
    """function(*args), as one op named `name` in the profiler's tables when it runs."""
    if torch.autograd._profiler_enabled():
        with torch.profiler.record_function(name):
            return function(*args)
    return function(*args)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def is_packable(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32)


def slab_count(out_features: int) -> int:
    """One slab per intra-op thread, fewer where they would not divide the output evenly."""
    slabs = max(1, torch.get_num_threads())
    while out_features % slabs:
        slabs -= 1
    return slabs


class PackedLinear(nn.Module):
    def __init__(self, *linears: nn.Linear, row_kernel: bool = True):
        super().__init__()
        first = linears[0]
        self.in_features = first.in_features
        self.out_features = sum(lin.out_features for lin in linears)
        if len(linears) == 1:  # the linear's own parameters: state dict keys as before
            self.weight, self.bias = first.weight, first.bias
            weight, bias = first.weight.detach(), first.bias
        else:  # a fused group: the members keep the parameters, this module only the copies
            weight = torch.cat([lin.weight.detach() for lin in linears])
            bias = None if first.bias is None else torch.cat([lin.bias.detach() for lin in linears])
            self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, None), persistent=False)
        self.handle = id(self)
        _PACKED[self.handle] = self
        if row_kernel and cpu_rows.fits(weight) and cpu_kernels_ready():
            self.register_buffer("panels", cpu_rows.panels_of(weight), persistent=False)
            self.slabs = None
        else:
            slabs = slab_count(self.out_features)
            columns = weight.t().reshape(self.in_features, slabs, self.out_features // slabs)
            self.register_buffer("slabs", columns.permute(1, 0, 2).contiguous(), persistent=False)
            self.panels = None

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)
        if self.panels is not None and rows.shape[0] <= cpu_rows.MAX_ROWS:
            if graphed_or_profiled():
                y = rows_times_panels_op(rows, self.panels, self.bias)  # an op that graphs and profilers see
            else:
                y = cpu_rows.rows_times_panels(rows.contiguous(), self.panels, self.bias)
        elif rows.shape[0] > 1:
            if torch.jit.is_tracing():
                y = rows_times_packed(rows, self.handle)
            else:
                y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        else:
            if graphing():
                # inductor would lower a one-row matmul into its own loop (~1.7x slower here
                # than MKL's): keep it one opaque call
                y = row_times_slabs(rows, self.slabs)
            else:  # [slabs, 1, out / slabs] in memory is the row [1, out]
                y = torch.matmul(rows, self.slabs).view(1, self.out_features)
            if self.bias is not None:
                y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class KernelNorm(nn.Module):
    """RMSNorm with a path through the CPU kernel library (one call instead of seven small ops).
    `pack_linears` turns it on (`cpu_kernel`) with the linears, for an fp32 CPU weight: a packed
    model runs every step through the same kernels, an unpacked one (training, references)
    through torch's op. Inference only, like the packed linears; any input strides (copied to
    contiguous first)."""
    cpu_kernel = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32:
            if self.cpu_kernel:
                if graphed_or_profiled():
                    return rms_norm_op(x, self.weight, self.eps)
                return cpu_rows.rms_norm(x.contiguous(), self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op in fp32
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class AfterPacking(nn.Module):
    """A module with work to do once `pack_linears` has packed everything inside it. (A packed
    module is not moved afterwards: `.to()` cannot convert oneDNN's packed weights.)"""

    def after_packing(self) -> None:
        raise NotImplementedError


def kernel_panels(linear: nn.Module) -> torch.Tensor | None:
    """The CPU kernel's panels of a packed linear (None: not packed for the kernel)."""
    return linear.panels if isinstance(linear, PackedLinear) else None


class Projections(nn.Module):
    """A module whose linears in each of `fused_groups` ({attribute: member names}) read the same
    input. Until packed, each attribute is None and the module calls the members; after
    `pack_linears` it holds one PackedLinear for the whole group."""
    fused_groups: dict[str, tuple[str, ...]] = {}

    def __init__(self):
        super().__init__()
        for name in self.fused_groups:
            setattr(self, name, None)


def pack_linears(module: nn.Module) -> nn.Module:
    """Swap every fp32 CPU nn.Linear inside `module` for a PackedLinear, pack each fused group
    of a `Projections` into one, turn on each `KernelNorm`'s kernel path and then run each
    `AfterPacking` module's step (in place); a no-op elsewhere."""
    if not onednn_available():
        return module
    fused: set[str] = set()
    if isinstance(module, KernelNorm) and cpu_rows.fits_norm(module.weight):
        module.cpu_kernel = cpu_kernels_ready()
    if isinstance(module, Projections):
        for name, members in module.fused_groups.items():
            linears = [getattr(module, m) for m in members]
            if getattr(module, name) is None and all(is_packable(lin) for lin in linears):
                setattr(module, name, PackedLinear(*linears))
                fused.update(members)
    for name, child in list(module.named_children()):
        if name in fused or isinstance(child, PackedLinear):
            continue
        if is_packable(child):
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
    if isinstance(module, AfterPacking):
        module.after_packing()
    return module
