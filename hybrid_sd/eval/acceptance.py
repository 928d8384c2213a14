"""Mean accepted length per category and drafter on held-out prompts:
`python -m hybrid_sd.eval.acceptance [--drafters ar,block,ngram,hybrid] [--k 2,4,6]`.

Greedy decoding of each held-out prompt with each (drafter, k), side by side with plain
decoding of the same prompt; every output is checked equal to plain decoding. Reports tau
(tokens committed per verify round: accepted drafts + the target's token), the speed-up
in tokens/s over plain decoding, and the modelled speed-up (every round priced by the
hybrid's cached latency table, in plain steps: free of timing noise, so two drafters of one
kind compare on it even on a busy machine), per category and over the whole mix.
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..cli import Parser, int_list, nonnegative_float, out_dir, positive_int, write_atomic
from ..config import EVAL_CONTEXT, EngineConfig
from ..engine import Engine, RoundStats
from ..errors import UserError, exit_code
from ..router import DEFAULT_LAM, LatencyTable


@dataclass
class Tally:
    tokens: int = 0      # generated tokens
    seconds: float = 0.0
    stats: RoundStats = field(default_factory=RoundStats)

    def add(self, engine, ids, max_new, latency: LatencyTable | None = None):
        t0 = time.perf_counter()
        gen = engine.generate(ids, max_new)
        self.seconds += time.perf_counter() - t0
        self.tokens += len(gen.token_ids)
        self.stats += RoundStats.of(gen.rounds, latency)
        return gen

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(self.tokens + other.tokens, self.seconds + other.seconds, self.stats + other.stats)

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
    engine = Engine(target, eos, [drafter], config=EngineConfig(min(EVAL_CONTEXT, target.max_len), draft_k={drafter.name: k}))
    tally = {cat: Tally() for cat in heldout_prompts(data_dir, per_category)}
    for cat, prompts in heldout_prompts(data_dir, per_category).items():
        for ids in prompts:
            tally[cat].add(engine, ids, max_new_tokens)
    tally["mix"] = sum(tally.values(), Tally())
    return {cat: round(t.stats.tau, 3) for cat, t in tally.items()}


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.eval.acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data directory (default: the user cache)")
    p.add_argument("--drafters", default="ar,block,ngram")
    p.add_argument("--ar", default=None, help="AR drafter directory (default: shipped)")
    p.add_argument("--block", default=None, help="block drafter directory (default: shipped)")
    p.add_argument("--lam", type=nonnegative_float, default=DEFAULT_LAM, help="hybrid: the routers' latency weight")
    p.add_argument("--router-dir", default=None, help="hybrid: router directory (default: shipped)")
    p.add_argument("--k", type=int_list, default="2,4,6",
                   help="draft lengths, integers >= 1 (each drafter also runs at its default k; none past its longest draft)")
    p.add_argument("--per-category", type=positive_int, default=6)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--out", default=None, type=out_dir, help="write results.json and results.md here (checked first)")
    return exit_code(run, p.parse_args(argv))


def run(args) -> dict:
    from .. import factory
    from ..train.data import default_data_dir

    data_dir = Path(args.data) if args.data else default_data_dir()
    kinds = [d for d in args.drafters.split(",") if d]
    unknown = [d for d in kinds if d != "hybrid" and d not in factory.DRAFTERS]
    if unknown or not kinds:
        raise UserError(f"--drafters: unknown drafter(s) {unknown} (choose from {', '.join([*factory.DRAFTERS, 'hybrid'])})")
    by_cat = heldout_prompts(data_dir, args.per_category)
    target, _, eos = factory.load_packed_target(None, max_len=EVAL_CONTEXT, load_tokenizer=False)
    ks = args.k
    runs = {}
    for kind in kinds:
        if kind == "hybrid":  # both routers over the three drafters, k chosen per round
            for router in ("entropy", "learned"):
                runs[f"hybrid-{router}"] = factory.build_hybrid(target, eos, EngineConfig(EVAL_CONTEXT), router, args.lam,
                                                                args.router_dir, {"ar": args.ar, "block": args.block})
            continue
        drafter = factory.build_drafter(kind, target, {"ar": args.ar, "block": args.block}.get(kind), embedded=True)
        for k in sorted({k for k in ks if k <= drafter.max_draft} | {drafter.default_k}):
            runs[f"{kind}@{k}"] = Engine(target, eos, [drafter], config=EngineConfig(EVAL_CONTEXT, draft_k={kind: k}))
    plain = Engine(target, eos, config=EngineConfig(EVAL_CONTEXT))
    # one price list for every method: the hybrid's table (cached per machine and drafter shapes)
    pricing = runs.get("hybrid-learned") or factory.build_hybrid(target, eos, EngineConfig(EVAL_CONTEXT), "learned",
                                                                 args.lam, args.router_dir,
                                                                 {"ar": args.ar, "block": args.block})
    latency = factory.cached_latency(pricing)
    tally = defaultdict(lambda: defaultdict(Tally))  # method -> category -> Tally
    bar = tqdm(total=sum(len(v) for v in by_cat.values()) * (len(runs) + 1), desc="acceptance", unit="run")
    with torch.inference_mode():
        for cat, prompts in by_cat.items():
            for ids in prompts:
                ref = tally["plain"][cat].add(plain, ids, args.max_new_tokens, latency)
                bar.update()
                for name, engine in runs.items():
                    gen = tally[name][cat].add(engine, ids, args.max_new_tokens, latency)
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
            entry[cat] = {"tau": round(mine.stats.tau, 3),
                          "speedup": round(mine.tokens_per_s / base.tokens_per_s, 3),
                          "modelled_speedup": round(mine.stats.modelled_speedup, 3),
                          "switching_overhead": round(mine.stats.switching_overhead, 4)}
        result["methods"][name] = entry
    lines = ["| drafter@k | " + " | ".join(cats + ["mix"]) + " |", "|---" * (len(cats) + 2) + "|"]
    for name, entry in result["methods"].items():
        cells = [f"{entry[c]['tau']:.2f} ({entry[c]['speedup']:.2f}x, {entry[c]['modelled_speedup']:.2f}x)"
                 for c in cats + ["mix"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    hybrid = [n for n in result["methods"] if n.startswith("hybrid")]
    if hybrid:  # catch-up time / round time, over every round of every prompt
        lines += ["", "switching overhead (catch-up time / round time): " + ", ".join(
            f"{n} {result['methods'][n]['mix']['switching_overhead']:.1%}" for n in hybrid)]
    table = "\n".join(lines)
    print("tau = tokens per round (speed-up vs plain decoding, same prompts, same run; modelled speed-up: every "
          "round priced by the latency table)\n" + table)
    if args.out:
        write_atomic(Path(args.out) / "results.json", json.dumps(result, indent=2) + "\n")
        write_atomic(Path(args.out) / "results.md", table + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
