"""Several drafters in one round: each drafts, and the target verifies the union of their
drafts as one tree (a cross-paradigm tree).

A router picks one drafter before it has seen any draft; a merge lets the verify pick instead.
Where the drafters agree the union shares the nodes, where they differ it branches, and the
tree cut (router/tree.py) keeps the nodes whose calibrated acceptance pays for their verify
rows: each node's score is mapped through the acceptance curve of the drafter that proposed
it, since the AR drafter's probabilities and the lookup's agreement shares are on different
scales. Prompt lookup costs nothing to run, so merging it with the AR drafter costs the AR
drafter's draft plus the rows that pay: on the 2-core CPU, 1.3x the lookup's tokens per round
at about its speed (docs/performance.md, sixteenth session).

Members keep their own state: each catches up on what it missed before it drafts (every round,
since every member drafts every round) and its graphs are its own.
"""
from __future__ import annotations

import torch

from ..graphs import BucketedGraphs
from ..tree import chain_parents, merge
from ..verify import Sampling
from .base import Context, Draft, Drafter

# Draft depth of a round: with the shipped AR and lookup drafters on the 2-core CPU, an offline
# simulation of the cut over the benchmark's answers peaked at 4 (docs/drafters.md, "Merged drafts")
MERGED_DEPTH = 4


class MergedDrafter(Drafter):
    name = "merged"
    # every round is a tree, whatever the engine's --tree: the engine verifies it as one, warms
    # the tree verify's graphs and cuts it by cost
    tree_only = True

    def __init__(self, members: list[Drafter]):
        names = [m.name for m in members]
        if len(members) < 2 or len(set(names)) != len(names):
            raise ValueError(f"a merge needs two or more different drafters, got {names}")
        self.members = list(members)
        self.feature_layers = tuple(sorted({layer for m in members for layer in m.feature_layers}))

    @property
    def default_k(self) -> int:
        return min(MERGED_DEPTH, self.max_draft)

    @property
    def max_draft(self) -> int:
        return min(m.max_draft for m in self.members)

    @property
    def frontier(self) -> int:
        """The least consumed context among the members (the engine's lag of this drafter)."""
        return min(m.frontier for m in self.members)

    def config_dict(self) -> dict:
        return {"members": [[m.name, m.config_dict()] for m in self.members]}

    def reset(self, max_len: int) -> None:
        for m in self.members:
            m.reset(max_len)

    def catch_up(self, ctx: Context, end: int) -> None:
        for m in self.members:
            m.catch_up(ctx, end)

    def rewind(self, position: int) -> None:
        for m in self.members:
            m.rewind(position)

    def use_graphs(self, mode: str, kv_block: int, device, pad: bool | None = None) -> None:
        for m in self.members:
            m.use_graphs(mode, kv_block, device, pad)

    def warm_up_plan(self, max_len: int, k_max: int, trees: int = 0) -> list[tuple[BucketedGraphs, dict]]:
        return [step for m in self.members for step in m.warm_up_plan(max_len, k_max, trees)]

    def draft(self, ctx: Context, k: int, sampling: Sampling, generator=None) -> Draft:
        """Every member's chain of k, merged. Greedy chains whatever the sampling: a tree's
        acceptance samples the target itself (verify.judge_tree), so it needs no proposal."""
        return self.merged([m.draft(ctx, k, Sampling(), generator) for m in self.members])

    def draft_tree(self, ctx: Context, budget: int, depth: int, generator=None) -> Draft:
        """Every member's tree of up to `budget` nodes, `depth` deep, merged (the cut keeps the
        nodes that pay)."""
        return self.merged([m.draft_tree(ctx, budget, depth, generator) for m in self.members])

    def merged(self, drafts: list[Draft]) -> Draft:
        parts = []
        for d in drafts:
            k = d.tokens.numel()
            parents = d.parents if d.parents is not None else chain_parents(k)
            # a member without scores (none of the built-in ones) is calibrated by depth alone
            scores = d.path_scores() or [1.0] * k
            parts.append((d.tokens.tolist(), parents, scores))
        tokens, parents, scores, owner = merge(parts)
        return Draft(torch.tensor(tokens, dtype=torch.long, device=drafts[0].tokens.device), None, None, parents,
                     scores, [self.members[o].name for o in owner])
