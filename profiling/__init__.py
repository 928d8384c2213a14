"""NVTX ranges and per-round phase timing (CUDA events / perf counters), and phase tables."""
from .phases import PHASES, PhaseClock, nvtx_range
from .report import phase_table

__all__ = ["PHASES", "PhaseClock", "nvtx_range", "phase_table"]
