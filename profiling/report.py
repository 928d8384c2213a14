"""Per-round phase table, from the engine's round records or from an Nsight Systems export:
`python -m hybrid_sd.profiling.report FILE.sqlite`.

In an export (`nsys export --type sqlite`), every NVTX range named `round` is one round and the
ranges inside it (`route`, `catchup:<drafter>`, `draft:<drafter>`, `verify`, `accept`,
`commit`) are its phases, keyed by the part before the colon.
"""
from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from .phases import PHASES


def phase_table(rounds: list[dict[str, float]]) -> str:
    """Markdown table: per phase, ms per round (mean), total ms and share of round time."""
    if not rounds:
        return "no rounds"
    total = {p: sum(r.get(p, 0.0) for r in rounds) for p in PHASES}
    extra = sorted({p for r in rounds for p in r} - set(PHASES))
    total.update({p: sum(r.get(p, 0.0) for r in rounds) for p in extra})
    round_time = sum(total.values())
    lines = [f"{len(rounds)} rounds, {round_time * 1e3 / len(rounds):.2f} ms per round",
             "| phase | ms / round | total ms | share |", "|---|---|---|---|"]
    for p, t in total.items():
        lines.append(f"| {p} | {t * 1e3 / len(rounds):.3f} | {t * 1e3:.1f} | {t / round_time:.1%} |")
    return "\n".join(lines)


def nsys_rounds(path: Path) -> list[dict[str, float]]:
    """Phase times (seconds) per round from an nsys SQLite export's NVTX_EVENTS."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    columns = {row[1] for row in db.execute("PRAGMA table_info(NVTX_EVENTS)")}
    if not columns:
        raise SystemExit(f"{path}: no NVTX_EVENTS table (was the decode run under nsys with --trace=nvtx?)")
    text = "COALESCE(e.text, s.value)" if "textId" in columns else "e.text"
    join = "LEFT JOIN StringIds s ON s.id = e.textId" if "textId" in columns else ""
    events = db.execute(f"SELECT e.start, e.end, {text} FROM NVTX_EVENTS e {join} "
                        "WHERE e.end IS NOT NULL AND e.end > 0 ORDER BY e.start").fetchall()
    rounds = [(s, e) for s, e, name in events if name == "round"]
    out: list[dict[str, float]] = [{} for _ in rounds]
    i = 0
    for start, end, name in events:
        if not name or name == "round":
            continue
        key = name.split(":")[0]
        if key not in PHASES:
            continue
        while i < len(rounds) and rounds[i][1] < start:
            i += 1
        if i < len(rounds) and rounds[i][0] <= start and end <= rounds[i][1]:
            out[i][key] = out[i].get(key, 0.0) + (end - start) / 1e9
    return out


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_file():
        print("usage: python -m hybrid_sd.profiling.report FILE.sqlite (an nsys SQLite export)", file=sys.stderr)
        return 2
    print(phase_table(nsys_rounds(Path(args[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
