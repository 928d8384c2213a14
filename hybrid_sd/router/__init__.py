"""Routing between drafters: signals, the measured latency table, the entropy rule and the
learned policy. The engine asks a router for a `Choice` once per round."""
from pathlib import Path

from ..errors import UserError
from ..weights import shipped
from .base import AlternatingRouter, Choice, FixedRouter, Router, best_choice
from .cost import LatencyTable
from .entropy import Calibration, EntropyRouter
from .learned import LearnedRouter, RouterMLP
from .signals import DrafterState, Signals, observe_draft, target_confidence

ROUTERS = ("entropy", "learned")


def load_router(kind: str, directory: str | Path | None, latency: LatencyTable, names: list[str], lam: float):
    """The entropy rule or the learned policy from a router directory (`python -m
    hybrid_sd.train.router` writes one; on the embedded default, the shipped one)."""
    if kind not in ROUTERS:
        raise UserError(f"unknown router {kind!r} (choose from {', '.join(ROUTERS)})")
    directory = Path(directory) if directory is not None else shipped("router")
    if directory is None:
        raise UserError("--drafter hybrid needs a router: pass --router-dir DIR (from python -m hybrid_sd.train.router)")
    needed = directory / ("entropy.json" if kind == "entropy" else "learned.safetensors")
    if not needed.is_file():
        raise UserError(f"router directory {directory} has no {needed.name}")
    try:
        if kind == "entropy":
            return EntropyRouter(Calibration.load(needed), latency, names, lam)
        return LearnedRouter(RouterMLP.load(directory), latency, names, lam)
    except ValueError as e:
        raise UserError(f"{directory}: {e}") from None


__all__ = ["ROUTERS", "load_router", "AlternatingRouter", "Calibration", "Choice", "DrafterState", "EntropyRouter", "FixedRouter",
           "LatencyTable", "LearnedRouter", "Router", "RouterMLP", "Signals", "best_choice", "observe_draft",
           "target_confidence"]
