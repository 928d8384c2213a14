"""Drafters: EAGLE-3-style autoregressive (ar), DFlash-style block (block), prompt lookup (ngram)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..models.packed_linear import pack_linears
from ..weights import shipped
from .ar import ARDrafter
from .base import Context, Draft, Drafter
from .block import BlockDrafter
from .ngram import NgramDrafter

KINDS = ("none", "ngram", "ar", "block")


def shipped_drafter(kind: str) -> Path | None:
    """The drafter this project trained and ships for the embedded default target."""
    return shipped(kind)


def load_drafter(kind: str, path: str | Path | None, target, ngram_max: int = 4,
                 embedded_default: bool = False) -> Drafter | None:
    """Build the drafter the CLI asked for; `path` is a checkpoint directory for ar/block
    (on the embedded default target, the shipped drafter when no path is given)."""
    if kind == "none":
        return None
    if kind == "ngram":
        return NgramDrafter(max_n=ngram_max, device=target.lm_head.weight.device)
    if kind not in ("ar", "block"):
        raise UserError(f"unknown drafter {kind!r} (choose from {', '.join(KINDS)})")
    if path is None and embedded_default:
        path = shipped_drafter(kind)
    if path is None:
        raise UserError(f"--drafter {kind} needs a checkpoint: pass --draft PATH"
                        + ("" if embedded_default else " (drafters ship only for the embedded default target)"))
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"drafter checkpoint {path} does not exist")
    cls = ARDrafter if kind == "ar" else BlockDrafter
    return pack_linears(cls.from_pretrained(path, target))


__all__ = ["ARDrafter", "BlockDrafter", "NgramDrafter", "Context", "Draft", "Drafter", "KINDS", "load_drafter"]
