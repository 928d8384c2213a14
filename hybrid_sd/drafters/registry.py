"""The drafter kinds by name: what the CLI offers, the factory builds and the docs list.

A new drafter is one module with a `Drafter` subclass plus one `register(...)` line (in
drafters/__init__.py for the built-in ones, anywhere before the CLI parses for others).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..weights import shipped
from .base import Drafter


@dataclass(frozen=True)
class DrafterKind:
    cls: type[Drafter]
    summary: str              # one line for --help and docs/architecture.md
    needs_checkpoint: bool    # built from a checkpoint directory (--draft DIR)
    ships: bool = False       # a trained checkpoint ships for the embedded default target
    marker: str = "config.json"  # the file that says a shipped directory is there

    @property
    def name(self) -> str:
        return self.cls.name

    def shipped_checkpoint(self) -> Path | None:
        """The checkpoint this project trained for the embedded default, if it ships one."""
        return shipped(self.name, self.marker) if self.ships else None


DRAFTERS: dict[str, DrafterKind] = {}


def register(kind: DrafterKind) -> DrafterKind:
    if kind.name in DRAFTERS or kind.name in ("none", "hybrid"):
        raise ValueError(f"a drafter named {kind.name!r} is already registered")
    DRAFTERS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    DRAFTERS.pop(name, None)
