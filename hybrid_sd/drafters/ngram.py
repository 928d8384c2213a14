"""Lookup drafting: continue the latest earlier occurrence of the context's last n-gram.

Training-free and model-free. Tries n = max_n down to min_n and proposes the tokens that
followed the most recent earlier match of the last n committed tokens (prompt lookup). With a
datastore of the target's own answers (`drafters/datastore.py`; one ships for the embedded
default) it also looks the context's suffix up there, and drafts from the store where its match
is longer than the context's own by more than DATASTORE_MARGIN tokens (or the context has none)
and enough of its occurrences agree on a continuation (`datastore.MIN_AGREEMENT`).
"""
from __future__ import annotations

import torch

from ..config import DraftOptions
from ..errors import UserError
from ..verify import Sampling
from .base import Context, Draft, Drafter
from .datastore import Datastore

# the store's match must beat the context's by more than this to draft (the context's own
# repeats are the better bet at equal length; chosen on the held-out split, docs/drafters.md)
DATASTORE_MARGIN = 1

# prompt lookup has no probabilities: a context continuation's path score falls by this a token
# (a tree cut calibrates every score against what the target accepted, router/tree.py)
CONTEXT_DECAY = 0.8

TREE_MATCHES = 8  # the context's earlier occurrences a tree merges (the most recent of the longest n-grams first)


class NgramDrafter(Drafter):
    name = "ngram"
    # Drafting costs nothing, so the verify decides: on the CPU its cost grows with every row
    # (past 8 rows faster still, kernels/cpu_rows.cpp), and with the datastore k = 3 gave the
    # most tokens/s, k = 8 (the old default) the fewest (docs/drafters.md, thirteenth session).
    # In a hybrid the router picks the n-gram's k by cost instead.
    default_k = 3

    def __init__(self, max_n: int = 4, min_n: int = 1, device: str | torch.device = "cpu",
                 datastore: Datastore | None = None):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n, self.device, self.datastore = max_n, min_n, device, datastore
        self.frontier = 0
        self.last = None  # (len(ids), last id, k, continuation): a router's query, reused by draft

    @classmethod
    def load(cls, target, checkpoint, options: DraftOptions) -> "NgramDrafter":
        """`checkpoint`, where given, is a datastore directory (the factory passes the shipped one
        on the embedded default); options.datastore can name another or switch it off."""
        path = checkpoint if options.datastore == "auto" else None if options.datastore == "none" else options.datastore
        datastore = None
        if path is not None:
            try:
                datastore = Datastore.load(path, target.config.vocab_size)
            except ValueError as e:
                raise UserError(f"--datastore: {e}") from None
        return cls(max_n=options.ngram_max, device=target.lm_head.weight.device, datastore=datastore)

    def config_dict(self) -> dict:
        """Whether it looks up a store (its host work per round is in the latency table)."""
        return {"datastore": self.datastore is not None}

    def reset(self, max_len: int) -> None:
        self.frontier, self.last = 0, None

    def lookup(self, ids: list[int], k: int) -> list[int]:
        """Up to k tokens; a shorter k's answer is a prefix (the match does not depend on k), so
        the draft after a router's query of the same context costs no second scan."""
        return self.scored_lookup(ids, k)[0]

    def scored_lookup(self, ids: list[int], k: int) -> tuple[list[int], list[float]]:
        """`lookup` and per token the path score: the store's share of voting occurrences that
        follow the draft that far, or CONTEXT_DECAY per token for the context's own match."""
        if self.last is not None and self.last[:2] == (len(ids), ids[-1] if ids else None) and self.last[2] >= k:
            return self.last[3][:k], self.last[4][:k]
        found, n = self.scan(ids, k)
        scores = [CONTEXT_DECAY ** j for j in range(len(found))]
        if self.datastore is not None:
            stored, m, shares = self.datastore.continuation(ids, k)
            if stored and (m > n + DATASTORE_MARGIN or not found):
                found, scores = stored, shares
        self.last = (len(ids), ids[-1] if ids else None, k, found, scores)
        return found, scores

    def occurrences(self, ids: list[int]):
        """(n, end) of every earlier occurrence of the context's last n tokens, for n = max_n down
        to min_n and, within an n, the most recent first; what followed starts at ids[end]."""
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            pattern = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start:start + n] == pattern:
                    yield n, start + n

    def scan(self, ids: list[int], k: int) -> tuple[list[int], int]:
        """The context's own continuation and the length n of the n-gram it matched (0: none)."""
        for n, end in self.occurrences(ids):
            return ids[end:end + k], n
        return [], 0

    def lookahead(self, ctx: Context, k_max: int) -> list[int]:
        """The match: a router knows before choosing what this drafter will propose."""
        return self.lookup(ctx.ids, k_max) if k_max > 0 else []

    def draft(self, ctx: Context, k: int, sampling: Sampling, generator=None) -> Draft:
        found, scores = self.scored_lookup(ctx.ids, k) if k > 0 else ([], [])
        return Draft(torch.tensor(found, dtype=torch.long, device=self.device), scores=scores)

    def context_continuations(self, ids: list[int], depth: int, limit: int = TREE_MATCHES) -> list[list[int]]:
        """Up to `limit` distinct continuations of earlier occurrences of the context's last
        n-grams, in `occurrences` order."""
        found: list[list[int]] = []
        for _, end in self.occurrences(ids):
            cont = ids[end:end + depth]
            if cont and cont not in found:
                found.append(cont)
                if len(found) >= limit:
                    break
        return found

    def draft_tree(self, ctx: Context, budget: int, depth: int, generator=None) -> Draft:
        """The chain's draft first, run `depth` deep (the continuation a chain round would
        propose), then the other guesses best first: the context's other continuations, a node
        scored by the share of them through it (decayed CONTEXT_DECAY a level: prompt lookup has
        no probabilities), and the store's voting occurrences, a node scored by the share that follow
        it. The tree cut calibrates the scores against what the target accepted."""
        ids = ctx.ids
        if budget <= 0 or depth <= 0:
            return Draft(torch.zeros(0, dtype=torch.long, device=self.device), None, torch.zeros(0), [], [])
        chain = self.lookup(ids, depth)
        score: dict[tuple[int, ...], float] = {}
        own = self.context_continuations(ids, depth)
        for cont in own:
            for j in range(1, len(cont) + 1):
                score[tuple(cont[:j])] = score.get(tuple(cont[:j]), 0.0) + CONTEXT_DECAY ** (j - 1) / len(own)
        if self.datastore is not None:  # room for the chain's own prefixes beside the budget's best
            for prefix, share in self.datastore.prefixes(ids, depth, budget + len(chain)).items():
                score[prefix] = max(score.get(prefix, 0.0), share)
        # the chain, then the rest by score; a prefix never outscores its parent (each source's
        # score falls along a path), so with ties to the shorter every parent precedes its children
        order = [tuple(chain[:j]) for j in range(1, len(chain) + 1)]
        order += sorted(score.keys() - set(order), key=lambda p: (-score[p], len(p), p))
        tokens, parents, scores, node = [], [], [], {}
        for prefix in order[:budget]:
            parent = node[prefix[:-1]] if len(prefix) > 1 else -1
            node[prefix] = len(tokens)
            tokens.append(prefix[-1])
            parents.append(parent)
            # a path is no likelier than its parent's (a chain node may have no score of its own)
            scores.append(min(score.get(prefix, CONTEXT_DECAY ** (len(prefix) - 1)), scores[parent] if parent >= 0 else 1.0))
        return Draft(torch.tensor(tokens, dtype=torch.long, device=self.device), None,
                     torch.tensor(scores), parents, scores)
