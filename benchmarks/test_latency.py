"""Latency benchmarks on the embedded default target (pytest-benchmark):
`python -m pytest benchmarks` — per-round pieces per bucket and end-to-end decoding.

Pieces: the target's verify of k+1 tokens, each drafter's k-token draft and catch-up over a
lag, on a 96-position context. End to end: 48 new tokens of one prompt per method (greedy,
output checked equal to plain decoding). Gate against the stored baseline with
`--benchmark-compare=0001 --benchmark-compare-fail=median:25%` (see README).
"""
import pytest
import torch

from hybrid_sd.decode import build_hybrid, encode_prompt
from hybrid_sd.drafters import load_drafter
from hybrid_sd.engine import Engine
from hybrid_sd.models.loading import load_target
from hybrid_sd.models.packed_linear import pack_linears

ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def smollm2():
    torch.set_grad_enabled(False)
    model, tokenizer, eos = load_target(None, max_len=1024)
    return pack_linears(model), tokenizer, eos


@pytest.fixture(scope="module")
def hybrid(smollm2):
    target, _, eos = smollm2
    return build_hybrid(target, eos, "entropy", max_len=1024)


@pytest.fixture(scope="module")
def probes(hybrid):
    return hybrid.latency_probes(96)


@pytest.mark.parametrize("k", [0, 3, 7])
def test_verify(benchmark, probes, k):
    verify, _ = probes
    benchmark.pedantic(verify, args=(k,), **ROUNDS)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_verify_graphs_mode(benchmark, smollm2, mode):
    """A 7-token verify (k=6) per --graphs mode, side by side; compile pays ~1-2 min once."""
    target, _, eos = smollm2
    engine = Engine(target, eos, None, max_len=1024, graphs=mode, kv_block=64)  # same spans in both modes
    verify, _ = engine.latency_probes(96)
    verify(6)  # compiles (or warms up) the (7 tokens, 128-position span) step once
    benchmark.pedantic(verify, args=(6,), rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("name, k", [("ar", 1), ("ar", 6), ("block", 7), ("ngram", 7)])
def test_draft(benchmark, probes, name, k):
    _, drafters = probes
    benchmark.pedantic(drafters[name][0], args=(k,), **ROUNDS)


@pytest.mark.parametrize("name, lag", [("ar", 1), ("ar", 16), ("block", 1), ("block", 16)])
def test_catch_up(benchmark, probes, name, lag):
    _, drafters = probes
    benchmark.pedantic(drafters[name][1], args=(lag,), **ROUNDS)


@pytest.mark.parametrize("method", ["plain", "ngram", "ar", "block", "hybrid"])
def test_decode(benchmark, smollm2, hybrid, method):
    target, tokenizer, eos = smollm2
    ids = encode_prompt(tokenizer, "Return a JSON object with the keys name, age and city for Ana, 31, Lisbon.", chat=True)
    if method == "hybrid":
        engine = hybrid
    else:
        drafter = load_drafter("none" if method == "plain" else method, None, target, embedded_default=True)
        engine = Engine(target, eos, drafter, k={"ngram": 8, "ar": 6, "block": 7}.get(method, 1), max_len=1024)
    expected = Engine(target, eos, None, max_len=1024).generate(ids, 48).token_ids
    gen = benchmark.pedantic(engine.generate, args=(ids, 48), rounds=3, iterations=1, warmup_rounds=1)
    assert gen.token_ids == expected
    benchmark.extra_info.update(new_tokens=len(gen.token_ids), tokens_per_round=round(gen.mean_accepted, 3))
