"""Prompt-lookup drafting: continue the latest earlier occurrence of the context's last n-gram.

Training-free and model-free. Tries n = max_n down to min_n and proposes the tokens that
followed the most recent earlier match of the last n committed tokens.
"""
from __future__ import annotations

import torch

from ..config import DraftOptions
from ..verify import Sampling
from .base import Context, Draft, Drafter


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
