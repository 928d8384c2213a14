"""Prompt-lookup drafting: continue the latest earlier occurrence of the context's last n-gram.

Training-free and model-free. Tries n = max_n down to min_n and proposes the tokens that
followed the most recent earlier match of the last n committed tokens.
"""
from __future__ import annotations

import torch

from ..config import DraftOptions
from ..tree import children_of, depths, trie
from ..verify import Sampling
from .base import Context, Draft, Drafter

TREE_MATCHES = 8  # earlier occurrences a tree merges (the most recent of the longest n-grams first)


class NgramDrafter(Drafter):
    name = "ngram"
    default_k = 8

    def __init__(self, max_n: int = 4, min_n: int = 1, device: str | torch.device = "cpu"):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n, self.device = max_n, min_n, device
        self.frontier = 0
        self.last = None  # (len(ids), last id, k, continuation): a router's query, reused by draft

    @classmethod
    def load(cls, target, checkpoint, options: DraftOptions) -> "NgramDrafter":
        return cls(max_n=options.ngram_max, device=target.lm_head.weight.device)

    def reset(self, max_len: int) -> None:
        self.frontier, self.last = 0, None

    def lookup(self, ids: list[int], k: int) -> list[int]:
        """Up to k tokens; a shorter k's answer is a prefix (the match does not depend on k), so
        the draft after a router's query of the same context costs no second scan."""
        if self.last is not None and self.last[:2] == (len(ids), ids[-1] if ids else None) and self.last[2] >= k:
            return self.last[3][:k]
        found = self.scan(ids, k)
        self.last = (len(ids), ids[-1] if ids else None, k, found)
        return found

    def scan(self, ids: list[int], k: int) -> list[int]:
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            pattern = ids[-n:]
            # scan right to left for the most recent earlier occurrence
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start:start + n] == pattern:
                    return ids[start + n:start + n + k]
        return []

    def available(self, ctx: Context, k_max: int) -> int:
        """The match length: a router knows before choosing how far this drafter can go."""
        return len(self.lookup(ctx.ids, k_max)) if k_max > 0 else 0

    def draft(self, ctx: Context, k: int, sampling: Sampling, generator=None) -> Draft:
        found = self.lookup(ctx.ids, k) if k > 0 else []
        return Draft(torch.tensor(found, dtype=torch.long, device=self.device))

    def continuations(self, ids: list[int], depth: int, limit: int = TREE_MATCHES) -> list[list[int]]:
        """Up to `limit` distinct continuations of earlier occurrences of the context's last
        n-grams: longest n first, most recent first within an n (the chain's match leads)."""
        found: list[list[int]] = []
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            pattern = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start:start + n] == pattern:
                    cont = ids[start + n:start + n + depth]
                    if cont and cont not in found:
                        found.append(cont)
                        if len(found) >= limit:
                            return found
        return found

    def draft_tree(self, ctx: Context, budget: int, depth: int, generator=None) -> Draft:
        """The continuations merged into a trie. A node's score is the share of continuations
        through it, decayed with depth (prompt lookup has no probabilities; the tree cut
        calibrates these against what the target accepted)."""
        conts = self.continuations(ctx.ids, depth) if budget > 0 and depth > 0 else []
        tokens, parents = trie(conts, budget)
        children = children_of(parents, tokens)  # (parent row, token) -> child row (node + 1)
        through = [0] * len(tokens)
        for cont in conts:  # how many continuations pass each node
            row = 0
            for t in cont:
                row = children.get((row, t))
                if row is None:
                    break
                through[row - 1] += 1
        scores = [0.8 ** (d - 1) * c / max(1, len(conts)) for d, c in zip(depths(parents), through)]
        return Draft(torch.tensor(tokens, dtype=torch.long, device=self.device), None,
                     torch.tensor(scores), parents, scores)
