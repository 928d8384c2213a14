"""Batched generation with the project's own compact target, for self-distilled training data.

`python -m hybrid_sd.train.generate [--batches 1,16,32,64] [--prompts 64] [--single-prompts 16] [--max-new-tokens 128]`
measures batched against one-at-a-time greedy generation on the embedded target.

Rows are left-padded to one width, so every row writes its K/V at the same cache columns,
while its RoPE positions count from its own first token: a row computes what it would
alone, only with other matmul shapes (which can flip a rare near-tie). Padding columns are
masked out of every real query and attend only to themselves, because a fully masked query
gives NaN and a NaN value poisons even masked attention. Rows that end are dropped from the
batch, cache rows included, once enough of them have ended, so the steps that are left are
paid only by the rows still running.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

import torch

from ..cache import KVCache
from ..cli import Parser
from ..errors import UserError, exit_code


@dataclass
class Sampler:
    """Sampling instead of greedy picks: softmax(logits / temperature), nucleus `top_p`."""
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)


def pick(logits: torch.Tensor, sampler: Sampler | None) -> torch.Tensor:
    """Next token per row of logits [B, V]."""
    if sampler is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampler.temperature, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    sorted_p = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < sampler.top_p)  # the top token always stays
    # the seeded generator lives on the CPU: the same draws whatever device the logits are on
    choice = torch.multinomial(sorted_p.cpu(), 1, generator=sampler.generator).to(order.device)
    return order.gather(-1, choice).squeeze(-1)


def row_mask(pad: torch.Tensor, cols: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, 1, T, kv_len], True = may attend: query column q of row b sees key columns c <= q
    from the row's first token on; a padding query sees only itself."""
    keys = torch.arange(kv_len, device=pad.device)
    causal = keys[None, :] <= cols[:, None]                 # [T, kv]
    real = keys[None, :] >= pad[:, None]                    # [B, kv]
    own = keys[None, :] == cols[:, None]                    # [T, kv]
    return (causal[None] & (real[:, None, :] | own[None]))[:, None]


