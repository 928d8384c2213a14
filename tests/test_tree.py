"""Draft trees: the bookkeeping (tree.py), one-pass tree verification against chain verifies of
each path, lossless greedy and sampled decoding on every drafter and the hybrid, and the
cost-aware cut."""
import itertools
import math

import pytest
import torch

from helpers import (MixedDrafter, OracleDrafter, chi_square_p_value, engine, make_drafter, plain_greedy,
                     random_prompts, second_token_marginal)
from hybrid_sd.graphs import TREE_BUCKETS
from hybrid_sd.router import AlternatingRouter, LatencyTable
from hybrid_sd.router.tree import AcceptanceCurve, TreeBudget
from hybrid_sd.tree import ancestor_mask, best_first, chain_parents, depths, walk
from hybrid_sd.verify import Sampling, judge_tree, target_probs

PROMPTS = random_prompts(50, seed=11)
MAX_NEW = 20
KINDS = ["ngram", "ar", "block"]


# ---- bookkeeping --------------------------------------------------------------------------
def test_depths_mask_and_walk_of_a_small_tree():
    #        bonus
    #       /  |  \
    #      a0  a1  a2        (nodes 0, 1, 2)
    #     / \       \
    #    b3  b4      b5      (nodes 3, 4 under 0; 5 under 2)
    #    |
    #    c6
    parents = [-1, -1, -1, 0, 0, 2, 3]
    tokens = [10, 11, 12, 13, 14, 15, 16]
    assert depths(parents) == [1, 1, 1, 2, 2, 2, 3]
    mask = ancestor_mask(parents)
    assert mask[7].nonzero().view(-1).tolist() == [0, 1, 4, 7]  # c6 sees the bonus, a0, b3, itself
    assert mask[3].nonzero().view(-1).tolist() == [0, 3]
    # the target's token at each row (row 0 = the bonus): 10 -> a0 (row 1), 13 -> b3 (row 4), 16 -> c6 (row 7)
    target = {0: 10, 1: 13, 4: 16, 7: 99}
    assert walk(parents, tokens, target.__getitem__) == ([1, 4, 7], 99)
    assert walk(parents, tokens, {0: 12, 3: 77}.__getitem__) == ([3], 77)  # a2, then no child 77
    assert walk(parents, tokens, {0: 50}.__getitem__) == ([], 50)
    assert walk(chain_parents(3), [4, 5, 6], {0: 4, 1: 5, 2: 9}.__getitem__) == ([1, 2], 9)


def test_best_first_is_the_top_budget_of_all_prefixes():
    """DDTree's heap gives exactly the `budget` most probable prefixes, parents first."""
    g = torch.Generator().manual_seed(0)
    D, K, budget = 4, 3, 20
    logp = torch.log_softmax(torch.randn(D, 6, generator=g) * 2, -1).topk(K, -1)
    tokens, parents, scores = best_first(logp.values, logp.indices, budget)
    assert all(p < i for i, p in enumerate(parents)) and scores == sorted(scores, reverse=True)
    every = []  # brute force: every prefix of every depth, by rank choices
    for d in range(1, D + 1):
        for ranks in itertools.product(range(K), repeat=d):
            every.append(sum(float(logp.values[i, r]) for i, r in enumerate(ranks)))
    assert scores == pytest.approx(sorted(every, reverse=True)[:budget])
    for i, p in enumerate(parents):  # each node's score = its parent's + its own token's log-prob
        d = depths(parents)[i] - 1
        own = float(logp.values[d][logp.indices[d].tolist().index(tokens[i])])
        assert scores[i] == pytest.approx((scores[p] if p >= 0 else 0.0) + own)


