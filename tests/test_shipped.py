"""The drafters shipped for the embedded default load with no path and stay lossless."""
import pytest

from hybrid_sd import factory
from hybrid_sd.config import EngineConfig
from hybrid_sd.drafters import DRAFTERS
from hybrid_sd.engine import Engine
from hybrid_sd.models.loading import encode_prompt

PROMPTS = ["Write a Python function that returns the largest element of a list.",
           "What is 12 times 13? Explain.",
           'Return a JSON object with keys "city" and "country" for Paris.',
           "Give me three tips for learning a new language."]


@pytest.fixture(scope="module")
def smollm2():
    return factory.load_packed_target(None, max_len=1024)


@pytest.mark.parametrize("kind", ["ar", "block"])
def test_shipped_drafter_is_lossless_and_accepts(smollm2, kind):
    if DRAFTERS[kind].shipped_checkpoint() is None:
        pytest.fail(f"no shipped {kind} drafter in hybrid_sd/weights")
    target, tokenizer, eos = smollm2
    engine = factory.build_engine(target, eos, kind, EngineConfig(1024, draft_k={kind: 6}), embedded=True)
    plain = Engine(target, eos, config=EngineConfig(1024))
    committed = rounds = 0
    for text in PROMPTS:
        ids = encode_prompt(tokenizer, text)
        expected = plain.generate(ids, 40).token_ids
        gen = engine.generate(ids, 40)
        assert gen.token_ids == expected, f"{kind} drafter changed the output for {text!r}"
        committed += sum(r.committed for r in gen.rounds)
        rounds += len(gen.rounds)
    # a trained drafter, not a random one (those commit ~1.0 per round); the block drafter is
    # the weaker of the two outside structured text (docs/drafters.md)
    assert committed / rounds > {"ar": 1.3, "block": 1.1}[kind]


@pytest.mark.parametrize("router", ["entropy", "learned"])
def test_shipped_hybrid_is_lossless(smollm2, router):
    from hybrid_sd.weights import shipped_router

    if shipped_router() is None:
        pytest.fail("no shipped router in hybrid_sd/weights")
    target, tokenizer, eos = smollm2
    engine = factory.build_hybrid(target, eos, EngineConfig(1024), router)
    plain = Engine(target, eos, config=EngineConfig(1024))
    used = set()
    for text in PROMPTS:
        ids = encode_prompt(tokenizer, text)
        gen = engine.generate(ids, 40)
        assert gen.token_ids == plain.generate(ids, 40).token_ids, f"hybrid/{router} changed {text!r}"
        used |= {r.drafter for r in gen.rounds}
        stats = gen.routing_stats()
        assert abs(sum(stats["share"].values()) - 1) < 1e-3 and 0 <= stats["switching_overhead"] < 1
    assert used - {"none"}, "the router never drafted"
