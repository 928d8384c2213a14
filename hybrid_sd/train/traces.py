"""Router traces: every drafter scored at every position against the target's own output:
`python -m hybrid_sd.train.traces [--per-category N]`.

Prompts are new (templated with seeds the drafter data never used; chat as templated open
questions, while the drafter data's chat questions are the target's own), none seen in
training or held out, and answered greedily by the target. Then each answer is decoded in
rounds, ROLLOUTS times: at a round's bonus position n each drafter catches up to n, drafts
`--k-max` tokens and is scored by how many of them the target would accept; the round commits
one drafter's draft (the best or a random one) and only that drafter's running state learns
from it, as in a hybrid. A row holds the signals a router sees at n (the target's confidence,
each drafter's last confidence and running acceptance, what a lookup drafter can propose) and
every drafter's accepted count; `python -m hybrid_sd.train.router` fits the routers from it.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..cli import Parser, out_file, positive_int
from ..config import EVAL_CONTEXT
from ..errors import UserError, exit_code
from ..models.loading import encode_prompt
from ..router.signals import DrafterState, observe_draft
from ..verify import Sampling
from .prompts import chat_prompts, code_prompts, math_prompts, structured_prompts

TRACE_SEED = 7000  # far from the seeds of the drafter data and its held-out split
ROLLOUTS = 2        # passes over each answer, each committing its own drafters' drafts
ORACLE_SHARE = 0.5  # rounds in which a rollout commits the best draft (else a random drafter's)


def answered_prompts(target_dir: Path, data_dir: Path, per_category: int, max_new: int, batch: int) -> list[dict]:
    """Prompts of every category with the target's greedy answers, cached in data_dir/traces-prompts.jsonl."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.loading import eos_ids
    from ..models.packed_linear import pack_linears
    from .data import batched_generate, write_jsonl_atomic

    cache = data_dir / "traces-prompts.jsonl"
    if cache.is_file():
        rows = [json.loads(line) for line in cache.read_text().splitlines() if line]
        if len(rows) == 4 * per_category:
            return rows
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    model = pack_linears(AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval())
    eos = eos_ids(target_dir, model.config)
    texts = [("code", p) for p in code_prompts(random.Random(TRACE_SEED + 1), per_category)]
    texts += [("math", p) for p in math_prompts(random.Random(TRACE_SEED + 2), per_category)]
    texts += [("structured", p) for p in structured_prompts(random.Random(TRACE_SEED + 3), per_category)]
    texts += [("chat", p) for p in chat_prompts(random.Random(TRACE_SEED + 4), per_category)]
    rows = []
    for s in tqdm(range(0, len(texts), batch), desc="answering", unit="batch"):
        chunk = texts[s:s + batch]
        ids = [encode_prompt(tokenizer, t, chat=True) for _, t in chunk]
        for (cat, text), p, a in zip(chunk, ids, batched_generate(model, tokenizer, ids, max_new, eos)):
            rows.append({"category": cat, "prompt": text, "prompt_ids": p, "response_ids": a})
    write_jsonl_atomic(cache, rows)
    return rows


def behaviour_choice(accepted: list[int | None], rng: random.Random) -> int | None:
    """The drafter whose draft a rollout commits: the best one in ORACLE_SHARE of rounds (a
    good router's path), any one otherwise (so every drafter's state is seen stale and fresh)."""
    candidates = [d for d, a in enumerate(accepted) if a is not None]
    if not candidates:
        return None
    if rng.random() < ORACLE_SHARE:
        return max(candidates, key=lambda d: accepted[d])
    return rng.choice(candidates)


