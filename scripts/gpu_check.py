"""GPU check for a lent machine: random-weight targets at real sizes with drafters of the
published shapes; every graph captured, replay checked against eager, per-round timings.

`scripts/gpu-check [--out DIR] [--preset 8b|tiny] [--device cuda] [--new-tokens N]`

Per model (Llama-3.1-8B with an EAGLE-3 head, Qwen3-8B with a DFlash b16 drafter; both get
both drafters, as the hybrid needs): warm-up captures every (tokens, span) graph of verify and
each drafter step and reports time and memory; greedy outputs of the captured engine equal
the eager engine's (same spans) for each drafter and for forced switching; per-round wall
time eager vs graphs; host overhead (round wall time not covered by the device time of
verify, draft and catch-up, from CUDA events); switching overhead (catch-up / round time
under forced switching). Writes gpu-check.json and gpu-check.md to --out.
No weights are downloaded: configs are written here, weights are random.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from hybrid_sd.config import EngineConfig
from hybrid_sd.engine import Engine
from hybrid_sd.eval.synthetic import BLOCK_SIZE, TARGETS, build
from hybrid_sd.profiling import phase_table
from hybrid_sd.router import AlternatingRouter

PRESETS = {"8b": ("llama-3.1-8b", "qwen3-8b"), "tiny": ("tiny-llama", "tiny-qwen3")}


def engine(target, drafters, setup: str, mode: str, max_len: int, kv_block: int | None, sync: bool = False):
    """setup: 'plain', 'ar@K', 'block@K' or 'switching' (AR/block alternating every round).
    Prompt and catch-up chunks are padded to their buckets in every mode, so that eager runs
    the same shapes as the graphs: a matmul of another shape may round differently, and random
    weights give near-tied logits."""
    config = dict(max_len=max_len, graphs=mode, kv_block=kv_block, profile_sync=sync, pad=True)
    if setup == "plain":
        return Engine(target, config=EngineConfig(**config))
    if setup == "switching":
        return Engine(target, (), drafters[:2], router=AlternatingRouter(2), config=EngineConfig(**config))
    name, k = setup.split("@")
    by_name = {d.name: d for d in drafters}
    return Engine(target, (), [by_name[name]], config=EngineConfig(**config, draft_k={name: int(k)}))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def per_round(eng, prompt, new_tokens, repeats, device) -> float:
    """Median wall seconds per decode round (prefill excluded)."""
    times = []
    for _ in range(repeats):
        sync(device)
        gen = eng.generate(prompt, new_tokens)
        sync(device)
        times.append((gen.elapsed_s - gen.ttft_s) / max(len(gen.rounds), 1))
    return statistics.median(times)


def check_model(name, args, dtype, fast_mode) -> dict:
    t0 = time.perf_counter()
    target, drafters = build(name, args.device, dtype, args.max_len)
    out = {"model": name, "build_s": round(time.perf_counter() - t0, 1), "setups": {}}
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, TARGETS[name]["vocab_size"], (n,), generator=gen).tolist()
               for n in (37, args.max_len // 8, args.max_len // 2)]
    setups = ["plain", "ar@6", f"block@{BLOCK_SIZE - 1}", "switching"]
    with torch.inference_mode():
        for setup in setups:
            fast = engine(target, drafters, setup, fast_mode, args.max_len, None)
            warm = fast.warm_up()
            eager = engine(target, drafters, setup, "eager", args.max_len, fast.kv_block)  # same spans
            equal = all(fast.generate(p, 32).token_ids == eager.generate(p, 32).token_ids for p in prompts)
            fast_round = per_round(fast, prompts[1], args.new_tokens, 3, args.device)
            eager_round = per_round(eager, prompts[1], args.new_tokens, 3, args.device)
            timed = engine(target, drafters, setup, fast_mode, args.max_len, None, sync=True)
            timed.warm_up()
            g = timed.generate(prompts[1], args.new_tokens)
            device_phases = ("verify", "draft", "catchup")
            walls = [sum(r.times.values()) for r in g.rounds]
            busy = [sum(r.times.get(p, 0.0) for p in device_phases) for r in g.rounds]
            out["setups"][setup] = {
                "graphs_equal_eager": equal,
                "capture": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in warm],
                "ms_per_round": {"eager": round(eager_round * 1e3, 3), "graphs": round(fast_round * 1e3, 3)},
                "speedup_per_round": round(eager_round / fast_round, 3),
                "phase_table": phase_table([r.times for r in g.rounds]),
                "host_share": round(1 - sum(busy) / sum(walls), 4) if walls else None,
                "switching_overhead": g.routing_stats()["switching_overhead"] if setup == "switching" else None,
            }
            print(f"{name} {setup}: equal={equal} eager {eager_round * 1e3:.2f} ms/round, {fast_mode} "
                  f"{fast_round * 1e3:.2f} ms/round ({eager_round / fast_round:.2f}x)", flush=True)
    del target, drafters
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def markdown(results: list[dict], mode: str) -> str:
    lines = [f"| model | setup | replay = eager | eager ms/round | {mode} ms/round | speed-up | host share | "
             "switching overhead | captured (keys, s, MiB) |", "|---" * 9 + "|"]
    for r in results:
        for setup, s in r["setups"].items():
            cap = "; ".join(f"{c['name']} {c['keys']}, {c['seconds']:.1f}, {c['memory_bytes'] / 2**20:.0f}"
                            for c in s["capture"])
            so = f"{s['switching_overhead']:.1%}" if s["switching_overhead"] is not None else ""
            lines.append(f"| {r['model']} | {setup} | {s['graphs_equal_eager']} | {s['ms_per_round']['eager']:.2f} | "
                         f"{s['ms_per_round']['graphs']:.2f} | {s['speedup_per_round']:.2f}x | {s['host_share']:.1%} | "
                         f"{so} | {cap} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check-out")
    p.add_argument("--preset", choices=sorted(PRESETS), default="8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--graphs", default=None, help="mode compared with eager (default: cuda on CUDA, else compile)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device here (use --device cpu --preset tiny for a dry run)",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    mode = args.graphs or ("cuda" if cuda else "compile")
    results = [check_model(name, args, dtype, mode) for name in PRESETS[args.preset]]
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "dtype": str(dtype), "graphs": mode, "max_len": args.max_len, "new_tokens": args.new_tokens}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (out / "gpu-check.md").write_text(f"{json.dumps(meta)}\n\n" + markdown(results, mode))
    print(markdown(results, mode))
    ok = all(s["graphs_equal_eager"] for r in results for s in r["setups"].values())
    if not ok:
        print("error: graph replay differs from eager", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
