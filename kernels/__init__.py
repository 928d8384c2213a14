"""Kernels for the per-round hot path, each with a plain-PyTorch reference: Triton kernels for
the verify's statistics and acceptance (GPU), and `cpu_rows`, the CPU's product of a few rows
with a linear's weight and whole layers (loaded, and built the first time, when a model is
packed; importing it costs nothing)."""
from . import accept, cpu_rows
from .row_stats import row_stats, row_stats_reference, triton_usable


def row_argmax(logits):
    """argmax per row; the fused kernel on a device where Triton runs, the CPU kernel library's
    scan where it is loaded."""
    if triton_usable(logits):
        return row_stats(logits)[0]
    return cpu_rows.row_argmax(logits) if cpu_rows.takes_logits(logits) else logits.argmax(dim=-1)


__all__ = ["accept", "row_argmax", "row_stats", "row_stats_reference", "triton_usable"]
