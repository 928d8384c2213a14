"""Single-stream generation: `python -m hybrid_sd.decode "prompt"` (or the prompt on stdin)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .cli import SEED_MAX, Parser, resolve_device
from .errors import BROKEN_PIPE, UserError, silence_stdout

TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-4, 100.0  # sampling temperatures; 0 = greedy

EPILOG = """\
The output is the target's own. Greedy in float32 (the CPU default), it is token for token
what plain decoding (--drafter none) prints, with every drafter. In bfloat16/float16 it is the
target's greedy choice under the numerics of the verify pass that checked it: a k-token verify
and a 1-token step round differently, so near-ties can break the other way and the text can
differ from --drafter none (it is deterministic for a given drafter and settings). Sampling
(--temperature > 0) draws from the target's distribution by rejection sampling.

Prompts: a prompt on stdin that is not valid UTF-8 is decoded with U+FFFD for each undecodable
byte, with one warning on stderr. In chat mode the prompt is the user's text: control-token
strings typed in it (<|im_end|>, <|im_start|>, ...) are encoded as plain text, never as the
template's control tokens; --no-chat feeds the text raw, control tokens included.

Exit status: 0 done; 2 a one-line error (docs/errors.md); 141 stdout was closed by its reader
(e.g. | head), generation stopped quietly; 130 interrupted."""


def build_parser() -> Parser:
    p = Parser(prog="python -m hybrid_sd.decode", description=__doc__, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the prompt; read from stdin when absent (bytes that are not UTF-8 "
                                             "become U+FFFD, with a warning)")
    p.add_argument("--no-chat", action="store_true",
                   help="feed the prompt as raw text, without the chat template (control-token strings in it are "
                        "parsed as control tokens)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0,
                   help=f"0 = greedy; sampling at a temperature in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}]")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, an integer in [0, 2**64 - 1]")
    add_engine_arguments(p)
    p.add_argument("--stats", action="store_true", help="print a stats line on stderr")
    p.add_argument("--profile", action="store_true",
                   help="print a per-round phase table on stderr (CUDA events on GPU, perf counters on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of streaming text")
    return p


def add_engine_arguments(p: Parser) -> None:
    """The flags that say which engine runs: target, drafters, router, cache, device, graphs
    (decode's and precompile's, which must build the same engine)."""
    from .config import DEFAULT_CONTEXT, DEFAULT_MERGE, DEFAULT_NGRAM_MAX
    from .factory import drafter_choices
    from .graphs import MODES
    from .router import DEFAULT_LAM, DEFAULT_ROUTER, ROUTERS
    p.add_argument("--target", help="HF checkpoint directory (Llama, Qwen2, Qwen3 dense); default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--drafter", default=None,
                   help=f"{' | '.join(drafter_choices())}: plain decoding, one registered drafter, several at once "
                        "(merged, --merge), or the hybrid of the drafters its router knows (default: hybrid on the "
                        "embedded target, ngram otherwise)")
    p.add_argument("--draft", help="drafter checkpoint directory (for --drafter ar/block)")
    p.add_argument("--router", default=DEFAULT_ROUTER, help=f"hybrid: {' | '.join(ROUTERS)} (calibrated rule | MLP)")
    p.add_argument("--lam", type=float, default=DEFAULT_LAM,
                   help="hybrid: latency weight; maximise expected tokens - lam * round cost in plain steps")
    p.add_argument("--router-dir", help="hybrid: router directory (default: shipped for the embedded target)")
    p.add_argument("--merge", default=",".join(DEFAULT_MERGE),
                   help="merged: the drafters that each draft every round, their union verified as one tree "
                        f"(default {','.join(DEFAULT_MERGE)})")
    p.add_argument("--ar-draft", help="hybrid, merged: AR drafter directory (default: shipped for the embedded target)")
    p.add_argument("--block-draft", help="hybrid, merged: block drafter directory (default: shipped for the embedded "
                                         "target)")
    p.add_argument("--k", type=int, default=None,
                   help="tokens drafted per round (default: the drafter's own: 3 for ngram, 6 for ar, block size-1 for "
                        "block, 4 for each of a merge's drafters)")
    p.add_argument("--tree", default="off", choices=("auto", "off"),
                   help="auto: draft trees (several guesses per position, verified in one pass) and verify as "
                        "many nodes as pay for themselves on this machine; off: chains")
    p.add_argument("--budget", type=int, default=None,
                   help="with --tree auto: verify exactly this many tree nodes per round (1..64) instead of "
                        "choosing by cost")
    p.add_argument("--ngram-max", type=int, default=DEFAULT_NGRAM_MAX, help="longest n-gram the prompt-lookup drafter matches")
    p.add_argument("--datastore", default="auto",
                   help="ngram and hybrid: a datastore of the target's own answers that the lookup drafter searches "
                        "too (python -m hybrid_sd.train.datastore writes one): auto = the shipped one on the embedded "
                        "target, none = prompt lookup only, or a directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model's ops (default: torch's, one per core; docs/performance.md)")
    p.add_argument("--max-context", type=int, default=DEFAULT_CONTEXT, help="KV cache length in tokens (prompt + answer)")
    p.add_argument("--graphs", default="auto", choices=MODES,
                   help="how each step runs: cuda (captured CUDA graphs), compile (torch.compile), trace "
                        "(TorchScript traces of the steps that recur, CPU), eager; auto = cuda on a CUDA device; "
                        "on the CPU, compiled steps where `python -m hybrid_sd.precompile` measured them faster "
                        "for these flags, else eager")


def check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (args.temperature == 0 or TEMPERATURE_MIN <= args.temperature <= TEMPERATURE_MAX):
        raise UserError(f"--temperature must be 0 (greedy) or in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}], "
                        f"got {args.temperature:g}")
    if not 0 < args.top_p <= 1:  # NaN fails this too
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not 0 <= args.seed <= SEED_MAX:
        raise UserError(f"--seed must be an integer in [0, 2**64 - 1], got {args.seed}")
    check_engine_args(args)


def check_engine_args(args) -> None:
    if args.k is not None and args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    if args.max_context < 2:
        raise UserError(f"--max-context must be >= 2, got {args.max_context}")
    if not (math.isfinite(args.lam) and args.lam >= 0):
        raise UserError(f"--lam must be a finite number >= 0, got {args.lam}")
    from . import factory
    if args.drafter is not None and args.drafter not in factory.drafter_choices():
        raise UserError(f"unknown drafter {args.drafter!r} (choose from {', '.join(factory.drafter_choices())})")
    drafter = args.drafter or factory.default_drafter(args.target is None)
    if drafter == factory.MERGED:
        names = merge_names(args)
        unknown = [name for name in names if name not in factory.DRAFTERS]
        if unknown or len(names) < 2 or len(set(names)) != len(names):
            raise UserError(f"--merge takes two or more different drafters from {', '.join(factory.DRAFTERS)}, "
                            f"comma-separated; got {args.merge!r}")
    if args.ngram_max < 1:
        raise UserError(f"--ngram-max must be >= 1, got {args.ngram_max}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.budget is not None:
        from .graphs import TREE_BUCKETS
        if args.tree == "off" and drafter != factory.MERGED:  # a merge verifies trees anyway
            raise UserError("--budget sets the tree size: add --tree auto")
        if not 1 <= args.budget <= TREE_BUCKETS[-1]:
            raise UserError(f"--budget must be 1..{TREE_BUCKETS[-1]} tree nodes, got {args.budget}")


def merge_names(args) -> tuple[str, ...]:
    """The drafters --merge names (empty items dropped: "ar,ngram," is ar and ngram)."""
    return tuple(name for name in args.merge.split(",") if name)


def emit(text: str) -> None:
    """Write to stdout now. A reader that went away raises BrokenPipeError (main ends quietly);
    any other failed write (a full disk, a closed descriptor) is one UserError."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:  # ValueError: the stream was closed under us
        silence_stdout()  # else the flush at exit fails once more, with a traceback
        raise UserError(f"cannot write the output to stdout ({getattr(e, 'strerror', None) or e})") from None


