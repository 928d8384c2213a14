"""How many nodes of a drafted tree to verify: the cut that maximises expected tokens per second.

A drafter orders its tree (best first, parents before children) and scores each node with its own probability of the
whole path (tree.py). A node is accepted exactly when its path is, so the expected number of
tokens a round commits with the first N nodes is 1 + sum of their acceptance probabilities.
Drafters' own probabilities are not calibrated (a small drafter is over-confident), so each
score is mapped through an acceptance curve per drafter, learnt online from the rounds already
verified (every node of a verified tree is one observation: on the accepted path or not).
The cost is the round's draft time plus the measured verify time of N + 1 rows. Only speed
depends on the cut; the verify keeps the output the target's own.

How many nodes a round drafts before the cut also follows the machine: as many as a verify
takes within VERIFY_SLACK of a plain step (at most TREE_BUDGET). On a GPU at batch 1 that is
the whole budget; on the CPU, where every verified row costs, 4-5 nodes, which also keeps an AR
tree's drafting narrow (its width is the budget's).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..config import TREE_BUDGET
from .cost import LatencyTable

if TYPE_CHECKING:  # the drafts it cuts; the router reads them, it builds none
    from ..drafters.base import Draft

BINS = 12          # score bins, by -log2(score): 1, 1/2, 1/4, ... 1/2048 and below
PRIOR_WEIGHT = 2.0  # pseudo-observations at the drafter's own score until rounds say otherwise
# a round drafts the nodes whose verify costs at most this many plain steps: on the CPU, trees of
# 8 or 15 nodes ran slower than 4-node ones for every drafter (docs/performance.md, fifteenth session)
VERIFY_SLACK = 1.25


class AcceptanceCurve:
    """P(node accepted | drafter's path score), per score bin: observed hits with a prior at the
    bin's own score."""

    def __init__(self):
        self.hits = [0.0] * BINS
        self.seen = [0.0] * BINS

    @staticmethod
    def bin(score: float) -> int:
        if score <= 0:
            return BINS - 1
        return min(BINS - 1, int(-math.log2(min(score, 1.0))))

    def __call__(self, score: float) -> float:
        b = self.bin(score)
        prior = 2.0 ** -(b + 0.5)
        return (self.hits[b] + PRIOR_WEIGHT * prior) / (self.seen[b] + PRIOR_WEIGHT)

    def add(self, score: float, accepted: bool) -> None:
        b = self.bin(score)
        self.seen[b] += 1
        self.hits[b] += accepted


class TreeBudget:
    def __init__(self, latency: LatencyTable):
        self.latency = latency
        self.curves: dict[str, AcceptanceCurve] = {}
        affordable = [n for n in range(1, TREE_BUDGET + 1) if latency.verify_seconds(n) <= VERIFY_SLACK * latency.step]
        self.drafted = max(affordable, default=1)  # nodes a round drafts before the cut

    def curve(self, name: str) -> AcceptanceCurve:
        return self.curves.setdefault(name, AcceptanceCurve())

    def cut(self, name: str, scores: list[float], draft_seconds: float) -> int:
        """The N (1..len(scores)) with the most expected tokens per second."""
        curve = self.curve(name)
        return self.best_count([curve(s) for s in scores], draft_seconds)

    def best_count(self, probabilities: list[float], draft_seconds: float) -> int:
        """The N (1..len) whose first N nodes, with these acceptance probabilities, give the
        most expected tokens per second of draft and verify."""
        best_n, best_rate, expected = 1, -1.0, 1.0
        for n, p in enumerate(probabilities, start=1):
            expected += p
            rate = expected / (draft_seconds + self.latency.verify_seconds(n))
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n

    def keep(self, name: str, draft: Draft, draft_seconds: float) -> Draft:
        """The nodes of a drafted tree worth verifying. One drafter's tree: its first N (it
        ranks its own nodes, `cut`). A merge of several drafters' drafts, whose scores are on
        different scales: every node's score through its own drafter's curve (never above its
        parent's, as a node is accepted only with its parent), then the N most likely."""
        if draft.origins is None:
            return draft.first(self.cut(name, draft.scores, draft_seconds))
        p = [self.curve(o)(s) for o, s in zip(draft.origins, draft.scores)]
        for i, parent in enumerate(draft.parents):
            if parent >= 0:
                p[i] = min(p[i], p[parent])
        order = sorted(range(len(p)), key=lambda i: -p[i])  # stable: a parent keeps its place before its children
        return draft.select(order[:self.best_count([p[i] for i in order], draft_seconds)])

    def observe(self, name: str, scores: list[float], accepted_nodes: set[int],
                origins: list[str] | None = None) -> None:
        """Each verified node is one observation for the curve of the drafter that scored it."""
        for i, s in enumerate(scores):
            self.curve(origins[i] if origins is not None else name).add(s, i in accepted_nodes)
