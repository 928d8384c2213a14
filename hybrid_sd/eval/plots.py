"""The benchmark's pictures, drawn from its results.json (matplotlib, Agg backend).

`python -m hybrid_sd.eval.plots RESULTS.json [--out DIR]` redraws them from a stored run.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..errors import UserError

PHASE_COLORS = {"route": "#9467bd", "catchup": "#d62728", "draft": "#ff7f0e", "verify": "#1f77b4",
                "accept": "#7f7f7f", "commit": "#bcbd22"}
DRAFTER_COLORS = {"ar": "#1f77b4", "block": "#ff7f0e", "ngram": "#2ca02c", "none": "#7f7f7f"}


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UserError("the plots need matplotlib: pip install 'hybrid_sd[bench]' (or pass --no-plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path: Path, plt) -> Path:
    """Write a figure atomically (nothing half-written on disk) and free it."""
    from ..cli import write_atomic
    try:
        write_atomic(path, writer=lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]]):
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(groups)), groups)


def category_bars(result: dict, table: dict, methods: list[str], ylabel: str, title: str, plt):
    """One group of bars per category (and the mix), one bar per method."""
    cats = result["categories"] + ["mix"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    grouped_bars(ax, cats, {m: [table[m].get(c, 0.0) for c in cats] for m in methods})
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(ncol=len(methods), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07))
    return fig, ax


def plot_speedup(result: dict, plt):
    fig, ax = category_bars(result, result["speedup"], result["methods"], "speed-up over plain decoding",
                            "Decode speed-up per category (same prompts, greedy, outputs checked equal)", plt)
    ax.axhline(1.0, color="black", lw=0.8)
    return fig


def plot_accepted(result: dict, plt):
    methods = [m for m in result["tau"] if m != "plain"]
    fig, _ = category_bars(result, result["tau"], methods, "tokens per round (accepted + 1)",
                           "Mean accepted length per category", plt)
    return fig


def plot_phases(result: dict, plt):
    cats = result["categories"] + ["mix"]
    methods = list(result["phases_ms_per_round"])
    fig, axes = plt.subplots(1, len(cats), figsize=(3.2 * len(cats), 4.5), sharey=True)
    for ax, cat in zip(axes, cats):
        bottom = [0.0] * len(methods)
        for phase, color in PHASE_COLORS.items():
            values = [result["phases_ms_per_round"][m].get(cat, {}).get(phase, 0.0) for m in methods]
            ax.bar(range(len(methods)), values, bottom=bottom, color=color, label=phase)
            bottom = [b + v for b, v in zip(bottom, values)]
        for x, (m, top) in enumerate(zip(methods, bottom)):  # tokens per round above each bar
            tau = result["tau"].get(m, {}).get(cat)
            if tau is not None:
                ax.text(x, top, f"{tau:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=7)
        ax.set_title(cat)
    axes[0].set_ylabel("ms per round (label: tokens per round)")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Per-round phase breakdown")
    fig.tight_layout()
    return fig


def plot_routing(result: dict, method: str, plt):
    """One strip per category over token positions: the drafter of the round that committed
    each token; its accepted drafts solid, the target's own token of the round pale."""
    from matplotlib.patches import Patch

    strips = result["routing"][method]
    fig, ax = plt.subplots(figsize=(11, 0.7 * len(strips) + 1.2))
    for row, (cat, rounds) in enumerate(strips.items()):
        pos = 1  # token 0 is the prefill's, committed before the first round
        for drafter, _, accepted, committed in rounds:
            color = DRAFTER_COLORS.get(drafter, "#17becf")
            if accepted:
                ax.barh(row, accepted, left=pos, color=color, height=0.8)
            ax.barh(row, committed - accepted, left=pos + accepted, color=color, alpha=0.3, height=0.8)
            pos += committed
    ax.set_yticks(range(len(strips)), list(strips))
    ax.invert_yaxis()
    ax.set_xlabel("generated token position")
    handles = [Patch(color=c, label=d if d != "none" else "no draft (plain round)") for d, c in DRAFTER_COLORS.items()]
    handles.append(Patch(color="#1f77b4", alpha=0.3, label="pale: the target's own token of the round"))
    ax.legend(handles=handles, ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(strips) < 3 else -0.15))
    ax.set_title(f"{method}: drafter chosen along one generation per category (solid = accepted drafts)")
    fig.tight_layout()
    return fig