# ---- one-pass verification ----------------------------------------------------------------
def test_tree_verify_equals_a_chain_verify_of_each_path(target):
    """Every node's logits and features from the tree pass equal those of a chain verify of the
    path to it: positions, the ancestor mask and the cache slots are right."""
    prompt = PROMPTS[0] + PROMPTS[1]
    parents = [-1, -1, -1, 0, 0, 2, 3, 6, 1]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, target.config.vocab_size, (len(parents),), generator=g).tolist()
    e = engine(target, (), [make_drafter("ngram", target, None)], max_len=128)
    e.generate(prompt, 1)  # fills the cache with the prompt
    n = len(prompt)
    e.cache.length = n
    e.tokens[n] = 7
    e.tokens[n + 1:n + 1 + len(tokens)] = torch.tensor(tokens)
    tree_logits, tree_feats = e.verify_tree(parents, n)
    for node in range(len(parents)):
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        path.reverse()
        chain = torch.tensor([7] + [tokens[i] for i in path])
        e.tokens[n:n + len(chain)] = chain
        logits, _ = e.verify_forward(e.tokens[n:n + len(chain)], n)
        torch.testing.assert_close(tree_logits[node + 1], logits[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tree_logits[0], logits[0], atol=1e-4, rtol=1e-4)


def test_a_chain_shaped_tree_accepts_what_the_chain_accepts(target):
    """The tree path on a chain (the default draft_tree) gives the chain path's rounds exactly."""
    for prompt in PROMPTS[:6]:
        expected = plain_greedy(target, (), prompt, MAX_NEW)
        oracle = OracleDrafter(prompt + expected)
        chain = engine(target, (), oracle, k=4).generate(prompt, MAX_NEW)
        tree = engine(target, (), oracle, k=4, tree=True, tree_budget=4).generate(prompt, MAX_NEW)
        assert tree.token_ids == chain.token_ids == expected
        assert [(r.k, r.accepted) for r in tree.rounds] == [(r.k, r.accepted) for r in chain.rounds]
        assert all(r.tree for r in tree.rounds) and not any(r.tree for r in chain.rounds)


def test_padded_tree_verifies_are_warmed_and_lossless(target):
    """With padding (as graphs run), every tree verify a generation meets is a warmed key
    (rows = a node bucket + 1), and the padding rows change nothing."""
    drafter = make_drafter("ngram", target, None)
    decoder = engine(target, (), drafter, k=7, max_len=256, kv_block=128, pad=True, tree=True, tree_budget=24)
    met = []
    step = decoder.tree_graphs.step
    decoder.tree_graphs.step = lambda key, *inputs: (met.append(key), step(key, *inputs))[1]
    reports = decoder.warm_up()
    warmed = set(met)
    assert [r for r in reports if r["name"] == "verify:tree"][0]["keys"] == len(warmed)
    for prompt in PROMPTS[:8]:
        assert decoder.generate(prompt * 3, MAX_NEW).token_ids == plain_greedy(target, (), prompt * 3, MAX_NEW)
    assert set(met) <= warmed and len(met) > len(warmed)


@pytest.mark.parametrize("kind", ["ar", "block"])
def test_drafter_tree_steps_are_warmed(target, tmp_path, kind):
    """With trees on, the warm-up runs every tree-step key a generation then meets (CUDA:
    captures them), and the drafter still drafts losslessly afterwards."""
    drafter = make_drafter(kind, target, tmp_path)
    decoder = engine(target, (), drafter, k=6, max_len=256, kv_block=128, pad=True, tree=True, tree_budget=16)
    met = []
    decoder.reset_drafters()  # the drafter's step sets for this engine's mode and spans
    step = drafter.tree_graphs.step
    drafter.tree_graphs.step = lambda key, *inputs: (met.append(key), step(key, *inputs))[1]
    reports = decoder.warm_up()
    warmed = set(met)
    assert [r for r in reports if r["name"] == f"tree:{drafter.name}"][0]["keys"] == len(warmed) > 0
    for prompt in PROMPTS[:4]:
        assert decoder.generate(prompt * 3, MAX_NEW).token_ids == plain_greedy(target, (), prompt * 3, MAX_NEW)
    assert set(met) <= warmed and len(met) > len(warmed)


# ---- lossless -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drafters(target, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tree")
    return {kind: make_drafter(kind, target, tmp) for kind in KINDS}


def check_lossless(target, decoder, mixed, prompts, label):
    moved = 0
    for i, prompt in enumerate(prompts):
        expected = plain_greedy(target, (), prompt, MAX_NEW)
        for d in mixed:
            d.follow(prompt + expected, seed=i)
        gen = decoder.generate(prompt, MAX_NEW)
        assert gen.token_ids == expected, f"{label}: prompt #{i} diverged"
        moved += sum(r.accepted > 0 and r.tree for r in gen.rounds)
    return moved


@pytest.mark.parametrize("kind", KINDS)
def test_trees_are_lossless_on_every_drafter(target, drafters, kind):
    """50 prompts at a mid budget; the drafts carry the truth along random paths, so accepted
    paths that are not the first nodes (rows moved in the cache) are exercised. One family in
    the default run (the budget grid and the hybrid cover both), both in the slow suite."""
    if target.config.model_type != "llama":
        pytest.skip("qwen3 runs the 50-prompt grid in the slow suite")
    mixed = MixedDrafter(drafters[kind])
    accepted = check_lossless(target, engine(target, (), mixed, tree=True, tree_budget=16), [mixed], PROMPTS,
                              f"{kind} tree")
    assert accepted > 20


@pytest.mark.parametrize("budget", TREE_BUCKETS)
def test_trees_are_lossless_at_every_budget_bucket(target, drafters, budget):
    if target.config.model_type != "llama":
        pytest.skip("qwen3 runs every budget in the slow grid")
    mixed = [MixedDrafter(drafters[kind]) for kind in KINDS]
    for d in mixed:
        check_lossless(target, engine(target, (), d, tree=True, tree_budget=budget), [d], PROMPTS[:8],
                       f"{d.name} tree, budget {budget}")


@pytest.mark.slow
@pytest.mark.parametrize("budget", TREE_BUCKETS)
@pytest.mark.parametrize("kind", KINDS)
def test_trees_are_lossless_on_50_prompts_at_every_budget(target, drafters, kind, budget):
    mixed = MixedDrafter(drafters[kind])
    check_lossless(target, engine(target, (), mixed, tree=True, tree_budget=budget), [mixed], PROMPTS,
                   f"{kind} tree, budget {budget}")


def test_hybrid_trees_with_forced_switching_are_lossless(target, drafters):
    mixed = [MixedDrafter(drafters[kind]) for kind in KINDS]
    decoder = engine(target, (), mixed, router=AlternatingRouter(len(mixed)), tree=True, tree_budget=12)
    check_lossless(target, decoder, mixed, PROMPTS, "hybrid trees, switching every round")
    gen = decoder.generate(PROMPTS[0], MAX_NEW)
    assert all(a.drafter != b.drafter for a, b in zip(gen.rounds, gen.rounds[1:]))


def test_trees_cut_by_cost_are_lossless(target, drafters):
    """The cost-aware cut (a measured latency table) on every drafter, the curves learning."""
    mixed = [MixedDrafter(drafters[kind]) for kind in KINDS]
    decoder = engine(target, (), mixed, router=AlternatingRouter(len(mixed)), tree=True)
    decoder.use_latency(decoder.measure_latency(repeats=1))
    check_lossless(target, decoder, mixed, PROMPTS[:12], "hybrid trees cut by cost")
    assert decoder.budgets.curves and all(sum(c.seen) > 0 for c in decoder.budgets.curves.values())


# ---- sampling -------------------------------------------------------------------------------
def test_tree_sampling_follows_the_target_at_every_step():
    """judge_tree on fixed logits: the first token is distributed as row 0, and after moving to
    a child the next token as that child's row -- whatever the tree holds."""
    g = torch.Generator().manual_seed(0)
    V, N = 6, 8000
    parents, tokens = [-1, -1, 0, 0], [1, 2, 3, 4]  # bonus -> {1, 2}; node 0 (token 1) -> {3, 4}
    logits = torch.randn(len(parents) + 1, V, generator=g)
    logits[0, 1] += 2.0  # the tree's first guess is likely, so its subtree is walked often
    s = Sampling(temperature=1.0, top_p=0.9)
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(N):
        v = judge_tree(parents, tokens, logits, s, g)
        committed = [tokens[r - 1] for r in v.path] + [v.token]
        first[committed[0]] += 1
        if committed[0] == 1:
            second[committed[1]] += 1
    p = target_probs(logits, s)
    assert chi_square_p_value(first, p[0]) > 1e-3
    assert chi_square_p_value(second, p[1]) > 1e-3  # row 1 = node 0, the child holding token 1
    assert chi_square_p_value(first, torch.softmax(logits[0], -1)) < 1e-6  # the test can tell


@pytest.mark.slow
def test_tree_sampling_matches_the_target_distribution(target, drafters):
    """The second sampled token's marginal, through the engine with AR trees."""
    prompt = [5, 9, 5, 9, 5]
    s = Sampling(temperature=1.3, top_p=0.95)
    decoder = engine(target, (), drafters["ar"], k=3, max_len=64, tree=True, tree_budget=8)
    counts = torch.zeros(target.config.vocab_size)
    for seed in range(1500):
        counts[decoder.generate(prompt, 2, Sampling(s.temperature, s.top_p, seed)).token_ids[1]] += 1
    assert chi_square_p_value(counts, second_token_marginal(target, prompt, s)) > 1e-3


# ---- the cut -------------------------------------------------------------------------------
def table(verify_per_row: float) -> LatencyTable:
    sizes = sorted({0, *range(1, 8), *TREE_BUCKETS})
    return LatencyTable({k: 1.0 + verify_per_row * k for k in sizes}, {"ar": {k: 0.1 for k in range(1, 8)}}, {})


def test_the_cut_grows_with_cheap_verifies_and_shrinks_with_dear_ones():
    scores = [0.9 ** i for i in range(1, 33)]
    cheap, dear = TreeBudget(table(0.001)), TreeBudget(table(0.5))
    assert cheap.cut("ar", scores, 0.1) == 32
    assert dear.cut("ar", scores, 0.1) < 8
    assert TreeBudget(table(0.0)).latency.verify_seconds(20) == pytest.approx(1.0)
    assert table(0.1).verify_seconds(20) == pytest.approx(3.0)  # interpolated between 16 and 32


def test_a_round_drafts_the_nodes_this_machine_verifies_cheaply(target):
    """Before the cut, a round drafts as many nodes as verify within VERIFY_SLACK of a plain step
    (a GPU at batch 1: the whole budget; a CPU: a few), at least one; --budget N overrides it."""
    from hybrid_sd.config import TREE_BUDGET
    assert TreeBudget(table(0.001)).drafted == TREE_BUDGET
    assert TreeBudget(table(0.06)).drafted == 4  # 1 + 0.06 n <= 1.25
    assert TreeBudget(table(0.5)).drafted == 1
    decoder = engine(target, (), make_drafter("ngram", target, None), tree=True)
    decoder.use_latency(table(0.06))
    assert decoder.node_budget(0) == 4
    fixed = engine(target, (), make_drafter("ngram", target, None), tree=True, tree_budget=9)
    fixed.use_latency(table(0.06))
    assert fixed.node_budget(0) == 9


def test_acceptance_curve_learns_from_rounds():
    curve = AcceptanceCurve()
    before = curve(0.9)
    for _ in range(50):
        for score in (0.9, 0.9):
            curve.add(score, accepted=False)  # confident and always wrong
    assert curve(0.9) < before / 10
    assert curve(0.9) == pytest.approx(2 * 2 ** -0.5 / 102)
    assert math.isclose(AcceptanceCurve()(0.0), 2.0 ** -(11.5))


def test_lookup_trees_over_a_datastore_are_lossless_and_take_its_branches(target):
    """The lookup drafter's tree with a store: 50 prompts, the store holding the target's own
    answers to half of them beside noise, so its branches carry the truth (and often not on the
    chain's path); every output equals plain decoding, and accepted paths leave the chain."""
    from hybrid_sd.drafters.datastore import Datastore
    from hybrid_sd.drafters.ngram import NgramDrafter
    answers = {i: plain_greedy(target, (), p, MAX_NEW) for i, p in enumerate(PROMPTS)}
    g = torch.Generator().manual_seed(5)
    noise = [torch.randint(4, target.config.vocab_size, (MAX_NEW,), generator=g).tolist() for _ in range(25)]
    store = Datastore.from_answers([answers[i] for i in range(0, len(PROMPTS), 2)] + noise,
                                   target.config.vocab_size)
    drafter = NgramDrafter(max_n=3, datastore=store)
    decoder = engine(target, (), drafter, k=4, tree=True, tree_budget=8)
    off_chain = 0
    for i, prompt in enumerate(PROMPTS):
        gen = decoder.generate(prompt, MAX_NEW)
        assert gen.token_ids == answers[i], f"lookup tree over a store: prompt #{i} diverged"
        ids = prompt + answers[i]
        n = len(prompt)
        for r in gen.rounds:  # the tree leads with the chain's draft: did the accepted path leave it?
            chain = NgramDrafter(max_n=3, datastore=store).lookup(ids[:n + 1], 4)
            off_chain += r.accepted > 0 and ids[n + 1:n + 1 + r.accepted] != chain[:r.accepted]
            n += r.accepted + 1
        assert n == len(ids) - 1  # the replay followed the rounds
    assert off_chain > 5


def test_a_small_ar_tree_is_the_first_nodes_of_a_large_one(target, drafters, monkeypatch):
    """The AR tree expands at most `budget` nodes per depth, `budget` deep: the same nodes as the
    best `budget` of a 32-node tree, for less drafting."""
    from hybrid_sd.drafters.base import Context
    drafter = drafters["ar"]
    decoder = engine(target, (), drafter, k=6, tree=True, tree_budget=32)
    prompt = PROMPTS[3] + PROMPTS[4]
    decoder.generate(prompt, 2)  # the drafter's cache and the target features of the prompt
    n = len(prompt)
    ctx = Context(list(prompt) + [int(decoder.tokens[n])], decoder.tokens, decoder.features, decoder.capture)
    with torch.inference_mode():  # as the engine drafts (a graph mode's cache is an inference tensor)
        decoder.reset_drafters()  # as a generation starts: this engine's graphs mode, an empty context
        drafter.catch_up(ctx, n)
        large = drafter.draft_tree(ctx, 32, 6)
        met = []  # rows of each depth's step, whatever runs it (eager, a trace, a capture)
        graphs = drafter.tree_graphs
        monkeypatch.setattr(drafter, "tree_graphs", lambda key, *inputs: (met.append(key[0]), graphs(key, *inputs))[1])
        for budget in (1, 2, 4, 7):
            met.clear()
            small = drafter.draft_tree(ctx, budget, 6)
            assert small.tokens.tolist() == large.tokens[:budget].tolist() and small.parents == large.parents[:budget]
            assert small.scores == pytest.approx(large.scores[:budget])
            assert len(met) == min(budget, 6) and max(met) <= budget  # depths run, rows a depth
