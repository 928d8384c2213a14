"""Drafters and routers trained by this project for the embedded default target, shipped as
package data (fp16 safetensors + JSON): `smollm2-135m-instruct/{ar,block,router}/`."""
from __future__ import annotations

from pathlib import Path

EMBEDDED = Path(__file__).resolve().parent / "smollm2-135m-instruct"


def shipped(kind: str, marker: str = "config.json") -> Path | None:
    """The shipped directory for `kind` (a drafter's name, or router with marker entropy.json),
    or None if none ships."""
    path = EMBEDDED / kind
    return path if (path / marker).is_file() else None


def shipped_router() -> Path | None:
    """The shipped router directory (entropy.json, learned.*), or None."""
    return shipped("router", "learned.json")
