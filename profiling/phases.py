"""Per-round phase timing with NVTX ranges.

`PhaseClock.phase(name)` is a context manager that opens an NVTX range of that name (a no-op
unless a profiler such as Nsight Systems is attached) and adds the wall time spent in it to
the current round's record. On the CPU, time is `perf_counter`; with `sync=True` on CUDA it
synchronises at each boundary so that the phase table is exact (use only when profiling).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import nvtx
import torch

PHASES = ("route", "catchup", "draft", "verify", "accept", "commit")


class PhaseClock:
    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.times: dict[str, float] = {}

    def start_round(self) -> dict[str, float]:
        self.times = {}
        return self.times

    @contextmanager
    def phase(self, name: str, label: str | None = None):
        """Time one phase; `label` refines the NVTX name (e.g. draft:ar) but not the table key."""
        rng = nvtx.start_range(message=label or name)
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
            nvtx.end_range(rng)
