"""The round loop: draft, verify, accept, commit — with plain decoding as the empty draft.

One generation:
    prefill the prompt -> first token (the "bonus": committed, not yet in the target cache)
    each round: the router picks a drafter and k from the last round's signals
                that drafter catches up to the committed context (Lazy Catch-up, KV-only);
                the others keep lagging until they are picked
                drafter proposes k tokens
                target verifies [bonus, d1..dk] in one forward at positions n..n+k
                accept a prefix (greedy or rejection sampling) and one more target token
                commit by setting the cache length; keep the target features of the new rows
Rejected rows stay in the caches past their lengths and are overwritten later: no copies.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .config import TREE_BUDGET, EngineConfig
from .drafters.base import Context, Draft, Drafter
from .errors import UserError
from .graphs import (
    DRAFT_BUCKETS,
    GRAPH_KV_BLOCK,
    KV_BLOCK,
    PREFILL_BUCKETS,
    TREE_BUCKETS,
    BucketedGraphs,
    bucket_for,
    chunks,
    kv_bucket,
    kv_buckets,
    resolve_mode,
    static_shapes,
    use_compile_cache,
)
from .models.embedded import compile_cache_dir
from .models.transformer import Transformer
from .profiling import PhaseClock, nvtx_range
from .router import (
    FixedRouter,
    LatencyTable,
    Router,
    Signals,
    observe_draft,
    target_confidence,
)
from .router.signals import DrafterState
from .router.tree import TreeBudget
from .tree import ancestor_mask, depths
from .verify import Sampling, judge, judge_tree, target_probs

PLAIN = "none"  # the label of a round without a draft (a plain decoding step)
# the smallest cache the latency probes fit in: a context of 1, the bonus and the longest draft bucket
MIN_PROBE_CONTEXT = DRAFT_BUCKETS[-1] + 2


def check_probe_context(max_len: int) -> None:
    """One UserError when a cache of max_len positions cannot hold the hybrid's latency probes
    (the CLI asks before loading anything)."""
    if max_len < MIN_PROBE_CONTEXT:
        raise UserError(f"a context of {max_len} positions is too small to measure the hybrid's latency table "
                        f"(a verify of {DRAFT_BUCKETS[-1] + 1} tokens after the prompt): raise --max-context to at "
                        f"least {MIN_PROBE_CONTEXT}")


@dataclass
class RoundRecord:
    drafter: str    # the drafter's name, or PLAIN
    k: int          # drafts proposed
    accepted: int   # drafts accepted
    committed: int  # tokens committed this round (accepted + the target's own token), before stop truncation
    times: dict[str, float]
    catchup_tokens: int = 0  # positions the drafter consumed before drafting (its lag)
    tree: bool = False       # the draft was a tree (k = its nodes, accepted = the depth reached)


@dataclass
class RoundStats:
    """Totals over any set of rounds -- one generation, one drafter's rounds, a category of a
    benchmark: the one place tau, phase times and switching overhead are computed."""
    rounds: int = 0
    committed: int = 0
    catchup_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, summed
    modelled_steps: float = 0.0  # the rounds priced by a latency table, in plain steps (when given one)

    @classmethod
    def of(cls, rounds: Iterable[RoundRecord], latency: LatencyTable | None = None) -> "RoundStats":
        total = cls()
        for r in rounds:
            total.rounds += 1
            total.committed += r.committed
            total.catchup_tokens += r.catchup_tokens
            if latency is not None:
                total.modelled_steps += latency.round_cost(r.drafter, r.k, r.catchup_tokens)
            for phase, t in r.times.items():
                total.seconds[phase] = total.seconds.get(phase, 0.0) + t
        return total

    def __add__(self, other: "RoundStats") -> "RoundStats":
        seconds = dict(self.seconds)
        for phase, t in other.seconds.items():
            seconds[phase] = seconds.get(phase, 0.0) + t
        return RoundStats(self.rounds + other.rounds, self.committed + other.committed,
                          self.catchup_tokens + other.catchup_tokens, seconds,
                          self.modelled_steps + other.modelled_steps)

    @property
    def tau(self) -> float:
        """Tokens committed per verify round (accepted drafts + the target's token)."""
        return self.committed / self.rounds if self.rounds else 0.0

    @property
    def modelled_speedup(self) -> float:
        """Tokens per plain step with every round priced by the latency table: the speed-up
        these rounds would give on the machine the table was measured on, free of timing noise."""
        return self.committed / self.modelled_steps if self.modelled_steps else 0.0

    @property
    def switching_overhead(self) -> float:
        """Catch-up time / round time."""
        total = sum(self.seconds.values())
        return self.seconds.get("catchup", 0.0) / total if total else 0.0

    def ms_per_round(self, phase: str) -> float:
        return 1e3 * self.seconds.get(phase, 0.0) / self.rounds if self.rounds else 0.0


@dataclass
class Generation:
    token_ids: list[int]
    prompt_tokens: int
    ttft_s: float
    elapsed_s: float
    stop_reason: str  # "eos", "length" (max_new_tokens) or "context" (cache full)
    rounds: list[RoundRecord] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per verify round (accepted drafts + the target's token): the papers' tau."""
        return RoundStats.of(self.rounds).tau

    def tree_stats(self) -> dict:
        """Per drafter, over its tree rounds: mean nodes verified and mean depth accepted."""
        by: dict[str, list[RoundRecord]] = {}
        for r in self.rounds:
            if r.tree:
                by.setdefault(r.drafter, []).append(r)
        return {d: {"nodes": round(sum(r.k for r in v) / len(v), 2), "depth": round(sum(r.accepted for r in v) / len(v), 3)}
                for d, v in by.items()}

    def routing_stats(self) -> dict:
        """Per drafter: share of rounds and tokens per round; switches between drafters;
        catch-up tokens; switching overhead = catch-up time / round time."""
        by: dict[str, list[RoundRecord]] = {}
        for r in self.rounds:
            by.setdefault(r.drafter, []).append(r)
        drafting = [r.drafter for r in self.rounds if r.drafter != PLAIN]
        total = RoundStats.of(self.rounds)
        return {
            "share": {d: round(len(v) / len(self.rounds), 4) for d, v in by.items()},
            "tokens_per_round": {d: round(RoundStats.of(v).tau, 3) for d, v in by.items()},
            "switches": sum(a != b for a, b in zip(drafting, drafting[1:])),
            "catchup_tokens": total.catchup_tokens,
            "switching_overhead": round(total.switching_overhead, 4),
        }


class Engine:
    """The round loop over one target. `drafters`: none (plain decoding), one (drafting
    `config.k_for` it every round unless a router says otherwise), or several sharing this
    target and its feature buffer, with a `router` choosing per round."""

    def __init__(self, target: Transformer, eos_ids: tuple[int, ...] = (), drafters: Sequence[Drafter] = (),
                 router: Router | None = None, config: EngineConfig = EngineConfig()):
        drafters = list(drafters)
        if len(drafters) > 1 and router is None:
            raise ValueError("several drafters need a router")
        self.target, self.eos_ids, self.drafters, self.config = target, frozenset(eos_ids), drafters, config
        self.router = router or FixedRouter(0 if drafters else None, config.k_for(drafters[0]) if drafters else 0)
        self.max_len = config.max_len or target.max_len
        if self.max_len > target.max_len:
            raise UserError(f"context {self.max_len} exceeds the target's RoPE table of {target.max_len} positions")
        self.cache = target.new_cache(self.max_len)
        self.capture = tuple(sorted({layer for d in drafters for layer in d.feature_layers}))
        p = target.lm_head.weight
        self.device = p.device
        self.features = (torch.zeros(self.max_len, len(self.capture), target.config.hidden_size, dtype=p.dtype,
                                     device=p.device) if self.capture else None)
        self.tokens = torch.zeros(self.max_len + 1, dtype=torch.long, device=p.device)
        self.clock = PhaseClock(sync=config.profile_sync)
        # verify (and each drafter's step) runs through one BucketedGraphs: captured CUDA graphs
        # keyed by (tokens, attention span), torch.compile, or eager -- the round loop is the same
        try:
            self.graphs_mode = resolve_mode(config.graphs, self.device)
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.graphs_mode == "trace":  # a trace holds the weights as constants: inference only
            target.requires_grad_(False)
        if self.graphs_mode == "compile":  # what a compile builds outlives the process (and /tmp)
            use_compile_cache(compile_cache_dir())
        # attention spans: fine buckets when eager, coarse ones when each is a capture (or a trace,
        # which pays only for keys met many times)
        self.kv_block = config.kv_block or (KV_BLOCK if self.graphs_mode == "eager" else GRAPH_KV_BLOCK)
        self.verify_graphs = BucketedGraphs(self.verify_step, self.graphs_mode, self.device, "verify",
                                            writes=self.cache.tensors)
        # tree verifies: keyed by (rows, span); rows padded to a node bucket when steps are graphs
        self.tree_graphs = BucketedGraphs(self.tree_verify_step, self.graphs_mode, self.device, "verify:tree",
                                          writes=self.cache.tensors)
        self.pads_trees = config.pad if config.pad is not None else static_shapes(self.graphs_mode)
        self.budgets: TreeBudget | None = None  # the cost-aware tree cut, once a latency table is given
        # prefill as CUDA graphs too (no launch gaps in TTFT); not compiled: on the CPU a compile
        # costs ~1 min per chunk shape and a compute-bound prefill gains nothing from it
        prefill_mode = "cuda" if self.graphs_mode == "cuda" else "eager"
        self.prefill_graphs = BucketedGraphs(self.prefill_step, prefill_mode, self.device, "prefill")
        self.pads_prefill = config.pad if config.pad is not None else prefill_mode == "cuda"

    def use_latency(self, latency: LatencyTable) -> None:
        """Cut each drafted tree where expected tokens per second peak (router/tree.py), with the
        verify costs of this machine (config.tree_budget None: draft as many nodes as this
        machine verifies cheaply, `TreeBudget.drafted`, then cut)."""
        self.budgets = TreeBudget(latency)

    @property
    def verifies_trees(self) -> bool:
        """Whether rounds may verify trees: --tree, or a drafter whose drafts are always trees."""
        return self.config.tree or any(d.tree_only for d in self.drafters)

    @property
    def routed(self) -> bool:
        """Whether rounds compute the router's signals (a fixed choice needs none)."""
        return self.router.needs_signals

    @property
    def k_max(self) -> int:
        """Longest draft a round may ask for."""
        return self.router.longest_draft()

    def reset_drafters(self) -> None:
        """Empty every drafter's context and point its steps at this engine's graphs mode (a
        drafter may be shared with engines of other modes)."""
        for d in self.drafters:
            d.use_graphs(self.graphs_mode, self.kv_block, self.device, self.config.pad)
            d.reset(self.max_len)

    def use_router(self, router: Router) -> None:
        """Route with `router` from now on: the hybrid's router is built from the latency table
        measured on this very engine (factory.build_hybrid)."""
        self.router = router

    @torch.inference_mode()
    def latency_probes(self, context: int = 96):
        """Callables that run one piece of a round on a dummy context of `context` positions:
        `verify(k)` (a k+1-token verify) and, per drafter name, `(draft(k), catch_up(lag))`
        (catch_up is None for a drafter without features). For warm-up and benchmarks.
        The context is cut so that the longest probed verify (k = DRAFT_BUCKETS[-1]) still has
        a cache position for every row; a cache too small for that is one UserError."""
        longest = DRAFT_BUCKETS[-1]
        check_probe_context(self.max_len)
        n = max(1, min(context, self.max_len - 1 - longest))
        ids = [(7 * i + 3) % self.target.config.vocab_size for i in range(n + 1)]
        ctx = Context(list(ids), self.tokens, self.features, self.capture)
        self.tokens[:n + 1] = torch.tensor(ids, device=self.device)
        self.prefill(n)
        self.cache.length = n

        @torch.inference_mode()
        def verify(k):
            start = min(n, self.max_len - 1 - k)  # a tree-sized verify may need an earlier start
            logits, _ = self.verify_forward(self.tokens[start:start + 1 + k], start)
            int(logits[:1].argmax())  # read the result, as a round does (waits for the device)
            self.cache.length = n

        def pieces(drafter):
            drafter.reset(self.max_len)
            drafter.catch_up(ctx, n)

            @torch.inference_mode()
            def draft(k):
                drafter.draft(ctx, k, Sampling())
                self.synchronize()  # time the device's work, not its launch

            @torch.inference_mode()
            def catch_up(lag):
                drafter.rewind(n - min(lag, n))
                drafter.catch_up(ctx, n)
                self.synchronize()
            return draft, (catch_up if drafter.feature_layers else None)

        self.reset_drafters()
        return verify, {d.name: pieces(d) for d in self.drafters}

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure_latency(self, context: int = 96, repeats: int = 3) -> LatencyTable:
        """Warm-up: time the target's verify of k+1 tokens and each drafter's draft of k and
        catch-up over each lag bucket, on a dummy context on this machine."""
        verify, drafters = self.latency_probes(context)
        table = LatencyTable.measure(verify, drafters, repeats, longest_verify=self.max_len - 2)
        self.cache.length = 0
        return table

    def pick(self, logits: torch.Tensor, sampling: Sampling, generator) -> int:
        if sampling.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(target_probs(logits, sampling), 1, generator=generator))

    def prefill_step(self, key: tuple, tokens: torch.Tensor, positions: torch.Tensor, last: torch.Tensor):
        """The captured prompt step: like verify_step, but only row `last` [1] gets logits
        ([1, V]: a graph per chunk bucket must not hold a [T, V] buffer). A key (rows, span,
        True) is an unpadded chunk at positions 0..rows-1: causal attention over those rows
        alone (half the attention work of the positional mask)."""
        kv_len, causal = key[1], len(key) > 2 and key[2]
        hidden, feats = self.target(tokens[None], positions, self.cache, kv_len, self.capture, causal=causal)
        return self.target.logits(hidden[0].index_select(0, last)), feats

    def prefill_chunks(self, P: int):
        """(start, real rows n, graph key (rows run, span)) of each chunk of a P-token prompt."""
        for start, n, rows in chunks(0, P, PREFILL_BUCKETS, self.pads_prefill):
            key = (rows, kv_bucket(start + n, self.max_len, self.kv_block))
            # an unpadded chunk from position 0 (eager prefill: the whole prompt) attends causally
            yield start, n, (key + (True,) if start == 0 and rows == n and not self.pads_prefill else key)

    def prefill(self, P: int) -> torch.Tensor:
        """The prompt self.tokens[:P] into the target cache and, for positions 0..P-1, the
        feature buffer; returns the logits [V] of position P-1. As graphs: in chunks of at most
        the largest prefill bucket, each padded to its bucket (graphs.chunks: the last token
        repeated at its last position, so the padding never changes the cache)."""
        for start, n, key in self.prefill_chunks(P):
            positions = torch.arange(start, start + key[0], device=self.device).clamp_max(start + n - 1)
            last = torch.full((1,), n - 1, device=self.device)
            logits, feats = self.prefill_graphs(key, self.tokens[positions], positions, last)
            if feats is not None:
                self.features[start:start + n] = feats[0, :n].view(n, len(self.capture), -1)
        return logits[0]

    def verify_step(self, key: tuple[int, int], tokens: torch.Tensor, positions: torch.Tensor):
        """The captured step: T tokens at `positions` attend over the first kv_len cache
        positions; returns (logits [T, V] float32, features [1, T, C*H] or None)."""
        _, kv_len = key
        hidden, feats = self.target(tokens[None], positions, self.cache, kv_len, self.capture)
        return self.target.logits(hidden[0]), feats

    def verify_forward(self, tokens: torch.Tensor, start: int):
        """Verify: (logits [T, V], features [T, C, H] or None) through the bucketed graphs."""
        T = tokens.numel()
        positions = torch.arange(start, start + T, device=self.device)
        logits, feats = self.verify_graphs((T, self.verify_span(T, start + T)), tokens, positions)
        return logits, (feats[0].view(T, len(self.capture), -1) if feats is not None else None)

    def verify_span(self, rows: int, end: int) -> int:
        """The attention span in a verify's graph key: the bucket covering `end` positions, or the
        whole cache where the target's forward of `rows` rows does not depend on it (fewer keys
        to compile or capture)."""
        return self.max_len if self.target.span_free(rows) else kv_bucket(end, self.max_len, self.kv_block)

    def tree_verify_step(self, key: tuple[int, int], tokens: torch.Tensor, positions: torch.Tensor,
                         slots: torch.Tensor, mask: torch.Tensor):
        """The captured tree verify: rows at RoPE `positions` write K/V at cache `slots` and see
        the cache slots `mask` [rows, span] allows; returns what verify_step returns."""
        hidden, feats = self.target(tokens[None], positions, self.cache, None, self.capture, tree=(slots, mask))
        return self.target.logits(hidden[0]), feats

    def verify_tree(self, parents: list[int], n: int):
        """Verify the bonus and a draft tree (self.tokens[n + 1:] holds its nodes) in one forward:
        row i + 1 (node i) at position n + depth, cache slot n + i + 1, attending to the committed
        context and its own ancestors. Returns (logits [k+1, V], features [k+1, C, H] or None)."""
        T = len(parents) + 1
        rows = T  # graphs: a few shapes, so pad to the next node bucket that fits
        if self.pads_trees:
            rows = next((b + 1 for b in TREE_BUCKETS if b + 1 >= T and n + b + 1 <= self.max_len), T)
        # padding rows: leaves of the bonus holding whatever tokens follow, never walked
        full = parents + [-1] * (rows - T)
        positions = n + torch.tensor([0] + depths(full), device=self.device)
        slots = torch.arange(n, n + rows, device=self.device)
        span = kv_bucket(n + rows, self.max_len, self.kv_block)
        mask = torch.zeros(rows, span, dtype=torch.bool, device=self.device)
        mask[:, :n] = True
        mask[:, n:n + rows] = ancestor_mask(full, self.device)
        logits, feats = self.tree_graphs((rows, span), self.tokens[n:n + rows], positions, slots, mask)
        return logits[:T], (feats[0, :T].view(T, len(self.capture), -1) if feats is not None else None)

    def node_budget(self, n: int) -> int:
        """Tree nodes a round may draft after a context of n positions."""
        drafted = self.budgets.drafted if self.budgets is not None else TREE_BUDGET
        return max(0, min(self.config.tree_budget or drafted, self.max_len - n - 1))

    def warm_up_plan(self) -> list[tuple[BucketedGraphs, dict]]:
        """Every bucket of every step a generation can meet: per step runner, its keys with
        scratch inputs (the verify's write scratch K/V at 0..T-1, which prefill overwrites)."""
        spans = kv_buckets(self.max_len, self.kv_block)
        examples = {(T, self.verify_span(T, kv)): (self.tokens[:T], torch.arange(T, device=self.device))
                    for T in range(1, self.k_max + 2) for kv in spans if kv >= T}
        plan = [(self.verify_graphs, examples)]
        if self.verifies_trees:  # every padded tree verify (rows = a node bucket + 1) at every span
            examples = {}
            for rows in (b + 1 for b in TREE_BUCKETS if b + 1 <= self.max_len):
                index = torch.arange(rows, device=self.device)
                for kv in spans:
                    if kv >= rows:
                        examples[(rows, kv)] = (self.tokens[:rows], index, index,
                                                torch.ones(rows, kv, dtype=torch.bool, device=self.device))
            plan.append((self.tree_graphs, examples))
        if self.pads_prefill:  # else prefill is one unpadded pass: nothing to warm
            # every key a prompt can meet: chunks start at multiples of the largest bucket
            chunk = PREFILL_BUCKETS[-1]
            keys = {(bucket_for(n, PREFILL_BUCKETS), kv_bucket(start + n, self.max_len, self.kv_block))
                    for start in range(0, self.max_len, chunk) for n in range(1, min(chunk, self.max_len - start) + 1)}
            last = torch.zeros(1, dtype=torch.long, device=self.device)
            examples = {}
            for T, kv in keys:  # a bucket may be longer than the cache: positions are clamped, as in prefill
                positions = torch.arange(T, device=self.device).clamp_max(self.max_len - 1)
                examples[(T, kv)] = (self.tokens[positions], positions, last)
            plan.append((self.prefill_graphs, examples))
        self.reset_drafters()
        for d in self.drafters:
            plan += d.warm_up_plan(self.max_len, self.k_max, trees=self.node_budget(0) if self.config.tree else 0)
        return plan

    @torch.inference_mode()
    def warm_up(self, progress: Callable[[], None] | None = None, plan=None) -> list[dict]:
        """Run every bucket of every step once (`plan`, else `warm_up_plan()`) -- on CUDA,
        capture its graph; in compile mode, compile it -- so that no generation pays for it,
        calling `progress()` after each key; returns per step runner the keys, seconds and graph
        memory."""
        plan = self.warm_up_plan() if plan is None else plan
        reports = [graphs.warm_up(examples, progress) for graphs, examples in plan]
        self.cache.length = 0
        return reports

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
        with nvtx_range("generate"):  # the capture range of profiling/nsys.sh
            return self._generate(prompt, max_new_tokens, sampling, on_tokens)

    def _generate(self, prompt, max_new_tokens, sampling, on_tokens) -> Generation:
        P = len(prompt)
        if P == 0:
            raise UserError("the prompt is empty")
        if P >= self.max_len:
            raise UserError(f"the prompt has {P} tokens but the context holds {self.max_len}; "
                            "shorten the prompt or raise --max-context")
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        t0 = time.perf_counter()
        ctx = Context(ids=list(prompt), tokens=self.tokens, features=self.features, capture=self.capture)
        self.tokens[:P] = torch.tensor(prompt, device=self.device)
        self.reset_drafters()
        self.signals = Signals(drafters=[DrafterState() for _ in self.drafters])

        with nvtx_range("prefill"):
            logits = self.prefill(P)
        if self.routed:
            self.signals.top1, self.signals.entropy = target_confidence(logits)
        self.commit(ctx, 0, P, None, [self.pick(logits, sampling, generator)])  # prefill wrote the features
        out = [ctx.ids[-1]]
        ttft = time.perf_counter() - t0
        if on_tokens:
            on_tokens(list(out))
        rounds: list[RoundRecord] = []
        stop = self.stop_reason(out, max_new_tokens, ctx.n)
        while stop is None:
            record = self.round(ctx, min(self.k_max, max_new_tokens - len(out) - 1, self.max_len - ctx.n - 1),
                                sampling, generator)
            rounds.append(record)
            new = ctx.ids[len(ctx.ids) - record.committed:]
            for i, token in enumerate(new):  # EOS or the budget can end the answer inside a round
                out.append(token)
                if token in self.eos_ids or len(out) >= max_new_tokens:
                    new = new[:i + 1]
                    break
            stop = self.stop_reason(out, max_new_tokens, ctx.n)
            if on_tokens:
                on_tokens(new)
        return Generation(out, P, ttft, time.perf_counter() - t0, stop, rounds)

    def stop_reason(self, out: list[int], max_new_tokens: int, n: int) -> str | None:
        if out[-1] in self.eos_ids:
            return "eos"
        if len(out) >= max_new_tokens:
            return "length"
        if n >= self.max_len:  # no position left to verify the bonus token at
            return "context"
        return None

    def route(self, ctx: Context, k_max: int):
        """The router's choice for this round, from the signals of the last one."""
        signals, n = self.signals, ctx.n
        if self.routed:
            for drafter, state in zip(self.drafters, signals.drafters):
                state.lag = n - drafter.frontier
                state.available = drafter.available(ctx, k_max)
        choice = self.router.choose(signals, k_max)
        k = min(choice.k, k_max)
        return (choice.drafter, k) if choice.drafter is not None and k > 0 else (None, 0)

    def round(self, ctx: Context, k_max: int, sampling: Sampling, generator) -> RoundRecord:
        times = self.clock.start_round()
        n = ctx.n
        with self.clock.phase("route"):
            index, k = self.route(ctx, k_max) if self.drafters else (None, 0)
        drafter = self.drafters[index] if index is not None else None
        name = drafter.name if drafter is not None else PLAIN
        draft, lag = Draft(self.tokens[:0]), 0
        if drafter is not None:
            lag = n - drafter.frontier
            with self.clock.phase("catchup", f"catchup:{name}"):
                drafter.catch_up(ctx, n)
            with self.clock.phase("draft", f"draft:{name}"):
                if self.config.tree:
                    draft = drafter.draft_tree(ctx, self.node_budget(n), k, generator)
                else:
                    draft = drafter.draft(ctx, k, sampling, generator)
            if draft.parents is not None and draft.scores is not None and self.budgets is not None:
                with self.clock.phase("route"):
                    draft = self.budgets.keep(name, draft, self.budgets.latency.draft_seconds(name, k))
            # a merge's union may outgrow what each member was allowed: --budget, the room left
            limit = min(self.config.tree_budget or TREE_BUCKETS[-1], self.max_len - n - 1)
            if draft.parents is not None and draft.tokens.numel() > limit:
                draft = draft.first(limit)
        tree = draft.parents is not None
        kd = draft.tokens.numel()
        with self.clock.phase("verify"):
            self.tokens[n + 1:n + 1 + kd] = draft.tokens
            if tree:
                logits, feats = self.verify_tree(draft.parents, n)
            else:
                logits, feats = self.verify_forward(self.tokens[n:n + 1 + kd], n)
        with self.clock.phase("accept"):  # the round's host sync: accepted count and the router's signals
            if tree:
                drafted = draft.tokens.tolist()
                verdict = judge_tree(draft.parents, drafted, logits, sampling, generator, signals=self.routed,
                                     draft_confidence=draft.confidence)
            else:
                verdict = judge(draft.tokens, draft.probs, logits, sampling, generator, signals=self.routed,
                                draft_confidence=draft.confidence)
            a, token = verdict.accepted, verdict.token
        with self.clock.phase("commit"):
            if tree:
                new = [drafted[row - 1] for row in verdict.path] + [token]
                feats = self.gather_path(n, verdict.path, feats)
            else:
                new = draft.tokens[:a].tolist() + [token]
            self.commit(ctx, n, a + 1, feats, new)
        if tree and draft.scores is not None and self.budgets is not None:
            self.budgets.observe(name, draft.scores, {row - 1 for row in verdict.path}, draft.origins)
        if self.routed:
            with self.clock.phase("route"):  # signals for the next round's choice
                self.signals.top1, self.signals.entropy = verdict.top1, verdict.entropy
                if drafter is not None:  # a tree reads as a chain as long as it is deep
                    observe_draft(self.signals.drafters[index], max(depths(draft.parents), default=0) if tree else kd,
                                  a, verdict.draft_confidence)
        self.clock.end_round()
        return RoundRecord(name, kd, a, len(new), times, lag, tree)

    def gather_path(self, n: int, path: list[int], feats):
        """A tree's accepted rows move to positions n + 1.. in the target cache (a few rows; the
        rest stays as scratch); returns the features of the rows that become context."""
        rows = [0] + path
        if path == list(range(1, len(path) + 1)):  # the path is the first nodes: already in place
            return feats
        self.cache.move(torch.tensor([n + r for r in path], device=self.device), n + 1)
        return feats[torch.tensor(rows, device=feats.device)] if feats is not None else None

    def commit(self, ctx: Context, n: int, rows: int, feats, new: list[int]) -> None:
        """The first `rows` verified positions (n..) become context; `new` tokens follow."""
        self.cache.length = n + rows
        if feats is not None:
            self.features[n:n + rows] = feats[:rows]
        start = len(ctx.ids)
        ctx.ids.extend(new)
        self.tokens[start:start + len(new)] = torch.tensor(new, device=self.device)
