"""Routers pick, each round, which drafter drafts and how far: a `Choice` from `Signals`.

Every router here maximises expected tokens committed minus lam times the round's latency
(in units of one plain decoding step), over the drafters and the draft-length buckets; they
differ only in how they estimate the expected tokens. Lossless output never depends on the
choice — the verify step guarantees it — so a router only decides speed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..graphs import DRAFT_BUCKETS
from .signals import Signals


@dataclass(frozen=True)
class Choice:
    drafter: int | None  # index into the engine's drafters; None = no draft (a plain step)
    k: int


class Router(Protocol):
    def choose(self, signals: Signals, k_max: int) -> Choice: ...


class FixedRouter:
    """One drafter at a fixed k (or plain decoding): the single-drafter paths of the engine."""

    def __init__(self, drafter: int | None, k: int):
        self.choice = Choice(drafter, k if drafter is not None else 0)

    def choose(self, signals: Signals, k_max: int) -> Choice:
        return self.choice


class AlternatingRouter:
    """Switches drafter every round (worst case for catch-up), cycling k over the buckets."""

    def __init__(self, n_drafters: int, ks: tuple[int, ...] = DRAFT_BUCKETS):
        self.n, self.ks, self.i = n_drafters, ks, 0

    def choose(self, signals: Signals, k_max: int) -> Choice:
        self.i += 1
        return Choice(self.i % self.n, self.ks[self.i % len(self.ks)])


def best_choice(expected, latency, lam: float, signals: Signals, names: list[str], k_max: int) -> Choice:
    """argmax over (drafter, k) of expected(d, k) - lam * latency(d, k, lag); a plain step
    (1 token for 1 step) is always a candidate."""
    best, best_score = Choice(None, 0), 1.0 - lam * latency.plain_step_cost()
    for d, name in enumerate(names):
        if name == "ngram" and signals.ngram_match == 0:
            continue  # nothing to propose
        for k in DRAFT_BUCKETS:
            if k > k_max or (name == "ngram" and k > signals.ngram_match):
                continue
            score = expected(d, k) - lam * latency.round_cost(name, k, signals.drafters[d].lag)
            if score > best_score:
                best, best_score = Choice(d, k), score
    return best
