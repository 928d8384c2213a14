"""Acceptance of a drafted chain: greedy, and lossless speculative (rejection) sampling.

Both take the target's logits for the verified rows [k+1, V] (row i scores the token after
the i-th verified input, so rows 0..k-1 judge drafts 1..k and row k gives the bonus) and
return (number of accepted drafts a, the token to commit after them).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .kernels import accept as accept_kernels
from .kernels import row_argmax, row_stats, triton_usable
from .tree import walk


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


@dataclass
class Verdict:
    accepted: int  # drafts accepted
    token: int     # the token committed after them
    top1: float | None = None      # with signals: target's top-1 probability at the new bonus row
    entropy: float | None = None   # ... and the entropy there (nats)
    draft_confidence: float | None = None  # ... and the drafter's probability of its first token
    path: list[int] | None = None  # a tree's accepted verify rows (node i is row i + 1), root excluded


def judge(draft: torch.Tensor, draft_probs: torch.Tensor | None, logits: torch.Tensor, s: Sampling,
          generator: torch.Generator | None = None, signals: bool = False,
          draft_confidence: torch.Tensor | None = None) -> Verdict:
    """Accept a prefix of `draft` [k] against the verify logits [k+1, V] (greedy, or rejection
    sampling) and, with `signals`, read the router's inputs for the next round.

    Where the fused row kernel runs (CUDA), one pass over the logits gives every row's
    argmax, entropy and top-1 and everything is read in one host sync. Elsewhere the
    result is read first and the bonus row's statistics after it: on the CPU a sync costs
    nothing and statistics of all k+1 rows cost ~2 ms more (docs/performance.md).
    """
    fused = signals and triton_usable(logits)
    stats = row_stats(logits) if fused else None  # (argmax, lse, entropy, top1) per row
    if s.greedy:
        result = accept_kernels.greedy_accept(draft, stats[0] if fused else row_argmax(logits))
    else:
        u = torch.rand(draft.numel() + 1, generator=generator, device=logits.device)
        result = accept_kernels.rejection_accept(draft, target_probs(logits, s), draft_probs, u)
    with_conf = signals and draft_confidence is not None and draft_confidence.numel() > 0
    if fused:
        R = logits.shape[0]
        parts = [result.double(), stats[3].double(), stats[2].double()]
        values = torch.cat(parts + ([draft_confidence[:1].double()] if with_conf else [])).tolist()  # the one sync
        a = int(values[0])
        return Verdict(a, int(values[1]), values[2 + a], values[2 + R + a], values[2 + 2 * R] if with_conf else None)
    a, token = result.tolist()  # the round's sync
    if not signals:
        return Verdict(a, token)
    return with_signals(Verdict(a, token), logits[a:a + 1], draft_confidence)


def with_signals(verdict: Verdict, bonus_logits: torch.Tensor, draft_confidence: torch.Tensor | None) -> Verdict:
    """`verdict` with the router's inputs, read after the result: the target's top-1 and
    entropy at the new bonus row (`bonus_logits` [1, V]) and the drafter's first confidence."""
    _, _, entropy, top1 = row_stats(bonus_logits)
    with_conf = draft_confidence is not None and draft_confidence.numel() > 0
    return replace(verdict, top1=float(top1[0]), entropy=float(entropy[0]),
                   draft_confidence=float(draft_confidence[0]) if with_conf else None)


def judge_tree(parents: list[int], tokens: list[int], logits: torch.Tensor, s: Sampling,
               generator: torch.Generator | None = None, signals: bool = False,
               draft_confidence: torch.Tensor | None = None) -> Verdict:
    """Accept a path of a draft tree (tree.py: node i at verify row i + 1) against the verify
    logits [k+1, V]. Greedy: descend while a child holds the target's argmax. Sampling: at each
    row draw the target's own token from its distribution there and descend while that token is
    a child -- every committed token is a sample of the target's conditional, so the output
    follows the target exactly whatever the tree holds (the drafts need no proposal)."""
    if s.greedy:
        argmax = row_argmax(logits).tolist()  # the round's sync
        path, token = walk(parents, tokens, argmax.__getitem__)
    else:
        probs = target_probs(logits, s)
        path, token = walk(parents, tokens, lambda row: int(torch.multinomial(probs[row], 1, generator=generator)))
    verdict = Verdict(len(path), token, path=path)
    if not signals:
        return verdict
    last = path[-1] if path else 0
    return with_signals(verdict, logits[last:last + 1], draft_confidence)


def greedy_accept(draft: torch.Tensor, logits: torch.Tensor) -> tuple[int, int]:
    """draft [k], logits [k+1, V]: longest prefix where draft equals the target's argmax."""
    v = judge(draft, None, logits, Sampling())
    return v.accepted, v.token


def speculative_accept(draft: torch.Tensor, draft_probs: torch.Tensor | None, logits: torch.Tensor,
                       s: Sampling, generator: torch.Generator | None) -> tuple[int, int]:
    """Rejection sampling (Leviathan et al. / Chen et al.): the output follows the target exactly.

    draft_probs [k, V] is the proposal each draft was sampled from; None means the drafts were
    chosen deterministically (a one-hot proposal: accept with probability p(d)). Draft i is
    accepted while u_i < p(d_i) / q(d_i); the token after the accepted ones is drawn from
    max(p - q, 0) at the first rejection (p itself after the last draft) with one more uniform.
    """
    v = judge(draft, draft_probs, logits, s, generator)
    return v.accepted, v.token
