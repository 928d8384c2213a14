"""How a drafter learned: held-out tokens per round and training loss against steps, from
the trainers' logs. `python -m hybrid_sd.eval.training_curve LOG [LOG ...] --out PNG`

A LOG is a drafter's `training_log.json` (its checks during training and the one after) or a
training checkpoint (`last.pt`, for a run still going); each becomes one line per panel,
labelled by its directory name.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError


def read_log(path: Path) -> list[dict]:
    """The records of a training log or checkpoint: one per step (loss ...) and one per
    held-out check (heldout_tau)."""
    if not path.is_file():
        raise UserError(f"no training log at {path}")
    if path.suffix == ".pt":
        import torch
        try:
            return torch.load(path, map_location="cpu", weights_only=False)["log"]
        except Exception as e:
            raise UserError(f"{path}: not a readable training checkpoint ({type(e).__name__})") from None
    try:
        record = json.loads(path.read_text())
        log = list(record["log"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a training_log.json (a JSON object with a \"log\" list)") from None
    final = record.get("heldout_tau")  # the check after training, at the last step
    steps = [r["step"] for r in log if "step" in r]
    if final and steps:
        log.append({"step": steps[-1], "heldout_tau": {k: v for k, v in final.items() if k != "k"}})
    return log


def curves(log: list[dict], smooth: int = 25) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, held-out mix tau) per check, and (step, loss averaged over the last `smooth` steps)."""
    taus = [(r["step"], r["heldout_tau"]["mix"]) for r in log if "heldout_tau" in r]
    steps = [r for r in log if "loss" in r]
    losses = [(r["step"], sum(s["loss"] for s in steps[max(0, i - smooth + 1):i + 1]) / min(i + 1, smooth))
              for i, r in enumerate(steps)]
    return taus, losses


def plot(logs: dict[str, list[dict]], out: Path) -> Path:
    from .plots import require_matplotlib, save_png
    plt = require_matplotlib()
    fig, (tau_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, log in logs.items():
        taus, losses = curves(log)
        if taus:
            tau_ax.plot(*zip(*taus), marker="o", label=label)
        if losses:
            loss_ax.plot(*zip(*losses), label=label)
    tau_ax.set(xlabel="step", ylabel="held-out tokens per round (mix)", title="acceptance")
    loss_ax.set(xlabel="step", ylabel="training loss (running mean)", title="loss")
    for ax in (tau_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, out, plt)


def main(argv=None) -> int:
    from ..cli import Parser
    from ..errors import exit_code
    p = Parser(prog="python -m hybrid_sd.eval.training_curve", description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="training_log.json or last.pt files")
    p.add_argument("--out", required=True, help="PNG to write")

    def run(args) -> int:
        logs = {Path(path).parent.name or path: read_log(Path(path)) for path in args.logs}
        print(f"wrote {plot(logs, Path(args.out))}")
        return 0
    return exit_code(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
