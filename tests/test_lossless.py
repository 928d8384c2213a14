"""Greedy speculative decoding returns exactly the target's own greedy output, on every drafter."""
import pytest

from helpers import (MixedDrafter, OracleDrafter, plain_greedy, random_prompts, write_dflash_checkpoint,
                     write_eagle3_checkpoint)
from hybrid_sd.drafters import ARDrafter, BlockDrafter, NgramDrafter
from hybrid_sd.engine import Engine
from hybrid_sd.models.packed_linear import pack_linears

PROMPTS = random_prompts(20)
MAX_NEW = 40


def make_drafter(kind, target, tmp_path):
    if kind == "ngram":
        return NgramDrafter(max_n=3)
    if kind == "ar":
        return pack_linears(ARDrafter.from_pretrained(write_eagle3_checkpoint(tmp_path / "ar", target.config), target))
    if kind == "block":
        return pack_linears(BlockDrafter.from_pretrained(
            write_dflash_checkpoint(tmp_path / "bl", target.config, block_size=8), target))
    raise ValueError(kind)


def first_divergence(got, expected):
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            return f"position {i}: expected {b}, got {a}"
    return f"lengths {len(expected)} vs {len(got)}"


def check_lossless(target, drafter, k, prompts=PROMPTS, max_new=MAX_NEW, max_len=None, eos=(), mix=False):
    engine = Engine(target, eos, drafter, k=k, max_len=max_len)
    for i, prompt in enumerate(prompts):
        expected = plain_greedy(target, eos, prompt, max_new, max_len)
        if mix:
            engine.drafters = [MixedDrafter(drafter, prompt + expected, seed=i)]
        gen = engine.generate(prompt, max_new)
        assert gen.token_ids == expected, (f"drafter {drafter.name}, k={k}, prompt #{i} {prompt}: "
                                           f"{first_divergence(gen.token_ids, expected)}")
        assert sum(r.committed for r in gen.rounds) + 1 >= len(expected)


@pytest.mark.parametrize("kind", ["ngram", "ar", "block"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_lossless(target, tmp_path, kind, k):
    check_lossless(target, make_drafter(kind, target, tmp_path), k, mix=kind != "ngram")


def test_oracle_drafts_are_all_accepted(target):
    """Bookkeeping proof: a drafter that knows the answer gets every draft accepted."""
    for k in (1, 4, 7):
        for prompt in PROMPTS[:8]:
            expected = plain_greedy(target, (), prompt, MAX_NEW)
            gen = Engine(target, (), OracleDrafter(prompt + expected), k=k).generate(prompt, MAX_NEW)
            assert gen.token_ids == expected
            assert [r.accepted for r in gen.rounds[:-1]] == [k] * (len(gen.rounds) - 1)
            assert gen.mean_accepted == pytest.approx((MAX_NEW - 1) / len(gen.rounds))


@pytest.mark.parametrize("kind", ["oracle", "ngram", "ar", "block"])
def test_eos_inside_a_draft(target, tmp_path, kind):
    """The target's output stops at EOS even when the EOS arrives in the middle of a draft."""
    for prompt in PROMPTS[:10]:
        free = plain_greedy(target, (), prompt, MAX_NEW)
        eos = (free[len(free) // 2],)  # pretend a mid-answer token is EOS
        expected = plain_greedy(target, eos, prompt, MAX_NEW)
        assert expected[-1] == eos[0] and len(expected) < MAX_NEW
        drafter = OracleDrafter(prompt + free) if kind == "oracle" else MixedDrafter(
            make_drafter(kind, target, tmp_path), prompt + free)
        gen = Engine(target, eos, drafter, k=8).generate(prompt, MAX_NEW)
        assert gen.token_ids == expected and gen.stop_reason == "eos"


@pytest.mark.parametrize("kind", ["oracle", "ar", "block"])
def test_draft_past_max_new_tokens(target, tmp_path, kind):
    for max_new in (1, 2, 3, 5, 9):
        for prompt in PROMPTS[:5]:
            free = plain_greedy(target, (), prompt, MAX_NEW)
            drafter = OracleDrafter(prompt + free) if kind == "oracle" else MixedDrafter(
                make_drafter(kind, target, tmp_path), prompt + free)
            gen = Engine(target, (), drafter, k=8).generate(prompt, max_new)
            assert gen.token_ids == free[:max_new] and gen.stop_reason == "length"


@pytest.mark.parametrize("kind", ["oracle", "ngram", "ar", "block"])
def test_k_larger_than_remaining_context(target, tmp_path, kind):
    """Near the end of the cache the draft is cut so that every verified row has a position."""
    max_len = 48
    for prompt in PROMPTS[:6]:
        free = plain_greedy(target, (), prompt, 100, max_len)
        assert len(prompt) + len(free) == max_len + 1  # the cache ran out, not the budget
        drafter = OracleDrafter(prompt + free) if kind == "oracle" else make_drafter(kind, target, tmp_path)
        gen = Engine(target, (), drafter, k=8, max_len=max_len).generate(prompt, 100)
        assert gen.token_ids == free and gen.stop_reason == "context"


def test_prompt_of_length_one(target, tmp_path):
    for kind in ("ngram", "ar", "block"):
        check_lossless(target, make_drafter(kind, target, tmp_path), 4, prompts=[[7], [50], [4]])
