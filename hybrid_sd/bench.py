"""Side-by-side decode benchmark: `python -m hybrid_sd.bench [--quick] [--out DIR]`.

Every method decodes the same held-out prompts of each category (hybrid_sd/eval/workloads.py)
with the same budget, greedy; runs are interleaved prompt by prompt (the method order
rotating) so that machine noise hits all methods alike, and every output is checked equal to
plain decoding of this engine (a mismatch fails the run). Per (method, prompt) the median wall
time over the passes is kept; a category's speed-up is plain's summed time over the method's
(the tokens are the same). Writes results.json, results.md and PNG plots to --out.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from .cli import Parser, nonnegative_float, out_dir, positive_int, resolve_device, write_atomic
from .config import DEFAULT_MERGE, EVAL_CONTEXT, EngineConfig
from .drafters import DRAFTERS
from .engine import RoundStats
from .errors import UserError, exit_code
from .profiling import PHASES
from .router import DEFAULT_LAM

# llama.cpp's methods run when llama-cpp-python is installed (eval/llamacpp.py)
LLAMACPP = ("llamacpp", "llamacpp-lookup")
PEERS = ("hf", "hf-lookup", *LLAMACPP)  # other libraries: no rounds to look into
# drafters: every registered kind; merged: the default merge of them (config.DEFAULT_MERGE)
METHODS = ("plain", "hf", "hf-lookup", *LLAMACPP, *DRAFTERS, "merged", "hybrid", "hybrid-learned")
GRAPH_SUFFIXES = ("trace", "compile")  # a method's steps as TorchScript traces or torch.compile (graphs.MODES)
LABELS = {"plain": "plain (this engine)", "hf": "transformers generate", "hf-lookup": "transformers prompt lookup",
          "llamacpp": "llama.cpp, F32 GGUF", "llamacpp-lookup": "llama.cpp prompt lookup, F32 GGUF",
          "ngram": "n-gram", "ar": "AR drafter", "block": "block drafter",
          "merged": "merged " + " + ".join(DEFAULT_MERGE) + " (one tree)", "hybrid": "hybrid, entropy router",
          "hybrid-learned": "hybrid, learned router"}
HF_LOOKUP_TOKENS = 10  # transformers' documented example for prompt_lookup_num_tokens
PROFILES = {"quick": dict(per_category=1, max_new_tokens=24, repeats=1),
            "full": dict(per_category=6, max_new_tokens=96, repeats=2)}


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI profile: 1 prompt per category, 24 tokens, 1 pass")
    p.add_argument("--out", default="bench-out", type=out_dir,
                   help="directory for results.json, results.md and the plots (checked before the run)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all; llama.cpp's where "
                        "llama-cpp-python is installed); a drafter may name its k, e.g. ar@4, "
                        "and a drafter or hybrid may draft trees: ar:tree (budget cut by cost) or ar:tree16 "
                        "(16 nodes); +trace or +compile runs a method's steps as traces or compiled (--graphs trace|compile; "
                        "compiled steps are all compiled before the timed runs), e.g. plain+trace, hybrid+compile")
    p.add_argument("--per-category", type=positive_int, default=None, help="prompts per category (at most 16)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None)
    p.add_argument("--repeats", type=positive_int, default=None, help="passes over the prompts (median time kept)")
    p.add_argument("--lam", type=nonnegative_float, default=DEFAULT_LAM, help="hybrid: the routers' latency weight")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda[:N]: where this engine's methods run (on a GPU their steps run as CUDA "
                        "graphs, every key captured before the timed runs); other libraries' methods are CPU-only")
    p.add_argument("--no-plots", action="store_true", help="write results.json and results.md only")
    return exit_code(run, p.parse_args(argv))


class MethodSpec(NamedTuple):
    kind: str
    k: int | None  # draft length (None: the default)
    tree: bool
    budget: int | None  # tree node budget (None: cut by cost)
    graphs: str  # how this engine's steps run (graphs.MODES)


def method_spec(name: str) -> MethodSpec | None:
    """`kind[@k][:tree[N]][+trace|+compile]` -> MethodSpec; None when malformed."""
    name, plus, graphs = name.partition("+")
    base, _, tree = name.partition(":")
    kind, at, k = base.partition("@")
    if kind not in METHODS or (at and (kind not in (*DRAFTERS, "merged") or not k.isdigit() or int(k) < 1)):
        return None
    if plus and (graphs not in GRAPH_SUFFIXES or kind in PEERS):
        return None
    graphs = graphs or "auto"  # graphs.resolve_mode: CUDA graphs on a GPU, eager on the CPU
    if not tree:
        return MethodSpec(kind, int(k) if at else None, False, None, graphs)
    budget = tree[len("tree"):]
    if not tree.startswith("tree") or kind == "plain" or kind in PEERS or (budget and (
            not budget.isdigit() or int(budget) < 1)):
        return None
    return MethodSpec(kind, int(k) if at else None, True, int(budget) if budget else None, graphs)


def parse_methods(text: str | None) -> list[str]:
    if text is None:
        from .eval import llamacpp
        text = ",".join(m for m in METHODS if m not in LLAMACPP or llamacpp.available())
    methods = [m for m in text.split(",") if m]
    bad = [m for m in methods if method_spec(m) is None]
    if bad or not methods:
        raise UserError(f"unknown method(s) {bad} (choose from {', '.join(METHODS)}; "
                        f"{', '.join(DRAFTERS)} optionally @k with k >= 1; drafters and hybrids optionally "
                        ":tree or :treeN with N >= 1 nodes; this engine's methods optionally +trace or +compile)")
    if "plain" not in methods:
        methods.insert(0, "plain")  # the reference every output is checked against
    return list(dict.fromkeys(methods))


class Methods:
    """Builds each method once and decodes with it: (tokens, seconds, Generation or None)."""

    def __init__(self, names: list[str], lam: float, device: torch.device = torch.device("cpu")):
        from . import factory

        self.target, self.tokenizer, eos = factory.load_packed_target(None, device=device, max_len=EVAL_CONTEXT)
        self.eos = eos
        self.hf = self.hf_model() if any(m.startswith("hf") for m in names) else None
        self.llamacpp = {m: self.llamacpp_model(m == "llamacpp-lookup") for m in names if m in LLAMACPP}
        self.engines = {}
        self.latency = None  # the first hybrid's latency table: prices every method's rounds alike
        for name in names:
            kind, k, tree, budget, graphs = method_spec(name)
            if kind in PEERS:
                continue
            if kind.startswith("hybrid"):
                router = "learned" if kind == "hybrid-learned" else "entropy"
                config = EngineConfig(EVAL_CONTEXT, tree=tree, tree_budget=budget, graphs=graphs)
                self.engines[name] = factory.build_hybrid(self.target, eos, config, router, lam)
                self.latency = self.latency or factory.cached_latency(self.engines[name])
                continue
            kind = factory.PLAIN if kind == "plain" else kind
            config = EngineConfig(EVAL_CONTEXT, draft_k={kind: k} if k else {}, tree=tree, tree_budget=budget,
                                  graphs=graphs)
            if kind == factory.MERGED:
                self.engines[name] = factory.build_merged(self.target, eos, config)
                continue
            self.engines[name] = factory.build_engine(self.target, eos, kind, config, embedded=True)

    @staticmethod
    def hf_model():
        from transformers import AutoModelForCausalLM

        from .models.embedded import default_target_dir
        return AutoModelForCausalLM.from_pretrained(default_target_dir(), dtype=torch.float32).eval()

    @staticmethod
    def llamacpp_model(lookup: bool):
        from .eval import llamacpp
        return llamacpp.LlamaCpp(llamacpp.f32_gguf(), EVAL_CONTEXT, torch.get_num_threads(), lookup)

    def warm_up(self, name: str) -> None:
        """Compile every key of a compiled method's steps, or capture every key of a CUDA-graph
        method's, before it is timed (others: nothing)."""
        engine = self.engines.get(name)
        if engine is not None and engine.graphs_mode == "compile":
            from .compiled import compile_every_key
            compile_every_key(engine, f"compiling {name}")
        elif engine is not None and engine.graphs_mode == "cuda":
            engine.warm_up()

    def decode(self, name: str, ids: list[int], max_new: int):
        t0 = time.perf_counter()
        if name in self.llamacpp:
            out = self.llamacpp[name].generate(ids, max_new, self.eos)
            return out, time.perf_counter() - t0, None
        if name.startswith("hf"):
            extra = {"prompt_lookup_num_tokens": HF_LOOKUP_TOKENS} if name == "hf-lookup" else {}
            out = self.hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=max_new, do_sample=False, eos_token_id=list(self.eos),
                                   pad_token_id=self.eos[0], **extra)
            return out[0, len(ids):].tolist(), time.perf_counter() - t0, None
        gen = self.engines[name].generate(ids, max_new)
        return gen.token_ids, time.perf_counter() - t0, gen