def read_prompt(args) -> str:
    """The prompt from the argument or stdin, as UTF-8; undecodable bytes become U+FFFD, with
    one warning on stderr (an argument's bytes are what the shell passed, via surrogateescape)."""
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
            return args.prompt
        except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 arrive as lone surrogates
            try:
                raw = args.prompt.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raw = args.prompt.encode("utf-8", "replace")
        where = "argument"
    else:
        if sys.stdin is None:
            raise UserError("no prompt: pass it as an argument or on stdin (stdin is closed)")
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream without bytes underneath (embedding, tests)
            return sys.stdin.read()
        raw, where = stream.read(), "on stdin"
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        text = raw.decode("utf-8", errors="replace")
        print(f"warning: the prompt {where} is not valid UTF-8 (first bad byte at offset {e.start}); "
              "undecodable bytes were replaced with U+FFFD", file=sys.stderr)
        return text


class Streamer:
    """Prints the text of newly committed tokens, holding back an unfinished UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, new: list[int]) -> None:
        self.ids.extend(new)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        emit(text[self.printed:])
        self.printed = len(text)


def engine_config(args):
    from .config import EngineConfig
    return EngineConfig(max_len=args.max_context, graphs=args.graphs, profile_sync=args.profile,
                        draft_k={args.drafter: args.k} if args.k is not None else {},
                        tree=args.tree == "auto", tree_budget=args.budget)


def load_target(args, tokenizer: bool = True):
    """(packed target, tokenizer or None, eos ids, embedded) for the engine flags in `args`."""
    import torch

    from . import factory
    from .models.loading import parse_dtype
    device, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    embedded = args.target is None
    if args.threads is not None:  # before packing: the one-row linears cut one slab per thread
        torch.set_num_threads(args.threads)
    target, tokenizer, eos = factory.load_packed_target(args.target, device=device, dtype=dtype,
                                                         load_tokenizer=tokenizer)
    if args.max_context > target.max_len:
        raise UserError(f"--max-context {args.max_context} exceeds the model's {target.max_len} positions")
    drafter = args.drafter or factory.default_drafter(embedded)
    if drafter == factory.HYBRID or (drafter == factory.MERGED and args.budget is None):  # they measure a latency table
        from .engine import check_probe_context
        check_probe_context(args.max_context)
    return target, tokenizer, eos, embedded


def build_engine(args, target, eos, embedded: bool, greedy: bool = True):
    """The engine the flags in `args` name (args.drafter and args.graphs resolved in place);
    `greedy`: it will decode greedily (compiled steps are precompiled for greedy rounds)."""
    from . import factory
    from .compiled import choose_graphs
    from .config import DraftOptions
    if args.drafter is None:
        args.drafter = factory.default_drafter(embedded)
    args.graphs = choose_graphs(args.graphs, target.lm_head.weight.device, args, greedy)
    options = DraftOptions(ngram_max=args.ngram_max, datastore=args.datastore)
    checkpoints = {"ar": args.ar_draft, "block": args.block_draft}
    if args.drafter == factory.HYBRID:
        return factory.build_hybrid(target, eos, engine_config(args), args.router, args.lam, args.router_dir,
                                    checkpoints, options, embedded)
    if args.drafter == factory.MERGED:
        return factory.build_merged(target, eos, engine_config(args), merge_names(args), checkpoints, options,
                                    embedded)
    return factory.build_engine(target, eos, args.drafter, engine_config(args), args.draft, options, embedded)


def run(args) -> int:
    check_args(args)
    import torch

    from . import factory
    from .models.loading import encode_prompt
    from .verify import Sampling

    if sys.stdout is None:  # started with descriptor 1 closed (`>&-`): nowhere to put the answer
        raise UserError("stdout is closed: nowhere to write the answer (redirect it to a file or a pipe)")
    prompt = read_prompt(args)
    if not prompt.strip():
        raise UserError("empty prompt: pass it as an argument or on stdin")
    target, tokenizer, eos, embedded = load_target(args)
    ids = encode_prompt(tokenizer, prompt, chat=not args.no_chat)
    if len(ids) >= args.max_context:  # before the drafters load and the latency table is measured
        raise UserError(f"the prompt has {len(ids)} tokens but the context holds {args.max_context}; "
                        "shorten the prompt or raise --max-context")
    engine = build_engine(args, target, eos, embedded, greedy=args.temperature == 0)
    if engine.graphs_mode == "cuda":  # capture is cheap; compile mode compiles each key when first met
        with torch.inference_mode():
            for report in engine.warm_up():
                print(f"[graphs] {report['name']}: {report['keys']} {report['mode']} buckets in "
                      f"{report['seconds']:.1f} s, {report['memory_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    streamer = None if args.json else Streamer(tokenizer)
    with torch.inference_mode():
        gen = engine.generate(ids, args.max_new_tokens, sampling, on_tokens=streamer)
    hybrid = args.drafter == factory.HYBRID
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
        "k": None if hybrid else engine.k_max,
        "rounds": len(gen.rounds),
        "mean_accepted": round(gen.mean_accepted, 3),
    }
    if args.profile:
        from .profiling import phase_table
        print(phase_table([r.times for r in gen.rounds]), file=sys.stderr)
    if hybrid:
        result.update(router=args.router, lam=args.lam, **gen.routing_stats())
    if engine.verifies_trees:
        result.update(tree=gen.tree_stats())
    emit(json.dumps(result) + "\n" if args.json else "\n")
    if args.stats:
        print(f"[{args.drafter}] prompt {gen.prompt_tokens} tok | new {len(gen.token_ids)} tok | "
              f"{gen.tokens_per_s:.1f} tok/s | ttft {gen.ttft_s * 1000:.0f} ms | rounds {len(gen.rounds)} | "
              f"mean accepted {gen.mean_accepted:.2f} | stop {gen.stop_reason}", file=sys.stderr)
        if hybrid:
            st = gen.routing_stats()
            per = ", ".join(f"{d} {st['share'][d]:.0%} x{st['tokens_per_round'][d]:.2f}" for d in st["share"])
            print(f"[hybrid/{args.router} lam={args.lam}] rounds: {per} | switches {st['switches']} | "
                  f"catch-up {st['catchup_tokens']} tok | switching overhead {st['switching_overhead']:.1%}",
                  file=sys.stderr)
        if engine.verifies_trees:
            per = ", ".join(f"{d} {t['nodes']:.1f} nodes, depth {t['depth']:.2f}" for d, t in gen.tree_stats().items())
            print(f"[tree {'budget ' + str(args.budget) if args.budget else 'by cost'}] per round: {per}",
                  file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        silence_stdout()
        return BROKEN_PIPE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
