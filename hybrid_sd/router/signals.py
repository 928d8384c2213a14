"""What a router sees at each round's one sync: the target's confidence at the bonus position
and, per drafter, how its last draft went and how far behind it is.

All of it is a by-product of the previous round (the verify logits, the accepted count, the
drafter's own probabilities), so routing adds no device work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels import row_stats

ACCEPTANCE_EMA = 0.5  # weight of the newest round in a drafter's running acceptance


@dataclass
class DrafterState:
    confidence: float = 0.5  # its probability of its first draft token, the last time it drafted
    acceptance: float = 0.5  # running accepted / proposed, over the rounds it drafted
    lag: int = 0             # committed positions it has not consumed (catch-up cost if chosen)
    available: int | None = None  # tokens it can propose now, where it knows before drafting; None: any


@dataclass
class Signals:
    top1: float = 0.5        # target's probability of its own choice at the bonus position
    entropy: float = 1.0     # entropy (nats) of that distribution
    drafters: list[DrafterState] = field(default_factory=list)

    @property
    def lookup_match(self) -> int:
        """Tokens a lookup drafter (one that knows before drafting) can propose now; 0: none."""
        return max((d.available for d in self.drafters if d.available is not None), default=0)

    def vector(self) -> list[float]:
        """Flat inputs for a learned router: target, lookup match, then each drafter's state."""
        out = [self.top1, self.entropy / 5.0, min(self.lookup_match, 8) / 8.0]
        for d in self.drafters:
            out += [d.confidence, d.acceptance, min(d.lag, 64) / 64.0]
        return out


def target_confidence(logits_row: torch.Tensor) -> tuple[float, float]:
    """(top-1 probability, entropy) of softmax(logits_row)."""
    _, _, entropy, top1 = row_stats(logits_row[None])
    return float(top1[0]), float(entropy[0])


def observe_draft(state: DrafterState, proposed: int, accepted: int, confidence: float | None) -> None:
    if proposed > 0:
        state.acceptance = (1 - ACCEPTANCE_EMA) * state.acceptance + ACCEPTANCE_EMA * accepted / proposed
    if confidence is not None:
        state.confidence = confidence

