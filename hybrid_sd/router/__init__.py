"""Routing between drafters: signals, the measured latency table, the entropy rule and the
learned policy. The engine asks a router for a `Choice` once per round."""
import json
from pathlib import Path

from ..errors import UserError
from ..weights import shipped_router
from .base import DEFAULT_LAM, AlternatingRouter, Choice, FixedRouter, Router, best_choice
from .cost import LatencyTable
from .entropy import Calibration, EntropyRouter
from .learned import LearnedRouter, RouterMLP
from .signals import DrafterState, Signals, observe_draft, target_confidence

ROUTERS = ("entropy", "learned")
DEFAULT_ROUTER = "entropy"  # with the datastore, the refitted rule routes best on the held-out split (docs/routing.md)


def router_file(kind: str, directory: Path) -> Path:
    return directory / ("entropy.json" if kind == "entropy" else "learned.safetensors")


def router_dir(kind: str, directory: str | Path | None) -> Path:
    """The router directory asked for, or on the embedded default the shipped one."""
    if kind not in ROUTERS:
        raise UserError(f"unknown router {kind!r} (choose from {', '.join(ROUTERS)})")
    directory = Path(directory) if directory is not None else shipped_router()
    if directory is None:
        raise UserError("--drafter hybrid needs a router: pass --router-dir DIR (from python -m hybrid_sd.train.router)")
    return directory


def router_names(kind: str, directory: str | Path | None) -> list[str]:
    """The drafters (by name, in order) the router in `directory` was calibrated or trained for."""
    directory = router_dir(kind, directory)
    meta = directory / ("entropy.json" if kind == "entropy" else "learned.json")
    try:
        names = json.loads(meta.read_text())["names"]
    except FileNotFoundError:
        raise UserError(f"router directory {directory} has no {meta.name}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta}: not a router file ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{meta}: 'names' must be a list of drafter names")
    return names


def load_router(kind: str, directory: str | Path | None, latency: LatencyTable, names: list[str], lam: float):
    """The entropy rule or the learned policy from a router directory (`python -m
    hybrid_sd.train.router` writes one; on the embedded default, the shipped one)."""
    directory = router_dir(kind, directory)
    needed = router_file(kind, directory)
    if not needed.is_file():
        raise UserError(f"router directory {directory} has no {needed.name}")
    try:
        if kind == "entropy":
            return EntropyRouter(Calibration.load(needed), latency, names, lam)
        return LearnedRouter(RouterMLP.load(directory), latency, names, lam)
    except ValueError as e:
        raise UserError(f"{directory}: {e}") from None


__all__ = ["DEFAULT_LAM", "DEFAULT_ROUTER", "ROUTERS", "load_router", "router_names", "AlternatingRouter", "Calibration", "Choice", "DrafterState", "EntropyRouter", "FixedRouter",
           "LatencyTable", "LearnedRouter", "Router", "RouterMLP", "Signals", "best_choice", "observe_draft",
           "target_confidence"]
