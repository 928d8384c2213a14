"""The round loop: draft, verify, accept, commit — with plain decoding as the empty draft.

One generation:
    prefill the prompt -> first token (the "bonus": committed, not yet in the target cache)
    each round: drafter catches up to the committed context (Lazy Catch-up, KV-only)
                drafter proposes k tokens
                target verifies [bonus, d1..dk] in one forward at positions n..n+k
                accept a prefix (greedy or rejection sampling) and one more target token
                commit by setting the cache length; keep the target features of the new rows
Rejected rows stay in the caches past their lengths and are overwritten later: no copies.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .drafters.base import Context, Draft, Drafter
from .errors import UserError
from .graphs import kv_bucket
from .models.transformer import Transformer
from .profiling import PhaseClock
from .verify import Sampling, greedy_accept, speculative_accept, target_probs


@dataclass
class RoundRecord:
    drafter: str
    k: int          # drafts proposed
    accepted: int   # drafts accepted
    committed: int  # tokens committed this round (accepted + the target's own token), before stop truncation
    times: dict[str, float]


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
        return sum(r.committed for r in self.rounds) / len(self.rounds) if self.rounds else 0.0


class Engine:
    def __init__(self, target: Transformer, eos_ids: tuple[int, ...] = (), drafter: Drafter | None = None,
                 k: int = 4, max_len: int | None = None, profile_sync: bool = False):
        self.target, self.eos_ids, self.drafter, self.k = target, frozenset(eos_ids), drafter, k
        self.max_len = max_len or target.max_len
        if self.max_len > target.max_len:
            raise UserError(f"context {self.max_len} exceeds the target's RoPE table of {target.max_len} positions")
        self.cache = target.new_cache(self.max_len)
        self.capture = tuple(sorted(set(drafter.feature_layers))) if drafter is not None else ()
        p = target.lm_head.weight
        self.device = p.device
        self.features = (torch.zeros(self.max_len, len(self.capture), target.config.hidden_size, dtype=p.dtype,
                                     device=p.device) if self.capture else None)
        self.tokens = torch.zeros(self.max_len + 1, dtype=torch.long, device=p.device)
        self.clock = PhaseClock(sync=profile_sync)

    def pick(self, logits: torch.Tensor, sampling: Sampling, generator) -> int:
        if sampling.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(target_probs(logits, sampling), 1, generator=generator))

    def target_forward(self, tokens: torch.Tensor, start: int):
        """Run the target on tokens at positions start.., writing their K/V; keep features."""
        positions = torch.arange(start, start + tokens.numel(), device=self.device)
        kv_len = kv_bucket(start + tokens.numel(), self.max_len)
        hidden, feats = self.target(tokens[None], positions, self.cache, kv_len, self.capture)
        return hidden[0], (feats[0].view(tokens.numel(), len(self.capture), -1) if feats is not None else None)

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
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
        if self.drafter is not None:
            self.drafter.reset(self.max_len)

        hidden, feats = self.target_forward(self.tokens[:P], 0)
        self.commit(ctx, 0, P, feats, [self.pick(self.target.logits(hidden[-1]), sampling, generator)])
        out = [ctx.ids[-1]]
        ttft = time.perf_counter() - t0
        if on_tokens:
            on_tokens(list(out))
        rounds: list[RoundRecord] = []
        stop = self.stop_reason(out, max_new_tokens, ctx.n)
        while stop is None:
            record = self.round(ctx, min(self.k, max_new_tokens - len(out) - 1, self.max_len - ctx.n - 1),
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

    def round(self, ctx: Context, k: int, sampling: Sampling, generator) -> RoundRecord:
        times = self.clock.start_round()
        drafter, n = self.drafter, ctx.n
        name = drafter.name if drafter is not None else "none"
        draft = Draft(self.tokens[:0])
        if drafter is not None and k > 0:
            with self.clock.phase("catchup", f"catchup:{name}"):
                drafter.catch_up(ctx, n)
            with self.clock.phase("draft", f"draft:{name}"):
                draft = drafter.draft(ctx, k, sampling, generator)
        kd = draft.tokens.numel()
        with self.clock.phase("verify"):
            self.tokens[n + 1:n + 1 + kd] = draft.tokens
            hidden, feats = self.target_forward(self.tokens[n:n + 1 + kd], n)
            logits = self.target.logits(hidden)
        with self.clock.phase("accept"):
            if sampling.greedy:
                a, token = greedy_accept(draft.tokens, logits)
            else:
                a, token = speculative_accept(draft.tokens, draft.probs, logits, sampling, generator)
        with self.clock.phase("commit"):
            new = draft.tokens[:a].tolist() + [token]
            self.commit(ctx, n, a + 1, feats, new)
        return RoundRecord(name, kd, a, len(new), times)

    def commit(self, ctx: Context, n: int, rows: int, feats, new: list[int]) -> None:
        """The first `rows` verified positions (n..) become context; `new` tokens follow."""
        self.cache.length = n + rows
        if feats is not None:
            self.features[n:n + rows] = feats[:rows]
        start = len(ctx.ids)
        ctx.ids.extend(new)
        self.tokens[start:start + len(new)] = torch.tensor(new, device=self.device)
