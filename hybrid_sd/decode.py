"""Single-stream generation: `python -m hybrid_sd.decode "prompt"` (or the prompt on stdin)."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from .cli import Parser
from .errors import UserError


def build_parser() -> Parser:
    from .graphs import MODES
    p = Parser(prog="python -m hybrid_sd.decode", description=__doc__)
    p.add_argument("prompt", nargs="?", help="the prompt; read from stdin when absent")
    p.add_argument("--target", help="HF checkpoint directory (Llama, Qwen2, Qwen3 dense); default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--drafter", default=None,
                   help="none | ngram | ar | block | hybrid (default: hybrid on the embedded target, ngram otherwise)")
    p.add_argument("--draft", help="drafter checkpoint directory (for --drafter ar/block)")
    p.add_argument("--router", default="entropy", help="hybrid: entropy (calibrated rule) | learned (MLP)")
    p.add_argument("--lam", type=float, default=1.0,
                   help="hybrid: latency weight; maximise expected tokens - lam * round cost in plain steps")
    p.add_argument("--router-dir", help="hybrid: router directory (default: shipped for the embedded target)")
    p.add_argument("--ar-draft", help="hybrid: AR drafter directory (default: shipped for the embedded target)")
    p.add_argument("--block-draft", help="hybrid: block drafter directory (default: shipped for the embedded target)")
    p.add_argument("--k", type=int, default=None, help="tokens drafted per round (default: 8 for ngram, 6 for ar, block size-1 for block)")
    p.add_argument("--ngram-max", type=int, default=4, help="longest n-gram the prompt-lookup drafter matches")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--max-context", type=int, default=4096, help="KV cache length in tokens (prompt + answer)")
    p.add_argument("--graphs", default="auto", choices=MODES,
                   help="how each step runs: cuda (captured CUDA graphs), compile (torch.compile), eager; "
                        "auto = cuda on a CUDA device, eager on the CPU")
    p.add_argument("--stats", action="store_true", help="print a stats line on stderr")
    p.add_argument("--profile", action="store_true",
                   help="print a per-round phase table on stderr (CUDA events on GPU, perf counters on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of streaming text")
    return p


def check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.k is not None and args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    if args.max_context < 2:
        raise UserError(f"--max-context must be >= 2, got {args.max_context}")
    if args.lam < 0:
        raise UserError(f"--lam must be >= 0, got {args.lam}")
    if args.ngram_max < 1:
        raise UserError(f"--ngram-max must be >= 1, got {args.ngram_max}")


def resolve_device(name: str):
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use cpu or cuda[:N])") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but this torch build sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r} (use cpu or cuda[:N])")
    return device


class Streamer:
    """Prints the text of newly committed tokens, holding back an unfinished UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, new: list[int]) -> None:
        self.ids.extend(new)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)


