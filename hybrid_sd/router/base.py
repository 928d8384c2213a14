"""Routers pick, each round, which drafter drafts and how far: a `Choice` from `Signals`.

Every router here maximises expected tokens committed minus lam times the round's latency
(in units of one plain decoding step), over the drafters and the draft-length buckets; they
differ only in how they estimate the expected tokens. Lossless output never depends on the
choice — the verify step guarantees it — so a router only decides speed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..graphs import DRAFT_BUCKETS
from .signals import Signals

# The latency weight: a round scores expected tokens - lam * cost (plain steps). That ranks
# choices by throughput when lam is the speed-up the router achieves (Dinkelbach), about 2 on
# the embedded default with its datastore (docs/routing.md, thirteenth session).
DEFAULT_LAM = 2.0


@dataclass(frozen=True)
class Choice:
    drafter: int | None  # index into the engine's drafters; None = no draft (a plain step)
    k: int


class Router(ABC):
    needs_signals: bool = True  # the engine reads the round's signals only for routers that use them

    @abstractmethod
    def choose(self, signals: Signals, k_max: int) -> Choice:
        """Which drafter drafts this round and how far (at most k_max)."""

    def longest_draft(self) -> int:
        """The longest draft it may choose: the engine sizes verify shapes and warm-up by it."""
        return max(DRAFT_BUCKETS)


class FixedRouter(Router):
    """One drafter at a fixed k (or plain decoding): the single-drafter paths of the engine."""
    needs_signals = False

    def __init__(self, drafter: int | None, k: int):
        self.choice = Choice(drafter, k if drafter is not None else 0)

    def choose(self, signals: Signals, k_max: int) -> Choice:
        return self.choice

    def longest_draft(self) -> int:
        return self.choice.k


class AlternatingRouter(Router):
    """Switches drafter every round (worst case for catch-up), cycling k over the buckets."""

    def __init__(self, n_drafters: int, ks: tuple[int, ...] = DRAFT_BUCKETS):
        self.n, self.ks, self.i = n_drafters, ks, 0

    def choose(self, signals: Signals, k_max: int) -> Choice:
        self.i += 1
        return Choice(self.i % self.n, self.ks[self.i % len(self.ks)])


def best_choice(expected, latency, lam: float, signals: Signals, names: list[str], k_max: int) -> Choice:
    """argmax over (drafter, k) of expected(d, k) - lam * latency(d, k, lag); a plain step
    (1 token for 1 step, the latency unit) is always a candidate. A drafter that said how much
    it can propose (`DrafterState.available`) is not asked for more."""
    best, best_score = Choice(None, 0), 1.0 - lam
    for d, name in enumerate(names):
        available = signals.drafters[d].available
        for k in DRAFT_BUCKETS:
            if k > k_max or (available is not None and k > available):
                continue
            score = expected(d, k) - lam * latency.round_cost(name, k, signals.drafters[d].lag)
            if score > best_score:
                best, best_score = Choice(d, k), score
    return best
