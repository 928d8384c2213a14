"""Compiled and traced steps keep the CPU kernel, and `--graphs auto` uses compiled steps only
where a precompile measured them faster (hybrid_sd/compiled.py, hybrid_sd/precompile.py)."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import engine, plain_greedy, random_prompts, save_hf_checkpoint, tiny_config, tiny_target
from hybrid_sd import compiled
from hybrid_sd.graphs import bucketed
from hybrid_sd.kernels import cpu_rows
from hybrid_sd.models import fused
from hybrid_sd.models.packed_linear import cpu_kernels_ready
from hybrid_sd.router.cost import LatencyTable

needs_kernel = pytest.mark.skipif(not cpu_kernels_ready(),
                                  reason=f"the CPU kernel library cannot run here: {cpu_rows.why_not()}")


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_SD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def flags(**overrides):
    values = {name: None for name in compiled.SETUP_FLAGS}
    values.update(drafter="hybrid", tree="off", device="cpu", dtype="float32", max_context=4096)
    values.update(overrides)
    return argparse.Namespace(**values)


@needs_kernel
def test_a_traced_verify_runs_the_kernel_and_equals_eager(tmp_path, monkeypatch):
    """The kernel is one op a trace holds (before, graph modes fell back to the modules)."""
    monkeypatch.setattr(bucketed, "TRACE_AFTER", 1)
    target, _ = tiny_target(tmp_path, "qwen3", seed=5)
    calls = []
    run = fused.FusedLayers.run
    monkeypatch.setattr(fused.FusedLayers, "run", lambda self, *a, **kw: calls.append(1) or run(self, *a, **kw))
    traced = engine(target, graphs="trace")
    for prompt in random_prompts(4, seed=21):
        assert traced.generate(prompt, 12).token_ids == plain_greedy(target, (), prompt, 12, max_len=256)
    assert traced.verify_graphs.traces, "the verify was traced"
    assert calls, "the traced verify ran the kernel"


@needs_kernel
def test_fused_verifies_are_one_key_per_row_count(tmp_path):
    """The kernel reads the cache by position: the span leaves a fused verify's graph key, so a
    compile or a capture covers every context with one key per draft length."""
    target, _ = tiny_target(tmp_path, "llama", seed=6)
    assert target.span_free(1) and target.span_free(fused.MAX_ROWS) and not target.span_free(fused.MAX_ROWS + 1)
    spans = engine(target, graphs="eager", kv_block=64, max_len=256).warm_up_plan()[0][1]
    assert sorted(spans) == [(1, 256)]
    unpacked, _ = tiny_target(tmp_path / "plain", "llama", seed=6, pack=False)
    assert not unpacked.span_free(1)
    spans = engine(unpacked, graphs="eager", kv_block=64, max_len=256).warm_up_plan()[0][1]
    assert sorted(spans) == [(1, 64), (1, 128), (1, 192), (1, 256)]


def test_auto_on_the_cpu_follows_the_record(cache_home, capsys):
    args = flags()
    assert compiled.choose_graphs("auto", torch.device("cpu"), args) == "eager"
    assert "hybrid_sd.precompile" in capsys.readouterr().err
    assert compiled.choose_graphs("auto", torch.device("cpu"), args) == "eager"
    assert capsys.readouterr().err == "", "the note is said once per machine"
    inductor = cache_home / "inductor"
    inductor.mkdir(parents=True)
    compiled.write_record(args, {"pays": True, "cache": str(inductor), "compiled_over_eager": {"mean": 0.9}})
    assert compiled.choose_graphs("auto", torch.device("cpu"), args) == "compile"
    assert "compiled steps" in capsys.readouterr().err, "choosing compiled steps is said"
    assert compiled.choose_graphs("auto", torch.device("cpu"), args, greedy=False) == "eager", \
        "sampling: its steps were never precompiled"
    assert compiled.choose_graphs("auto", torch.device("cpu"), flags(max_context=2048)) == "eager", \
        "another setup has no record"
    assert compiled.choose_graphs("auto", torch.device("cpu"), flags(target="./x")) == \
        compiled.choose_graphs("auto", torch.device("cpu"), flags(target="x")), "a directory is one however named"
    inductor.rmdir()
    assert compiled.choose_graphs("auto", torch.device("cpu"), args) == "eager", "its compile cache is gone"
    compiled.write_record(args, {"pays": False})
    assert compiled.choose_graphs("auto", torch.device("cpu"), args) == "eager"
    assert compiled.choose_graphs("trace", torch.device("cpu"), args) == "trace"
    assert compiled.choose_graphs("auto", torch.device("meta"), args) == "auto", "not the CPU: graphs decides"
    compiled.record_path(args).write_text("{not json")
    assert compiled.choose_graphs("auto", torch.device("cpu"), args) == "eager"


def test_every_engine_flag_is_in_the_record_key_or_said_not_to_shape_the_steps():
    from hybrid_sd.cli import Parser
    from hybrid_sd.decode import add_engine_arguments
    parser = Parser()
    add_engine_arguments(parser)
    assert set(vars(parser.parse_args([]))) == set(compiled.SETUP_FLAGS) | set(compiled.NOT_SETUP_FLAGS)


def test_an_unwritable_compile_cache_leaves_inductors_default_and_says_so(tmp_path, monkeypatch, capsys):
    from hybrid_sd.graphs import compile_cache
    monkeypatch.setenv(compile_cache.CACHE_VARIABLE, "")  # restored after the test
    (tmp_path / "file").write_text("")
    assert compile_cache.use_compile_cache(tmp_path / "file" / "inductor") is None
    assert "cannot be written" in capsys.readouterr().err
    assert compile_cache.use_compile_cache(tmp_path / "file" / "inductor") is None
    assert capsys.readouterr().err == "", "said once"
    assert compile_cache.use_compile_cache(tmp_path / "ok") == tmp_path / "ok"
    assert compile_cache.use_compile_cache(tmp_path / "other") == tmp_path / "ok", "a place set already stays"


def test_a_record_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    from hybrid_sd.errors import UserError
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HYBRID_SD_CACHE", str(tmp_path / "file"))
    with pytest.raises(UserError, match="HYBRID_SD_CACHE"):
        compiled.write_record(flags(), {"pays": False})


@needs_kernel
def test_graph_ops_name_their_model_by_a_count(tmp_path):
    """A compiled graph holds the handle as a constant: it must be the same in every process (a
    count, not an address) and never name a later model; a graph that outlived its model says so."""
    first, _ = tiny_target(tmp_path, "llama", seed=7)
    second, _ = tiny_target(tmp_path / "b", "llama", seed=8)
    a, b = first.fused_layers.handle, second.fused_layers.handle
    assert b == a + 1
    del first
    import gc
    gc.collect()
    x = torch.zeros(1, 64)
    with pytest.raises(RuntimeError, match="no live model"):
        fused.decoder_layers_op(a, x, torch.zeros(1, 16), torch.zeros(1, 16), torch.zeros(1, dtype=torch.long),
                                torch.zeros(1, dtype=torch.long), None, second.new_cache(8).tensors(), [])


def test_the_record_key_follows_setup_threads_and_code(cache_home, monkeypatch):
    base = compiled.setup_key(flags())
    assert compiled.setup_key(flags()) == base
    assert compiled.setup_key(flags(drafter="ar")) != base
    assert compiled.setup_key(flags(max_context=2048)) != base
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert compiled.setup_key(flags()) != base
    monkeypatch.undo()
    monkeypatch.setattr(compiled, "source_digest", lambda: "other code")
    assert compiled.setup_key(flags()) != base


def test_round_ratio_covers_each_piece_with_device_steps():
    eager = LatencyTable({0: 1.0, 1: 2.0, 2: 2.0}, {"ar": {1: 1.0, 2: 1.0}, "ngram": {1: 0.1, 2: 0.1}},
                         {"ar": {4: 1.0}})
    fast = LatencyTable({0: 0.5, 1: 1.0, 2: 9.0}, {"ar": {1: 0.5, 2: 9.0}, "ngram": {1: 9.0, 2: 9.0}},
                        {"ar": {4: 0.5}})
    ratios = compiled.round_ratio(eager, fast, k_max=1)
    assert set(ratios) == {"mean", "verify 1", "verify 2", "draft ar 1", "catch-up ar 4"}  # no ngram: no device step
    assert ratios["mean"] == pytest.approx(0.5)


@pytest.mark.slow
def test_precompile_writes_a_record_that_auto_reads(tmp_path, monkeypatch):
    """End to end on a tiny target: compile every key, time both modes, write the record; the
    same flags' `--graphs auto` picks what it says (~1 min: every key compiles)."""
    config = tiny_config("llama")
    path = save_hf_checkpoint(tmp_path / "target", config)
    env = {**os.environ, "HYBRID_SD_CACHE": str(tmp_path / "cache")}
    common = ["--target", str(path), "--drafter", "none", "--max-context", "128", "--threads", "1"]
    done = subprocess.run([sys.executable, "-m", "hybrid_sd.precompile", *common, "--passes", "1", "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)
    assert record["keys"] == 1 and isinstance(record["pays"], bool) and record["compiled_over_eager"]["verify 1"] > 0
    assert "compiling steps" in done.stderr and "--graphs auto runs" in done.stderr
    from hybrid_sd import precompile
    args = precompile.build_parser().parse_args(common)
    monkeypatch.setenv("HYBRID_SD_CACHE", env["HYBRID_SD_CACHE"])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the record is per thread count
    assert compiled.choose_graphs("auto", torch.device("cpu"), args) == ("compile" if record["pays"] else "eager")
    assert compiled.read_record(args) is not None
    monkeypatch.setenv("HYBRID_SD_CACHE", str(tmp_path / "elsewhere"))
    assert compiled.read_record(args) is None, "another cache holds no record"

    # a second process compiles nothing again: inductor's cache serves the verify's graph
    script = ("import torch; from torch._dynamo.utils import counters; from hybrid_sd.factory import load_packed_target; "
              "from hybrid_sd.config import EngineConfig; from hybrid_sd.engine import Engine; "
              f"t, _, e = load_packed_target({str(path)!r}, load_tokenizer=False); torch.set_num_threads(1); "
              "g = Engine(t, e, [], config=EngineConfig(max_len=128, graphs='compile')); "
              "g.generate([5, 6, 7], 3); print('hits', counters['inductor']['fxgraph_cache_hit'])")
    hits = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        hits.append(int(done.stdout.split("hits")[-1]))
    assert hits[1] > 0, f"the second process's compiles hit the persistent cache: {hits}"


def test_precompile_refuses_other_graph_modes(capsys):
    from hybrid_sd import precompile
    assert precompile.main(["--graphs", "eager"]) == 2
    assert "precompile builds compiled steps" in capsys.readouterr().err
