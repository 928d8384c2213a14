"""Mean accepted length per category and drafter on held-out prompts:
`python -m hybrid_sd.eval.acceptance [--drafters ar,block,ngram,hybrid] [--k 2,4,6]`.

Greedy decoding of each held-out prompt with each (drafter, k), side by side with plain
decoding of the same prompt; every output is checked equal to plain decoding. Reports tau
(tokens committed per verify round: accepted drafts + the target's token) and the speed-up
in tokens/s over plain decoding, per category and over the whole mix.
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..cli import Parser
from ..errors import exit_code


@dataclass
class Tally:
    tokens: int = 0      # generated tokens
    committed: int = 0   # tokens committed by verify rounds
    rounds: int = 0
    seconds: float = 0.0
    round_time: float = 0.0    # summed phase times of all rounds
    catchup_time: float = 0.0  # of which catching drafters up

    def add(self, engine, ids, max_new):
        t0 = time.perf_counter()
        gen = engine.generate(ids, max_new)
        self.seconds += time.perf_counter() - t0
        self.tokens += len(gen.token_ids)
        self.committed += sum(r.committed for r in gen.rounds)
        self.rounds += len(gen.rounds)
        self.round_time += sum(sum(r.times.values()) for r in gen.rounds)
        self.catchup_time += sum(r.times.get("catchup", 0.0) for r in gen.rounds)
        return gen

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(self.tokens + other.tokens, self.committed + other.committed, self.rounds + other.rounds,
                     self.seconds + other.seconds, self.round_time + other.round_time,
                     self.catchup_time + other.catchup_time)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def heldout_prompts(data_dir: Path, per_category: int) -> dict[str, list[list[int]]]:
    """The first `per_category` held-out prompts (token ids, chat template applied) per category."""
    from ..train.data import read_split

    by_cat = defaultdict(list)
    for r in read_split(data_dir, "heldout"):
        if len(by_cat[r["category"]]) < per_category:
            by_cat[r["category"]].append(r["prompt_ids"])
    return dict(by_cat)


@torch.inference_mode()
def heldout_tau(target, eos, drafter, k: int, data_dir: Path, per_category: int = 2,
                max_new_tokens: int = 48) -> dict[str, float]:
    """Tokens per round of `drafter` at draft length k per held-out category and on the mix
    (greedy); the quick check the trainers log after training."""
    from ..engine import Engine

    engine = Engine(target, eos, drafter, k=k, max_len=min(2048, target.max_len))
    tally = {cat: Tally() for cat in heldout_prompts(data_dir, per_category)}
    for cat, prompts in heldout_prompts(data_dir, per_category).items():
        for ids in prompts:
            tally[cat].add(engine, ids, max_new_tokens)
    tally["mix"] = sum(tally.values(), Tally())
    return {cat: round(t.committed / max(t.rounds, 1), 3) for cat, t in tally.items()}


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.eval.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data directory (default: the user cache)")
    p.add_argument("--drafters", default="ar,block,ngram")
    p.add_argument("--ar", default=None, help="AR drafter directory (default: shipped)")
    p.add_argument("--block", default=None, help="block drafter directory (default: shipped)")
    p.add_argument("--lam", type=float, default=1.0, help="hybrid: the routers' latency weight")
    p.add_argument("--router-dir", default=None, help="hybrid: router directory (default: shipped)")
    p.add_argument("--k", default="2,4,6", help="draft lengths (block drafters also run at block_size-1)")
    p.add_argument("--per-category", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default=None, help="write results.json and results.md here")
    return exit_code(run, p.parse_args(argv))


def run(args) -> dict:
    from ..decode import build_hybrid
    from ..drafters import load_drafter
    from ..engine import Engine
    from ..models.loading import load_target
    from ..models.packed_linear import pack_linears
    from ..train.data import default_data_dir

    data_dir = Path(args.data) if args.data else default_data_dir()
    by_cat = heldout_prompts(data_dir, args.per_category)
    target, _, eos = load_target(None, max_len=2048, load_tokenizer=False)
    pack_linears(target)
    ks = [int(k) for k in args.k.split(",") if k]
    runs = {}
    for kind in [d for d in args.drafters.split(",") if d]:
        if kind == "hybrid":  # both routers over the three drafters, k chosen per round
            for router in ("entropy", "learned"):
                runs[f"hybrid-{router}"] = build_hybrid(target, eos, router, args.lam, args.router_dir, args.ar,
                                                        args.block, max_len=2048)
            continue
        drafter = load_drafter(kind, getattr(args, kind, None), target, embedded_default=True)
        grid = sorted(set(ks + ([drafter.block_size - 1] if kind == "block" else [])))
        for k in grid:
            if kind == "block" and k > drafter.block_size - 1:
                continue
            runs[f"{kind}@{k}"] = Engine(target, eos, drafter, k=k, max_len=2048)
    plain = Engine(target, eos, None, max_len=2048)
    tally = defaultdict(lambda: defaultdict(Tally))  # method -> category -> Tally
    bar = tqdm(total=sum(len(v) for v in by_cat.values()) * (len(runs) + 1), desc="acceptance", unit="run")
    with torch.inference_mode():
        for cat, prompts in by_cat.items():
            for ids in prompts:
                ref = tally["plain"][cat].add(plain, ids, args.max_new_tokens)
                bar.update()
                for name, engine in runs.items():
                    gen = tally[name][cat].add(engine, ids, args.max_new_tokens)
                    if gen.token_ids != ref.token_ids:
                        raise SystemExit(f"acceptance: {name} diverged from plain decoding on a {cat} prompt")
                    bar.update()
    bar.close()
    cats = list(by_cat)
    result = {"max_new_tokens": args.max_new_tokens, "prompts_per_category": args.per_category, "methods": {}}
    for name in runs:
        entry = {}
        for cat in cats + ["mix"]:
            pick = cats if cat == "mix" else [cat]
            mine = sum((tally[name][c] for c in pick), Tally())
            base = sum((tally["plain"][c] for c in pick), Tally())
            entry[cat] = {"tau": round(mine.committed / mine.rounds, 3),
                          "speedup": round(mine.tokens_per_s / base.tokens_per_s, 3),
                          "switching_overhead": round(mine.catchup_time / mine.round_time, 4) if mine.round_time else 0}
        result["methods"][name] = entry
    lines = ["| drafter@k | " + " | ".join(cats + ["mix"]) + " |", "|---" * (len(cats) + 2) + "|"]
    for name, entry in result["methods"].items():
        cells = [f"{entry[c]['tau']:.2f} ({entry[c]['speedup']:.2f}x)" for c in cats + ["mix"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    hybrid = [n for n in result["methods"] if n.startswith("hybrid")]
    if hybrid:  # catch-up time / round time, over every round of every prompt
        lines += ["", "switching overhead (catch-up time / round time): " + ", ".join(
            f"{n} {result['methods'][n]['mix']['switching_overhead']:.1%}" for n in hybrid)]
    table = "\n".join(lines)
    print("tau = tokens per round (speed-up vs plain decoding, same prompts, same run)\n" + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "results.md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