TREE_METHOD = re.compile(r"^(?P<kind>[a-z-]+)(@\d+)?:tree(?P<budget>\d+)$")


def budget_sweeps(result: dict) -> dict[str, list[tuple[int, str]]]:
    """Per drafter, its fixed-budget tree methods (budget, method name), by budget."""
    sweeps: dict[str, list[tuple[int, str]]] = {}
    for m in result["methods"]:
        match = TREE_METHOD.match(m)
        if match and m in result["tau"]:
            sweeps.setdefault(match["kind"], []).append((int(match["budget"]), m))
    return {k: sorted(v) for k, v in sweeps.items() if len(v) > 1}


def plot_budget(result: dict, plt):
    """Tokens per round and tokens/s (mix) against the tree's node budget, per drafter; the
    chain version of each drafter as a dashed line."""
    fig, (ax_tau, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (kind, points) in enumerate(budget_sweeps(result).items()):
        color = DRAFTER_COLORS.get(kind, f"C{i}")
        budgets = [b for b, _ in points]
        ax_tau.plot(budgets, [result["tau"][m]["mix"] for _, m in points], "o-", color=color, label=f"{kind} tree")
        ax_speed.plot(budgets, [result["tokens_per_s"][m]["mix"] for _, m in points], "o-", color=color,
                      label=f"{kind} tree")
        if kind in result["tau"]:
            ax_tau.axhline(result["tau"][kind]["mix"], color=color, ls="--", lw=1, label=f"{kind} chain")
            ax_speed.axhline(result["tokens_per_s"][kind]["mix"], color=color, ls="--", lw=1, label=f"{kind} chain")
    if "plain" in result["tokens_per_s"]:
        ax_speed.axhline(result["tokens_per_s"]["plain"]["mix"], color="black", lw=0.8, label="plain")
    for ax, label in ((ax_tau, "tokens per round (mix)"), (ax_speed, "tokens/s (mix)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tree node budget")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("Draft trees: accepted length and speed against the node budget")
    fig.tight_layout()
    return fig


def plot_all(result: dict, out: Path) -> list[Path]:
    plt = require_matplotlib()
    figures = {"speedup.png": plot_speedup(result, plt)}
    if any(m != "plain" for m in result["tau"]):
        figures["accepted.png"] = plot_accepted(result, plt)
    if result["phases_ms_per_round"]:
        figures["phases.png"] = plot_phases(result, plt)
    if budget_sweeps(result):
        figures["tree-budget.png"] = plot_budget(result, plt)
    for method in result["routing"]:
        figures[f"routing-{method.replace(':', '-')}.png"] = plot_routing(result, method, plt)
    return [save_png(fig, out / name, plt) for name, fig in figures.items()]


def main(argv=None) -> int:
    from ..cli import Parser, out_dir
    from ..errors import exit_code
    p = Parser(prog="python -m hybrid_sd.eval.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results.json of python -m hybrid_sd.bench")
    p.add_argument("--out", default=None, type=out_dir, help="directory for the PNGs (default: next to the results)")
    return exit_code(redraw, p.parse_args(argv))


def redraw(args) -> int:
    from ..cli import check_out_dir
    path = Path(args.results)
    if not path.is_file():
        raise UserError(f"no results file at {path}")
    try:
        result = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    out = args.out if args.out else check_out_dir(path.parent)
    for written in plot_all(result, out):
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
