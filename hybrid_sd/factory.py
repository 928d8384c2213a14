"""Builds what a generation needs -- the target, the drafters, the router and the engine --
from settings. Every entry point goes through here (the CLI, bench, eval, train, benchmarks,
scripts/gpu_check.py, tests), so the wiring exists once."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from .config import DEFAULT_MERGE, DraftOptions, EngineConfig
from .drafters import DRAFTERS, Drafter
from .drafters.merged import MergedDrafter
from .drafters.registry import DrafterKind
from .engine import Engine
from .errors import UserError
from .graphs import DRAFT_BUCKETS, TREE_BUCKETS
from .models.loading import load_target
from .models.packed_linear import LAYOUT_VERSION, pack_linears
from .router import DEFAULT_LAM, DEFAULT_ROUTER, FixedRouter, LatencyTable, load_router, router_names
from .router.cost import MEASURE_VERSION
from .weights import shipped_router

PLAIN, MERGED, HYBRID = "none", "merged", "hybrid"


def drafter_choices() -> list[str]:
    """What --drafter accepts: plain decoding, every registered drafter, a merge of them, the hybrid."""
    return [PLAIN, *DRAFTERS, MERGED, HYBRID]


def default_drafter(embedded: bool) -> str:
    """The hybrid on the embedded default where a router ships; prompt lookup, which needs no
    checkpoint, elsewhere. (The merge of the AR drafter and the lookup, `merged`, commits 1.3x the
    lookup's tokens per round, but on the 2-core CPU it was level with the hybrid on the
    benchmark and 0.92x it on the README's prompt: docs/performance.md, sixteenth session.)"""
    return HYBRID if embedded and shipped_router() is not None else "ngram"


def load_packed_target(path: str | Path | None = None, device="cpu", dtype=torch.float32, max_len: int | None = None,
                       load_tokenizer: bool = True):
    """(target with packed linears, tokenizer or None, eos ids); path None: the embedded default."""
    target, tokenizer, eos = load_target(path, device=device, dtype=dtype, max_len=max_len,
                                         load_tokenizer=load_tokenizer)
    return pack_linears(target), tokenizer, eos


def drafter_kind(name: str) -> DrafterKind:
    if name not in DRAFTERS:
        raise UserError(f"unknown drafter {name!r} (choose from {', '.join(drafter_choices())})")
    return DRAFTERS[name]


def checkpoint_of(name: str, path: str | Path | None, embedded: bool, flag: str = "--draft") -> Path | None:
    """The checkpoint directory a drafter is built from: the one given (by `flag`), else on the
    embedded default the shipped one; for a drafter that needs none, the shipped extra it may use
    (the lookup drafter's datastore) on the embedded default, else None."""
    kind = drafter_kind(name)
    if not kind.needs_checkpoint:
        return kind.shipped_checkpoint() if embedded else None
    if path is None and embedded:
        path = kind.shipped_checkpoint()
    if path is None:
        raise UserError(f"--drafter {name} needs a checkpoint: pass {flag} PATH"
                        + ("" if embedded else " (drafters ship only for the embedded default target)"))
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"drafter checkpoint {path} does not exist")
    return path


def build_drafter(name: str, target, path: str | Path | None = None, options: DraftOptions = DraftOptions(),
                  embedded: bool = False) -> Drafter:
    """The registered drafter `name` for `target` (from `path`, or the shipped checkpoint)."""
    return drafter_kind(name).cls.load(target, checkpoint_of(name, path, embedded), options)


def build_engine(target, eos, drafter: str = PLAIN, config: EngineConfig = EngineConfig(),
                 path: str | Path | None = None, options: DraftOptions = DraftOptions(),
                 embedded: bool = False) -> Engine:
    """Plain decoding (`none`) or one registered drafter at its k (config.draft_k or its default).
    Trees with no fixed budget are cut by cost: this machine's latency table, measured once."""
    if drafter == PLAIN:
        return Engine(target, eos, [], config=config)
    path = checkpoint_of(drafter, path, embedded)
    engine = Engine(target, eos, [drafter_kind(drafter).cls.load(target, path, options)], config=config)
    if config.tree and config.tree_budget is None:
        engine.use_latency(cached_latency(engine))
    return engine


