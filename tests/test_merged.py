"""Merged drafts (`--drafter merged`): several drafters draft every round and the target
verifies the union as one tree. The union's bookkeeping, the cut across drafters' scales,
lossless greedy and sampled decoding, and the CLI's checks."""
import pytest
import torch

from helpers import MixedDrafter, chi_square_p_value, engine, make_drafter, random_prompts, second_token_marginal
from hybrid_sd.drafters.base import Draft
from hybrid_sd.drafters.merged import MergedDrafter
from hybrid_sd.graphs import TREE_BUCKETS
from hybrid_sd.router import LatencyTable
from hybrid_sd.router.tree import TreeBudget
from hybrid_sd.tree import check_tree, merge
from hybrid_sd.verify import Sampling
from test_tree import check_lossless

PROMPTS = random_prompts(50, seed=23)


# ---- the union ------------------------------------------------------------------------------
def test_merge_shares_common_paths_and_keeps_each_drafts_branches():
    ar = ([5, 6, 7, 8], [-1, 0, 1, 2], [0.9, 0.8, 0.5, 0.4])   # a chain 5 6 7 8
    lookup = ([5, 6, 9, 3], [-1, 0, 1, 2], [1.0, 1.0, 0.6, 0.6])  # shares "5 6", then branches
    tokens, parents, scores, owner = merge([ar, lookup])
    # depth by depth, the drafts in turn: "5", "5 6", then "5 6 7" (ar) and "5 6 9" (lookup), ...
    assert tokens == [5, 6, 7, 9, 8, 3]
    assert parents == [-1, 0, 1, 1, 2, 3]
    assert scores == [0.9, 0.8, 0.5, 0.6, 0.4, 0.6]  # a shared node keeps the first draft's score
    assert owner == [0, 0, 0, 1, 0, 1]
    check_tree(parents)
    # a tree member: its branch under a shared node hangs off the merged node
    tree = ([5, 2, 4], [-1, 0, -1], [0.5, 0.2, 0.1])
    tokens, parents, _, owner = merge([ar, tree])
    assert tokens == [5, 4, 6, 2, 7, 8] and parents == [-1, -1, 0, 0, 2, 4] and owner == [0, 1, 0, 1, 0, 0]
    # so a budget's first nodes hold both drafters' first guesses
    assert set(merge([ar, ([1, 2, 3, 4], [-1, 0, 1, 2], [1.0] * 4)])[3][:4]) == {0, 1}


def test_select_renumbers_the_kept_nodes():
    d = Draft(torch.tensor([5, 6, 7, 9, 3]), None, None, [-1, 0, 1, 1, 3], [0.9, 0.8, 0.5, 0.6, 0.6],
              ["ar", "ar", "ar", "ngram", "ngram"])
    kept = d.select([0, 1, 3, 2])
    assert kept.tokens.tolist() == [5, 6, 9, 7]
    assert kept.parents == [-1, 0, 1, 1]
    assert kept.origins == ["ar", "ar", "ngram", "ar"] and kept.scores == [0.9, 0.8, 0.6, 0.5]


def table(verify_per_row: float) -> LatencyTable:
    sizes = sorted({0, *range(1, 8), *TREE_BUCKETS})
    return LatencyTable({k: 1.0 + verify_per_row * k for k in sizes}, {"merged": {k: 0.1 for k in range(1, 8)}}, {})


def test_the_cut_ranks_a_merge_by_each_drafters_own_curve():
    """Raw scores of two drafters are not comparable: a drafter whose high scores were seldom
    accepted loses its nodes to one whose low scores always were."""
    budget = TreeBudget(table(0.05))
    for _ in range(50):  # "ar" claims 0.9 and is never right; "ngram" claims 0.3 and always is
        budget.observe("merged", [0.9, 0.3], {1}, ["ar", "ngram"])
    d = Draft(torch.tensor([5, 6, 9, 3]), None, None, [-1, 0, -1, 2], [0.9, 0.85, 0.3, 0.3],
              ["ar", "ar", "ngram", "ngram"])
    kept = budget.keep("merged", d, 0.1)
    assert kept.origins[:2] == ["ngram", "ngram"] and kept.tokens.tolist()[:2] == [9, 3]
    check_tree(kept.parents)
    assert all(kept.parents[i] < i for i in range(len(kept.parents)))
    # a dear verify keeps fewer nodes, a free one all of them
    assert len(TreeBudget(table(0.0)).keep("merged", d, 0.1).parents) == 4
    assert len(TreeBudget(table(2.0)).keep("merged", d, 0.1).parents) == 1


def test_a_child_never_ranks_above_its_parent():
    budget = TreeBudget(table(0.0))
    for _ in range(50):  # "ngram" is always right, "ar" never: the ar node under an ngram node
        budget.observe("merged", [0.5, 0.5], {0}, ["ngram", "ar"])  # must still follow its parent
    d = Draft(torch.tensor([1, 2, 3]), None, None, [-1, 0, -1], [0.5, 0.5, 0.5], ["ar", "ngram", "ngram"])
    kept = budget.keep("merged", d, 0.0)
    check_tree(kept.parents)


# ---- through the engine ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def members(target, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merged")
    return {kind: make_drafter(kind, target, tmp) for kind in ("ar", "block", "ngram")}


