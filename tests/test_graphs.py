"""The bucketed step runner: one object whatever the device, and every mode gives the eager
result (CUDA graphs on a GPU, torch.compile in the slow suite, eager here)."""
import pytest
import torch

from helpers import context_for, engine, make_drafter, plain_greedy, random_prompts, tiny_target
from hybrid_sd.drafters import NgramDrafter
from hybrid_sd.errors import UserError
from hybrid_sd.graphs import bucketed
from hybrid_sd.graphs import GRAPH_KV_BLOCK, KV_BLOCK, BucketedGraphs, kv_bucket, kv_buckets, resolve_mode
from hybrid_sd.router import AlternatingRouter


def test_kv_buckets_cover_every_span():
    for max_len in (64, 100, 2048):
        for block in (KV_BLOCK, GRAPH_KV_BLOCK):
            spans = kv_buckets(max_len, block)
            assert {kv_bucket(n, max_len, block) for n in range(1, max_len + 1)} == set(spans)


def test_mode_resolution():
    assert resolve_mode("auto", "cpu") == "eager"
    assert resolve_mode("compile", "cpu") == "compile"
    assert resolve_mode("trace", "cpu") == "trace"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_mode("cuda", "cpu")
    with pytest.raises(ValueError, match="CPU"):
        resolve_mode("trace", "meta")
    with pytest.raises(ValueError, match="auto, cuda, compile, trace, eager"):
        resolve_mode("fast", "cpu")


def test_eager_runs_the_step_with_its_key():
    keys = []
    graphs = BucketedGraphs(lambda key, x: keys.append(key) or x * key[0], "eager", "cpu")
    assert torch.equal(graphs((3,), torch.ones(2)), torch.full((2,), 3.0)) and keys == [(3,)]
    report = graphs.warm_up({(1,): (torch.ones(2),), (2,): (torch.ones(2),)})
    assert report["keys"] == 2 and report["mode"] == "eager" and keys == [(3,), (1,), (2,)]


def test_trace_runs_eager_until_a_key_recurs_then_its_trace(monkeypatch):
    monkeypatch.setattr(bucketed, "TRACE_AFTER", 2)
    buf, calls = torch.zeros(4), []

    def step(key, x):
        calls.append(key)
        buf[key[0]] = x.sum()  # a write into a tensor the step closes over, like a KV cache
        return x * key[0], None

    graphs = BucketedGraphs(step, "trace", "cpu", writes=lambda: [buf])
    y, nothing = graphs((2,), torch.ones(3))
    assert nothing is None and not graphs.traces and torch.equal(y, torch.full((3,), 2.0))
    graphs((2,), torch.ones(3))  # the second call of the key records it
    assert list(graphs.traces) == [(2,)]
    before = len(calls)
    y, nothing = graphs((2,), torch.full((3,), 5.0))
    assert len(calls) == before, "the trace runs without the Python step"
    assert torch.equal(y, torch.full((3,), 10.0)) and nothing is None and buf[2] == 15.0
    graphs.forget()
    assert not graphs.traces and not graphs.calls


def test_engine_rejects_cuda_graphs_without_cuda(target):
    with pytest.raises(UserError, match="CUDA"):
        engine(target, graphs="cuda")


def switching_engine(target, tmp_path, ar_kernel: bool = True, **config):
    """AR, block and n-gram drafters switched every round. `ar_kernel=False`: the AR drafter's greedy
    drafts run its step graphs (as on a GPU, or sampling) instead of its CPU kernel's chain."""
    ar = make_drafter("ar", target, tmp_path)
    if not ar_kernel:
        ar.chain = None
    drafters = [ar, make_drafter("block", target, tmp_path), NgramDrafter(max_n=3, device=target.lm_head.weight.device)]
    return engine(target, (), drafters, router=AlternatingRouter(3), **{"max_len": 256, **config})


def record_keys(graphs, into: list):
    step = graphs.step
    graphs.step = lambda key, *x: into.append(key) or step(key, *x)


