"""Side-by-side decode benchmark: `python -m hybrid_sd.bench [--quick] [--out DIR]`.

Every method decodes the same prompts with the same budget, interleaved prompt by prompt so
that machine noise hits all methods alike; each greedy output is checked equal to plain
decoding (a mismatch fails the run). Reports tokens/s per method (total new tokens / total
wall time, prefill included) and each method's ratio to plain decoding of this engine.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from .decode import Parser, encode_prompt
from .errors import UserError, exit_code

PROMPTS = {
    "code": [
        "Write a Python function that returns the n-th Fibonacci number.",
        "Write a Python function that checks whether a string is a palindrome.",
        "Write a JavaScript function that removes duplicates from an array.",
    ],
    "math": [
        "A shop sells pens at 3 dollars each. How much do 7 pens cost? Explain step by step.",
        "What is 15% of 240? Show your work.",
        "If a train travels 60 miles per hour for 2.5 hours, how far does it go?",
    ],
    "structured": [
        "Return a JSON object with fields name, age and city for a person named Maria, 34, from Lisbon.",
        "Write a JSON array of three books, each with title, author and year.",
        "Produce a YAML config with keys host, port and debug for a local web server.",
    ],
    "chat": [
        "What are three tips for staying focused while studying?",
        "Explain why the sky is blue.",
        "Describe a good morning routine.",
    ],
}
METHODS = ("hf", "plain", "ngram", "ar", "block", "hybrid", "hybrid-learned")
DEFAULT_K = {"ngram": 8, "ar": 6, "block": None}  # None: the block drafter's trained size - 1


def run_hf(model, ids, max_new, eos):
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids):].tolist()


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one prompt per category, small budget (for CI)")
    p.add_argument("--out", default="bench-out", help="directory for results.json and results.md")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}; a drafter may name its k, e.g. ar@4")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--lam", type=float, default=1.0, help="hybrid: the routers' latency weight")
    p.add_argument("--repeats", type=int, default=None, help="passes over the prompt set (median reported)")
    return exit_code(run, p.parse_args(argv))


def run(args) -> int:
    from transformers import AutoModelForCausalLM

    from .decode import build_hybrid
    from .drafters import load_drafter
    from .engine import Engine
    from .models.embedded import default_target_dir
    from .models.loading import load_target
    from .models.packed_linear import pack_linears

    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m.split("@")[0] not in METHODS or ("@" in m and not m.split("@")[1].isdigit())]
    if bad:
        raise UserError(f"unknown method(s) {bad} (choose from {', '.join(METHODS)}, drafters optionally @k)")
    max_new = args.max_new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    prompts = [(cat, text) for cat, texts in PROMPTS.items() for text in (texts[:1] if args.quick else texts)]

    target, tokenizer, eos = load_target(None, max_len=2048)
    pack_linears(target)
    hf = AutoModelForCausalLM.from_pretrained(default_target_dir(), dtype=torch.float32).eval() if "hf" in methods else None
    engines = {}
    for m in methods:
        kind, _, k = m.partition("@")
        if kind == "hf":
            continue
        if kind.startswith("hybrid"):
            engines[m] = build_hybrid(target, eos, "learned" if kind == "hybrid-learned" else "entropy", args.lam,
                                      max_len=2048)
            continue
        drafter = load_drafter("none" if kind == "plain" else kind, None, target, embedded_default=True)
        k = int(k) if k else DEFAULT_K.get(kind) or (drafter.block_size - 1 if drafter is not None else 1)
        engines[m] = Engine(target, eos, drafter, k=k, max_len=2048)

    def decode(method, ids):
        if method == "hf":
            return run_hf(hf, ids, max_new, eos), None
        gen = engines[method].generate(ids, max_new)
        return gen.token_ids, gen

    encoded = [(cat, encode_prompt(tokenizer, text, chat=True)) for cat, text in prompts]
    with torch.inference_mode():
        for method in methods:  # warm-up: first calls pay one-time costs
            decode(method, encoded[0][1][:8])
        per_pass = {m: [] for m in methods}
        taus = {m: [] for m in methods}
        bar = tqdm(total=repeats * len(encoded) * len(methods), desc="bench", unit="run")
        for _ in range(repeats):
            totals = {m: [0, 0.0] for m in methods}
            for cat, ids in encoded:
                reference = None
                for method in methods:
                    t0 = time.perf_counter()
                    out, gen = decode(method, ids)
                    dt = time.perf_counter() - t0
                    if reference is None:
                        reference = out
                    elif out != reference:
                        raise SystemExit(f"bench: {method} output differs from {methods[0]} on a {cat} prompt")
                    totals[method][0] += len(out)
                    totals[method][1] += dt
                    if gen is not None:
                        taus[method].append(gen.mean_accepted)
                    bar.update()
            for m in methods:
                per_pass[m].append(totals[m][0] / totals[m][1])
        bar.close()
    tps = {m: statistics.median(v) for m, v in per_pass.items()}
    base = tps.get("plain")
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "max_new_tokens": max_new, "repeats": repeats, "prompts": len(encoded),
        "tokens_per_s": {m: round(v, 2) for m, v in tps.items()},
        "ratio_vs_plain": {m: round(v / base, 3) for m, v in tps.items()} if base else {},
        "mean_accepted": {m: round(statistics.mean(v), 3) for m, v in taus.items() if v},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| method | tokens/s (median of passes) | vs plain | tokens/round |", "|---|---|---|---|"]
    for m in methods:
        lines.append(f"| {m} | {tps[m]:.2f} | {result['ratio_vs_plain'].get(m, float('nan')):.2f}x | "
                     f"{result['mean_accepted'].get(m, '')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