def forward_rows(model, tokens: torch.Tensor, cols: torch.Tensor, pad: torch.Tensor, cache: KVCache,
                 capture: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final-normed hidden states [B, T, H] of `tokens` [B, T] at cache columns `cols` [T]
    (shared by the rows); row b's first real token sits at column pad[b]. With `capture`, also
    those hidden states in Transformer.forward's numbering, [B, T, len(capture) * H].

    The decoder layers of `Transformer` run as they are; only positions and mask are per row
    (Transformer.forward keeps its B = 1 contract for the engine)."""
    positions = (cols[None, :] - pad[:, None]).clamp(min=0)  # each row counts from its own start
    cos, sin = model.rope(positions)
    kv_len = int(cols[-1]) + 1
    mask = row_mask(pad, cols, kv_len)
    h = model.model.embed_tokens(tokens)
    kept = {0: h} if 0 in capture else {}
    for i, layer in enumerate(model.model.layers):
        h = layer(h, cos, sin, mask, cache, cols, kv_len)
        if i + 1 in capture:
            kept[i + 1] = h
    features = torch.cat([kept[i] for i in capture], dim=-1) if capture else None
    return model.model.norm(h), features


def cut_at_eos(tokens: list[int], eos) -> list[int]:
    return next((tokens[:i + 1] for i, t in enumerate(tokens) if t in eos), tokens)


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new: int, eos, sampler: Sampler | None = None,
             prefill_tokens: int = 4096, on_tokens=None, capture: tuple[int, ...] = (),
             on_features=None) -> list[list[int]]:
    """Continuations of every prompt (token ids), all rows answered together; each is cut after
    its first EOS. `on_tokens(n)` is told of every n tokens generated (progress bars).

    `on_features(i, f)`, with `capture`, receives prompt i's hidden states (Transformer.forward's
    numbering, fp16 [positions, len(capture) * H]) as they are computed, in order: the prompt's
    positions, then one per answer token fed back -- every position but the answer's last,
    which nothing reads (training data gets its target features for free)."""
    eos = set(eos)
    capture = tuple(capture) if on_features is not None else ()
    B, width = len(prompts), max(len(p) for p in prompts)
    if width + max_new > model.max_len:
        raise UserError(f"a prompt of {width} tokens plus {max_new} new ones exceeds the target's {model.max_len} positions")
    w = model.lm_head.weight
    tokens = torch.zeros(B, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = torch.tensor(p)
    tokens = tokens.to(w.device)
    pad = torch.tensor([width - len(p) for p in prompts], device=w.device)
    cache = KVCache(model.n_layers, width + max_new, model.config.num_key_value_heads, model.head_dim,
                    w.dtype, w.device, batch=B)
    chunk = max(1, prefill_tokens // B)  # bounds the prefill's attention scores and activations
    for s in range(0, width, chunk):
        hidden, feats = forward_rows(model, tokens[:, s:s + chunk], torch.arange(s, min(s + chunk, width), device=w.device),
                                     pad, cache, capture)
        if capture:
            feats = feats.half().cpu()
            for b, first in enumerate(pad.tolist()):
                if first < s + feats.shape[1]:
                    on_features(b, feats[b, max(0, first - s):])
    nxt = pick(model.logits(hidden[:, -1]), sampler)
    rows = list(range(B))          # the prompt index of each cache row
    ended = [False] * B            # per cache row
    out: list[list[int]] = [[] for _ in range(B)]
    for step in range(max_new):
        added = 0
        for r, t in enumerate(nxt.tolist()):
            if not ended[r]:
                out[rows[r]].append(t)
                ended[r], added = t in eos, added + 1
        if on_tokens is not None:
            on_tokens(added)
        if all(ended) or step == max_new - 1:
            break
        if sum(ended) >= max(1, len(rows) // 8):  # drop ended rows: later steps cost only the live ones
            keep = torch.tensor([r for r, e in enumerate(ended) if not e], device=w.device)
            cache.k = [k.index_select(0, keep) for k in cache.k]
            cache.v = [v.index_select(0, keep) for v in cache.v]
            pad, nxt = pad[keep], nxt[keep]
            rows = [rows[r] for r in keep.tolist()]
            ended = [False] * len(rows)
        hidden, feats = forward_rows(model, nxt[:, None], torch.tensor([width + step], device=w.device), pad, cache,
                                     capture)
        if capture:  # a row that has just ended fed its EOS: not a position of its answer to keep
            feats = feats.half().cpu()
            for r in range(len(rows)):
                if not ended[r]:
                    on_features(rows[r], feats[r])
        nxt = pick(model.logits(hidden[:, -1]), sampler)
    return out


def generate_sorted(model, prompts: list[list[int]], max_new: int, eos, batch: int, sampler: Sampler | None = None,
                    on_tokens=None, capture: tuple[int, ...] = (), on_features=None) -> list[list[int]]:
    """`generate` over batches of similar prompt lengths (less padding); answers in prompt order
    (and `on_features` told the prompt's index in `prompts`)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[int] | None] = [None] * len(prompts)
    for s in range(0, len(order), batch):
        group = order[s:s + batch]
        told = None if on_features is None else (lambda b, f, group=group: on_features(group[b], f))
        for i, a in zip(group, generate(model, [prompts[i] for i in group], max_new, eos, sampler,
                                        on_tokens=on_tokens, capture=capture, on_features=told)):
            answers[i] = a
    return answers


@torch.inference_mode()
def generate_one(model, prompt: list[int], max_new: int, eos) -> list[int]:
    """Greedy decoding of one prompt through `Transformer.forward` (B = 1), as the engine
    decodes without a drafter: the reference for the batched path."""
    eos = set(eos)
    cache = model.new_cache(len(prompt) + max_new)
    n = len(prompt)
    hidden, _ = model(torch.tensor([prompt]), torch.arange(n), cache, n)
    out = []
    for step in range(max_new):
        t = int(model.logits(hidden[0, -1]).argmax())
        out.append(t)
        if t in eos or step == max_new - 1:
            break
        hidden, _ = model(torch.tensor([[t]]), torch.tensor([n + step]), cache, n + step + 1)
    return out


def bench_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """A fixed mix of templated prompts of every category, chat template applied."""
    from ..models.loading import encode_prompt
    from .prompts import code_prompts, math_prompts, structured_prompts
    rng = random.Random(seed)
    texts = []
    for make in (code_prompts, math_prompts, structured_prompts):
        texts += make(rng, (n + 2) // 3)
    rng.shuffle(texts)
    return [encode_prompt(tokenizer, t) for t in texts[:n]]


def bench(args) -> dict:
    from ..models.loading import load_target
    from ..models.packed_linear import pack_linears

    batches = [int(b) for b in args.batches.split(",") if b]
    if not batches or min(batches) < 1:
        raise UserError(f"--batches must list positive batch sizes, got {args.batches!r}")
    if min(args.prompts, args.single_prompts, args.max_new_tokens) < 1:
        raise UserError("--prompts, --single-prompts and --max-new-tokens must be positive")
    model, tokenizer, eos = load_target(None, load_tokenizer=True)
    pack_linears(model)
    prompts = bench_prompts(tokenizer, args.prompts, args.seed)
    results, reference = {}, None
    for b in batches:
        start = time.perf_counter()
        if b == 1:  # one at a time is slow: timed on the first --single-prompts only
            answers = [generate_one(model, p, args.max_new_tokens, eos) for p in prompts[:args.single_prompts]]
        else:
            answers = generate_sorted(model, prompts, args.max_new_tokens, eos, b)
        seconds = time.perf_counter() - start
        tokens = sum(len(a) for a in answers)
        reference = reference or answers
        same = sum(a == r for a, r in zip(answers, reference))
        results[b] = {"prompts": len(answers), "tokens": tokens, "seconds": round(seconds, 1),
                      "tokens_per_s": round(tokens / seconds, 1), "same_as_first": same}
        print(f"batch {b:3d}: {len(answers)} prompts, {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} "
              f"tokens/s ({same}/{min(len(answers), len(reference))} answers equal to batch {batches[0]}'s)", flush=True)
    return results


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.train.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,16,32,64", help="batch sizes to time (1 = one prompt at a time)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--single-prompts", type=int, default=16, help="prompts timed one at a time (batch 1)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    return exit_code(bench, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
