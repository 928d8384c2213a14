"""The lookup drafter's datastore: its index agrees with a brute-force search, its files are
checked on load, and drafting from it stays lossless."""
import random

import numpy as np
import pytest

from hybrid_sd.drafters.datastore import MAX_N, MIN_AGREEMENT, Datastore
from hybrid_sd.drafters.ngram import NgramDrafter


def brute_longest(answers, ids):
    """(n, hits): the longest suffix of ids (<= MAX_N tokens) found inside one answer, and the
    (answer, end) of each occurrence."""
    for n in range(min(MAX_N, len(ids)), 0, -1):
        suffix = ids[-n:]
        hits = [(a, i + n) for a, ans in enumerate(answers) for i in range(len(ans) - n + 1) if ans[i:i + n] == suffix]
        if hits:
            return n, hits
    return 0, []


def test_match_and_continuation_agree_with_brute_force():
    rng = random.Random(0)
    answers = [[rng.randrange(6) for _ in range(rng.randrange(5, 40))] for _ in range(30)]
    store = Datastore.from_answers(answers, vocab_size=6)
    for _ in range(300):
        ids = [rng.randrange(7) for _ in range(rng.randrange(1, 12))]  # 6: never in the store
        lo, hi, n = store.match(ids)
        want_n, hits = brute_longest(answers, ids)
        assert n == want_n
        if n:
            assert hi - lo == len(hits)
        tokens, m, shares = store.continuation(ids, 5)
        assert m == want_n and len(shares) == len(tokens)
        if not n:
            assert tokens == []
            continue
        alive = hits  # occurrences that agree with the draft so far
        for j in range(5):  # each drafted token is the most frequent follower among them ...
            followers = [answers[a][end + j] for a, end in alive if end + j < len(answers[a])]
            best = max((followers.count(t) for t in set(followers)), default=0)
            if j == len(tokens):  # ... and the draft stops where too few of the voters would agree
                assert best < MIN_AGREEMENT * len(hits)
                break
            assert followers.count(tokens[j]) == best >= MIN_AGREEMENT * len(hits)
            assert shares[j] == pytest.approx(best / len(hits))  # the share that follows the draft this far
            alive = [(a, end) for a, end in alive if end + j < len(answers[a]) and answers[a][end + j] == tokens[j]]