def test_warm_up_visits_every_bucket_and_leaves_no_trace(target, tmp_path):
    decoder = switching_engine(target, tmp_path, kv_block=128)
    decoder.reset_drafters()  # points the drafters at this engine's graphs
    warmed = {}  # keys per step: those of the warm-up, then those generations meet
    for name, graphs in [("verify", decoder.verify_graphs)] + [(d.name, d.step_graphs) for d in decoder.drafters[:2]]:
        record_keys(graphs, warmed.setdefault(name, []))
    reports = decoder.warm_up()
    assert [r["name"] for r in reports] == ["verify", "draft:ar", "catchup:ar", "draft:block", "catchup:block"]
    # verify of 1..8 tokens, per span unless the kernel runs them (one key for every span)
    assert reports[0]["keys"] == 8 * (1 if target.span_free(8) else len(kv_buckets(256, 128)))
    assert reports[1]["keys"] == len(warmed["ar"]) and reports[3]["keys"] == len(warmed["block"])
    prompts = random_prompts(6, seed=11) + [random_prompts(2, seed=12, lo=240, hi=240)[1]]  # the last runs to the end
    keys_before = {name: len(keys) for name, keys in warmed.items()}
    for prompt in prompts:
        assert decoder.generate(prompt, 20).token_ids == plain_greedy(target, (), prompt, 20, max_len=256)
    for name, keys in warmed.items():  # every key a generation met was warmed: no capture mid-generation
        assert set(keys[keys_before[name]:]) <= set(keys[:keys_before[name]]), name


@pytest.mark.parametrize("kind", ["ar", "block"])
def test_padded_catch_up_writes_the_same_cache(target, tmp_path, kind):
    """Graph modes pad each catch-up chunk to its bucket by repeating the last row (and cut
    lags over the largest bucket into chunks): the drafter's cache must come out the same."""
    drafter = make_drafter(kind, target, tmp_path)
    if kind == "ar":
        drafter.chain = None  # the graphs' catch-up (with its kernel, a catch-up is one call, never padded)
    ids = torch.randint(3, target.config.vocab_size, (150,), generator=torch.Generator().manual_seed(14)).tolist()
    ctx = context_for(target, ids, drafter.feature_layers, max_len=256)
    caches = []
    for pad in (False, True):
        drafter.use_graphs("eager", KV_BLOCK, "cpu", pad=pad)
        drafter.reset(256)
        drafter.catch_up(ctx, 37)   # one chunk, padded 37 -> 64
        drafter.catch_up(ctx, 140)  # 103 rows: 64 + 39 (padded to 64)
        assert drafter.frontier == 140
        caches.append((torch.stack(drafter.cache.k)[..., :140, :], torch.stack(drafter.cache.v)[..., :140, :]))
    torch.testing.assert_close(caches[0], caches[1], rtol=1e-5, atol=1e-6)


def test_padded_catch_up_stays_lossless_under_switching(target, tmp_path):
    decoder = switching_engine(target, tmp_path, pad=True)
    for prompt in random_prompts(10, seed=15):
        assert decoder.generate(prompt, 24).token_ids == plain_greedy(target, (), prompt, 24, max_len=256)


