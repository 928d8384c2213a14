"""Where a target step's time goes on this machine, per kind of op:
`python -m hybrid_sd.eval.step_profile [--threads 1,2] [--tokens 1,7] [--context 256]`.

Profiles the engine's own verify step (plain decoding is its 1-token case) on the embedded
default or `--target DIR`, after a prefill of `--context` tokens, at each thread count, and
prints one markdown table (profiling/ops.py explains the rows).
"""
from __future__ import annotations

import sys

import torch

from ..cli import Parser, int_list, positive_int
from ..config import EngineConfig
from ..errors import UserError, exit_code
from ..profiling.ops import breakdown_table, op_breakdown


def parse_args(argv):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None, help="a Hugging Face model directory (default: the embedded SmolLM2)")
    p.add_argument("--threads", type=int_list, default=[1, 2], help="torch intra-op thread counts to profile")
    p.add_argument("--tokens", type=int_list, default=[1, 7], help="tokens per step (1 = plain decoding)")
    p.add_argument("--context", type=positive_int, default=256, help="tokens already in the cache")
    p.add_argument("--repeats", type=positive_int, default=20, help="steps timed per measurement")
    p.add_argument("--graphs", default="eager", choices=("eager", "compile"), help="how the step runs")
    return p.parse_args(argv)


@torch.inference_mode()
def profile_steps(engine, tokens: list[int], context: int, repeats: int, label: str) -> dict[str, dict]:
    engine.tokens[:context] = torch.randint(0, engine.target.config.vocab_size, (context,),
                                            generator=torch.Generator().manual_seed(0))
    engine.prefill(context)
    results = {}
    for T in tokens:
        draft = engine.tokens[:T].clone()
        results[f"{T}-token step, {label}"] = op_breakdown(lambda d=draft: engine.verify_forward(d, context), repeats)
    return results


def run(args) -> int:
    from ..factory import build_engine, load_packed_target
    results, before = {}, torch.get_num_threads()
    try:
        for n_threads in args.threads:
            # packed at this thread count: the one-row linears cut one slab per thread
            torch.set_num_threads(n_threads)
            target, _, eos = load_packed_target(args.target, load_tokenizer=False)
            if args.context + max(args.tokens) > target.max_len:
                raise UserError(f"--context {args.context} + {max(args.tokens)} tokens exceed the target's "
                                f"{target.max_len} positions")
            engine = build_engine(target, eos, config=EngineConfig(max_len=args.context + max(args.tokens) + 1,
                                                                   graphs=args.graphs))
            label = f"{n_threads} thread{'s' * (n_threads > 1)}"
            results.update(profile_steps(engine, args.tokens, args.context, args.repeats, label))
    finally:
        torch.set_num_threads(before)
    print(f"context {args.context}, {args.repeats} steps per measurement, graphs {args.graphs}")
    print(breakdown_table(results))
    return 0


def main(argv=None) -> int:
    return exit_code(run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
