"""NVTX ranges and per-round phase timing (CUDA events / perf counters)."""
from .phases import PHASES, PhaseClock

__all__ = ["PHASES", "PhaseClock"]