def test_save_load_round_trip_and_clear_errors(tmp_path):
    store = Datastore.from_answers([[1, 2, 3, 4], [2, 3, 5]], vocab_size=10)
    store.save(tmp_path)
    back = Datastore.load(tmp_path, 10)
    assert np.array_equal(back.tokens, store.tokens)
    assert back.continuation([2, 3], 2) == store.continuation([2, 3], 2)
    with pytest.raises(ValueError, match="vocabulary of 10 tokens, the target has 11"):
        Datastore.load(tmp_path, 11)
    (tmp_path / "datastore.safetensors").write_bytes(b"cut")
    with pytest.raises(ValueError, match="damaged"):
        Datastore.load(tmp_path, 10)
    with pytest.raises(ValueError, match="has no datastore.json"):
        Datastore.load(tmp_path / "missing", 10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Datastore.from_answers([[1, 12]], vocab_size=10)


def test_lookup_prefers_the_store_only_when_its_match_is_longer():
    store = Datastore.from_answers([[7, 8, 9, 1, 2, 3]], vocab_size=10)
    drafter = NgramDrafter(datastore=store)
    # the context repeats "5 6" (a 2-gram match); the store matches "7 8 9" (3 tokens): 3 > 2 + 1 fails
    assert drafter.scan([5, 6, 4, 7, 8, 9, 5, 6], 3) == ([4, 7, 8], 2)
    assert drafter.lookup([5, 6, 4, 7, 8, 9, 5, 6], 3) == [4, 7, 8]
    drafter.reset(0)
    assert drafter.lookup([4, 4, 7, 8, 9], 3) == [1, 2, 3]  # context: "9" unseen; store: 3 tokens
    drafter.reset(0)
    assert NgramDrafter().lookup([4, 4, 7, 8, 9], 3) == []


def test_a_lookup_chain_carries_its_path_scores():
    """The store's share of voters that follow the draft so far; the context's own match decays
    by CONTEXT_DECAY a token (what a merge's cut calibrates)."""
    from hybrid_sd.drafters.ngram import CONTEXT_DECAY
    store = Datastore.from_answers([[7, 8, 9, 1, 2, 3], [7, 8, 9, 1, 2, 3], [7, 8, 9, 1, 5, 6]], vocab_size=10)
    drafter = NgramDrafter(datastore=store)
    tokens, scores = drafter.scored_lookup([4, 4, 7, 8, 9], 3)
    assert tokens == [1, 2, 3] and scores == pytest.approx([1.0, 2 / 3, 2 / 3])
    drafter.reset(0)
    assert drafter.scored_lookup([5, 6, 4, 7, 5, 6], 3) == ([4, 7, 5], [1.0, CONTEXT_DECAY, CONTEXT_DECAY ** 2])


def test_greedy_output_with_the_shipped_datastore_equals_plain_decoding():
    """The lookup drafter with the shipped store, without it, and the hybrid over it, on five prompts."""
    import torch

    from hybrid_sd import factory
    from hybrid_sd.config import DraftOptions, EngineConfig
    from hybrid_sd.models.loading import encode_chat

    target, tokenizer, eos = factory.load_packed_target(None, max_len=512)
    plain = factory.build_engine(target, eos, factory.PLAIN, EngineConfig(512))
    lookup = factory.build_engine(target, eos, "ngram", EngineConfig(512), embedded=True)
    assert lookup.drafters[0].datastore is not None
    bare = factory.build_engine(target, eos, "ngram", EngineConfig(512), options=DraftOptions(datastore="none"),
                                embedded=True)
    assert bare.drafters[0].datastore is None
    hybrid = factory.build_hybrid(target, eos, EngineConfig(512))  # the shipped store under auto
    assert next(d for d in hybrid.drafters if d.name == "ngram").datastore is not None
    prompts = ["What is 17 * 23? Show your steps.", "Write a Python function that reverses a list.",
               "Give me a JSON object with keys name and age for a person called Ana, 31.",
               "Explain what a hash map is in two sentences.", "Solve 3x + 5 = 20 for x."]
    used = 0
    with torch.inference_mode():
        for text in prompts:
            ids = encode_chat(tokenizer, [{"role": "user", "content": text}])
            want = plain.generate(ids, 40).token_ids
            gen = lookup.generate(ids, 40)
            assert gen.token_ids == want, text
            assert bare.generate(ids, 40).token_ids == want, text
            assert hybrid.generate(ids, 40).token_ids == want, text
            used += len(gen.rounds) - len(bare.generate(ids, 40).rounds)
    assert used < 0  # the store's drafts were taken and accepted: fewer rounds than prompt lookup alone


def test_prefixes_are_the_most_followed_continuations_of_the_voters():
    """Every prefix's share is the fraction of the matched occurrences that go on with it, the
    `limit` most followed come back, and a kept prefix's parent is always kept."""
    rng = random.Random(1)
    answers = [[rng.randrange(4) for _ in range(rng.randrange(4, 30))] for _ in range(40)]
    store = Datastore.from_answers(answers, vocab_size=4)
    for _ in range(200):
        ids = [rng.randrange(4) for _ in range(rng.randrange(1, 9))]
        n, hits = brute_longest(answers, ids)
        got = store.prefixes(ids, depth=3, limit=6)
        if not n:
            assert got == {}
            continue
        counts = {}
        for a, end in hits:
            for j in range(1, 4):
                if end + j <= len(answers[a]):
                    prefix = tuple(answers[a][end:end + j])
                    counts[prefix] = counts.get(prefix, 0) + 1
        assert len(got) == min(6, len(counts))  # fewer than SAMPLE voters here: every one counts
        if not got:  # every occurrence ends its answer
            continue
        for prefix, share in got.items():
            assert share == pytest.approx(counts[prefix] / len(hits))
            assert len(prefix) == 1 or prefix[:-1] in got
        cut = min(got.values())  # nothing left out was followed more often than what came back
        assert all(c / len(hits) <= cut + 1e-12 for p, c in counts.items() if p not in got)


def test_lookup_tree_is_the_chain_then_the_stores_other_continuations():
    from types import SimpleNamespace

    from hybrid_sd.tree import depths
    # after "1 2" the store holds three continuations: 3 4 (twice), 5 6, 3 7
    store = Datastore.from_answers([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 3, 7]], vocab_size=10)
    drafter = NgramDrafter(datastore=store)
    ctx = SimpleNamespace(ids=[9, 1, 2])
    chain = drafter.lookup(ctx.ids, 2)
    assert chain == [3, 4]  # the majority, 3 of 4 and then 2 of 4 agree
    tree = drafter.draft_tree(ctx, budget=5, depth=2)
    paths = []
    for i, p in enumerate(tree.parents):
        paths.append((paths[p] if p >= 0 else ()) + (int(tree.tokens[i]),))
    assert paths[:2] == [(3,), (3, 4)]  # the chain leads
    assert set(paths) == {(3,), (3, 4), (5,), (3, 7), (5, 6)}
    assert tree.scores == [0.75, 0.5, 0.25, 0.25, 0.25]  # the share of the voters on each path
    assert all(p < i for i, p in enumerate(tree.parents)) and max(depths(tree.parents)) == 2
    assert drafter.draft_tree(ctx, budget=2, depth=2).tokens.tolist() == [3, 4]  # a prefix of the nodes
