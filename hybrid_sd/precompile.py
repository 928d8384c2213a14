"""Compile every step of one engine setup once, and record whether compiled steps pay here.

    python -m hybrid_sd.precompile                    # the embedded default, as decode runs it
    python -m hybrid_sd.precompile --drafter ar --max-context 2048

Takes decode's engine flags. Builds that engine with `--graphs compile`, runs every bucket of
every step once (verify of each draft length, each drafter's drafts and catch-ups) under a
progress bar, which fills the persistent compile cache (hybrid_sd/compiled.py). Then it times
each piece of a round eager and compiled, alternating, and writes the setup's record:
`python -m hybrid_sd.decode` with the same flags and `--graphs auto` (the default) runs the
compiled steps if they made a round at least 3 % faster, else eager. Prints the record's
figures; `--json` prints the record.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

from .cli import Parser, positive_int
from .errors import UserError, exit_code


def build_parser() -> Parser:
    from .decode import add_engine_arguments
    p = Parser(prog="python -m hybrid_sd.precompile", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(p)
    p.add_argument("--passes", type=positive_int, default=2,
                   help="timing passes per mode, alternating eager and compiled (each the median of 3 per piece)")
    p.add_argument("--json", action="store_true", help="print the record as JSON on stdout")
    p.set_defaults(graphs="compile", profile=False)
    return p


def merged(tables):
    """Per piece, the fastest of several LatencyTables of one engine: a slow spell of the machine
    in one pass does not decide the comparison."""
    from .router.cost import LatencyTable
    first = tables[0]
    best = lambda rows: {size: min(r[size] for r in rows) for size in rows[0]}  # noqa: E731
    return LatencyTable(best([t.verify for t in tables]),
                        {n: best([t.draft[n] for t in tables]) for n in first.draft},
                        {n: best([t.catchup[n] for t in tables]) for n in first.catchup})


def run(args) -> int:
    from .decode import build_engine, check_engine_args, load_target
    check_engine_args(args)
    if args.graphs != "compile":
        raise UserError("precompile builds compiled steps: drop --graphs (or pass --graphs compile)")
    import torch
    from tqdm import tqdm

    from .compiled import PAYS_BELOW, compile_every_key, round_ratio, write_record
    from .engine import Engine
    from .graphs.compile_cache import CACHE_VARIABLE
    target, _, eos, embedded = load_target(args, tokenizer=False)
    if target.lm_head.weight.device.type != "cpu":
        raise UserError("precompile is for the CPU: on a CUDA device --graphs auto captures CUDA graphs at start-up")
    t0 = time.perf_counter()
    engine = build_engine(args, target, eos, embedded)  # the hybrid's latency table compiles its probes
    keys = compile_every_key(engine)
    compile_seconds = time.perf_counter() - t0

    eager = Engine(target, eos, engine.drafters, router=engine.router, config=replace(engine.config, graphs="eager"))
    tables = {"eager": [], "compile": []}
    for _ in tqdm(range(args.passes), desc="timing eager and compiled", unit="pass", file=sys.stderr):
        for mode, e in (("eager", eager), ("compile", engine)):
            tables[mode].append(e.measure_latency(repeats=3))
    ratios = round_ratio(merged(tables["eager"]), merged(tables["compile"]), engine.k_max)
    record = {"setup": {"drafter": args.drafter, "max_context": args.max_context, "threads": torch.get_num_threads(),
                        "target": args.target or "embedded", "torch": torch.__version__},
              "keys": keys, "compile_seconds": round(compile_seconds, 1), "cache": os.environ.get(CACHE_VARIABLE),
              "compiled_over_eager": {k: round(v, 3) for k, v in ratios.items()},
              "pays": ratios["mean"] < PAYS_BELOW}
    path = write_record(args, record)
    if args.json:
        print(json.dumps(record))
    verdict = "compiled" if record["pays"] else "eager"
    print(f"[precompile] {keys} keys compiled in {compile_seconds:.0f} s; a round compiled takes "
          f"{ratios['mean']:.2f}x its eager time (geometric mean of {len(ratios) - 1} pieces): --graphs auto runs "
          f"{verdict} steps for these flags (record {path})", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return exit_code(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
