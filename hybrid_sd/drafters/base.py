"""The drafter protocol and the committed context that all drafters read.

Positions: `ctx.ids[0..n]` are committed; `ctx.ids[n]` (the bonus) has no target K/V or
features yet. Features exist for positions 0..n-1. A drafter's `frontier` is the number of
positions whose context it has consumed; `catch_up(ctx, n)` brings it to n in one batched
pass (Lazy Catch-up: a drafter that did not draft for a while just has a lower frontier).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..cache import KVCache
from ..config import DraftOptions
from ..graphs import CATCHUP_BUCKETS, KV_BLOCK, BucketedGraphs, chunks, kv_buckets, static_shapes
from ..models.packed_linear import pack_linears
from ..tree import chain_parents
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
    # a tree (hybrid_sd/tree.py): each node's parent (-1 = the bonus), best node first; None = a chain
    parents: list[int] | None = None
    scores: list[float] | None = None  # per node: the drafter's probability of its whole path, where it has one
    origins: list[str] | None = None  # a merge of drafts: per node, the drafter whose score it carries

    def first(self, n: int) -> "Draft":
        """The first n nodes (of a tree: again a tree, the n best)."""
        cut = lambda x: x[:n] if x is not None else None  # noqa: E731
        return Draft(self.tokens[:n], cut(self.probs), cut(self.confidence), cut(self.parents), cut(self.scores),
                     cut(self.origins))

    def select(self, nodes: list[int]) -> "Draft":
        """The given nodes of a tree, in the given order, as a tree of their own (every node's
        parent must be among them, before it)."""
        where = {old: new for new, old in enumerate(nodes)}
        parents = [where[self.parents[i]] if self.parents[i] >= 0 else -1 for i in nodes]
        index = torch.tensor(nodes, dtype=torch.long, device=self.tokens.device)
        pick = lambda x: [x[i] for i in nodes] if x is not None else None  # noqa: E731
        confidence = self.confidence[index.to(self.confidence.device)] if self.confidence is not None else None
        return Draft(self.tokens[index], None, confidence, parents, pick(self.scores), pick(self.origins))

    def path_scores(self) -> list[float] | None:
        """Per node, the drafter's probability of its whole path: its scores, else the product
        of its per-token confidences along the path; None where it has neither."""
        if self.scores is not None:
            return list(self.scores)
        if self.confidence is None:
            return None
        parents = self.parents if self.parents is not None else chain_parents(self.tokens.numel())
        out: list[float] = []
        for p, c in zip(parents, self.confidence.tolist()):
            out.append((out[p] if p >= 0 else 1.0) * c)
        return out


class Drafter(ABC):
    """Everything the engine and the routers use of a drafter. A drafter without target
    features or device steps (prompt lookup) overrides only `draft`, `reset` and, if it can
    tell before drafting what it will propose, `lookahead`; the rest are no-ops here.

    `frontier` is the number of committed positions whose context it has consumed: the engine
    calls `catch_up` before every draft, and a drafter that was not picked for a while just has
    a lower frontier (Lazy Catch-up)."""

    name: ClassVar[str]                       # registry name, stats and router label
    feature_layers: tuple[int, ...] = ()      # target hidden states it reads (transformers numbering)
    frontier: int = 0
    # its every draft is a tree, whatever the engine's --tree (a merge of drafters' drafts): the
    # engine warms the tree verify's graphs for it and cuts its drafts by cost
    tree_only: ClassVar[bool] = False

    @classmethod
    def load(cls, target, checkpoint: Path | None, options: DraftOptions) -> "Drafter":
        """This drafter for `target`, from a checkpoint directory where it needs one: what the
        factory calls for a registered kind (drafters/registry.py)."""
        raise NotImplementedError(f"the {cls.name} drafter is not built by name: construct it directly")

    def config_dict(self) -> dict:
        """The published config it is built from (its shapes: what its steps cost, so the key of
        the cached latency table); a drafter without a checkpoint has none."""
        return {}

    @property
    @abstractmethod
    def default_k(self) -> int:
        """Draft length of a round when nobody asks for another."""

    @property
    def max_draft(self) -> int:
        """The longest draft one round can make (a block drafter: its block size - 1)."""
        return 1 << 30

    @abstractmethod
    def reset(self, max_len: int) -> None:
        """Forget all context; prepare caches for sequences up to max_len."""

    def catch_up(self, ctx: Context, end: int) -> None:
        """Consume the context of positions [frontier, end); stateless drafters only move on."""
        self.frontier = max(self.frontier, end)

    def rewind(self, position: int) -> None:
        """Forget the context past `position` (what catch_up consumed there is recomputed)."""
        self.frontier = min(self.frontier, position)

    @abstractmethod
    def draft(self, ctx: Context, k: int, sampling: Sampling, generator: torch.Generator | None = None) -> Draft:
        """Up to k tokens to follow ctx.ids (may be fewer, or none)."""

    def draft_tree(self, ctx: Context, budget: int, depth: int, generator: torch.Generator | None = None) -> Draft:
        """Up to `budget` nodes, at most `depth` deep, best first (a Draft with `parents`): what
        tree rounds verify. Tree drafts are deterministic (the tree's acceptance samples the
        target itself, so it needs no proposal distribution). Here: the greedy chain."""
        draft = self.draft(ctx, min(budget, depth), Sampling(), generator)
        k = draft.tokens.numel()
        return Draft(draft.tokens, None, draft.confidence, chain_parents(k), None)

    def lookahead(self, ctx: Context, k_max: int) -> list[int] | None:
        """What it would draft now (at most k_max tokens), where knowing costs nothing (prompt
        lookup: its match); None for a drafter that must run to know."""
        return None

    def available(self, ctx: Context, k_max: int) -> int | None:
        """What a router may read before choosing: how many tokens it would propose now, where
        it knows without drafting; None = up to k_max."""
        proposal = self.lookahead(ctx, k_max)
        return None if proposal is None else len(proposal)

    def use_graphs(self, mode: str, kv_block: int, device, pad: bool | None = None) -> None:
        """Run the device steps as `mode` (graphs.MODES) with attention spans in blocks of
        kv_block; `pad`: pad catch-up chunks to buckets (None: iff the steps are graphs)."""

    def warm_up_plan(self, max_len: int, k_max: int, trees: int = 0) -> list[tuple[BucketedGraphs, dict]]:
        """Every step shape a context of max_len can meet, the tree steps too when a round drafts
        trees of up to `trees` nodes (0: chains only): per
        step runner, its keys with scratch inputs (`reset` must have run). Running each key once
        captures it on CUDA and compiles it in compile mode (Engine.warm_up)."""
        return []


def pick_tokens(p: torch.Tensor, u: torch.Tensor, greedy: bool) -> torch.Tensor:
    """One token per row of p [R, V]: the argmax, or a sample by inverse CDF with the uniforms
    u [R] drawn before the call -- graph-safe where multinomial with a generator is not
    (right=True never picks a zero-probability token)."""
    if greedy:
        return p.argmax(-1)
    cdf = p.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(p.shape[-1] - 1).view(-1)


class GraphedStep(Drafter):
    """A drafter that reads target features and fuses them with `fc`, and whose device work is
    step functions run through BucketedGraphs, one set per (mode, span block, device), so that
    engines of different modes can share the drafter: `graph_step`, its whole draft, keyed by
    `draft_key(n, k, sampled)` = (k, span, sampled), `catchup_step`, KV-only context rows, and
    `tree_step`, the device part of a tree draft (`draft_tree`). Call `init_graphs()` in
    __init__ and `forget_graphs()` when the buffers the steps close over are reallocated."""

    fc: nn.Linear  # fuses the target features: its input width and device shape the scratch inputs
    cache: KVCache  # the drafter's own K/V, which its steps write

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: Path, target) -> "GraphedStep":
        """Read a checkpoint directory in the drafter's published format."""

    @classmethod
    def load(cls, target, checkpoint: Path | None, options: DraftOptions) -> "GraphedStep":
        return pack_linears(cls.from_pretrained(checkpoint, target))

    @abstractmethod
    def graph_step(self, key: tuple[int, int, int], *inputs):
        """(key, *draft inputs, u [k], inv_temperature [1]) -> (target ids [k], probabilities [k],
        proposals [k, V] or None)."""

    @abstractmethod
    def tree_step(self, key: tuple[int, int], *inputs):
        """The device work of a tree draft, keyed by (rows, attention span): what `draft_tree`
        replays (a block drafter: once; an AR drafter: once per depth)."""

    @abstractmethod
    def catchup_step(self, key: tuple[int], features, next_tokens, positions) -> None:
        """KV-only rows: features [T, C], the token after each row [T], positions [T]."""

    @abstractmethod
    def draft_key(self, n: int, k: int, sampled: bool) -> tuple[int, int, int]:
        """The graph key of a k-token draft after a context of n positions."""

    @abstractmethod
    def draft_example(self, k: int) -> tuple[torch.Tensor, ...]:
        """Scratch draft inputs for key k, for the warm-up."""

    @abstractmethod
    def tree_examples(self, spans: list[int], budget: int) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
        """Scratch inputs of every tree-step key `draft_tree` can meet with up to `budget` nodes,
        given the attention spans of this cache, for the warm-up."""

    def init_graphs(self) -> None:
        self.graph_sets: dict[tuple, tuple[BucketedGraphs, BucketedGraphs, BucketedGraphs]] = {}
        self.use_graphs("eager", KV_BLOCK, "cpu")

    def use_graphs(self, mode: str, kv_block: int, device, pad: bool | None = None) -> None:
        key = (mode, kv_block, str(device))
        if key not in self.graph_sets:
            # draft outputs are read after the verify replays, which may reuse their memory
            writes = lambda: self.cache.tensors()  # noqa: E731 -- the cache a reset may reallocate
            self.graph_sets[key] = (BucketedGraphs(self.graph_step, mode, device, f"draft:{self.name}",
                                                   copy_outputs=True, writes=writes),
                                    BucketedGraphs(self.catchup_step, mode, device, f"catchup:{self.name}",
                                                   writes=writes),
                                    BucketedGraphs(self.tree_step, mode, device, f"tree:{self.name}",
                                                   copy_outputs=True, writes=writes))
        if mode == "trace":  # a trace holds the weights as constants: inference only
            self.requires_grad_(False)
        self.kv_block = kv_block
        self.step_graphs, self.catchup_graphs, self.tree_graphs = self.graph_sets[key]
        self.pad_catchup = pad if pad is not None else static_shapes(self.catchup_graphs.mode)

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

    def in_kernel(self) -> bool:
        """Whether greedy drafts and catch-ups run as one CPU kernel call each, whatever the
        graphs mode, outside the step graphs (so none of their keys is ever met): a graph of one
        opaque call gains nothing."""
        return False

    def warm_up_plan(self, max_len: int, k_max: int, trees: int = 0) -> list[tuple[BucketedGraphs, dict]]:
        """Every greedy draft key a context of max_len can meet and every catch-up bucket (none
        where the kernel runs them) and, with trees of up to `trees` nodes, every tree-step key,
        on scratch inputs.
        Sampled keys capture when first met."""
        kernel = self.in_kernel()
        keys = {self.draft_key(n, k, False) for n in range(1, max_len) if not kernel
                for k in range(1, min(k_max, self.max_draft, max_len - n - 1) + 1)}
        p = self.fc.weight
        drafts = {key: (*self.draft_example(key[0]), torch.zeros(key[0], device=p.device), torch.ones(1, device=p.device))
                  for key in keys}
        rows = {}
        for n in CATCHUP_BUCKETS if not kernel else ():
            rows[(n,)] = (torch.zeros(n, self.fc.in_features, dtype=p.dtype, device=p.device),
                          torch.zeros(n, dtype=torch.long, device=p.device), torch.arange(n, device=p.device))
        plan = [(self.step_graphs, drafts), (self.catchup_graphs, rows)]
        if trees:
            plan.append((self.tree_graphs, self.tree_examples(kv_buckets(max_len, self.kv_block), trees)))
        return plan

    def catch_up(self, ctx: Context, end: int) -> None:
        """KV-only pass over context positions [frontier, end); when padding, in chunks padded
        to a bucket (graphs.chunks: the last row repeated, so the cache is the same)."""
        kernel = self.in_kernel()  # one kernel call per chunk: no graph, no padding
        run = self.catchup_step if kernel else self.catchup_graphs
        for start, n, rows in chunks(self.frontier, end, CATCHUP_BUCKETS, self.pad_catchup and not kernel):
            positions = torch.arange(start, start + rows, device=ctx.tokens.device).clamp_max(start + n - 1)
            run((rows,), ctx.feature_rows_at(self.feature_layers, positions), ctx.tokens[positions + 1], positions)
        self.frontier = max(self.frontier, end)