def run(args) -> dict:
    from .eval.workloads import workloads
    from .models.loading import encode_chat

    profile = dict(PROFILES["quick" if args.quick else "full"])
    for key in profile:
        if getattr(args, key, None) is not None:
            profile[key] = getattr(args, key)
    if not 1 <= profile["per_category"] <= 16:
        raise UserError(f"--per-category must be 1..16 (the held-out code and chat sets hold 16), got {profile['per_category']}")
    if profile["max_new_tokens"] < 1 or profile["repeats"] < 1:
        raise UserError("--max-new-tokens and --repeats must be at least 1")
    names = parse_methods(args.methods)
    device = resolve_device(args.device)
    peers = [m for m in names if method_spec(m).kind in PEERS]
    if device.type != "cpu" and peers:
        raise UserError(f"--device {args.device}: {', '.join(peers)} run on the CPU only; leave them out of --methods")
    if any(m in LLAMACPP for m in names):
        from .eval import llamacpp
        llamacpp.require()
    if not args.no_plots:
        from .eval import plots  # fail before the long part when matplotlib is missing
        plots.require_matplotlib()
    methods = Methods(names, args.lam, device)
    prompts = [(cat, i, encode_chat(methods.tokenizer, messages))
               for cat, items in workloads(profile["per_category"]).items() for i, messages in enumerate(items)]
    max_new, repeats = profile["max_new_tokens"], profile["repeats"]

    times = defaultdict(list)   # (method, prompt index) -> seconds per pass
    tokens = {}                 # (method, prompt index) -> new tokens (the same for every method but llama.cpp's)
    equal = defaultdict(int)    # method -> prompts whose output equals plain decoding's
    gens = {}                   # (method, prompt index) -> Generation of the first pass
    with torch.inference_mode():
        for name in names:  # warm-up: first calls pay one-time costs (compiled steps: every key, compiled)
            methods.warm_up(name)
            methods.decode(name, prompts[0][2][:16], 4)
        bar = tqdm(total=repeats * len(prompts) * len(names), desc="bench", unit="run")
        for rep in range(repeats):
            for j, (cat, _, ids) in enumerate(prompts):
                order = names[j % len(names):] + names[:j % len(names)]  # rotate who goes first
                outputs = {}
                for name in order:
                    out, seconds, gen = methods.decode(name, ids, max_new)
                    outputs[name] = out
                    times[name, j].append(seconds)
                    if rep == 0 and gen is not None:
                        gens[name, j] = gen
                    bar.update()
                for name, out in outputs.items():
                    tokens[name, j] = len(out)
                    if rep == 0:
                        equal[name] += out == outputs["plain"]
                    # another library's fp32 kernels may flip a near-tie: counted, not fatal
                    if out != outputs["plain"] and name not in LLAMACPP:
                        raise SystemExit(f"bench: {name} output differs from plain decoding on {cat} prompt "
                                         f"{prompts[j][1]} (at token {first_difference(out, outputs['plain'])})")
        bar.close()
    result = summarize(names, prompts, times, tokens, gens, profile, methods.latency, device)
    result["equal_outputs"] = {m: f"{equal[m]}/{len(prompts)}" for m in names}
    write(result, Path(args.out), plots=not args.no_plots)
    return result


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summarize(names, prompts, times, tokens, gens, profile, latency=None, device=torch.device("cpu")) -> dict:
    cats = list(dict.fromkeys(cat for cat, _, _ in prompts))
    groups = {cat: [j for j, p in enumerate(prompts) if p[0] == cat] for cat in cats} | {"mix": list(range(len(prompts)))}
    median = {(m, j): statistics.median(v) for (m, j), v in times.items()}
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "profile": profile, "methods": names, "categories": cats,
        "tokens_per_s": {}, "speedup": {}, "tau": {}, "phases_ms_per_round": {}, "routing": {},
        "modelled_speedup": {},  # rounds priced by the hybrid's latency table (with a hybrid among the methods)
    }
    for m in names:
        result["tokens_per_s"][m], result["speedup"][m] = {}, {}
        for g, js in groups.items():
            rate = sum(tokens[m, j] for j in js) / sum(median[m, j] for j in js)
            plain = sum(tokens["plain", j] for j in js) / sum(median["plain", j] for j in js)
            result["tokens_per_s"][m][g] = round(rate, 2)
            result["speedup"][m][g] = round(rate / plain, 3)
        if (m, 0) not in gens:
            continue  # other libraries' methods: no rounds to look into
        result["tau"][m], result["phases_ms_per_round"][m] = {}, {}
        for g, js in groups.items():
            rounds = [r for j in js for r in gens[m, j].rounds]
            # priced only where the table has every drafter's draft time (the hybrid's table: not a merge's)
            priced = latency if latency is not None and all(r.k == 0 or r.drafter in latency.draft for r in rounds) else None
            stats = RoundStats.of(rounds, priced)
            if not stats.rounds:
                continue
            result["tau"][m][g] = round(stats.tau, 3)
            if priced is not None:
                result["modelled_speedup"].setdefault(m, {})[g] = round(stats.modelled_speedup, 3)
            result["phases_ms_per_round"][m][g] = {ph: round(stats.ms_per_round(ph), 3) for ph in PHASES}
        if m.startswith("hybrid"):  # one generation per category: which drafter, how much accepted
            result["routing"][m] = {cat: [[r.drafter, r.k, r.accepted, r.committed] for r in gens[m, groups[cat][0]].rounds]
                                    for cat in cats}
    return result


