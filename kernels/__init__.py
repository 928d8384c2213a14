"""Kernels for the per-round hot path, each with a plain-PyTorch reference: Triton kernels for
the verify's statistics and acceptance (GPU), and `cpu_rows`, the CPU's product of a few rows
with a linear's weight (imported by the models that use it, not here: it stays off start-up)."""
from . import accept
from .row_stats import row_stats, row_stats_reference, triton_usable


def row_argmax(logits):
    """argmax per row; the fused kernel on a device where Triton runs."""
    return row_stats(logits)[0] if triton_usable(logits) else logits.argmax(dim=-1)


__all__ = ["accept", "row_argmax", "row_stats", "row_stats_reference", "triton_usable"]
