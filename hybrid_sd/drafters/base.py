"""The drafter protocol and the committed context that all drafters read.

Positions: `ctx.ids[0..n]` are committed; `ctx.ids[n]` (the bonus) has no target K/V or
features yet. Features exist for positions 0..n-1. A drafter's `frontier` is the number of
positions whose context it has consumed; `catch_up(ctx, n)` brings it to n in one batched
pass (Lazy Catch-up: a drafter that did not draft for a while just has a lower frontier).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..graphs import CATCHUP_BUCKETS, KV_BLOCK, BucketedGraphs
from ..verify import Sampling


@dataclass
class Context:
    ids: list[int]              # committed tokens (prompt + generated), host side
    tokens: torch.Tensor        # the same ids on the device, [max_len]
    features: torch.Tensor | None  # [max_len, n_captured, hidden]: target features per position
    capture: tuple[int, ...]    # which hidden states (transformers numbering) `features` holds

    @property
    def n(self) -> int:
        """Position of the bonus token, = number of positions with target K/V and features."""
        return len(self.ids) - 1

    def feature_rows_at(self, layers: tuple[int, ...], positions: torch.Tensor) -> torch.Tensor:
        """Features of the given positions for `layers`, concatenated in their order: [T, L*H]."""
        cols = [self.capture.index(layer) for layer in layers]
        return self.features[positions][:, cols].flatten(1)

    def feature_rows(self, layers: tuple[int, ...], start: int, end: int) -> torch.Tensor:
        """Features of positions [start, end) for `layers`, concatenated in their order: [T, L*H]."""
        cols = [self.capture.index(layer) for layer in layers]
        rows = self.features[start:end]
        if cols == list(range(cols[0], cols[0] + len(cols))):
            return rows[:, cols[0]:cols[0] + len(cols)].flatten(1)
        return rows[:, cols].flatten(1)


@dataclass
class Draft:
    tokens: torch.Tensor             # [k] target ids, on the device
    probs: torch.Tensor | None = None  # [k, V] proposal the tokens were sampled from; None = deterministic
    confidence: torch.Tensor | None = None  # [k] drafter's probability of each drafted token


class Drafter(Protocol):
    name: str
    feature_layers: tuple[int, ...]  # target hidden states it reads (transformers numbering)
    frontier: int

    def reset(self, max_len: int) -> None:
        """Forget all context; prepare caches for sequences up to max_len."""

    def catch_up(self, ctx: Context, end: int) -> None:
        """Consume the context of positions [frontier, end)."""

    def draft(self, ctx: Context, k: int, sampling: Sampling, generator: torch.Generator | None) -> Draft:
        """Up to k tokens to follow ctx.ids (may be fewer, or none)."""


def pick_tokens(p: torch.Tensor, u: torch.Tensor, greedy: bool) -> torch.Tensor:
    """One token per row of p [R, V]: the argmax, or a sample by inverse CDF with the uniforms
    u [R] drawn before the call -- graph-safe where multinomial with a generator is not
    (right=True never picks a zero-probability token)."""
    if greedy:
        return p.argmax(-1)
    cdf = p.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(p.shape[-1] - 1).view(-1)


class GraphedStep:
    """For a drafter whose device work is two step functions, `graph_step(key, ...)` (its
    draft) and `catchup_step(key, features, next_tokens, positions)` (KV-only rows): runs them
    through BucketedGraphs, one pair per (mode, span block, device), so that engines of
    different modes can share the drafter. Call `init_graphs()` in __init__ and
    `forget_graphs()` when the buffers the steps close over are reallocated."""

    def init_graphs(self) -> None:
        self.graph_sets: dict[tuple, tuple[BucketedGraphs, BucketedGraphs]] = {}
        self.pad_catchup: bool | None = None  # None: pad catch-up chunks to a bucket iff the steps are graphs
        self.use_graphs("eager", KV_BLOCK, "cpu")

    def use_graphs(self, mode: str, kv_block: int, device) -> None:
        key = (mode, kv_block, str(device))
        if key not in self.graph_sets:
            self.graph_sets[key] = (BucketedGraphs(self.graph_step, mode, device, f"draft:{self.name}"),
                                    BucketedGraphs(self.catchup_step, mode, device, f"catchup:{self.name}"))
        self.kv_block = kv_block
        self.step_graphs, self.catchup_graphs = self.graph_sets[key]

    def forget_graphs(self) -> None:
        for pair in self.graph_sets.values():
            for graphs in pair:
                graphs.forget()

    def catch_up(self, ctx: Context, end: int) -> None:
        """KV-only pass over context positions [frontier, end). When the steps are graphs: in
        chunks of at most the largest catch-up bucket, each padded to its bucket by repeating
        the chunk's last row -- one position written again with the same K/V, so the padding
        never changes the cache."""
        start = self.frontier
        pad = self.pad_catchup if self.pad_catchup is not None else self.catchup_graphs.mode != "eager"
        while start < end:
            n = min(end - start, CATCHUP_BUCKETS[-1]) if pad else end - start
            rows = next(b for b in CATCHUP_BUCKETS if b >= n) if pad else n
            positions = torch.arange(start, start + rows, device=ctx.tokens.device).clamp_max(start + n - 1)
            self.catchup_graphs((rows,), ctx.feature_rows_at(self.feature_layers, positions), ctx.tokens[positions + 1],
                                positions)
            start += n
        self.frontier = max(self.frontier, end)

    def warm_up_catchup(self) -> dict:
        """Every catch-up bucket once (CUDA: captured) on scratch rows; `reset` must have run."""
        p = self.fc.weight
        examples = {}
        for rows in CATCHUP_BUCKETS:
            positions = torch.arange(rows, device=p.device)
            examples[(rows,)] = (torch.zeros(rows, self.fc.in_features, dtype=p.dtype, device=p.device),
                                 torch.zeros(rows, dtype=torch.long, device=p.device), positions)
        return self.catchup_graphs.warm_up(examples)
