"""Compiled steps on the CPU: built once per machine, used by `--graphs auto` only where they pay.

On the CPU a step's first compile costs seconds to minutes, so `--graphs auto` never compiles
on its own. `python -m hybrid_sd.precompile` compiles every bucket of one setup (target,
drafters, context, threads) into the persistent compile cache (graphs/compile_cache.py), then
times each piece of a round eager and compiled, side by side on this machine, and writes a
record. `--graphs auto` reads it: compiled steps where the record says they are faster, eager
where it says they are not; with no record, eager and a note, once per machine, on how to
build them. The record is keyed by the setup, torch's version and this package's source, so
any change to either asks for a new precompile instead of silently compiling for minutes.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch

RECORD_VERSION = 1
# compiled steps must make a round at least this much faster: less is inside this VM's noise
# between two measurements of the same code (docs/performance.md)
PAYS_BELOW = 0.97
# decode's engine flags (decode.add_engine_arguments) that shape the compiled steps, and those that
# do not (routing, lookup, the graphs choice itself; threads enter the key as torch's count)
SETUP_FLAGS = ("target", "drafter", "merge", "router", "router_dir", "ar_draft", "block_draft", "draft", "k",
               "tree", "budget", "device", "dtype", "max_context")
NOT_SETUP_FLAGS = ("lam", "ngram_max", "datastore", "threads", "graphs")
PATH_FLAGS = ("target", "router_dir", "ar_draft", "block_draft", "draft")  # the same directory however it is named


def compile_root() -> Path:
    from .models.embedded import compile_cache_dir
    return compile_cache_dir().parent  # beside inductor's cache: the records and the note's marker


def source_digest() -> str:
    """A digest of this package's code, kernels included: compiled graphs of other code are stale."""
    from . import graphs, kernels
    roots = [Path(__file__).parent, *map(Path, graphs.__path__), *map(Path, kernels.__path__)]
    h = hashlib.sha1()
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def setup_key(args) -> str:
    """The record's name for the setup in `args` (decode's or precompile's parsed flags) on this
    machine's threads, torch and code."""
    flags = vars(args)
    setup = {name: str(Path(flags[name]).resolve()) if name in PATH_FLAGS and flags[name] is not None else flags[name]
             for name in SETUP_FLAGS}
    key = json.dumps([RECORD_VERSION, setup, torch.get_num_threads(), torch.__version__, source_digest()],
                     sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def record_path(args) -> Path:
    return compile_root() / "steps" / f"{setup_key(args)}.json"


def read_record(args) -> dict | None:
    """The precompile record of this setup, or None (never built, unreadable, or its compile
    cache gone: build again)."""
    try:
        record = json.loads(record_path(args).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pays"), bool):
        return None
    if record["pays"] and not Path(str(record.get("cache"))).is_dir():
        return None  # the compiled steps it vouches for were deleted: compiling again takes minutes
    return record


def write_record(args, record: dict) -> Path:
    """Atomically: a record is whole or absent."""
    from .cli import write_atomic
    from .errors import UserError
    path = record_path(args)
    try:
        return write_atomic(path, json.dumps(record, indent=1))
    except UserError as e:  # one line that also says where a writable cache can go
        raise UserError(f"{e}; set HYBRID_SD_CACHE to a writable directory") from None


def compile_every_key(engine, desc: str = "compiling steps") -> int:
    """Run every key of `engine.warm_up_plan()` once (compiling it, in compile mode) under a
    progress bar on stderr; returns how many keys."""
    from tqdm import tqdm
    plan = engine.warm_up_plan()
    keys = sum(len(examples) for _, examples in plan)
    with tqdm(total=keys, desc=desc, unit="key", file=sys.stderr) as bar:
        engine.warm_up(progress=bar.update, plan=plan)
    return keys


def round_ratio(eager, compiled, k_max: int) -> dict:
    """Compiled against eager time (LatencyTables of one engine setup): per piece of a round --
    the plain step, each verify of k + 1 <= k_max + 1 rows, and for each drafter with device
    steps (those that catch up) its draft of every k and its catch-up over each lag bucket --
    and their geometric mean, `mean`."""
    ratios = {f"verify {k + 1}": compiled.verify[k] / eager.verify[k] for k in range(k_max + 1) if k in eager.verify}
    for name, costs in eager.catchup.items():
        ratios.update({f"draft {name} {k}": compiled.draft[name][k] / eager.draft[name][k]
                       for k in eager.draft[name] if 0 < k <= k_max})
        ratios.update({f"catch-up {name} {lag}": compiled.catchup[name][lag] / costs[lag] for lag in costs})
    mean = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
    return {"mean": mean, **ratios}


def choose_graphs(requested: str, device: torch.device, args, greedy: bool = True) -> str:
    """`--graphs auto` on the CPU: compiled steps where this setup's record says they pay (said
    on stderr), else eager (with a note, once per machine, when they were never built). Sampling
    stays eager: precompile builds and times the greedy steps only. Any other choice stands."""
    if requested != "auto" or torch.device(device).type != "cpu":
        return requested
    record = read_record(args)
    if record is not None:
        if record["pays"] and greedy:
            print(f"[graphs] compiled steps (precompiled here: a round {record['compiled_over_eager']['mean']:.2f}x "
                  "its eager time)", file=sys.stderr)
            return "compile"
        return "eager"
    noted = compile_root() / "noted"
    if not noted.exists():
        print("[graphs] eager steps: compiled ones were never built for this setup. "
              "`python -m hybrid_sd.precompile` (same flags) compiles every bucket once (about 7 minutes for "
              "the default hybrid on a 2-core CPU) and --graphs auto then uses them if they are faster here "
              "(docs/performance.md)",
              file=sys.stderr)
        try:
            noted.parent.mkdir(parents=True, exist_ok=True)
            noted.touch()
        except OSError:
            pass  # a read-only cache: the note again next time, nothing worse
    return "eager"
