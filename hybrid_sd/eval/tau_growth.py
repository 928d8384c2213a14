"""How the drafters' tokens per round grew with training: benchmark tau against the training
sequences each drafter has seen along its line of runs.
`python -m hybrid_sd.eval.tau_growth RUNS.json --out PNG`

RUNS.json lists the recorded training runs (`docs/bench/training/tau-growth.json`), each with
its drafter kind, name, the run it went on from (`parent`, null for a run from scratch), its
steps and batch, where it ran, and the benchmark tau measured for it (null where none was).
A run's position on the x axis is the sequences (steps x batch) of its run and of every run it
descends from, so a warm start carries its parent's training with it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError


DRAFTERS = ("ar", "block")
FIELDS = ("drafter", "name", "parent", "steps", "batch", "bench_tau")


def read_runs(path: Path) -> list[dict]:
    try:
        runs = json.loads(path.read_text())["runs"]
    except FileNotFoundError:
        raise UserError(f"no runs file at {path}") from None
    except (ValueError, KeyError, TypeError):
        runs = None
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise UserError(f"{path} is not a runs file (a JSON object with a \"runs\" list of objects)")
    names = set()
    for r in runs:
        missing = set(FIELDS) - set(r)
        if missing:
            raise UserError(f"{path}: run {r.get('name')!r} lacks {', '.join(sorted(missing))}")
        if r["drafter"] not in DRAFTERS:
            raise UserError(f"{path}: run {r['name']!r} is of drafter {r['drafter']!r}; expected one of {DRAFTERS}")
        if not all(isinstance(r[k], int) and not isinstance(r[k], bool) and r[k] > 0 for k in ("steps", "batch")):
            raise UserError(f"{path}: run {r['name']!r} needs positive integer steps and batch")
        if r["bench_tau"] is not None and not isinstance(r["bench_tau"], (int, float)):
            raise UserError(f"{path}: run {r['name']!r} has bench_tau {r['bench_tau']!r}; expected a number or null")
        if (r["drafter"], r["name"]) in names:
            raise UserError(f"{path}: two {r['drafter']} runs are named {r['name']!r}")
        names.add((r["drafter"], r["name"]))
    return runs


def seen_sequences(runs: list[dict]) -> dict[tuple[str, str], int]:
    """Per (drafter, name): training sequences of the run and all its ancestors."""
    by_key = {(r["drafter"], r["name"]): r for r in runs}
    seen: dict[tuple[str, str], int] = {}

    def total(key, path=()):
        if key in seen:
            return seen[key]
        if key not in by_key:
            raise UserError(f"run {path[-1][1]!r} goes on from {key[1]!r}, which is not in the runs file")
        if key in path:
            raise UserError(f"runs {' -> '.join(k[1] for k in path + (key,))} go on from each other in a loop")
        r = by_key[key]
        parent = r["parent"]
        seen[key] = r["steps"] * r["batch"] + (total((r["drafter"], parent), path + (key,)) if parent else 0)
        return seen[key]

    for key in by_key:
        total(key)
    return seen


def plot(runs: list[dict], out: Path) -> Path:
    from .plots import require_matplotlib, save_png
    plt = require_matplotlib()
    seen = seen_sequences(runs)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for drafter, color in zip(DRAFTERS, ("tab:blue", "tab:orange")):
        by_name = {r["name"]: r for r in runs if r["drafter"] == drafter}
        measured = [r for r in by_name.values() if r["bench_tau"] is not None]
        for r in measured:  # each warm start joined to the nearest measured ancestor
            parent = r["parent"]
            while parent and by_name[parent]["bench_tau"] is None:
                parent = by_name[parent]["parent"]
            if parent:
                p = by_name[parent]
                ax.plot([seen[(drafter, parent)], seen[(drafter, r["name"])]], [p["bench_tau"], r["bench_tau"]],
                        color=color, alpha=0.5, linewidth=1)
        for shipped, marker in ((True, "o"), (False, "x")):
            pts = [r for r in measured if bool(r.get("shipped")) == shipped]
            if pts:
                ax.scatter([seen[(drafter, r["name"])] for r in pts], [r["bench_tau"] for r in pts], color=color,
                           marker=marker, label=f"{drafter} drafter, {'shipped' if shipped else 'not shipped'}")
        for r in measured:
            ax.annotate(r["name"], (seen[(drafter, r["name"])], r["bench_tau"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.axhline(3.0, color="grey", linestyle="--", linewidth=1, label="#14's aim (tau 3.0)")
    ax.set(xscale="log", xlabel="training sequences seen along the run's line (steps x batch)",
           ylabel="benchmark tokens per round (mix)", title="drafter tau against training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, out, plt)


def main(argv=None) -> int:
    from ..cli import Parser
    from ..errors import exit_code
    p = Parser(prog="python -m hybrid_sd.eval.tau_growth", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", help="runs file (docs/bench/training/tau-growth.json)")
    p.add_argument("--out", required=True, help="PNG to write")

    def run(args) -> int:
        print(f"wrote {plot(read_runs(Path(args.runs)), Path(args.out))}")
        return 0
    return exit_code(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
