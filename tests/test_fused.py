"""The fused CPU decoder (kernels/cpu_decoder.cpp through models/fused.py) equals the decoder's
PyTorch forward, gives a row the same bits in a step and in a verify, and is used exactly
where it is meant to be: a packed fp32 target, a cache, 1-33 rows, inference."""
import pytest
import torch

import helpers
from helpers import tiny_target
from hybrid_sd.kernels import cpu_rows
from hybrid_sd.models import fused
from hybrid_sd.models.packed_linear import cpu_kernels_ready

needs_kernel = pytest.mark.skipif(not cpu_kernels_ready(),
                                  reason=f"the CPU kernel library cannot run here: {cpu_rows.why_not()}")
CAPTURE = (0, 2, 5, 8)
CONTEXT = 20


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def fused_target(request, tmp_path_factory):
    """qwen2: q/k/v biases; qwen3: per-head q/k norms and a head size (24) whose half is off the vector width."""
    model, _ = tiny_target(tmp_path_factory.mktemp("fused"), request.param, seed=3)
    return model


def forward_both(target, tokens, positions, tree=None, context=CONTEXT, seed=0):
    """(fused, module) results of the same step, each on its own copy of one prefilled cache:
    (hidden, features, cache)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, target.config.vocab_size, (1, context), generator=g)
    results = []
    for use_kernel in (True, False):
        cache = target.new_cache(64)
        kept, target.fused_layers = target.fused_layers, (target.fused_layers if use_kernel else None)
        try:
            with torch.inference_mode():
                target(prompt, torch.arange(context), cache, causal=True)
                hidden, feats = target(tokens[None], positions, cache, 64, CAPTURE, tree=tree)
        finally:
            target.fused_layers = kept
        results.append((hidden, feats, cache))
    return results


@needs_kernel
def test_packed_targets_run_fused(fused_target):
    """Every family of the tiny targets takes the fused path, so the lossless suites run it too."""
    assert fused_target.fused_layers is not None


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 7, 12, 17, 33])
def test_fused_equals_the_module_forward(fused_target, rows):
    g = torch.Generator().manual_seed(rows)
    tokens = torch.randint(0, fused_target.config.vocab_size, (rows,), generator=g)
    positions = torch.arange(CONTEXT, CONTEXT + rows)
    (h_f, f_f, c_f), (h_m, f_m, c_m) = forward_both(fused_target, tokens, positions)
    torch.testing.assert_close(h_f, h_m, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f_f, f_m, rtol=1e-4, atol=1e-4)
    for layer in range(fused_target.n_layers):  # the rows' K/V written where the module writes them
        torch.testing.assert_close(c_f.k[layer][:, :, :CONTEXT + rows], c_m.k[layer][:, :, :CONTEXT + rows],
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c_f.v[layer][:, :, :CONTEXT + rows], c_m.v[layer][:, :, :CONTEXT + rows],
                                   rtol=1e-4, atol=1e-4)
    assert f_f.shape == (1, rows, len(CAPTURE) * fused_target.config.hidden_size)


@needs_kernel
def test_fused_tree_equals_the_module_forward(fused_target):
    """A draft tree's rows: repeated RoPE positions, K/V at their own slots, an ancestor mask."""
    parents = [-1, 0, 0, 1, 2, 2]  # node i's parent (-1: the bonus row)
    rows = len(parents) + 1
    depth = [0]
    for p in parents:
        depth.append(depth[p + 1] + 1)
    span = 32
    mask = torch.zeros(rows, span, dtype=torch.bool)
    mask[:, :CONTEXT] = True
    for i in range(rows):
        node = i
        while node >= 0:
            mask[i, CONTEXT + node] = True
            node = parents[node - 1] + 1 if node > 0 else -1
    positions = CONTEXT + torch.tensor(depth)
    slots = torch.arange(CONTEXT, CONTEXT + rows)
    tokens = torch.randint(0, fused_target.config.vocab_size, (rows,), generator=torch.Generator().manual_seed(9))
    (h_f, f_f, _), (h_m, f_m, _) = forward_both(fused_target, tokens, positions, tree=(slots, mask))
    torch.testing.assert_close(h_f, h_m, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f_f, f_m, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("rows", [7, 17])
def test_a_rows_bits_do_not_depend_on_the_rows_beside_it(fused_target, rows):
    """A verify gives each row exactly what one-token steps give it (17 rows: two passes of the
    products, attention across threads): plain decoding and every drafter's verify then agree
    on the target's logits bit for bit."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, fused_target.config.vocab_size, (1, CONTEXT), generator=g)
    tokens = torch.randint(0, fused_target.config.vocab_size, (1, rows), generator=g)
    outs = []
    for steps in ([slice(0, rows)], [slice(i, i + 1) for i in range(rows)]):
        cache = fused_target.new_cache(64)
        with torch.inference_mode():
            fused_target(prompt, torch.arange(CONTEXT), cache, causal=True)
            hidden = [fused_target(tokens[:, s], torch.arange(CONTEXT + s.start, CONTEXT + s.stop), cache, 64, CAPTURE)
                      for s in steps]
        outs.append((torch.cat([h for h, _ in hidden], 1), torch.cat([f for _, f in hidden], 1), cache))
    (h7, f7, c7), (h1, f1, c1) = outs
    assert torch.equal(h7, h1) and torch.equal(f7, f1)
    assert all(torch.equal(a, b) for a, b in zip(c7.tensors(), c1.tensors()))


@needs_kernel
def test_the_kernel_runs_only_where_it_is_meant_to(fused_target, monkeypatch):
    """1-33 rows with a cache under inference: the kernel; 34 rows, no cache, or gradients on:
    the module forward."""
    calls = []
    real = cpu_rows.decoder_layers
    monkeypatch.setattr(cpu_rows, "decoder_layers", lambda *a: calls.append(a[3].shape[0]) or real(*a))
    cache = fused_target.new_cache(64)
    with torch.inference_mode():
        for rows in (1, fused.MAX_ROWS, fused.MAX_ROWS + 1):
            fused_target(torch.zeros(1, rows, dtype=torch.long), torch.arange(rows), cache, 64)
        fused_target(torch.zeros(1, 3, dtype=torch.long), torch.arange(3))  # no cache: training's causal forward
    with torch.no_grad():
        fused_target(torch.zeros(1, 2, dtype=torch.long), torch.arange(2), cache, 32)
    with torch.enable_grad():
        fused_target(torch.zeros(1, 2, dtype=torch.long), torch.arange(2), fused_target.new_cache(64), 32)
    assert calls == [1, fused.MAX_ROWS, 2]


@needs_kernel
def test_inputs_the_kernel_would_misread_are_refused(fused_target):
    """The kernel reads and writes raw memory: a slot past the cache, a mask row that sees
    nothing or a capture past the last layer must fail before it runs."""
    cache = fused_target.new_cache(16)
    two = torch.zeros(1, 2, dtype=torch.long)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="cache positions"):
            fused_target(two, torch.tensor([15, 16]), cache, 16)
        with pytest.raises(ValueError, match="cache positions"):
            fused_target(two, torch.tensor([3, 4]), cache, tree=(torch.tensor([3, -1]), torch.ones(2, 8, dtype=torch.bool)))
        with pytest.raises(ValueError, match="at least one"):
            fused_target(two, torch.tensor([3, 4]), cache, tree=(torch.tensor([3, 4]), torch.zeros(2, 8, dtype=torch.bool)))
        with pytest.raises(ValueError, match="capture"):
            fused_target(two, torch.tensor([3, 4]), cache, 16, capture=(fused_target.n_layers + 1,))


def test_an_unpacked_target_is_not_fused(tmp_path):
    model, _ = tiny_target(tmp_path, "llama", pack=False)
    assert model.fused_layers is None


def recorded_drafts(drafter, target, prompts, chained: bool, sampling=None, tree: bool = False):
    """Every draft an AR engine makes over `prompts`, with the kernel's chain or with the PyTorch
    steps: (tokens, confidence) per chain, or with `tree` (tokens, parents) per tree of up to 16
    nodes. Returns (drafts, outputs)."""
    from hybrid_sd.verify import Sampling
    method = "draft_tree" if tree else "draft"
    kept, drafter.chain = drafter.chain, (drafter.chain if chained else None)
    drafts, real = [], getattr(drafter, method)

    def spy(ctx, *args):
        d = real(ctx, *args)
        drafts.append((d.tokens.tolist(), d.parents if tree else d.confidence))
        return d
    setattr(drafter, method, spy)
    try:
        config = dict(tree=True, tree_budget=16) if tree else {}
        e = helpers.engine(target, drafters=drafter, k=5 if tree else 6, **config)
        outs = [e.generate(p, 24, sampling or Sampling()).token_ids for p in prompts]
    finally:
        drafter.chain = kept
        delattr(drafter, method)
    return drafts, outs


@needs_kernel
@pytest.mark.parametrize("variant", [{}, {"norm_before_residual": True, "norm_output": True}, {"hidden": 32}])
def test_the_ar_chain_drafts_what_its_pytorch_steps_draft(tmp_path, variant):
    """The kernel's greedy chain = ARDrafter.graph_step's, draft by draft (same tokens, the same
    probabilities to float rounding), for the head's variants: plain, normed residual and
    output, and a head narrower than the target with its own embedding."""
    from hybrid_sd.drafters.ar import ARDrafter
    from hybrid_sd.models.packed_linear import pack_linears
    target, _ = tiny_target(tmp_path, "llama", seed=5)
    variant = dict(variant)  # the parameter is shared between runs
    hidden = variant.pop("hidden", None)
    path = helpers.write_eagle3_checkpoint(tmp_path / "ar", target.config, hidden=hidden, **variant)
    drafter = pack_linears(ARDrafter.from_pretrained(path, target))
    assert drafter.chain is not None
    prompts = helpers.random_prompts(6, seed=2)
    chained, out_chained = recorded_drafts(drafter, target, prompts, True)
    stepped, out_stepped = recorded_drafts(drafter, target, prompts, False)
    assert [t for t, _ in chained] == [t for t, _ in stepped] and out_chained == out_stepped
    assert len(chained) >= 20
    for (_, a), (_, b) in zip(chained, stepped):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_the_ar_chain_runs_only_for_greedy_drafts(tmp_path, monkeypatch):
    from hybrid_sd.drafters.ar import ARDrafter
    from hybrid_sd.models.packed_linear import pack_linears
    from hybrid_sd.verify import Sampling
    target, _ = tiny_target(tmp_path, "llama", seed=5)
    drafter = pack_linears(ARDrafter.from_pretrained(helpers.write_eagle3_checkpoint(tmp_path / "ar", target.config), target))
    calls = []
    real = cpu_rows.eagle3_chain
    monkeypatch.setattr(cpu_rows, "eagle3_chain", lambda *a: calls.append(a[-1]) or real(*a))
    prompts = helpers.random_prompts(2, seed=4)
    recorded_drafts(drafter, target, prompts, True, Sampling(temperature=0.8, seed=1))
    assert calls == []
    drafts, _ = recorded_drafts(drafter, target, prompts, True)
    assert len(calls) == len(drafts) > 0


@needs_kernel
@pytest.mark.parametrize("variant", [{}, {"hidden": 32}])
def test_the_ar_catch_up_writes_what_its_pytorch_step_writes(tmp_path, variant):
    """KV-only rows through the kernel: the drafter's cache holds the K/V of catchup_step's
    PyTorch path (to float rounding) at the rows' positions, and nothing else changes."""
    from hybrid_sd.drafters.ar import ARDrafter
    from hybrid_sd.models.packed_linear import pack_linears
    target, _ = tiny_target(tmp_path, "llama", seed=5)
    path = helpers.write_eagle3_checkpoint(tmp_path / "ar", target.config, **variant)
    drafter = pack_linears(ARDrafter.from_pretrained(path, target))
    g = torch.Generator().manual_seed(0)
    features = torch.randn(5, drafter.fc.in_features, generator=g)
    tokens = torch.randint(0, target.config.vocab_size, (5,), generator=g)
    positions = torch.tensor([3, 4, 5, 9, 10])
    caches = []
    for chained in (True, False):
        kept, drafter.chain = drafter.chain, (drafter.chain if chained else None)
        drafter.cache = None  # a fresh, zeroed cache
        drafter.reset(64)
        drafter.catchup_step((5,), features, tokens, positions)
        drafter.chain = kept
        caches.append((drafter.cache.k[0].clone(), drafter.cache.v[0].clone()))
    (k_c, v_c), (k_t, v_t) = caches
    torch.testing.assert_close(k_c, k_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v_c, v_t, rtol=1e-4, atol=1e-5)
    untouched = [i for i in range(64) if i not in positions.tolist()]
    assert k_c[:, :, positions].abs().sum() > 0 and k_c[:, :, untouched].abs().sum() == 0
    with pytest.raises(ValueError, match="vocabulary"):  # the kernel reads embedding rows unchecked
        drafter.chain.catch_up(torch.zeros(1, drafter.config.hidden_size), torch.tensor([target.config.vocab_size]),
                               torch.tensor([0]))
    with pytest.raises(ValueError, match="vocabulary"):
        drafter.chain(torch.zeros(drafter.config.hidden_size), -1, 0, 2)


@needs_kernel
def test_the_ar_tree_steps_draft_what_their_pytorch_steps_draft(tmp_path, monkeypatch):
    """Each depth of an AR draft tree through the kernel: the same trees (tokens and parents) as
    ARDrafter.tree_step's PyTorch path, the same output, and the kernel really ran."""
    from hybrid_sd.drafters.ar import ARDrafter
    from hybrid_sd.models.packed_linear import pack_linears
    target, _ = tiny_target(tmp_path, "llama", seed=5)
    drafter = pack_linears(ARDrafter.from_pretrained(helpers.write_eagle3_checkpoint(tmp_path / "ar", target.config),
                                                     target))
    prompts = helpers.random_prompts(5, seed=6)
    calls, real = [], cpu_rows.eagle3_tree_step
    monkeypatch.setattr(cpu_rows, "eagle3_tree_step", lambda *a: calls.append(a[2].shape[0]) or real(*a))
    trees_k, outs_k = recorded_drafts(drafter, target, prompts, True, tree=True)
    trees_t, outs_t = recorded_drafts(drafter, target, prompts, False, tree=True)
    assert trees_k == trees_t and outs_k == outs_t and len(trees_k) >= 10
    assert any(len(parents) > len(set(parents)) for _, parents in trees_k)  # real trees: siblings
    assert len(calls) >= len(trees_k) and max(calls) > 1  # every tree through the kernel, frontiers of several rows
