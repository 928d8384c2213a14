"""Phase tables from the engine's own round records and from an Nsight Systems SQLite export."""
import sqlite3

from helpers import engine, random_prompts
from hybrid_sd.drafters import NgramDrafter
from hybrid_sd.profiling import PHASES, phase_table
from hybrid_sd.profiling.report import main as report_main
from hybrid_sd.profiling.report import nsys_rounds


def test_engine_rounds_time_every_phase(target):
    gen = engine(target, (), NgramDrafter(), k=4).generate(random_prompts(1, seed=3)[0] * 3, 24)
    assert all({"catchup", "draft", "verify", "accept", "commit"} <= set(r.times) for r in gen.rounds)
    table = phase_table([r.times for r in gen.rounds])
    assert f"{len(gen.rounds)} rounds" in table and "| verify |" in table


def write_export(path, rounds):
    """An nsys-style export: NVTX ranges with names in StringIds, nanosecond timestamps."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("CREATE TABLE NVTX_EVENTS (start INT NOT NULL, end INT, eventType INT NOT NULL, text TEXT, textId INT)")
    names = {}

    def add(name, start, end):
        if name not in names:
            names[name] = len(names) + 1
            db.execute("INSERT INTO StringIds VALUES (?, ?)", (names[name], name))
        db.execute("INSERT INTO NVTX_EVENTS VALUES (?, ?, 59, NULL, ?)", (start, end, names[name]))

    t = 1_000_000
    add("generate", t, t + 10**9)
    for phases in rounds:
        start = t
        for name, ms in phases:
            add(name, t, t + int(ms * 1e6))
            t += int(ms * 1e6)
        add("round", start, t)
        t += 5_000  # host work between rounds, outside any round
    db.commit()
    db.close()


def test_nsys_export_gives_the_same_table(tmp_path, capsys):
    path = tmp_path / "report.sqlite"
    write_export(path, [[("route", 0.1), ("catchup:ar", 0.5), ("draft:ar", 2.0), ("verify", 10.0), ("accept", 0.2),
                         ("commit", 0.1)],
                        [("route", 0.1), ("catchup:block", 1.5), ("draft:block", 3.0), ("verify", 11.0),
                         ("accept", 0.2), ("commit", 0.1)]])
    rounds = nsys_rounds(path)
    assert len(rounds) == 2 and set(rounds[0]) == set(PHASES)
    assert abs(rounds[1]["catchup"] - 1.5e-3) < 1e-9 and abs(rounds[0]["draft"] - 2.0e-3) < 1e-9
    assert report_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 rounds" in out and "| catchup | 1.000 |" in out


def test_report_without_a_file_is_a_usage_error(tmp_path):
    assert report_main([str(tmp_path / "missing.sqlite")]) == 2


def test_stored_benchmark_baseline_covers_the_latency_suite():
    """README's gate compares against benchmarks/baseline: it must hold every default benchmark."""
    import json
    from pathlib import Path
    files = sorted((Path(__file__).parent.parent / "benchmarks" / "baseline").glob("*/0001_*.json"))
    assert files, "no stored baseline"
    stored = {b["name"]: b["stats"]["median"] for b in json.loads(files[0].read_text())["benchmarks"]}
    expected = ([f"test_verify[{k}]" for k in (0, 3, 7)] + ["test_draft[ar-1]", "test_draft[ar-6]", "test_draft[block-7]",
                "test_draft[ngram-7]"] + [f"test_catch_up[{d}-{n}]" for d in ("ar", "block") for n in (1, 16)]
                + [f"test_decode[{m}]" for m in ("plain", "ngram", "ar", "block", "hybrid")])
    assert sorted(stored) == sorted(expected)
    assert all(v > 0 for v in stored.values())


def test_latency_suite_runs_in_its_synthetic_configuration(tmp_path):
    """The GPU configuration of the benchmarks (a random-weight target, scripts/gpu-check),
    at tiny size on the CPU: every piece runs and is timed; end-to-end decoding skips."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).parent.parent
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-p", "no:cacheprovider", "-o", "addopts=",
                          "-m", "not gpu and not slow", "--benchmark-enable",
                          "--bench-target", "tiny-qwen3", "--bench-device", "cpu", f"--benchmark-json={out}", "-q"],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    names = {b["name"] for b in json.loads(out.read_text())["benchmarks"]}
    assert {"test_verify[7]", "test_draft[ar-6]", "test_draft[block-7]", "test_catch_up[block-16]"} <= names
    assert not any(n.startswith("test_decode") for n in names) and "5 skipped" in run.stdout


def test_op_categories():
    from hybrid_sd.profiling.ops import category
    assert category("mkldnn::_linear_pointwise") == category("aten::bmm") == "matmuls (linears)"
    assert category("hybrid_sd::rows_times_panels") == category("hybrid_sd::row_times_slabs") == "matmuls (linears)"
    assert category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert category("aten::index_copy_") == "cache writes"
    assert category("aten::rsqrt") == category("aten::silu") == "norms, RoPE, activations"
    assert category("aten::t") == category("aten::as_strided") == "views and allocations"
    assert category("aten::something_new") == "other ops"


def test_step_profile_prints_the_breakdown(tmp_path, capsys):
    """`python -m hybrid_sd.eval.step_profile` on a tiny checkpoint: one column per (tokens,
    threads), every category a row, the categories summing to the profiled step."""
    from helpers import save_hf_checkpoint, tiny_config
    from hybrid_sd.eval import step_profile
    from hybrid_sd.profiling.ops import DISPATCH, op_breakdown

    path = save_hf_checkpoint(tmp_path / "tiny", tiny_config("llama"))
    assert step_profile.main(["--target", str(path), "--threads", "1", "--tokens", "1,3", "--context", "16",
                              "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "1-token step, 1 thread" in out and "3-token step, 1 thread" in out
    assert "| matmuls (linears) |" in out and f"| {DISPATCH} |" in out
    result = op_breakdown(lambda: __import__("torch").ones(64).sum(), repeats=3)
    assert abs(sum(result["categories"].values()) - result["profiled_ms"]) < 1e-6 + 0.01 * result["profiled_ms"]
    assert step_profile.main(["--target", str(path), "--context", "100000"]) == 2