@pytest.mark.slow
def test_compiled_steps_equal_eager(target, tmp_path):
    """torch.compile of every step (~minutes on the CPU: one compilation per shape)."""
    decoder = switching_engine(target, tmp_path, ar_kernel=False, graphs="compile", kv_block=256)
    for prompt in random_prompts(3, seed=12):
        assert decoder.generate(prompt, 16).token_ids == plain_greedy(target, (), prompt, 16, max_len=256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cuda_graph_replay_equals_eager(family, tmp_path):
    model, _ = tiny_target(tmp_path, family, pack=False)
    model = model.to("cuda")
    graphed = switching_engine(model, tmp_path, graphs="cuda")
    # the same spans and padded shapes: a matmul of another shape may round differently
    eager = switching_engine(model, tmp_path, graphs="eager", kv_block=graphed.kv_block, pad=True)
    reports = graphed.warm_up()
    assert all(r["mode"] == "cuda" and r["keys"] > 0 for r in reports)
    for prompt in random_prompts(12, seed=13):
        assert graphed.generate(prompt, 24).token_ids == eager.generate(prompt, 24).token_ids


def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    """scripts/gpu-check's own logic, at tiny size on the CPU (eager against eager), so that
    a lent GPU machine gets a script that runs."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parent.parent / "scripts" / "gpu_check.py"
    run = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--device", "cpu", "--graphs", "eager",
                          "--max-len", "128", "--new-tokens", "8", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    setups = result["results"][0]["setups"]
    assert set(setups) == {"plain", "ar@6", "block@15", "switching"}
    assert all(s["graphs_equal_eager"] and s["ms_per_round"]["graphs"] > 0 for s in setups.values())
    assert setups["switching"]["switching_overhead"] > 0
    assert "| tiny-qwen3 | switching | True |" in (tmp_path / "gpu-check.md").read_text()


def test_padded_prefill_writes_the_same_cache_features_and_logits(target, tmp_path):
    """Graph modes cut a prompt into chunks of at most the largest prefill bucket and pad each
    to its bucket by repeating its last token: cache, features and logits must come out the same."""
    drafter = make_drafter("ar", target, tmp_path)
    engines = {pad: engine(target, (), drafter, max_len=512, pad=pad) for pad in (False, True)}
    out = {}
    for P in (5, 37, 300):  # one short chunk; one padded 37 -> 64; 256 + 44 (padded to 64)
        prompt = torch.randint(3, target.config.vocab_size, (P,), generator=torch.Generator().manual_seed(P))
        for pad, decoder in engines.items():
            decoder.tokens[:P] = prompt
            for buffer in decoder.cache.k + decoder.cache.v + [decoder.features]:
                buffer.zero_()
            logits = decoder.prefill(P)
            out[pad] = (logits, torch.stack(decoder.cache.k)[..., :P, :], torch.stack(decoder.cache.v)[..., :P, :],
                        decoder.features[:P].clone())
            assert not decoder.features[P:].any()  # nothing written past the prompt
        # equal up to float rounding: chunks change the matmul shapes
        torch.testing.assert_close(out[False], out[True], rtol=1e-4, atol=1e-4)


def test_padded_prefill_warms_every_bucket_and_stays_lossless(target, tmp_path):
    decoder = switching_engine(target, tmp_path, kv_block=64, pad=True)
    warmed, step = [], decoder.prefill_graphs.step
    decoder.prefill_graphs.step = lambda key, *x: warmed.append(key) or step(key, *x)
    reports = decoder.warm_up()
    assert next(r for r in reports if r["name"] == "prefill")["keys"] == len(warmed)
    # exactly the keys prompts can meet: none captured mid-generation, none captured in vain
    assert set(warmed) == {key for P in range(1, 256) for *_, key in decoder.prefill_chunks(P)}
    for prompt in random_prompts(8, seed=16, hi=70):
        assert decoder.generate(prompt, 20).token_ids == plain_greedy(target, (), prompt, 20, max_len=256)


@pytest.mark.parametrize("ar_kernel", [False, True])
def test_traced_steps_equal_eager(target, tmp_path, monkeypatch, ar_kernel):
    """--graphs trace: the verify and every drafter's draft and catch-up steps, traced once a
    key recurs, under forced switching; the traces write the caches the eager steps would. With
    its kernel, the AR drafter's greedy drafts are one kernel call in every mode: not traced."""
    monkeypatch.setattr(bucketed, "TRACE_AFTER", 2)
    decoder = switching_engine(target, tmp_path, ar_kernel=ar_kernel, graphs="trace")
    assert decoder.graphs_mode == "trace" and decoder.kv_block == GRAPH_KV_BLOCK and not decoder.pads_trees
    for prompt in random_prompts(4, seed=16):
        assert decoder.generate(prompt, 16).token_ids == plain_greedy(target, (), prompt, 16, max_len=256)
    assert decoder.verify_graphs.traces
    for drafter in decoder.drafters[:2]:
        assert (drafter.step_graphs.traces and drafter.catchup_graphs.traces) or drafter.in_kernel(), drafter.name
    assert decoder.drafters[0].in_kernel() == (ar_kernel and target.fused_layers is not None)
