"""Settings shared by every entry point, declared once: an engine's configuration and the
defaults that the CLI, the benchmarks, the evaluation and the trainers all start from."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

DEFAULT_CONTEXT = 4096  # KV cache positions of the CLI (prompt + answer)
EVAL_CONTEXT = 2048     # the benchmark's, the evaluation's and the traces' cache: their prompts are short
DEFAULT_NGRAM_MAX = 4   # longest n-gram the prompt-lookup drafter matches
TREE_BUDGET = 32        # most nodes a tree round drafts before the cost-aware cut (router/tree.py: as many as
                        # this machine verifies cheaply, up to this); without a latency table, this many
TREE_WIDTH = 8          # AR trees: children per expanded node, and nodes expanded per depth (EAGLE-2's top-k;
                        # fewer for a smaller budget)
# --drafter merged: the drafters that draft every round, their union verified as one tree (the
# block drafter's forward costs ~0.4 plain steps on the 2-core CPU, more than it adds there)
DEFAULT_MERGE = ("ar", "ngram")
TREE_TOP = 8            # block trees (DDTree): best tokens per slot a tree may branch over


@dataclass(frozen=True)
class DraftOptions:
    """What building a drafter may need besides its checkpoint."""
    ngram_max: int = DEFAULT_NGRAM_MAX
    datastore: str = "auto"  # the lookup drafter's store of answers: auto (shipped, embedded target), none, or a directory


@dataclass(frozen=True)
class EngineConfig:
    max_len: int | None = None       # KV cache positions (None: the target's whole RoPE table)
    graphs: str = "eager"            # graphs.MODES: how verify and the drafters' steps run
    kv_block: int | None = None      # attention spans rounded up to multiples of this (None: by mode)
    profile_sync: bool = False       # wait for the device at each phase boundary (exact phase times)
    pad: bool | None = None          # pad prefill and catch-up chunks to buckets (None: iff graphs)
    draft_k: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # per drafter name; else its default
    tree: bool = False               # draft trees (hybrid_sd/tree.py) instead of chains
    tree_budget: int | None = None   # tree nodes per round; None: draft what verifies cheaply, keep what pays (needs latency)

    def __post_init__(self):
        object.__setattr__(self, "draft_k", MappingProxyType(dict(self.draft_k)))

    def k_for(self, drafter) -> int:
        """The draft length a single drafter runs at: asked for, else its own default."""
        return min(self.draft_k.get(drafter.name, drafter.default_k), drafter.max_draft)
