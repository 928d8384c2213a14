"""Drafters: EAGLE-3-style autoregressive (ar), DFlash-style block (block), lookup (ngram: prompt lookup and a datastore).
Each registers its kind here, one line each (drafters/registry.py)."""
from .ar import ARDrafter
from .base import Context, Draft, Drafter, GraphedStep
from .block import BlockDrafter
from .ngram import NgramDrafter
from .registry import DRAFTERS, DrafterKind, register

register(DrafterKind(NgramDrafter, "lookup: continues the latest earlier occurrence of the last n-gram, in the "
                     "context or in a datastore of the target's own answers", needs_checkpoint=False, ships=True,
                     marker="datastore.json"))
register(DrafterKind(ARDrafter, "EAGLE-3-style autoregressive head over fused target features", needs_checkpoint=True,
                     ships=True))
register(DrafterKind(BlockDrafter, "DFlash-style block-diffusion drafter, a whole block per forward",
                     needs_checkpoint=True, ships=True))

__all__ = ["ARDrafter", "BlockDrafter", "NgramDrafter", "Context", "Draft", "Drafter", "DrafterKind", "DRAFTERS",
           "GraphedStep", "register"]
