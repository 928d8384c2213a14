"""Latency table: what each piece of a round costs on the machine at hand, measured at warm-up.

Pieces: the target's verify forward of k + 1 tokens, each drafter's k-token draft, and each
drafter's catch-up over a lag bucket. A router compares candidates by
`round_cost(drafter, k, lag)` in units of one plain decoding step (verify of 1 token), so the
table is unit-free and `--lam` means the same on every machine.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..graphs import CATCHUP_BUCKETS, DRAFT_BUCKETS, TREE_BUCKETS


def read_json_object(path: Path) -> dict:
    """A JSON object from a router or table file; anything else is a ValueError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path.name} cannot be read ({e})") from None
    if not text.strip():
        raise ValueError(f"{path.name} is empty")
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} holds a JSON {type(value).__name__}, not an object")
    return value


def name_list(value, what: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(n, str) for n in value) \
            or len(set(value)) != len(value):
        raise ValueError(f"{what}: 'names' is {value!r}, expected a list of distinct drafter names")
    return value


def positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} is {value!r}, expected a positive integer")
    return value


# bump when `LatencyTable.measure` changes how it measures: cached tables key on it
MEASURE_VERSION = 2  # 1: size after size, median of 2; 2: interleaved passes, median of 5, non-decreasing


def non_decreasing(costs: dict[int, float]) -> dict[int, float]:
    """The closest non-decreasing costs in size order, in least squares (pool adjacent violators):
    a spike or a dip in one measured size is averaged with its neighbours instead of deciding
    what the router drafts."""
    blocks: list[tuple[float, int]] = []  # (mean, sizes pooled) of runs of sizes
    for size in sorted(costs):
        blocks.append((costs[size], 1))
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append(((m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2))
    values = [m for m, w in blocks for _ in range(w)]
    return dict(zip(sorted(costs), values))


class LatencyTable:
    def __init__(self, verify: dict[int, float], draft: dict[str, dict[int, float]],
                 catchup: dict[str, dict[int, float]]):
        self.verify, self.draft, self.catchup = verify, draft, catchup  # seconds
        self.step = verify[0]

    def catchup_seconds(self, name: str, lag: int) -> float:
        if lag <= 0 or name not in self.catchup:
            return 0.0
        table = self.catchup[name]
        for bucket in sorted(table):
            if lag <= bucket:
                return table[bucket]
        top = max(table)
        return table[top] * lag / top  # beyond the largest bucket: linear in the missed tokens

    def verify_seconds(self, k: int) -> float:
        """A verify of k drafts (k + 1 rows, a chain or a tree): measured, or interpolated
        linearly between the measured sizes (linear past the largest)."""
        if k in self.verify:
            return self.verify[k]
        sizes = sorted(self.verify)
        lo = max((s for s in sizes if s < k), default=sizes[0])
        hi = min((s for s in sizes if s > k), default=None)
        if hi is None:
            below = max((s for s in sizes if s < lo), default=None)
            if below is None:
                return self.verify[lo]
            slope = (self.verify[lo] - self.verify[below]) / (lo - below)
            return self.verify[lo] + slope * (k - lo)
        return self.verify[lo] + (self.verify[hi] - self.verify[lo]) * (k - lo) / (hi - lo)

    def draft_seconds(self, name: str, k: int) -> float:
        """A k-token draft by `name` (its longest measured one past the buckets, e.g. a tree's
        nodes, which prices a tree below its cost; 0 for no draft or a drafter it does not know)."""
        row = self.draft.get(name)
        if not k or not row:
            return 0.0
        return row[k] if k in row else row[max(row)]

    def round_cost(self, name: str, k: int, lag: int = 0) -> float:
        """Draft + verify (+ catch-up) of one round, in plain decoding steps: a candidate's for
        the routers, or a round that happened (a plain step costs 1), which RoundStats sums."""
        seconds = self.draft_seconds(name, k) + self.verify_seconds(k) + self.catchup_seconds(name, lag)
        return seconds / self.step

    @classmethod
    def measure(cls, verify_fn: Callable[[int], None], drafters: dict[str, tuple[Callable, Callable]],
                repeats: int = 3, longest_verify: int | None = None) -> "LatencyTable":
        """`verify_fn(k)` runs a (k+1)-token verify; per drafter name, `(draft_fn(k), catchup_fn(lag))`
        run a draft and a catch-up over `lag` missed positions. Median of `repeats` after one warm-up.
        Verifies are timed for the chain and tree buckets up to `longest_verify` drafts."""
        sizes = sorted({0, *DRAFT_BUCKETS, *TREE_BUCKETS})
        jobs = {("verify", "", k): (verify_fn, k) for k in sizes
                if longest_verify is None or k <= max(longest_verify, DRAFT_BUCKETS[-1])}
        for name, (d, c) in drafters.items():
            jobs.update({("draft", name, k): (d, k) for k in DRAFT_BUCKETS})
            if c is not None:
                jobs.update({("catchup", name, b): (c, b) for b in CATCHUP_BUCKETS})
        for fn, arg in jobs.values():  # warm-up
            fn(arg)
        samples: dict[tuple, list[float]] = {key: [] for key in jobs}
        for _ in range(repeats):  # every size once per pass: a slow spell of the machine hits them all
            for key, (fn, arg) in jobs.items():
                t0 = time.perf_counter()
                fn(arg)
                samples[key].append(time.perf_counter() - t0)
        rows: dict[tuple[str, str], dict[int, float]] = {}
        for (kind, name, size), times in samples.items():
            rows.setdefault((kind, name), {})[size] = statistics.median(times)
        # a longer verify, draft or catch-up never costs less; a noisy machine's medians may say so
        rows = {key: non_decreasing(row) for key, row in rows.items()}
        return cls(rows[("verify", "")], {name: rows[("draft", name)] for name in drafters},
                   {name: rows[("catchup", name)] for name in drafters if ("catchup", name) in rows})

    def to_dict(self) -> dict:
        return {"verify": self.verify, "draft": self.draft, "catchup": self.catchup}

    @classmethod
    def from_dict(cls, d, drafters: Sequence[str] = (), catchup: Sequence[str] = ()) -> "LatencyTable":
        """A table read back from JSON (to_dict's shape). Every malformed shape -- not an object,
        keys missing, not numbers, negative, a bucket or a named drafter missing -- raises
        ValueError, which callers take as "measure again". `drafters` must each have a draft
        row, `catchup` (those that catch up) a catch-up row."""
        def seconds(m, what: str, needed: Iterable[int] = ()) -> dict[int, float]:
            if not isinstance(m, dict) or not m:
                raise ValueError(f"latency table: {what} is not a non-empty object")
            try:
                # JSON keys are strings; bool is an int to Python but never a time
                table = {int(k): float(v) for k, v in m.items() if not isinstance(v, bool)}
            except (TypeError, ValueError):
                raise ValueError(f"latency table: {what} maps something other than integers to seconds") from None
            if len(table) != len(m) or not all(math.isfinite(v) and v >= 0 for v in table.values()):
                raise ValueError(f"latency table: {what} holds a time that is not a non-negative number")
            missing = sorted(set(needed) - set(table))
            if missing:
                raise ValueError(f"latency table: {what} lacks buckets {missing}")
            return table

        def rows(m, what: str, needed: Iterable[int]) -> dict[str, dict[int, float]]:
            if not isinstance(m, dict):
                raise ValueError(f"latency table: {what} is not an object")
            return {str(n): seconds(t, f"{what} {n}", needed) for n, t in m.items()}

        if not isinstance(d, dict):
            raise ValueError(f"latency table: a JSON {type(d).__name__}, not an object")
        absent = [key for key in ("verify", "draft", "catchup") if key not in d]
        if absent:
            raise ValueError(f"latency table: no {', '.join(absent)}")
        # a table for routing (drafters named) must price every draft bucket; any table needs the plain step
        buckets = DRAFT_BUCKETS if drafters else ()
        verify = seconds(d["verify"], "verify", (0, *buckets))
        if verify[0] <= 0:
            raise ValueError("latency table: the plain step (verify 0) takes no time")
        draft = rows(d["draft"], "draft", buckets)
        catchups = rows(d["catchup"], "catch-up", ())
        missing = [n for n in drafters if n not in draft] + [n for n in catchup if n not in catchups]
        if missing:
            raise ValueError(f"latency table: no row for drafter(s) {sorted(set(missing))}")
        return cls(verify, draft, catchups)
