"""Per-round phase timing with NVTX ranges.

`PhaseClock.phase(name)` is a context manager that opens an NVTX range of that name (a no-op
unless a profiler such as Nsight Systems is attached) and adds the time spent in it to the
current round's record. On the CPU, time is `perf_counter`. With `sync=True` on CUDA
(profiling), each phase records a pair of CUDA events and the round's times are read once,
at `end_round`, so that the phase table is device time without a sync per phase.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

try:  # the nvtx package: ranges are no-ops unless a profiler is attached
    import nvtx
except ImportError:  # e.g. a bare GPU machine: torch's own NVTX bindings, or nothing on the CPU
    class nvtx:  # noqa: N801 -- stands in for the module
        @staticmethod
        def start_range(message: str):
            if torch.cuda.is_available():
                torch.cuda.nvtx.range_push(message)
            return message

        @staticmethod
        def end_range(_):
            if torch.cuda.is_available():
                torch.cuda.nvtx.range_pop()

PHASES = ("route", "catchup", "draft", "verify", "accept", "commit")


@contextmanager
def nvtx_range(message: str):
    rng = nvtx.start_range(message=message)
    try:
        yield
    finally:
        nvtx.end_range(rng)


class PhaseClock:
    def __init__(self, sync: bool = False):
        self.events = sync and torch.cuda.is_available()
        self.times: dict[str, float] = {}
        self.pending: list[tuple[str, object, object]] = []
        self.round_range = None

    def start_round(self) -> dict[str, float]:
        self.times, self.pending = {}, []
        self.round_range = nvtx.start_range(message="round")
        return self.times

    def end_round(self) -> None:
        if self.pending:  # CUDA events: one sync per round, when profiling
            self.pending[-1][2].synchronize()
            for name, start, end in self.pending:
                self.times[name] = self.times.get(name, 0.0) + start.elapsed_time(end) / 1e3
            self.pending = []
        if self.round_range is not None:
            nvtx.end_range(self.round_range)
            self.round_range = None

    @contextmanager
    def phase(self, name: str, label: str | None = None):
        """Time one phase; `label` refines the NVTX name (e.g. draft:ar) but not the table key."""
        with nvtx_range(label or name):
            if self.events:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    yield
                finally:
                    end.record()
                    self.pending.append((name, start, end))
                return
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
