"""Latency benchmarks (pytest-benchmark): `python -m pytest benchmarks --benchmark-enable`
-- per-round pieces per bucket and end-to-end decoding.

Pieces: the target's verify of k+1 tokens, each drafter's k-token draft and catch-up over a
lag, on a 96-position context. End to end: 48 new tokens of one prompt per method (greedy,
output checked equal to plain decoding). Gate against the stored baseline with
`--benchmark-compare=0001 --benchmark-compare-fail=median:25%` (see README).

Configurations (benchmarks/conftest.py): the embedded default on the CPU (CI), or a
random-weight target at real size on a GPU (`--bench-target llama-3.1-8b --bench-device
cuda`): the pieces and the graph modes only, as end-to-end decoding needs real weights.
"""
from types import SimpleNamespace

import pytest
import torch

from hybrid_sd import factory
from hybrid_sd.config import EngineConfig
from hybrid_sd.engine import Engine
from hybrid_sd.graphs import TRACE_AFTER
from hybrid_sd.models.loading import encode_prompt
from hybrid_sd.router import AlternatingRouter

ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)
MAX_LEN = 1024


@pytest.fixture(scope="module")
def setup(request):
    """The target, its drafters by name and, for the embedded default, tokenizer and EOS ids."""
    torch.set_grad_enabled(False)
    name, device = request.config.getoption("--bench-target"), request.config.getoption("--bench-device")
    if name == "smollm2":
        target, tokenizer, eos = factory.load_packed_target(None, max_len=MAX_LEN)
        drafters = {d: factory.build_drafter(d, target, embedded=True) for d in ("ar", "block", "ngram")}
        return SimpleNamespace(name=name, target=target, tokenizer=tokenizer, eos=eos, drafters=drafters)
    from hybrid_sd.eval.synthetic import build
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        pytest.exit("--bench-device cuda but no CUDA device here", returncode=2)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    target, (ar, block, ngram) = build(name, device, dtype, MAX_LEN)
    return SimpleNamespace(name=name, target=target, tokenizer=None, eos=(), drafters=dict(ar=ar, block=block, ngram=ngram))


@pytest.fixture(scope="module")
def hybrid(setup):
    if setup.tokenizer is not None:
        return factory.build_hybrid(setup.target, setup.eos, EngineConfig(MAX_LEN), "entropy")
    return Engine(setup.target, (), list(setup.drafters.values()), router=AlternatingRouter(3),
                  config=EngineConfig(MAX_LEN, graphs="auto"))


@pytest.fixture(scope="module")
def probes(hybrid):
    return hybrid.latency_probes(96)


@pytest.mark.parametrize("k", [0, 3, 7])
def test_verify(benchmark, probes, k):
    verify, _ = probes
    benchmark.pedantic(verify, args=(k,), **ROUNDS)


@pytest.mark.parametrize("name, k", [("ar", 1), ("ar", 6), ("block", 7), ("ngram", 7)])
def test_draft(benchmark, probes, name, k):
    _, drafters = probes
    benchmark.pedantic(drafters[name][0], args=(k,), **ROUNDS)


@pytest.mark.parametrize("name, lag", [("ar", 1), ("ar", 16), ("block", 1), ("block", 16)])
def test_catch_up(benchmark, probes, name, lag):
    _, drafters = probes
    benchmark.pedantic(drafters[name][1], args=(lag,), **ROUNDS)


@pytest.mark.parametrize("method", ["plain", "ngram", "ar", "block", "hybrid"])
def test_decode(benchmark, setup, hybrid, method):
    if setup.tokenizer is None:
        pytest.skip("end-to-end decoding needs the embedded target's tokenizer and shipped drafters")
    target, tokenizer, eos = setup.target, setup.tokenizer, setup.eos
    ids = encode_prompt(tokenizer, "Return a JSON object with the keys name, age and city for Ana, 31, Lisbon.", chat=True)
    if method == "hybrid":
        engine = hybrid
    else:
        drafters = [] if method == "plain" else [setup.drafters[method]]  # each at its default k
        engine = Engine(target, eos, drafters, config=EngineConfig(MAX_LEN))
    expected = Engine(target, eos, config=EngineConfig(MAX_LEN)).generate(ids, 48).token_ids
    gen = benchmark.pedantic(engine.generate, args=(ids, 48), rounds=3, iterations=1, warmup_rounds=1)
    assert gen.token_ids == expected
    benchmark.extra_info.update(new_tokens=len(gen.token_ids), tokens_per_round=round(gen.mean_accepted, 3))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "graphs", "trace"])
@pytest.mark.parametrize("piece", ["verify", "ar", "block"])
def test_graphs_mode(benchmark, setup, piece, mode):
    """Last in the file: its engines re-point the shared drafters at their own modes and spans.
    Per --graphs mode, side by side: a 7-token verify (k=6), the AR drafter's 6 steps, the
    block drafter's 7-token block. `graphs` is cuda on a GPU and compile elsewhere (~1 min per
    shape on the CPU, paid once before timing); `trace` is the CPU's (traced before timing)."""
    if mode == "graphs":
        mode = "cuda" if setup.target.lm_head.weight.is_cuda else "compile"
    if mode == "trace" and setup.target.lm_head.weight.is_cuda:
        pytest.skip("--graphs trace is the CPU's capture")
    drafters = [] if piece == "verify" else [setup.drafters[piece]]
    config = EngineConfig(MAX_LEN, graphs=mode, kv_block=64, draft_k={piece: 6})  # same spans
    engine = Engine(setup.target, setup.eos, drafters, config=config)
    verify, drafters = engine.latency_probes(96)
    run, k = (verify, 6) if piece == "verify" else (drafters[piece][0], 6 if piece == "ar" else 7)
    for _ in range(TRACE_AFTER if mode == "trace" else 1):
        run(k)  # compiles, traces or warms up each step's shape once
    benchmark.pedantic(run, args=(k,), rounds=10, iterations=1, warmup_rounds=2)
