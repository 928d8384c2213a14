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

from ..graphs import CATCHUP_BUCKETS, KV_BLOCK, BucketedGraphs, chunks
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
    """For a drafter whose device work is two step functions: `graph_step(key, *inputs, u,
    inv_temperature)`, its whole draft, keyed by `draft_key(n, k, sampled)` = (k, span,
    sampled), and `catchup_step(key, features, next_tokens, positions)`, KV-only rows. Runs
    them through BucketedGraphs, one pair per (mode, span block, device), so that engines of
    different modes can share the drafter. Call `init_graphs()` in __init__ and
    `forget_graphs()` when the buffers the steps close over are reallocated; a drafter also
    names `max_draft` and `draft_example(k)` (scratch inputs) for the warm-up."""

    def init_graphs(self) -> None:
        self.graph_sets: dict[tuple, tuple[BucketedGraphs, BucketedGraphs]] = {}
        self.pad_catchup: bool | None = None  # None: pad catch-up chunks to a bucket iff the steps are graphs
        self.use_graphs("eager", KV_BLOCK, "cpu")

    def use_graphs(self, mode: str, kv_block: int, device) -> None:
        key = (mode, kv_block, str(device))
        if key not in self.graph_sets:
            # draft outputs are read after the verify replays, which may reuse their memory
            self.graph_sets[key] = (BucketedGraphs(self.graph_step, mode, device, f"draft:{self.name}",
                                                   copy_outputs=True),
                                    BucketedGraphs(self.catchup_step, mode, device, f"catchup:{self.name}"))
        self.kv_block = kv_block
        self.step_graphs, self.catchup_graphs = self.graph_sets[key]

    def forget_graphs(self) -> None:
        for pair in self.graph_sets.values():
            for graphs in pair:
                graphs.forget()

    def replay_draft(self, n: int, k: int, sampling: Sampling, generator, *inputs):
        """The draft step on `inputs`, with its uniforms (drawn here) and 1/temperature as inputs."""
        sampled, device = not sampling.greedy, inputs[0].device
        u = torch.rand(k, generator=generator, device=device) if sampled else torch.zeros(k, device=device)
        inv_t = torch.full((1,), 1.0 / sampling.temperature if sampled else 1.0, device=device)
        return self.step_graphs(self.draft_key(n, k, sampled), *inputs, u, inv_t)

    def warm_up(self, max_len: int, k_max: int) -> dict:
        """Every greedy draft key a context of max_len can meet, once (CUDA: captured), on
        scratch inputs; `reset` must have run. Sampled keys capture when first met."""
        keys = {self.draft_key(n, k, False) for n in range(1, max_len)
                for k in range(1, min(k_max, self.max_draft, max_len - n - 1) + 1)}
        device = self.fc.weight.device
        return self.step_graphs.warm_up({key: (*self.draft_example(key[0]), torch.zeros(key[0], device=device),
                                               torch.ones(1, device=device)) for key in keys})

    def catch_up(self, ctx: Context, end: int) -> None:
        """KV-only pass over context positions [frontier, end); when the steps are graphs, in
        padded chunks (graphs.chunks: the last row repeated, so the cache is the same)."""
        pad = self.pad_catchup if self.pad_catchup is not None else self.catchup_graphs.mode != "eager"
        for start, n, rows in chunks(self.frontier, end, CATCHUP_BUCKETS, pad):
            positions = torch.arange(start, start + rows, device=ctx.tokens.device).clamp_max(start + n - 1)
            self.catchup_graphs((rows,), ctx.feature_rows_at(self.feature_layers, positions), ctx.tokens[positions + 1],
                                positions)
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
