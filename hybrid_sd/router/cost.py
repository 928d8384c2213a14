"""Latency table: what each piece of a round costs on the machine at hand, measured at warm-up.

Pieces: the target's verify forward of k + 1 tokens, each drafter's k-token draft, and each
drafter's catch-up over a lag bucket. A router compares candidates by
`round_cost(drafter, k, lag)` in units of one plain decoding step (verify of 1 token), so the
table is unit-free and `--lam` means the same on every machine.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

from ..graphs import CATCHUP_BUCKETS, DRAFT_BUCKETS


class LatencyTable:
    def __init__(self, verify: dict[int, float], draft: dict[str, dict[int, float]],
                 catchup: dict[str, dict[int, float]]):
        self.verify, self.draft, self.catchup = verify, draft, catchup  # seconds
        self.step = verify[0]

    def plain_step_cost(self) -> float:
        return 1.0

    def catchup_seconds(self, name: str, lag: int) -> float:
        if lag <= 0 or name not in self.catchup:
            return 0.0
        table = self.catchup[name]
        for bucket in sorted(table):
            if lag <= bucket:
                return table[bucket]
        top = max(table)
        return table[top] * lag / top  # beyond the largest bucket: linear in the missed tokens

    def round_cost(self, name: str, k: int, lag: int = 0) -> float:
        """Draft + verify (+ catch-up) of one round, in plain decoding steps."""
        seconds = self.draft[name][k] + self.verify[k] + self.catchup_seconds(name, lag)
        return seconds / self.step

    @classmethod
    def measure(cls, verify_fn: Callable[[int], None], drafters: dict[str, tuple[Callable, Callable]],
                repeats: int = 3) -> "LatencyTable":
        """`verify_fn(k)` runs a (k+1)-token verify; per drafter name, `(draft_fn(k), catchup_fn(lag))`
        run a draft and a catch-up over `lag` missed positions. Median of `repeats` after one warm-up."""
        def timed(fn, *args) -> float:
            fn(*args)
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(*args)
                samples.append(time.perf_counter() - t0)
            return statistics.median(samples)

        verify = {k: timed(verify_fn, k) for k in (0, *DRAFT_BUCKETS)}
        draft = {name: {k: timed(d, k) for k in DRAFT_BUCKETS} for name, (d, _) in drafters.items()}
        catchup = {name: {b: timed(c, b) for b in CATCHUP_BUCKETS} for name, (_, c) in drafters.items()
                   if c is not None}
        return cls(verify, draft, catchup)

    def to_dict(self) -> dict:
        return {"verify": self.verify, "draft": self.draft, "catchup": self.catchup}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        ints = lambda m: {int(k): float(v) for k, v in m.items()}  # noqa: E731 (json keys are strings)
        return cls(ints(d["verify"]), {n: ints(m) for n, m in d["draft"].items()},
                   {n: ints(m) for n, m in d["catchup"].items()})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def summary(self) -> str:
        rows = ["verify(k+1): " + " ".join(f"{k}:{v * 1e3:.1f}" for k, v in self.verify.items())]
        for name, m in self.draft.items():
            rows.append(f"draft {name}: " + " ".join(f"{k}:{v * 1e3:.1f}" for k, v in m.items()))
        for name, m in self.catchup.items():
            rows.append(f"catch-up {name}: " + " ".join(f"{k}:{v * 1e3:.1f}" for k, v in m.items()))
        return "latency ms\n  " + "\n  ".join(rows)