def markdown(result: dict) -> str:
    cats = result["categories"] + ["mix"]
    p = result["profile"]
    lines = [f"Speed-up over plain decoding of this engine (tokens per round); {p['per_category']} prompts per "
             f"category, {p['max_new_tokens']} new tokens, median of {p['repeats']} pass(es).", "",
             "| method | " + " | ".join(cats) + " | mix tokens/s |", "|---" * (len(cats) + 2) + "|"]
    for m in result["methods"]:
        cells = []
        for c in cats:
            tau = result["tau"].get(m, {}).get(c)
            cells.append(f"{result['speedup'][m][c]:.2f}x" + (f" ({tau:.2f})" if tau is not None else ""))
        kind, k, tree, budget, graphs = method_spec(m)
        label = LABELS.get(kind, kind) + (f" k={k}" if k else "") + (
            f", tree {budget if budget else 'by cost'}" if tree else "") + (f", {graphs}d steps" if graphs in GRAPH_SUFFIXES else "")
        lines.append(f"| {label} | "
                     + " | ".join(cells) + f" | {result['tokens_per_s'][m]['mix']:.2f} |")
    peers = [m for m in result["methods"] if m in LLAMACPP]
    if peers:  # this engine's methods always equal plain decoding (the run fails otherwise)
        lines += ["", "Outputs equal to plain decoding: " + ", ".join(
            f"{LABELS[m]} {result['equal_outputs'][m]}" for m in peers) + "."]
    modelled = result.get("modelled_speedup", {})
    if modelled:  # deterministic: the same rounds give the same figure on a noisy machine
        lines += ["", "Modelled speed-up on the mix (every round priced by the hybrid's latency table): " + ", ".join(
            f"{m} {by['mix']:.2f}x" for m, by in modelled.items() if "mix" in by) + "."]
    lines += ["", "Milliseconds per round by phase (mix):", "",
              "| method | " + " | ".join(PHASES) + " | total |", "|---" * (len(PHASES) + 2) + "|"]
    for m, by in result["phases_ms_per_round"].items():
        ph = by.get("mix", {})
        lines.append(f"| {m} | " + " | ".join(f"{ph.get(k, 0):.1f}" for k in PHASES) + f" | {sum(ph.values()):.1f} |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path, plots: bool) -> None:
    write_atomic(out / "results.json", json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    write_atomic(out / "results.md", table)
    print(table)
    if plots:
        from .eval.plots import plot_all
        for path in plot_all(result, out):
            print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