def build_merged(target, eos, config: EngineConfig = EngineConfig(), names: tuple[str, ...] = DEFAULT_MERGE,
                 checkpoints: Mapping[str, str | Path | None] = {}, options: DraftOptions = DraftOptions(),
                 embedded: bool = True) -> Engine:
    """One drafter that is several (drafters/merged.py): the registered drafters `names` (from
    checkpoints[name] or the shipped ones) draft every round and their union is verified as
    one tree, cut by this machine's latency table (or to config.tree_budget nodes)."""
    if len(names) < 2 or len(set(names)) != len(names):
        raise UserError(f"--merge needs two or more different drafters, got {','.join(names)}")
    members = [drafter_kind(name).cls.load(target, checkpoint_of(name, checkpoints.get(name), embedded,
                                                                 f"--{name}-draft"), options) for name in names]
    engine = Engine(target, eos, [MergedDrafter(members)], config=config)
    if config.tree_budget is None:
        engine.use_latency(cached_latency(engine))
    return engine


def build_hybrid(target, eos, config: EngineConfig = EngineConfig(), router: str = DEFAULT_ROUTER, lam: float = DEFAULT_LAM,
                 router_dir: str | Path | None = None, checkpoints: Mapping[str, str | Path | None] = {},
                 options: DraftOptions = DraftOptions(), embedded: bool = True) -> Engine:
    """The drafters the router was calibrated for (by name: checkpoints[name] or the shipped
    ones), one engine over them, this machine's latency table, then the router on it."""
    names = router_names(router, router_dir)
    paths = {name: checkpoint_of(name, checkpoints.get(name), embedded, f"--{name}-draft") for name in names}
    drafters = [drafter_kind(name).cls.load(target, paths[name], options) for name in names]
    # the latency probes run each step once before timing it: on CUDA that call captures its graph
    engine = Engine(target, eos, drafters, router=FixedRouter(0, 1), config=config)
    latency = cached_latency(engine)
    engine.use_router(load_router(router, router_dir, latency, names, lam))
    if config.tree and config.tree_budget is None:
        engine.use_latency(latency)
    return engine


def latency_cache_dir() -> Path:
    from .models.embedded import cache_root
    return cache_root() / "latency"


def cached_latency(engine: Engine) -> LatencyTable:
    """The latency table of this machine and configuration: measured once, then read back, so
    that routing (and so a seeded sampled output) does not change with timing noise between
    runs. Delete ~/.cache/hybrid_sd/latency/ to measure again.

    Drafters enter the key by their configs, not their weights: what a step costs depends on
    the shapes alone, so retrained weights of the same shape keep the table (and the routing)."""
    target, w = engine.target, engine.target.lm_head.weight
    key = json.dumps([target.config.to_json_string(), [[d.name, d.config_dict()] for d in engine.drafters],
                      str(w.device), str(w.dtype), torch.get_num_threads(), engine.max_len,
                      platform.processor() or platform.machine(), engine.graphs_mode,
                      DRAFT_BUCKETS, TREE_BUCKETS, LAYOUT_VERSION, MEASURE_VERSION],
                     sort_keys=True)  # the sizes measured, the kernels, how it was measured
    path = latency_cache_dir() / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if path.is_file():
        try:
            return LatencyTable.from_dict(json.loads(path.read_text()), drafters=[d.name for d in engine.drafters],
                                          catchup=[d.name for d in engine.drafters if d.feature_layers])
        except ValueError:
            pass  # unreadable or for other drafters: measure again
    table = engine.measure_latency(repeats=5)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(table.to_dict(), f)
    os.replace(tmp, path)
    return table
