"""Batched data generation (hybrid_sd.train.generate) answers every row as the target would alone."""
import pytest
import torch
from helpers import random_prompts, tiny_target

from hybrid_sd.cache import KVCache
from hybrid_sd.train.generate import Sampler, forward_rows, generate, generate_one, generate_sorted


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, _ = tiny_target(tmp_path_factory.mktemp("gen"), "llama", pack=True)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rows_compute_what_each_computes_alone(tmp_path, family):
    """Left padding with per-row positions and masks: a row's hidden states do not depend on
    its neighbours or its padding."""
    model, _ = tiny_target(tmp_path, family, pack=False)
    prompts = random_prompts(4, seed=3, lo=2, hi=17)
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = torch.tensor(p)
    pad = torch.tensor([width - len(p) for p in prompts])
    cache = KVCache(model.n_layers, width + 4, model.config.num_key_value_heads, model.head_dim, batch=len(prompts))
    hidden = torch.cat([forward_rows(model, tokens[:, s:s + 5], torch.arange(s, min(s + 5, width)), pad, cache)[0]
                        for s in range(0, width, 5)], dim=1)  # chunked prefill, as generate does
    for b, p in enumerate(prompts):
        alone, _ = model(torch.tensor([p]), torch.arange(len(p)))
        torch.testing.assert_close(hidden[b, width - len(p):], alone[0], rtol=1e-5, atol=1e-5)


def test_batched_greedy_equals_one_at_a_time(tiny):
    prompts = random_prompts(7, seed=5, lo=1, hi=30)
    free = [generate_one(tiny, p, 24, ()) for p in prompts]
    # an EOS that some rows emit early and others never: rows end at different steps
    eos = (free[0][4],)
    reference = [generate_one(tiny, p, 24, eos) for p in prompts]
    assert len({len(r) for r in reference}) > 1
    assert generate(tiny, prompts, 24, eos) == reference
    assert generate_sorted(tiny, prompts, 24, eos, batch=3) == reference
    assert generate(tiny, prompts[:1], 24, eos) == reference[:1]


def test_captured_features_are_the_targets_own(tiny):
    """Features captured while answering: for every row, exactly the prompt's positions and the
    answer's but its last, equal to a forward of the whole sequence alone (rows ending at
    different steps, dropped from the batch, sorted into groups)."""
    prompts = random_prompts(7, seed=8, lo=1, hi=30)
    eos = (generate_one(tiny, prompts[2], 20, ())[5],)
    capture = (0, 2, tiny.n_layers)
    got: dict[int, list[torch.Tensor]] = {}
    answers = generate_sorted(tiny, prompts, 20, eos, batch=3, capture=capture,
                              on_features=lambda i, f: got.setdefault(i, []).append(f))
    assert generate_sorted(tiny, prompts, 20, eos, batch=3) == answers  # capturing changes nothing
    assert len({len(a) for a in answers}) > 1
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = p + a
        f = torch.cat([x.reshape(-1, x.shape[-1]) for x in got[i]])
        _, alone = tiny(torch.tensor([seq]), torch.arange(len(seq)), capture=capture)
        assert f.dtype == torch.float16 and f.shape[0] == len(seq) - 1
        torch.testing.assert_close(f.float(), alone[0, :-1].half().float(), rtol=2e-3, atol=2e-3)


def test_sampling_is_seeded_and_a_tiny_nucleus_is_greedy(tiny):
    prompts = random_prompts(5, seed=6, lo=2, hi=12)
    greedy = generate(tiny, prompts, 12, ())
    assert generate(tiny, prompts, 12, (), Sampler(top_p=1e-6, seed=1)) == greedy
    a = generate(tiny, prompts, 12, (), Sampler(seed=2))
    assert a == generate(tiny, prompts, 12, (), Sampler(seed=2))
    assert a != greedy


def test_progress_counts_every_token(tiny):
    prompts = random_prompts(6, seed=7, lo=2, hi=12)
    eos = (generate_one(tiny, prompts[1], 16, ())[3],)
    counted = []
    answers = generate(tiny, prompts, 16, eos, on_tokens=counted.append)
    assert sum(counted) == sum(len(a) for a in answers)


def test_smollm2_batched_equals_one_at_a_time():
    """On the real target (fp32, packed) four chat prompts of different lengths, answered
    together, equal their one-at-a-time answers."""
    from hybrid_sd.models.loading import encode_prompt, load_target
    from hybrid_sd.models.packed_linear import pack_linears

    model, tokenizer, eos = load_target(None, load_tokenizer=True)
    pack_linears(model)
    texts = ["What is 17 times 23?", "Write a Python function that reverses a string, with a docstring.",
             "Return a JSON object with the fields name, age and city for a made-up person. Output only JSON.",
             "Explain in two sentences why the sky is blue, and then give one everyday example of "
             "light scattering that a child could notice at home or outside."]
    prompts = [encode_prompt(tokenizer, t) for t in texts]
    assert len({len(p) for p in prompts}) == 4
    reference = [generate_one(model, p, 40, eos) for p in prompts]
    assert generate(model, prompts, 40, eos) == reference


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_generation_on_cuda_answers_as_the_cpu(tmp_path):
    """The data command's --device cuda: the same batched path on the GPU (rows dropped as they
    end, seeded sampling drawn on the CPU) gives the CPU's greedy answers, but for a rare
    near-tie that another matmul order flips."""
    model, _ = tiny_target(tmp_path, "llama", pack=False)
    prompts = random_prompts(9, seed=5, lo=1, hi=30)
    eos = (generate_one(model, prompts[0], 24, ())[4],)
    cpu = generate_sorted(model, prompts, 24, eos, batch=4)
    gpu_model = model.to("cuda")
    gpu = generate_sorted(gpu_model, prompts, 24, eos, batch=4)
    assert sum(a == b for a, b in zip(cpu, gpu)) >= 8
    # the seeded draws are made on the CPU: the same samples, but for a near-boundary draw
    sampled = generate(gpu_model, prompts, 12, (), Sampler(seed=3))
    assert sum(a == b for a, b in zip(generate(model.cpu(), prompts, 12, (), Sampler(seed=3)), sampled)) >= 8
