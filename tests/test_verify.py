"""Acceptance rules: greedy prefix, nucleus filtering, and lossless rejection sampling."""
import pytest
import torch

from helpers import TargetAsDrafter, chi_square_p_value, second_token_marginal, tiny_target, write_eagle3_checkpoint
from helpers import engine as make_engine
from hybrid_sd.drafters import ARDrafter, NgramDrafter
from hybrid_sd.verify import Sampling, greedy_accept, speculative_accept, target_probs


def one_hot_logits(tokens, vocab=10):
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


@pytest.mark.parametrize("draft, target, accepted, bonus", [
    ([4, 5, 6], [4, 5, 6, 7], 3, 7),
    ([4, 5, 6], [4, 9, 6, 7], 1, 9),
    ([4, 5, 6], [1, 5, 6, 7], 0, 1),
    ([], [8], 0, 8),
])
def test_greedy_accept(draft, target, accepted, bonus):
    assert greedy_accept(torch.tensor(draft, dtype=torch.long), one_hot_logits(target)) == (accepted, bonus)


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = target_probs(logits, Sampling(1.0, top_p=0.8))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    assert torch.equal(target_probs(logits, Sampling(1.0, top_p=0.01)), torch.tensor([1.0, 0, 0, 0, 0]))


@pytest.mark.parametrize("with_q", [True, False])
def test_rejection_sampling_first_token_follows_target(with_q):
    g = torch.Generator().manual_seed(0)
    V, k, N = 8, 3, 20000
    logits = torch.randn(k + 1, V, generator=g) * 1.5
    q = torch.softmax(torch.randn(k, V, generator=g), -1)
    s = Sampling(temperature=1.0, top_p=0.9)
    counts = torch.zeros(V)
    for _ in range(N):
        draft = torch.multinomial(q, 1, generator=g).view(-1) if with_q else torch.tensor([1, 2, 3])
        a, token = speculative_accept(draft, q if with_q else None, logits, s, g)
        counts[int(draft[0]) if a > 0 else token] += 1
    p0 = target_probs(logits[0], s)
    assert chi_square_p_value(counts, p0) > 1e-3
    # the same counts are far from the unfiltered distribution: the test can tell them apart
    assert chi_square_p_value(counts, torch.softmax(logits[0], -1)) < 1e-6


@pytest.mark.parametrize("drafter_kind", ["self", pytest.param("ngram", marks=pytest.mark.slow), "ar"])
def test_spec_sampling_matches_target_distribution(target, tmp_path, drafter_kind):
    """The target drafting for itself (accept and residual paths) and the AR drafter (its
    proposals) on the llama target; qwen3 and the n-gram drafter (one-hot drafts, also covered
    by test_rejection_sampling_first_token_follows_target) in the slow suite."""
    if target.config.model_type != "llama":
        pytest.skip("one family keeps the default run short (the verifier is shared); qwen3: the slow suite")
    check_sampling(target, tmp_path, drafter_kind)


@pytest.mark.slow
def test_spec_sampling_on_qwen3(session_tmp, tmp_path):
    check_sampling(tiny_target(session_tmp, "qwen3")[0], tmp_path, "self")


def check_sampling(target, tmp_path, drafter_kind):
    prompt = [5, 9, 5, 9, 5]
    s = Sampling(temperature=1.3, top_p=0.95)
    drafter = {"self": lambda: TargetAsDrafter(target), "ngram": lambda: NgramDrafter(max_n=2),
               "ar": lambda: ARDrafter.from_pretrained(write_eagle3_checkpoint(tmp_path / "ar", target.config),
                                                       target)}[drafter_kind]()
    engine = make_engine(target, (), drafter, k=3, max_len=64)
    counts = torch.zeros(target.config.vocab_size)
    N = 2000
    for seed in range(N):
        out = engine.generate(prompt, 2, Sampling(s.temperature, s.top_p, seed)).token_ids
        counts[out[1]] += 1
    expected = second_token_marginal(target, prompt, s)
    assert chi_square_p_value(counts, expected) > 1e-3


@pytest.mark.parametrize("greedy", [True, False])
def test_judge_reads_the_router_signals_at_the_new_bonus_row(greedy):
    """The CPU path (statistics of the accepted row after the read); the fused one-read path is
    checked against the same reference in test_kernels."""
    from hybrid_sd.kernels import row_stats_reference
    from hybrid_sd.verify import judge
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 300, generator=g) * 3
    draft = logits[:4].argmax(-1)
    draft[2] = (draft[2] + 1) % 300
    s = Sampling() if greedy else Sampling(temperature=0.8, seed=1)
    v = judge(draft, None, logits, s, torch.Generator().manual_seed(5), signals=True,
              draft_confidence=torch.tensor([0.25, 0.5]))
    if greedy:
        assert (v.accepted, v.token) == (2, int(logits[2].argmax()))
    _, _, entropy, top1 = row_stats_reference(logits[v.accepted:v.accepted + 1])
    # the CPU kernel library's one pass (where loaded) equals the reference to float rounding
    assert v.draft_confidence == 0.25 and v.top1 == pytest.approx(float(top1[0]), rel=1e-5)
    assert v.entropy == pytest.approx(float(entropy[0]), rel=1e-5)
    assert judge(draft, None, logits, Sampling()).top1 is None  # no signals asked, none read
