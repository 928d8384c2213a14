"""Acceptance of a drafted chain: greedy, and lossless speculative (rejection) sampling.

Both take the target's logits for the verified rows [k+1, V] (row i scores the token after
the i-th verified input, so rows 0..k-1 judge drafts 1..k and row k gives the bonus) and
return (number of accepted drafts a, the token to commit after them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import accept as accept_kernels
from .kernels import row_argmax


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def target_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The distribution the target samples from: softmax(logits / T), cut to the top-p nucleus."""
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_p.cumsum(-1) - sorted_p >= s.top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def greedy_accept(draft: torch.Tensor, logits: torch.Tensor) -> tuple[int, int]:
    """draft [k], logits [k+1, V]: longest prefix where draft equals the target's argmax."""
    a, token = accept_kernels.greedy_accept(draft, row_argmax(logits)).tolist()  # the round's one sync
    return a, token


def speculative_accept(draft: torch.Tensor, draft_probs: torch.Tensor | None, logits: torch.Tensor,
                       s: Sampling, generator: torch.Generator | None) -> tuple[int, int]:
    """Rejection sampling (Leviathan et al. / Chen et al.): the output follows the target exactly.

    draft_probs [k, V] is the proposal each draft was sampled from; None means the drafts were
    chosen deterministically (a one-hot proposal: accept with probability p(d)). Draft i is
    accepted while u_i < p(d_i) / q(d_i); the token after the accepted ones is drawn from
    max(p - q, 0) at the first rejection (p itself after the last draft) with one more uniform.
    """
    u = torch.rand(draft.numel() + 1, generator=generator, device=logits.device)
    a, token = accept_kernels.rejection_accept(draft, target_probs(logits, s), draft_probs, u).tolist()
    return a, token
