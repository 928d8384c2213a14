"""Drafters and routers trained by this project for the embedded default target, shipped as
package data (fp16 safetensors + JSON): `smollm2-135m-instruct/{ar,block,router}/`."""
from __future__ import annotations

from pathlib import Path

EMBEDDED = Path(__file__).resolve().parent / "smollm2-135m-instruct"
MARKERS = {"ar": "config.json", "block": "config.json", "router": "entropy.json"}


def shipped(kind: str) -> Path | None:
    """The shipped directory for `kind` (ar, block or router), or None if none ships."""
    path = EMBEDDED / kind
    return path if (path / MARKERS[kind]).is_file() else None