@torch.inference_mode()
def score_sequence(target, drafters, ids: list[int], response_start: int, k_max: int, seq: int,
                   rng: random.Random, rollouts: int = ROLLOUTS) -> list[dict]:
    """One row per round of each rollout over the answer: the signals at the round's bonus
    position n and every drafter's accepted count there. A rollout commits one drafter's
    draft per round (`behaviour_choice`), and only that drafter's state learns from it, as in
    a hybrid, where an idle drafter's last confidence and acceptance grow stale."""
    from ..drafters.base import Context
    from ..router.signals import target_confidence

    capture = tuple(sorted({layer for d in drafters for layer in d.feature_layers}))
    T = len(ids)
    tokens = torch.tensor(ids)
    hidden, feats = target(tokens[None], torch.arange(T), capture=capture)
    logits = target.logits(hidden[0])
    greedy = logits.argmax(-1)
    features = feats[0].view(T, len(capture), -1) if capture else None
    buffer = torch.zeros(T + k_max + 1, dtype=torch.long)
    buffer[:T] = tokens
    rows = []
    for _ in range(rollouts):
        for d in drafters:
            d.reset(T + k_max + 8)
        state = [DrafterState() for _ in drafters]
        n = max(1, response_start)
        while n < T - 1:
            ctx = Context(ids[:n + 1], buffer, features, capture)
            top1, entropy = target_confidence(logits[n - 1])
            row = {"seq": seq, "n": n, "top1": round(top1, 4), "entropy": round(entropy, 4), "drafters": [],
                   "accepted": []}
            outcomes = []  # per drafter: (proposed, confidence) for the state update
            for d, s in zip(drafters, state):
                d.catch_up(ctx, n)
                # the state a router would read here (lag: random, as the drafter's lag varies in a hybrid)
                row["drafters"].append({"confidence": round(s.confidence, 4), "acceptance": round(s.acceptance, 4),
                                        "lag": rng.randrange(0, 65), "available": d.available(ctx, k_max)})
                draft = d.draft(ctx, k_max, Sampling())
                k = draft.tokens.numel()
                if k == 0:
                    row["accepted"].append(None)
                    outcomes.append((0, None))
                    continue
                a = 0  # accepted while the draft is the target's choice on this very answer
                while a < k and n + a < T - 1 and int(draft.tokens[a]) == int(greedy[n + a]) == ids[n + 1 + a]:
                    a += 1
                row["accepted"].append(a)
                has_confidence = draft.confidence is not None and draft.confidence.numel() > 0
                outcomes.append((k, float(draft.confidence[0]) if has_confidence else None))
            rows.append(row)
            chosen = behaviour_choice(row["accepted"], rng)
            if chosen is None:
                n += 1  # a plain step
                continue
            observe_draft(state[chosen], outcomes[chosen][0], row["accepted"][chosen], outcomes[chosen][1])
            n += row["accepted"][chosen] + 1
    return rows


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.train.traces", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data directory (default: the user cache)")
    p.add_argument("--drafters", default="ar,block,ngram", help="the drafters to score, in the router's order")
    p.add_argument("--ar", default=None, help="AR drafter directory (default: shipped)")
    p.add_argument("--block", default=None, help="block drafter directory (default: shipped)")
    p.add_argument("--per-category", type=positive_int, default=12)
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--k-max", type=positive_int, default=7)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--out", default=None, type=out_file, help="traces file (default: DATA/traces.jsonl; checked first)")
    return exit_code(run, p.parse_args(argv))


def run(args) -> Path:
    from .. import factory
    from ..cli import check_out_dir, check_out_file
    from ..models.embedded import default_target_dir
    from .data import default_data_dir, write_jsonl_atomic

    data_dir = Path(args.data) if args.data else default_data_dir()
    check_out_dir(data_dir, "--data")
    if args.out is None:
        check_out_file(data_dir / "traces.jsonl")
    names = [name for name in args.drafters.split(",") if name]
    unknown = [name for name in names if name not in factory.DRAFTERS]
    if unknown or not names:  # one line now, not after answering the prompts
        raise UserError(f"--drafters: unknown drafter(s) {unknown} (choose from {', '.join(factory.DRAFTERS)})")
    data_dir.mkdir(parents=True, exist_ok=True)
    prompts = answered_prompts(default_target_dir(), data_dir, args.per_category, args.max_new_tokens, args.batch)
    target, _, _ = factory.load_packed_target(None, max_len=EVAL_CONTEXT, load_tokenizer=False)
    checkpoints = {"ar": args.ar, "block": args.block}
    drafters = [factory.build_drafter(name, target, checkpoints.get(name), embedded=True) for name in names]
    rng = random.Random(0)
    rows = []
    for seq, r in enumerate(tqdm(prompts, desc="scoring drafters", unit="seq")):
        for row in score_sequence(target, drafters, r["prompt_ids"] + r["response_ids"], len(r["prompt_ids"]),
                                  args.k_max, seq, rng):
            rows.append({"category": r["category"], **row})
    out = Path(args.out) if args.out else data_dir / "traces.jsonl"
    header = {"names": [d.name for d in drafters], "k_max": args.k_max}
    write_jsonl_atomic(out, [header] + rows)
    print(f"{len(rows)} positions scored -> {out}")
    return out


if __name__ == "__main__":
    sys.exit(main())
