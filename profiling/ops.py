"""Where one step's CPU time goes, per kind of op, from torch's profiler.

`op_breakdown(step, repeats)` times `step()` without a profiler (the wall time a user sees),
then once more under `torch.profiler` and sums every op's self time into the categories of
`OP_CATEGORIES`. What the ops' self times do not cover -- Python between the ops, module
calls, the profiler's own cost -- is reported as `python and dispatch`: the profiled wall time
minus the ops' sum, so the rows add up to the profiled step.
"""
from __future__ import annotations

import time
from typing import Callable

from torch.profiler import ProfilerActivity, profile

# first match wins: a needle equals the op's name without its namespace or, from 5
# characters on, is part of it; an op that matches nothing counts as "other ops"
OP_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decoder layers, fused (CPU kernel)", ("decoder_layers",)),
    ("matmuls (linears)", ("linear", "addmm", "mm", "bmm", "matmul", "gemm", "addmv", "mv",
                           "rows_times_panels", "rows_times_packed", "row_times_slabs")),
    ("attention", ("scaled_dot_product", "flash_attention", "softmax")),
    ("cache writes", ("index_copy", "index_put")),
    ("norms, RoPE, activations", ("mul", "add", "pow", "mean", "rsqrt", "cat", "neg", "silu", "div", "sum",
                                  "sub", "rms_norm", "_to_copy", "to", "copy_", "where", "embedding",
                                  "index_select", "index", "le", "arange", "fill_", "zero_")),
    ("views and allocations", ("view", "slice", "transpose", "as_strided", "reshape", "narrow", "empty",
                               "chunk", "split", "expand", "unsqueeze", "squeeze", "select", "t", "contiguous",
                               "permute", "alias", "detach", "lift_fresh", "clone", "resolve")),
)
DISPATCH = "python and dispatch"


def category(op: str) -> str:
    short = op.split("::")[-1]
    for name, needles in OP_CATEGORIES:
        if any(n == short or (len(n) >= 5 and n in short) for n in needles):
            return name
    return "other ops"


def wall_ms(step: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats * 1e3


def op_breakdown(step: Callable[[], object], repeats: int = 20) -> dict:
    """{"wall_ms": unprofiled ms per step, "profiled_ms": ms per step under the profiler,
    "categories": {category: ms per step}, "top": [(op, ms per step, calls per step)]}."""
    wall = wall_ms(step, repeats)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        profiled = (time.perf_counter() - t0) / repeats * 1e3
    events = prof.key_averages()
    per_category: dict[str, float] = {name: 0.0 for name, _ in OP_CATEGORIES}
    per_category["other ops"] = 0.0
    for e in events:
        per_category[category(e.key)] += e.self_cpu_time_total / repeats / 1e3
    per_category[DISPATCH] = max(0.0, profiled - sum(per_category.values()))
    top = sorted(((e.key, e.self_cpu_time_total / repeats / 1e3, e.count / repeats) for e in events),
                 key=lambda r: -r[1])[:12]
    return {"wall_ms": wall, "profiled_ms": profiled, "categories": per_category, "top": top}


def breakdown_table(results: dict[str, dict]) -> str:
    """Markdown: one column per profiled step (name -> op_breakdown result)."""
    names = list(results)
    cats = list(next(iter(results.values()))["categories"])
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             "| **wall ms per step (no profiler)** | " + " | ".join(f"**{results[n]['wall_ms']:.1f}**" for n in names) + " |",
             "| ms per step under the profiler | " + " | ".join(f"{results[n]['profiled_ms']:.1f}" for n in names) + " |"]
    for c in cats:
        cells = []
        for n in names:
            ms, total = results[n]["categories"][c], results[n]["profiled_ms"]
            cells.append(f"{ms:.1f} ({ms / total:.0%})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
