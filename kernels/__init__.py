"""Kernels for the per-round hot path, each with a plain-PyTorch reference: Triton kernels for
the verify's statistics and acceptance (GPU), and `cpu_rows`, the CPU's product of a few rows
with a linear's weight and whole layers (loaded, and built the first time, when a model is
packed; importing it costs nothing).

This directory installs as `hybrid_sd.kernels`. In a checkout it can also be found as a
top-level `kernels` (`python -m …` from the repo root puts the root on sys.path), a name that
belongs to PyPI's `kernels`, which transformers imports when it is installed; imported under
that name, the package loads the installed one in its place, or is absent like any missing
module.
"""
if __name__ == "kernels":
    import sys
    from importlib import machinery, util
    from pathlib import Path

    _root = Path(__file__).resolve().parents[1]
    _spec = machinery.PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _installed = util.module_from_spec(_spec)
    sys.modules["kernels"] = _installed  # what the import statement returns
    _spec.loader.exec_module(_installed)
else:
    from . import accept, cpu_rows
    from .row_stats import row_argmax, row_stats, row_stats_reference, triton_usable

    __all__ = ["accept", "cpu_rows", "row_argmax", "row_stats", "row_stats_reference", "triton_usable"]
