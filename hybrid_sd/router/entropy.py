"""The entropy rule: expected tokens per round from calibration curves, then best_choice.

The target's top-1 probability at the bonus position (low entropy = predictable text, where
a block drafter's long drafts survive) and each drafter's running acceptance pick a cell;
the cell holds, per drafter and depth i, the fraction of traced positions where at least i
drafts were accepted. Expected tokens for (drafter, k) = 1 + sum of the first k fractions.
Cells with few traced positions fall back to the drafter's top-1 row, then to its overall curve.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import DEFAULT_LAM, Router, best_choice
from .cost import LatencyTable, name_list, positive_int, read_json_object
from .signals import DrafterState, Signals

TOP1_EDGES = (0.5, 0.7, 0.85, 0.95)
ACCEPTANCE_EDGES = (0.34, 0.67)
MIN_COUNT = 20


def bucket(x: float, edges: tuple[float, ...]) -> int:
    return sum(x >= e for e in edges)


def signals_from_row(row: dict) -> Signals:
    """The signals of one trace row (train.traces: each drafter's state holds its `available`)."""
    return Signals(row["top1"], row["entropy"], [DrafterState(**d) for d in row["drafters"]])


class Calibration:
    def __init__(self, names: list[str], k_max: int, curves: torch.Tensor):
        self.names, self.k_max = names, k_max
        self.curves = curves  # [D, n_top1, n_acceptance, k_max]: P(accepted >= i+1)

    @classmethod
    def fit(cls, rows: list[dict], names: list[str], k_max: int) -> "Calibration":
        T, A = len(TOP1_EDGES) + 1, len(ACCEPTANCE_EDGES) + 1
        sums = torch.zeros(len(names), T, A, k_max)
        counts = torch.zeros(len(names), T, A)
        depth = torch.arange(1, k_max + 1)
        for row in rows:
            t = bucket(row["top1"], TOP1_EDGES)
            for d, (state, accepted) in enumerate(zip(row["drafters"], row["accepted"])):
                if accepted is None:  # the drafter had nothing to propose here (n-gram without a match)
                    continue
                a = bucket(state["acceptance"], ACCEPTANCE_EDGES)
                sums[d, t, a] += (accepted >= depth).float()
                counts[d, t, a] += 1
        overall = sums.sum((1, 2)) / counts.sum((1, 2)).clamp_min(1)[:, None]          # [D, K]
        by_top1 = sums.sum(2) / counts.sum(2).clamp_min(1)[..., None]                  # [D, T, K]
        by_top1 = torch.where(counts.sum(2)[..., None] >= MIN_COUNT, by_top1, overall[:, None])
        cell = sums / counts.clamp_min(1)[..., None]
        curves = torch.where(counts[..., None] >= MIN_COUNT, cell, by_top1[:, :, None])
        return cls(names, k_max, curves)

    def expected(self, d: int, k: int, top1: float, acceptance: float) -> float:
        """Expected tokens committed when calibrated drafter d drafts k."""
        t, a = bucket(top1, TOP1_EDGES), bucket(acceptance, ACCEPTANCE_EDGES)
        return 1.0 + float(self.curves[d, t, a, :k].sum())

    def save(self, path: Path) -> None:
        from ..cli import write_atomic
        write_atomic(path, json.dumps({"names": self.names, "k_max": self.k_max, "top1_edges": TOP1_EDGES,
                                       "acceptance_edges": ACCEPTANCE_EDGES, "curves": self.curves.tolist()}) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        """Every malformed file is a ValueError naming it (load_router makes it one line)."""
        name = Path(path).name
        d = read_json_object(path)
        names = name_list(d.get("names"), name)
        k_max = positive_int(d.get("k_max"), f"{name}: k_max")
        for key, edges in (("top1_edges", TOP1_EDGES), ("acceptance_edges", ACCEPTANCE_EDGES)):
            if key in d and d[key] != list(edges):  # cells bucketed another way would be misread
                raise ValueError(f"{name}: {key} {d[key]!r} differ from this version's {list(edges)}; calibrate again")
        try:
            curves = torch.tensor(d.get("curves"), dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name}: curves is not a nested list of numbers") from None
        shape = (len(names), len(TOP1_EDGES) + 1, len(ACCEPTANCE_EDGES) + 1, k_max)
        if tuple(curves.shape) != shape:
            raise ValueError(f"{name}: curves have shape {list(curves.shape)}, expected {list(shape)} "
                             "(drafters, top-1 buckets, acceptance buckets, k_max)")
        if not bool(((curves >= 0) & (curves <= 1)).all()):
            raise ValueError(f"{name}: curves hold values outside [0, 1] (they are probabilities)")
        return cls(names, k_max, curves)


class EntropyRouter(Router):
    def __init__(self, calibration: Calibration, latency: LatencyTable, names: list[str], lam: float = DEFAULT_LAM):
        missing = [n for n in names if n not in calibration.names]
        if missing:
            raise ValueError(f"the calibration has no curves for drafter(s) {missing} (it has {calibration.names})")
        self.cal, self.latency, self.names, self.lam = calibration, latency, names, lam
        self.index = [calibration.names.index(n) for n in names]

    def choose(self, signals: Signals, k_max: int):
        def expected(d, k):
            return self.cal.expected(self.index[d], min(k, self.cal.k_max), signals.top1,
                                     signals.drafters[d].acceptance)
        return best_choice(expected, self.latency, self.lam, signals, self.names, k_max)
