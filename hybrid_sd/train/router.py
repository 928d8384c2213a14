"""Fit both routers from traces: `python -m hybrid_sd.train.router [--traces FILE] [--out DIR]`.

The entropy rule's calibration curves are tallies over the traces; the learned router is a
small MLP trained with binary cross-entropy on "at least i drafts accepted" per drafter and
depth. One sequence in five is held back, and both are scored on it: mean absolute error of
the predicted tokens per round at every k a router could ask for, against what the drafters
really achieved.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..cli import Parser, out_dir, positive_float, positive_int, seed, write_atomic
from ..errors import UserError, exit_code
from ..router.entropy import Calibration, signals_from_row
from ..router.learned import RouterMLP


def read_traces(path: Path) -> tuple[dict, list[dict]]:
    if not path.is_file():
        raise UserError(f"no traces at {path}; run python -m hybrid_sd.train.traces first")
    lines = path.read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:] if line]


def askable(state: dict, k_max: int) -> int:
    """The longest draft a router may ask of a drafter in this state: best_choice never asks a
    lookup drafter for more than it can propose. The learned router is fitted, and both routers
    scored, on these depths alone, so that P(at least i accepted) is conditioned on i being
    proposed: a long lookup proposal is not priced by rounds that had only a short one. (The
    same conditioning of the entropy rule's curves routed no better: docs/routing.md.)"""
    available = state.get("available")
    return k_max if available is None else min(k_max, available)


def tensors(rows: list[dict], n_drafters: int, k_max: int):
    """Inputs [N, F], targets [N, D, K] (1 where at least i+1 accepted) and a mask [N, D, K]:
    the depths a router could have asked of a drafter that had a draft (`askable`)."""
    x = torch.tensor([signals_from_row(r).vector() for r in rows])
    depth = torch.arange(1, k_max + 1)
    acc = torch.tensor([[a if a is not None else -1 for a in r["accepted"]] for r in rows])
    y = (acc[..., None] >= depth).float()
    longest = torch.tensor([[askable(state, k_max) for state in r["drafters"]] for r in rows])
    return x, y, (acc >= 0)[..., None] & (depth <= longest[..., None])


def mean_abs_error(predict, rows, n_drafters, k_max) -> float:
    """|expected - actual tokens per round| averaged over rows, drafters with a draft, and k."""
    total, count = 0.0, 0
    for r in rows:
        for d in range(n_drafters):
            a = r["accepted"][d]
            if a is None:
                continue
            for k in range(1, askable(r["drafters"][d], k_max) + 1):
                total += abs(predict(r, d, k) - (1 + min(a, k)))
                count += 1
    return total / max(count, 1)


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.train.router", description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", default=None, help="traces file (default: DATA/traces.jsonl in the user cache)")
    p.add_argument("--out", default="router", type=out_dir,
                   help="directory for entropy.json and learned.* (checked before training)")
    p.add_argument("--epochs", type=positive_int, default=200)
    p.add_argument("--hidden", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--seed", type=seed, default=0)
    return exit_code(train, p.parse_args(argv))


@torch.enable_grad()
def train(args) -> dict:
    from .data import default_data_dir

    path = Path(args.traces) if args.traces else default_data_dir() / "traces.jsonl"
    header, rows = read_traces(path)
    names, k_max = header["names"], header["k_max"]
    fit_rows = [r for r in rows if r["seq"] % 5 != 4]
    val_rows = [r for r in rows if r["seq"] % 5 == 4] or fit_rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    calibration = Calibration.fit(fit_rows, names, k_max)
    calibration.save(out / "entropy.json")

    torch.manual_seed(args.seed)
    model = RouterMLP(names, k_max, args.hidden)
    x, y, mask = tensors(fit_rows, len(names), k_max)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.epochs), desc="train router", unit="epoch")
    for _ in bar:
        for idx in torch.randperm(len(x), generator=gen).split(512):
            p = model(x[idx]).clamp(1e-6, 1 - 1e-6)
            m = mask[idx]
            loss = F.binary_cross_entropy(p[m], y[idx][m])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    model.save(out)

    with torch.no_grad():
        val_p = model(torch.tensor([signals_from_row(r).vector() for r in val_rows]))
    val_index = {id(r): i for i, r in enumerate(val_rows)}

    def learned(r, d, k):
        return 1.0 + float(val_p[val_index[id(r)], d, :k].sum())

    def rule(r, d, k):
        return calibration.expected(d, k, r["top1"], r["drafters"][d]["acceptance"])

    def constant(r, d, k):  # a router that ignores the signals: the drafter's average
        return average[d][k]

    average = {}
    for d in range(len(names)):
        seen = [r["accepted"][d] for r in fit_rows if r["accepted"][d] is not None]
        average[d] = {k: 1 + sum(min(a, k) for a in seen) / max(len(seen), 1) for k in range(1, k_max + 1)}
    report = {"traces": str(path), "fit_positions": len(fit_rows), "validation_positions": len(val_rows),
              "mae_tokens_per_round": {name: round(mean_abs_error(f, val_rows, len(names), k_max), 4)
                                       for name, f in (("signal-free average", constant), ("entropy rule", rule),
                                                       ("learned", learned))}}
    write_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["mae_tokens_per_round"]))
    return report


if __name__ == "__main__":
    sys.exit(main())