def merged_of(members, kinds):
    mixed = [MixedDrafter(members[kind]) for kind in kinds]
    return MergedDrafter(mixed), mixed


def test_merged_chains_cut_by_cost_are_lossless_on_50_prompts(target, members):
    """Chains of each member (--tree off), their union cut by a measured latency table, the
    curves learning per member; the truth rides on random prefixes of each member's draft, so
    accepted paths run through either member's branch."""
    if target.config.model_type != "llama":
        pytest.skip("qwen3 runs the merges on 50 prompts in the slow suite")
    check_merged_chains(target, members)


@pytest.mark.slow
def test_merged_chains_and_trees_on_50_prompts_of_every_family(target, members):
    check_merged_chains(target, members)
    drafter, mixed = merged_of(members, ("ar", "block", "ngram"))
    check_lossless(target, engine(target, (), drafter, tree=True, tree_budget=8), mixed, PROMPTS, "merged trees")


def check_merged_chains(target, members):
    drafter, mixed = merged_of(members, ("ar", "ngram"))
    decoder = engine(target, (), drafter, k=4)
    decoder.use_latency(decoder.measure_latency(repeats=1))
    accepted = check_lossless(target, decoder, mixed, PROMPTS, "merged ar+ngram chains")
    assert accepted > 20
    assert set(decoder.budgets.curves) == {"ar", "ngram"}  # each member calibrated on its own nodes
    assert all(sum(c.hits) > 0 for c in decoder.budgets.curves.values())  # and each member's branches accepted


@pytest.mark.parametrize("budget", [4, 16])
def test_merged_trees_of_every_member_are_lossless(target, members, budget):
    """Trees of all three kinds (--tree auto), merged and cut to a fixed budget."""
    drafter, mixed = merged_of(members, ("ar", "block", "ngram"))
    decoder = engine(target, (), drafter, tree=True, tree_budget=budget)
    check_lossless(target, decoder, mixed, PROMPTS[:16], f"merged trees, budget {budget}")
    gen = decoder.generate(PROMPTS[0], 12)
    assert all(r.k <= budget and (r.tree or r.k == 0) for r in gen.rounds)  # k = 0: the last token, a plain step


def test_a_merge_catches_every_member_up(target, members):
    drafter = MergedDrafter([members["ar"], members["ngram"]])
    assert drafter.feature_layers == members["ar"].feature_layers
    decoder = engine(target, (), drafter, tree_budget=8)
    gen = decoder.generate(PROMPTS[1], 10)
    assert members["ar"].frontier == drafter.frontier > 0
    assert gen.rounds and all(r.drafter == "merged" and r.tree for r in gen.rounds if r.k)
    with pytest.raises(ValueError, match="two or more different drafters"):
        MergedDrafter([members["ar"], members["ar"]])


def test_a_merge_runs_to_the_end_of_the_context(target, members):
    """Each member drafts what fits before the cache ends; their union may not: it is cut to
    the room left, and the answer stops at the context's end as plain decoding's does."""
    from helpers import plain_greedy
    prompt = PROMPTS[2][:20]
    decoder = engine(target, (), MergedDrafter([members["ar"], members["block"]]), k=7, max_len=len(prompt) + 12)
    gen = decoder.generate(prompt, 40)  # two model drafters: each drafts k tokens, and they part
    assert gen.token_ids == plain_greedy(target, (), prompt, 40, max_len=len(prompt) + 12)
    assert gen.stop_reason == "context" and max(r.k for r in gen.rounds) > 7


@pytest.mark.slow
def test_merged_sampling_matches_the_target_distribution(target, members):
    prompt = [5, 9, 5, 9, 5]
    s = Sampling(temperature=1.3, top_p=0.95)
    decoder = engine(target, (), MergedDrafter([members["ar"], members["ngram"]]), k=3, max_len=64, tree_budget=6)
    counts = torch.zeros(target.config.vocab_size)
    for seed in range(1500):
        counts[decoder.generate(prompt, 2, Sampling(s.temperature, s.top_p, seed)).token_ids[1]] += 1
    assert chi_square_p_value(counts, second_token_marginal(target, prompt, s)) > 1e-3


# ---- the CLI ----------------------------------------------------------------------------------
@pytest.mark.parametrize("merge", ["ar", "ar,ar", "ar,nope", ""])
def test_a_bad_merge_is_one_clear_error(merge):
    from hybrid_sd.decode import build_parser, check_args
    from hybrid_sd.errors import UserError
    args = build_parser().parse_args(["--drafter", "merged", "--merge", merge, "hi"])
    with pytest.raises(UserError, match="--merge takes two or more different drafters"):
        check_args(args)


def test_a_merge_takes_a_budget_without_tree_auto():
    from hybrid_sd.decode import build_parser, check_args, merge_names
    from hybrid_sd.errors import UserError
    check_args(build_parser().parse_args(["--drafter", "merged", "--budget", "6", "hi"]))
    with pytest.raises(UserError, match="add --tree auto"):
        check_args(build_parser().parse_args(["--drafter", "ar", "--budget", "6", "hi"]))
    assert merge_names(build_parser().parse_args(["--merge", "ar,ngram,", "hi"])) == ("ar", "ngram")