def run(args) -> int:
    check_args(args)
    import torch

    from .drafters import load_drafter
    from .engine import Engine
    from .models.loading import encode_prompt, load_target, parse_dtype
    from .models.packed_linear import pack_linears
    from .verify import Sampling

    device, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise UserError("empty prompt: pass it as an argument or on stdin")
    target, tokenizer, eos = load_target(args.target, device=device, dtype=dtype)
    if args.max_context > target.max_len:
        raise UserError(f"--max-context {args.max_context} exceeds the model's {target.max_len} positions")
    pack_linears(target)
    if args.drafter is None:  # hybrid beats every single drafter on the embedded default (docs/performance.md)
        from .weights import shipped
        args.drafter = "hybrid" if args.target is None and shipped("router") is not None else "ngram"
    if args.drafter == "hybrid":
        engine = build_hybrid(target, eos, args.router, args.lam, args.router_dir, args.ar_draft, args.block_draft,
                              args.ngram_max, args.max_context, embedded=args.target is None,
                              profile_sync=args.profile, graphs=args.graphs)
        k = None
    else:
        drafter = load_drafter(args.drafter, args.draft, target, args.ngram_max, embedded_default=args.target is None)
        k = args.k or {"ngram": 8, "ar": 6}.get(args.drafter, getattr(drafter, "block_size", 2) - 1)
        k = k if drafter is not None else 0
        engine = Engine(target, eos, drafter, k=k, max_len=args.max_context, profile_sync=args.profile,
                        graphs=args.graphs)
    if engine.graphs_mode == "cuda":  # capture is cheap; compile mode compiles each key when first met
        with torch.inference_mode():
            for report in engine.warm_up():
                print(f"[graphs] {report['name']}: {report['keys']} {report['mode']} buckets in "
                      f"{report['seconds']:.1f} s, {report['memory_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    ids = encode_prompt(tokenizer, prompt, chat=not args.no_chat)
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    streamer = None if args.json else Streamer(tokenizer)
    with torch.inference_mode():
        gen = engine.generate(ids, args.max_new_tokens, sampling, on_tokens=streamer)
    result = {
        "text": tokenizer.decode(gen.token_ids, skip_special_tokens=True),
        "token_ids": gen.token_ids,
        "prompt_tokens": gen.prompt_tokens,
        "new_tokens": len(gen.token_ids),
        "tokens_per_s": round(gen.tokens_per_s, 3),
        "ttft_s": round(gen.ttft_s, 4),
        "elapsed_s": round(gen.elapsed_s, 4),
        "stop_reason": gen.stop_reason,
        "drafter": args.drafter,
        "k": k,
        "rounds": len(gen.rounds),
        "mean_accepted": round(gen.mean_accepted, 3),
    }
    if args.profile:
        from .profiling import phase_table
        print(phase_table([r.times for r in gen.rounds]), file=sys.stderr)
    if args.drafter == "hybrid":
        result.update(router=args.router, lam=args.lam, **gen.routing_stats())
    if args.json:
        print(json.dumps(result))
    else:
        print()
    if args.stats:
        print(f"[{args.drafter}] prompt {gen.prompt_tokens} tok | new {len(gen.token_ids)} tok | "
              f"{gen.tokens_per_s:.1f} tok/s | ttft {gen.ttft_s * 1000:.0f} ms | rounds {len(gen.rounds)} | "
              f"mean accepted {gen.mean_accepted:.2f} | stop {gen.stop_reason}", file=sys.stderr)
        if args.drafter == "hybrid":
            st = gen.routing_stats()
            per = ", ".join(f"{d} {st['share'][d]:.0%} x{st['tokens_per_round'][d]:.2f}" for d in st["share"])
            print(f"[hybrid/{args.router} lam={args.lam}] rounds: {per} | switches {st['switches']} | "
                  f"catch-up {st['catchup_tokens']} tok | switching overhead {st['switching_overhead']:.1%}",
                  file=sys.stderr)
    return 0


def cached_latency(engine, target, drafter_paths):
    """The latency table of this machine and configuration: measured once, then read back, so
    that routing (and so a seeded sampled output) does not change with timing noise between
    runs. Delete ~/.cache/hybrid_sd/latency/ to measure again."""
    import hashlib
    import tempfile

    import torch

    from .models.embedded import cache_root
    from .router import LatencyTable
    from .weights import shipped

    paths = [Path(p) if p else shipped(k) for p, k in zip(drafter_paths, ("ar", "block"))]
    stamp = [(str(p), (p / "model.safetensors").stat().st_mtime_ns if p and (p / "model.safetensors").is_file() else 0)
             for p in paths]
    w = target.lm_head.weight
    key = json.dumps([target.config.to_json_string(), stamp, str(w.device), str(w.dtype), torch.get_num_threads(),
                      engine.max_len, platform.processor() or platform.machine()]
                     + ([engine.graphs_mode] if engine.graphs_mode != "eager" else []))
    path = cache_root() / "latency" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if path.is_file():
        try:
            return LatencyTable.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError):
            pass  # unreadable: measure again
    table = engine.measure_latency(repeats=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(table.to_dict(), f)
    os.replace(tmp, path)
    return table


def build_hybrid(target, eos, router: str = "entropy", lam: float = 1.0, router_dir=None, ar=None, block=None,
                 ngram_max: int = 4, max_len: int | None = None, embedded: bool = True,
                 profile_sync: bool = False, graphs: str = "eager"):
    """AR, block and n-gram drafters on one target; the latency table measured now, on this
    machine; then the router (the shipped drafters and router on the embedded default)."""
    from .drafters import load_drafter
    from .engine import Engine
    from .router import FixedRouter, load_router

    drafters = [load_drafter("ar", ar, target, embedded_default=embedded),
                load_drafter("block", block, target, embedded_default=embedded),
                load_drafter("ngram", None, target, ngram_max)]
    # the latency probes run each step once before timing it: on CUDA that call captures its graph
    engine = Engine(target, eos, drafters, max_len=max_len, router=FixedRouter(0, 1), profile_sync=profile_sync,
                    graphs=graphs)
    latency = cached_latency(engine, target, [ar, block])
    engine.use_router(load_router(router, router_dir, latency, [d.name for d in drafters], lam))
    return engine


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
