"""Training: each command runs end to end on a tiny target, lowers its loss and writes a
checkpoint that loads; and the training forward computes exactly what drafting computes."""
import json
from pathlib import Path

import pytest
import torch

from helpers import context_for, save_hf_checkpoint, tiny_config, write_selfdistilled_data
from hybrid_sd.drafters import ARDrafter, BlockDrafter
from hybrid_sd.models.loading import load_target
from hybrid_sd.train import ar as train_ar
from hybrid_sd.train import block as train_block


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    path = save_hf_checkpoint(tmp / "target", tiny_config("llama"))
    target, _, _ = load_target(path, load_tokenizer=False)
    write_selfdistilled_data(tmp / "data", target)
    return tmp, path, target


def test_ttt_forward_equals_drafting(setup):
    """Step j of the training-time test at row t = drafting step j after context ending at t."""
    _, _, target = setup
    vocab = torch.arange(target.config.vocab_size)
    drafter = train_ar.new_drafter(target, vocab)
    drafter.reset(64)
    seq = torch.randint(4, 96, (20,), generator=torch.Generator().manual_seed(0))
    _, f = target(seq[None], torch.arange(20), capture=drafter.feature_layers)
    steps = 4
    ttt = [drafter.lm_head(h[0]) for _, h in train_ar.ttt_forward(drafter, target.model.embed_tokens, f, seq[None], steps)]
    for t in (0, 6, 11):
        ctx = context_for(target, seq[:t + 2].tolist(), drafter.feature_layers)  # n = t + 1
        drafter.reset(64)
        drafter.catch_up(ctx, ctx.n)
        g = drafter.fuse(ctx.feature_rows(drafter.feature_layers, t, t + 1))
        for j in range(steps):
            token = seq[t + 1 + j:t + 2 + j]  # teacher forcing, as in training
            g, logits = drafter.step(g, target.model.embed_tokens(token), torch.tensor([t + j]), 64)
            torch.testing.assert_close(logits[0], ttt[j][t], rtol=1e-4, atol=1e-4, msg=f"t={t} step={j}")


def test_ttt_on_loss_rows_equals_all_rows(setup):
    """Rows that can carry no loss lend only their step-0 K/V: the rows that can compute what
    they compute when every row runs every step, and the batch's loss is unchanged."""
    _, _, target = setup
    vocab = torch.arange(target.config.vocab_size)
    drafter = train_ar.new_drafter(target, vocab)
    drafter.reset(64)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(4, 96, (3, 24), generator=g)
    lengths, starts = torch.tensor([24, 17, 20]), torch.tensor([12, 3, 15])
    _, f = target(tokens, torch.arange(24), capture=drafter.feature_layers)
    steps = 4
    rows, real = train_ar.loss_rows(lengths, starts, steps)
    assert rows[0, 0] == 12 - 1 - steps and rows[1, 0] == 0 and int(real[1].sum()) == 17 - 2
    full = list(train_ar.ttt_forward(drafter, target.model.embed_tokens, f, tokens, steps))
    part = list(train_ar.ttt_forward(drafter, target.model.embed_tokens, f, tokens, steps, rows))
    for (_, a), (_, b) in zip(full, part):
        for item in range(3):
            picked = rows[item][real[item]]
            torch.testing.assert_close(b[item][real[item]], a[item, picked], rtol=1e-5, atol=1e-5)


def block_case(target, seed: int):
    """A fresh 2-layer block drafter, a random 30-token sequence, its target features and three anchors."""
    drafter = train_block.new_drafter(target, 2, 8, mask_token_id=2)
    drafter.reset(64)
    seq = torch.randint(4, 96, (30,), generator=torch.Generator().manual_seed(seed))
    _, f = target(seq[None], torch.arange(30), capture=drafter.feature_layers)
    return drafter, seq, f, torch.tensor([3, 10, 17])


def test_block_training_forward_equals_drafting(setup):
    _, _, target = setup
    drafter, seq, f, anchors = block_case(target, 1)
    trained = train_block.block_forward(drafter, f, seq[None], anchors[None])[0]
    for i, a in enumerate(anchors.tolist()):
        ctx = context_for(target, seq[:a + 1].tolist(), drafter.feature_layers)  # bonus x_a at n = a
        drafter.reset(64)
        drafter.catch_up(ctx, ctx.n)
        n, B = ctx.n, drafter.block_size
        hidden = drafter.forward_block(ctx.tokens[n:n + 1], torch.arange(n, n + B), drafter.cache.max_len)
        torch.testing.assert_close(hidden, trained[i], rtol=1e-4, atol=1e-4)


def test_block_loss_batched_over_padded_sequences_equals_each_alone(setup):
    """One pass over right-padded sequences of different lengths, with padded anchors, gives the
    mean of the per-sequence losses and their gradients: padding is never read."""
    _, _, target = setup
    drafter = train_block.new_drafter(target, 2, 8, mask_token_id=2)
    drafter.reset(64)
    gen = torch.Generator().manual_seed(3)
    lengths = [30, 19, 25]
    seqs = [torch.randint(4, 96, (n,), generator=gen) for n in lengths]
    feats = [target(s[None], torch.arange(len(s)), capture=drafter.feature_layers + (2,))[1][0] for s in seqs]
    width = drafter.fc.in_features
    picks = [torch.tensor([3, 10, 17]), torch.tensor([1, 12]), torch.tensor([20, 5, 9])]
    V = target.config.vocab_size
    to_sub = torch.full((V,), -1, dtype=torch.long)
    to_sub[torch.arange(0, V, 2)] = torch.arange(V // 2)  # odd tokens fall outside the loss vocabulary
    rows = target.lm_head.weight.detach()[::2]
    kw = dict(target=target, kd=0.5)

    def grads():
        out = [p.grad.clone() for p in drafter.parameters() if p.grad is not None]
        drafter.zero_grad()
        return out

    alone_loss, alone_ce = 0.0, 0.0
    for s, f, a in zip(seqs, feats, picks):
        with torch.enable_grad():
            loss, ce, _ = train_block.block_loss(drafter, rows, to_sub, f[None, :, :width], s[None], a[None], 4.0,
                                                 f[None, :, width:], **kw)
            (loss / len(seqs)).backward()
        alone_loss, alone_ce = alone_loss + loss.item() / len(seqs), alone_ce + ce / len(seqs)
    alone = grads()
    T, A = max(lengths), 3
    tokens, batch = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, feats[0].shape[-1])
    anchors, real = torch.zeros(3, A, dtype=torch.long), torch.zeros(3, A, dtype=torch.bool)
    for r, (s, f, a) in enumerate(zip(seqs, feats, picks)):
        tokens[r, :len(s)], batch[r, :len(s)] = s, f
        batch[r, len(s):] = 7.0  # padding that would show if read
        anchors[r, :len(a)], real[r, :len(a)] = a, True
    with torch.enable_grad():
        loss, ce, acc = train_block.block_loss(drafter, rows, to_sub, batch[..., :width], tokens, anchors, 4.0,
                                               batch[..., width:], lengths=torch.tensor(lengths), anchor_real=real,
                                               **kw)
        loss.backward()
    assert loss.item() == pytest.approx(alone_loss, rel=1e-5)
    assert ce == pytest.approx(alone_ce, rel=1e-5)
    assert len(acc) == 7
    for a, b in zip(alone, grads()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["ar", "block"])
def test_training_command_end_to_end(setup, kind):
    tmp, path, target = setup
    out = tmp / f"out-{kind}"
    common = ["--data", str(tmp / "data"), "--target", str(path), "--out", str(out), "--epochs", "6",
              "--batch", "4", "--lr", "3e-3", "--ckpt-dir", str(tmp / f"ckpt-{kind}"), "--eval-every", "0"]
    if kind == "ar":
        rc = train_ar.main(common + ["--draft-vocab", "64"])
    else:
        rc = train_block.main(common + ["--loss-vocab", "64", "--mask-token-id", "2", "--layers", "2"])
    assert rc == 0
    record = json.loads((out / "training_log.json").read_text())
    log = record["log"]
    assert record["heldout_tau"]["mix"] >= 1.0  # measured on held-out prompts after training
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    cls = ARDrafter if kind == "ar" else BlockDrafter
    drafter = cls.from_pretrained(out, target)
    assert drafter.fc.weight.dtype == torch.float32  # fp16 on disk, target dtype in memory


def tiny_run(setup, kind, name, *extra):
    """A few deterministic steps of a trainer on the tiny target; its checkpoint directory."""
    tmp, path, _ = setup
    ckpt = tmp / f"ckpt-{name}"
    args = ["--data", str(tmp / "data"), "--target", str(path), "--out", str(tmp / f"out-{name}"), "--batch", "4",
            "--lr", "3e-3", "--ckpt-dir", str(ckpt), "--eval-per-category", "0", "--eval-every", "0", *extra]
    if kind == "ar":
        rc = train_ar.main(args + ["--draft-vocab", "64", "--ttt-steps", "3"])
    else:
        rc = train_block.main(args + ["--loss-vocab", "64", "--mask-token-id", "2", "--layers", "2", "--anchors", "6"])
    assert rc == 0
    return ckpt


@pytest.mark.parametrize("kind", ["ar", "block"])
def test_training_goes_on_from_a_published_drafter(setup, kind):
    """--start-from: the run begins where the saved drafter ended (its loss, not a fresh one's),
    keeps its vocabulary and shapes, and writes a loadable drafter."""
    tmp, path, target = setup
    first, again = tmp / f"out-{kind}", tmp / f"again-{kind}"
    if not (first / "config.json").is_file():
        pytest.skip("needs test_training_command_end_to_end's drafter")
    common = ["--data", str(tmp / "data"), "--target", str(path), "--out", str(again), "--steps", "2", "--batch", "4",
              "--lr", "1e-4", "--ckpt-dir", str(tmp / f"ckpt-again-{kind}"), "--eval-every", "0",
              "--eval-per-category", "0", "--start-from", str(first)]
    extra = [] if kind == "ar" else ["--loss-vocab", "64", "--mask-token-id", "2", "--layers", "1"]
    main = train_ar.main if kind == "ar" else train_block.main
    assert main(common + extra) == 0
    before = json.loads((first / "training_log.json").read_text())["log"]
    after = json.loads((again / "training_log.json").read_text())["log"]
    fresh_start = sum(r["loss"] for r in before[:2]) / 2
    assert after[0]["loss"] < 0.8 * fresh_start, (after[0]["loss"], fresh_start)
    cls = ARDrafter if kind == "ar" else BlockDrafter
    old, new = cls.from_pretrained(first, target), cls.from_pretrained(again, target)
    if kind == "ar":
        assert torch.equal(old.d2t, new.d2t) and new.draft_vocab == 64  # its own
        # another size: the data's most frequent tokens; rows it had keep their trained weights
        assert main(["--data", str(tmp / "data"), "--target", str(path), "--out", str(tmp / "resized"),
                     "--ckpt-dir", str(tmp / "ckpt-resized"), "--steps", "1", "--lr", "1e-9", "--eval-every", "0",
                     "--eval-per-category", "0", "--start-from", str(first), "--draft-vocab", "32"]) == 0
        resized = cls.from_pretrained(tmp / "resized", target)
        ids_old, ids_new = old.d2t + torch.arange(64), resized.d2t + torch.arange(32)
        assert resized.draft_vocab == 32 and not torch.equal(ids_new, ids_old[:32])
        kept = [(r, ids_old.tolist().index(t)) for r, t in enumerate(ids_new.tolist()) if t in ids_old]
        for r, o in kept:  # new tokens' rows: test_resized_vocabulary_carries_the_trained_head_map
            torch.testing.assert_close(resized.lm_head.weight[r], old.lm_head.weight[o], rtol=1e-2, atol=1e-3)
    else:
        assert len(new.layers) == len(old.layers) == 2 and new.block_size == old.block_size


def test_resized_vocabulary_carries_the_trained_head_map(setup):
    """A drafter whose LM head is the target's moved by a linear map: resized to a larger draft
    vocabulary, its kept rows stay and each new token's row is the target's moved by that same map
    (not the raw target row, which a trained drafter's rows would not match in scale)."""
    _, _, target = setup
    V, H = target.config.vocab_size, target.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(V, generator=gen)
    old_ids = order[:V - 16].sort().values  # the new vocabulary keeps H of them (enough to fit the map) and adds 16
    drafter = train_ar.new_drafter(target, old_ids)
    moved = 0.5 * torch.eye(H) + 0.1 * torch.randn(H, H, generator=gen)
    drafter.lm_head.weight.copy_(target.lm_head.weight[old_ids] @ moved)
    new_ids = torch.cat([order[:H], order[V - 16:]]).sort().values
    resized = train_ar.with_vocabulary(drafter, target, new_ids)
    assert torch.equal(resized.d2t + torch.arange(len(new_ids)), new_ids)
    torch.testing.assert_close(resized.lm_head.weight, target.lm_head.weight[new_ids] @ moved, rtol=1e-3, atol=1e-4)
    kept = torch.isin(new_ids, old_ids)
    assert torch.equal(resized.lm_head.weight[kept], drafter.lm_head.weight[torch.isin(old_ids, new_ids)])


def test_grown_block_drafter_drafts_as_before_until_trained(setup):
    """--grow-layers appends layers that start as the identity: the grown drafter's blocks equal
    the drafter's, its new layers hold target layers (residual outputs zero), and one training
    step moves them."""
    _, _, target = setup
    drafter, seq, f, anchors = block_case(target, 3)
    bigger = train_block.grown(drafter, target, 2)
    bigger.reset(64)
    assert len(bigger.layers) == 4 and bigger.target_layer_ids == drafter.target_layer_ids
    torch.testing.assert_close(train_block.block_forward(bigger, f, seq[None], anchors[None]),
                               train_block.block_forward(drafter, f, seq[None], anchors[None]), rtol=0, atol=0)
    source_idx = train_block.default_target_layer_ids(target.config.num_hidden_layers, 2)[1]
    new_layer, source = bigger.layers[3], target.model.layers[source_idx]
    assert torch.equal(new_layer.self_attn.q_proj.weight, source.self_attn.q_proj.weight)
    assert not new_layer.self_attn.o_proj.weight.any() and not new_layer.mlp.down_proj.weight.any()
    a = anchors[1].item()  # and drafting: catch-up, then one block forward, as at inference
    ctx = context_for(target, seq[:a + 1].tolist(), drafter.feature_layers)
    blocks = []
    for d in (drafter, bigger):
        d.reset(64)
        d.catch_up(ctx, ctx.n)
        blocks.append(d.forward_block(ctx.tokens[ctx.n:ctx.n + 1], torch.arange(ctx.n, ctx.n + 8), d.cache.max_len))
    torch.testing.assert_close(blocks[1], blocks[0], rtol=0, atol=0)
    with torch.enable_grad():  # the suite runs without autograd (conftest)
        train_block.block_forward(bigger, f, seq[None], anchors[None]).square().mean().backward()
    assert new_layer.self_attn.o_proj.weight.grad.abs().sum() > 0


def test_grow_layers_on_the_command_line(setup, capsys):
    tmp, path, target = setup
    first = tmp / "out-block"
    if not (first / "config.json").is_file():
        pytest.skip("needs test_training_command_end_to_end's drafter")
    common = ["--data", str(tmp / "data"), "--target", str(path), "--out", str(tmp / "grown"), "--steps", "1",
              "--batch", "4", "--ckpt-dir", str(tmp / "ckpt-grown"), "--eval-every", "0", "--eval-per-category", "0",
              "--loss-vocab", "64", "--mask-token-id", "2", "--grow-layers", "1"]
    assert train_block.main(common) == 2  # nothing to grow
    assert "--start-from" in capsys.readouterr().err and not (tmp / "grown").exists()
    assert train_block.main(common + ["--start-from", str(first)]) == 0
    old, new = BlockDrafter.from_pretrained(first, target), BlockDrafter.from_pretrained(tmp / "grown", target)
    assert len(new.layers) == len(old.layers) + 1 and new.block_size == old.block_size
    record = json.loads((tmp / "grown" / "training_log.json").read_text())
    before = json.loads((first / "training_log.json").read_text())["log"]
    assert record["args"]["grow_layers"] == 1  # and it starts where the drafter ended, not afresh
    assert record["log"][0]["loss"] < 0.8 * sum(r["loss"] for r in before[:2]) / 2


@pytest.mark.parametrize("kind", ["ar", "block"])
def test_distillation_lowers_its_loss(setup, kind):
    """With --kd 1 the whole loss is cross-entropy against the target's own distribution; it falls."""
    ckpt = tiny_run(setup, kind, f"kd-{kind}", "--kd", "1", "--epochs", "8")
    log = [r for r in torch.load(ckpt / "last.pt", weights_only=False)["log"] if "loss" in r]
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.9 * first, (first, last)


def test_teacher_is_the_targets_distribution(setup):
    """The distillation teacher from the cached last hidden state = the target's logits over the vocabulary subset."""
    from hybrid_sd.train.common import Sequence, teacher_logits, with_last_hidden
    _, _, target = setup
    seq = torch.randint(4, 96, (17,), generator=torch.Generator().manual_seed(3))
    feats, last = with_last_hidden(target, [Sequence(seq, 5, "chat")], (2, 4), last=True)
    rows = torch.tensor([3, 7, 40, 95])
    normed, f = target(seq[None], torch.arange(17), capture=(2, 4))
    torch.testing.assert_close(feats[0].float(), f[0], rtol=1e-2, atol=1e-2)  # fp16 cache
    torch.testing.assert_close(teacher_logits(target, last[0], target.lm_head.weight[rows]),
                               target.logits(normed[0])[:, rows], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind", ["ar", "block"])
def test_resume_continues_exactly(setup, kind):
    """Stopping at step 3 and resuming gives the parameters, optimizer state and log of an
    uninterrupted run; held-out checks in the middle of training change nothing."""
    flags = ("--steps", "6", "--ckpt-every", "2", "--kd", "0.5")
    whole = torch.load(tiny_run(setup, kind, f"whole-{kind}", *flags, "--eval-every", "2", "--eval-prompts", "1")
                       / "last.pt", weights_only=False)
    assert [r["step"] for r in whole["log"] if "heldout_tau" in r] == [2, 4]
    tiny_run(setup, kind, f"split-{kind}", *flags, "--stop-at", "3")
    tmp = setup[0]
    assert not (tmp / f"out-split-{kind}").exists()  # no published drafter from an unfinished run
    parts = torch.load(tiny_run(setup, kind, f"split-{kind}", *flags, "--resume") / "last.pt", weights_only=False)
    assert parts["step"] == whole["step"] == 6
    for name, value in whole["model"].items():
        torch.testing.assert_close(parts["model"][name], value, rtol=0, atol=0, msg=name)
    for a, b in zip(whole["optimizer"]["state"].values(), parts["optimizer"]["state"].values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=0)
    untimed = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log if "loss" in r]  # noqa: E731
    assert untimed(whole["log"]) == untimed(parts["log"])
    cls = ARDrafter if kind == "ar" else BlockDrafter
    cls.from_pretrained(tmp / f"out-split-{kind}", setup[2])  # the finished run publishes


def test_resume_refuses_what_it_cannot_continue(setup, capsys):
    tmp, path, _ = setup
    base = ["--data", str(tmp / "data"), "--target", str(path), "--out", str(tmp / "x"), "--draft-vocab", "64",
            "--eval-per-category", "0", "--resume"]
    assert train_ar.main(base + ["--ckpt-dir", str(tmp / "no-ckpt")]) == 2
    tiny_run(setup, "ar", "other", "--steps", "2")
    assert train_ar.main(base + ["--ckpt-dir", str(tmp / "ckpt-other"), "--kd", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"error: no training checkpoint to resume in {tmp / 'no-ckpt'}; drop --resume to start a new run"
    assert err[-1].startswith(f"error: {tmp / 'ckpt-other' / 'last.pt'} is from another run (")
    assert "kd: 0.0 there, 0.5 here" in err[-1]


def test_init_from_target_copies_the_right_tensors(setup):
    _, _, target = setup
    H = target.config.hidden_size
    vocab = torch.tensor([3, 5, 8, 60, 90])
    first, last = target.model.layers[0], target.model.layers[-1]
    ar = train_ar.new_drafter(target, vocab, init="full")
    mid = ar.midlayer
    assert torch.equal(ar.lm_head.weight, target.lm_head.weight[vocab])
    assert torch.equal(ar.norm.weight, target.model.norm.weight)
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(getattr(mid.mlp, name).weight, getattr(last.mlp, name).weight)
    assert torch.equal(mid.post_attention_layernorm.weight, last.post_attention_layernorm.weight)
    assert torch.equal(mid.self_attn.o_proj.weight, last.self_attn.o_proj.weight)
    for name in ("q_proj", "k_proj", "v_proj"):  # attention input [embedding | hidden]
        assert torch.equal(getattr(mid.self_attn, name).weight[:, :H], getattr(first.self_attn, name).weight)
        assert torch.equal(getattr(mid.self_attn, name).weight[:, H:], getattr(last.self_attn, name).weight)
    assert torch.equal(mid.input_layernorm.weight, first.input_layernorm.weight)
    assert torch.equal(mid.hidden_norm.weight, last.input_layernorm.weight)
    assert torch.equal(ar.fc.weight[:, -H:], torch.eye(H)) and not ar.fc.weight[:, :-H].any()
    assert torch.equal(ar.to_target_ids(torch.arange(5)), vocab)
    mlp_only = train_ar.new_drafter(target, vocab, init="mlp")
    assert torch.equal(mlp_only.midlayer.mlp.up_proj.weight, last.mlp.up_proj.weight)
    assert not torch.equal(mlp_only.midlayer.self_attn.o_proj.weight, last.self_attn.o_proj.weight)
    random = train_ar.new_drafter(target, vocab, init="none")
    assert not torch.equal(random.lm_head.weight, target.lm_head.weight[vocab])

    block = train_block.new_drafter(target, 2, 8, mask_token_id=2, layer_ids=[1, 5])
    for mine, i in zip(block.layers, [1, 5]):
        src = target.model.layers[i]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(mine.self_attn, name).weight, getattr(src.self_attn, name).weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(mine.mlp, name).weight, getattr(src.mlp, name).weight)
        assert torch.equal(mine.input_layernorm.weight, src.input_layernorm.weight)
        assert torch.equal(mine.post_attention_layernorm.weight, src.post_attention_layernorm.weight)
    assert torch.equal(block.norm.weight, target.model.norm.weight)
    fresh = train_block.new_drafter(target, 2, 8, mask_token_id=2, layer_ids=[1, 5], init="none")
    assert not torch.equal(fresh.layers[0].mlp.up_proj.weight, target.model.layers[1].mlp.up_proj.weight)


def test_features_are_stored_beside_shards_and_reused(tmp_path, setup, monkeypatch):
    """Features a trainer computes go beside their shard; a later run (more layers, more shards)
    reads them back and computes only what is missing; a damaged file is recomputed."""
    from hybrid_sd.train import common
    from hybrid_sd.train.data import features_path
    _, _, target = setup
    data_dir = write_selfdistilled_data(tmp_path / "data", target, n_train=6, n_heldout=1)
    seqs = common.load_sequences(data_dir, "train")
    first = common.target_features(target, seqs, (2, 4))
    assert features_path(seqs[0].shard).is_file()
    for s, f in zip(seqs, first):  # what the target computes for the sequence alone
        _, alone = target(s.tokens[None], torch.arange(len(s.tokens)), capture=(2, 4))
        torch.testing.assert_close(f.float(), alone[0].half().float(), rtol=2e-3, atol=2e-3)

    computed = []
    real = common._compute_features
    monkeypatch.setattr(common, "_compute_features", lambda t, s, layers, b: computed.append(layers) or real(t, s, layers, b))
    again = common.target_features(target, seqs, (4, 2, 5))
    assert computed == [(5,)]  # only the new layer
    for a, f in zip(again, first):
        assert torch.equal(a[:, :a.shape[1] // 3], f[:, f.shape[1] // 2:])  # layer 4, read back
    computed.clear()
    assert all(torch.equal(a, b) for a, b in zip(common.target_features(target, seqs, (4, 2, 5)), again))
    assert computed == []
    features_path(seqs[0].shard).write_bytes(b"garbage")
    assert all(torch.equal(a, b) for a, b in zip(common.target_features(target, seqs, (4, 2, 5)), again))
    assert computed == [(4, 2, 5)]


def test_missing_data_is_a_clear_error(setup, capsys):
    tmp, path, _ = setup
    assert train_ar.main(["--data", str(tmp / "nothing"), "--target", str(path), "--out", str(tmp / "x")]) == 2
    assert "run python -m hybrid_sd.train.data first" in capsys.readouterr().err


def test_data_command_builds_resumes_and_grows(tmp_path, monkeypatch, capsys):
    """The data command answers every prompt (every turn of a multi-turn one) with the target,
    keeps the held-out split apart, reports its mix, and a larger --per-category grows the set
    without touching what was answered."""
    import shutil
    from collections import Counter

    from hybrid_sd.models.embedded import default_target_dir
    from hybrid_sd.train import data

    # a tiny random model that speaks SmolLM2's tokenizer and chat template
    target_dir = save_hf_checkpoint(tmp_path / "target", tiny_config("llama", vocab_size=49152, eos_token_id=2,
                                                                     bos_token_id=1, pad_token_id=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_target_dir() / name, target_dir / name)
    # a random model rarely ends a sampled question; hand out numbered ones instead
    monkeypatch.setattr(data, "magpie_batch", lambda model, tokenizer, eos, lead, batch, seed:
                        [f"My {lead} question number {seed}-{i}?" for i in range(batch)])

    out = tmp_path / "data"
    args = ["--target", str(target_dir), "--out", str(out), "--heldout", "1", "--max-new-tokens", "5", "--batch", "2",
            "--shard-size", "8"]
    assert data.main(args + ["--per-category", "6"]) == 0
    train, heldout = data.read_split(out, "train"), data.read_split(out, "heldout")
    assert Counter(r["category"] for r in train if r["turn"] == 0) == {cat: 6 for cat in data.CATEGORIES}
    assert {r["item"] for r in train} == set(range(24)) and len({r["source"] for r in train}) > 8
    assert len(heldout) == 4 and not {r["prompt"] for r in heldout} & {r["prompt"] for r in train}
    assert all(1 <= len(r["response_ids"]) <= 5 for r in train + heldout)
    # a second turn goes on from the target's own first answer
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    first = {r["item"]: r for r in train if r["turn"] == 0}
    later = [r for r in train if r["turn"] == 1]
    assert later
    for r in later:
        a = first[r["item"]]["response_ids"]
        assert r["messages"][-2]["content"] == tokenizer.decode(a[:-1] if a[-1] == 2 else a, skip_special_tokens=True)
        assert r["prompt_ids"] == data.encode_chat(tokenizer, r["messages"])
    # the target features of every training row were stored beside its shard as it was answered
    from hybrid_sd.models.loading import load_target
    model, _, _ = load_target(target_dir, load_tokenizer=False)
    layers = data.capture_layers("auto", model.n_layers)
    for shard in data.split_shards(out, "train"):
        stored = data.read_features(data.features_path(shard))
        for i, r in enumerate(data.read_jsonl(shard)):
            seq = r["prompt_ids"] + r["response_ids"]
            _, alone = model(torch.tensor([seq]), torch.arange(len(seq)), capture=layers)
            for c, layer in enumerate(layers):
                got = stored[data.feature_key(i, layer)]
                assert got.shape == (len(seq) - 1, model.config.hidden_size)
                want = alone[0, :-1, c * model.config.hidden_size:(c + 1) * model.config.hidden_size]
                torch.testing.assert_close(got.float(), want.half().float(), rtol=2e-3, atol=2e-3)
    assert not data.features_path(data.split_shards(out, "heldout")[0]).exists()
    mix = json.loads((out / "mix.json").read_text())
    assert mix["train"]["total"]["answers"] == len(train) and mix["train"]["total"]["prompts"] == 24
    assert "train: 24/24 prompts answered" in capsys.readouterr().out
    first_shard = (out / "train" / "00000.jsonl").stat().st_mtime_ns

    assert data.main(args + ["--per-category", "8"]) == 0
    grown = data.read_split(out, "train")
    assert Counter(r["category"] for r in grown if r["turn"] == 0) == {cat: 8 for cat in data.CATEGORIES}
    assert [r for r in grown if r["item"] < 24] == train  # the plan grew at its end
    assert data.read_split(out, "heldout") == heldout
    assert (out / "train" / "00000.jsonl").stat().st_mtime_ns == first_shard  # answered once, kept

    capsys.readouterr()
    assert data.main(args[:-2] + ["--shard-size", "4"]) == 2  # resuming needs the same shard size
    assert data.main(args + ["--per-category", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: " + str(out) + " was built with --shard-size 8; resume it with the same value",
                   "error: --per-category must be at least 1, got 0"]


def test_training_curve_reads_logs_and_checkpoints(tmp_path, capsys):
    """The curve command takes finished logs and running checkpoints; a wrong file is one clear error."""
    pytest.importorskip("matplotlib")
    from hybrid_sd.eval import training_curve
    log = [{"step": s, "loss": 4.0 - s / 10} for s in range(1, 11)]
    log.insert(5, {"step": 5, "heldout_tau": {"chat": 1.2, "mix": 1.5}})
    log.append({"step": 10, "heldout_tau": {"chat": 1.4, "mix": 1.8}})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "training_log.json").write_text(json.dumps({"args": {}, "log": log,
                                                                  "heldout_tau": {"k": 6, "mix": 2.0}}))
    assert training_curve.curves(training_curve.read_log(tmp_path / "a" / "training_log.json"))[0][-1] == (10, 2.0)
    (tmp_path / "b").mkdir()
    torch.save({"log": log[:6]}, tmp_path / "b" / "last.pt")
    taus, losses = training_curve.curves(log, smooth=2)
    assert taus == [(5, 1.5), (10, 1.8)] and losses[1] == (2, pytest.approx((3.9 + 3.8) / 2))
    out = tmp_path / "curve.png"
    assert training_curve.main([str(tmp_path / "a" / "training_log.json"), str(tmp_path / "b" / "last.pt"),
                                "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert training_curve.main([str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    assert "is not a training_log.json" in capsys.readouterr().err


def test_tau_growth_counts_each_line_of_runs(tmp_path, capsys):
    """A run's training is its own steps x batch plus its ancestors'; the shipped record plots;
    a parent missing from the file or a loop is one clear error."""
    pytest.importorskip("matplotlib")
    from hybrid_sd.eval import tau_growth

    def run(name, parent, steps, batch=8, tau=None, drafter="ar"):
        return {"drafter": drafter, "name": name, "parent": parent, "steps": steps, "batch": batch, "bench_tau": tau}
    runs = [run("a", None, 10), run("b", "a", 5, tau=2.0), run("c", "b", 2, batch=32, tau=2.1),
            run("d", "a", 1, tau=1.9), run("a", None, 3, drafter="block", tau=1.2)]
    assert tau_growth.seen_sequences(runs) == {("ar", "a"): 80, ("ar", "b"): 120, ("ar", "c"): 184, ("ar", "d"): 88,
                                               ("block", "a"): 24}
    (tmp_path / "runs.json").write_text(json.dumps({"runs": runs}))
    out = tmp_path / "growth.png"
    assert tau_growth.main([str(tmp_path / "runs.json"), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    shipped = tau_growth.read_runs(Path(__file__).parents[1] / "docs" / "bench" / "training" / "tau-growth.json")
    assert tau_growth.seen_sequences(shipped)[("ar", "v7")] == 1540 * 32 + 638 * 8 + 978 * 8  # GPU run, v6, v7
    (tmp_path / "orphan.json").write_text(json.dumps({"runs": [run("b", "a", 5)]}))
    (tmp_path / "loop.json").write_text(json.dumps({"runs": [run("a", "b", 1), run("b", "a", 1)]}))
    (tmp_path / "twice.json").write_text(json.dumps({"runs": [run("a", None, 1), run("a", None, 2)]}))
    (tmp_path / "kind.json").write_text(json.dumps({"runs": [run("a", None, 1, drafter="ngram")]}))
    (tmp_path / "steps.json").write_text(json.dumps({"runs": [run("a", None, None)]}))
    for name, words in (("orphan.json", "not in the runs file"), ("loop.json", "loop"), ("absent.json", "no runs file"),
                        ("twice.json", "two ar runs"), ("kind.json", "drafter 'ngram'"), ("steps.json", "integer")):
        assert tau_growth.main([str(tmp_path / name), "--out", str(tmp_path / "x.png")]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_sampled_rest_draws_distinct_outside_tokens_with_their_weight():
    rest = torch.tensor([5, 9, 11, 20, 31, 40, 41, 60])
    drawn, correction = train_block.sampled_rest(rest, 3, torch.Generator().manual_seed(0))
    assert drawn.numel() == 3 and len(set(drawn.tolist())) == 3 and set(drawn.tolist()) <= set(rest.tolist())
    assert correction == pytest.approx(torch.log(torch.tensor(8 / 3)).item())
    everything, none = train_block.sampled_rest(rest, 100, torch.Generator().manual_seed(0))
    assert sorted(everything.tolist()) == rest.tolist() and none == 0.0


def test_block_loss_with_the_whole_rest_is_the_full_vocabulary_loss(setup):
    """Drawing every token outside the loss vocabulary makes the hard-label loss the full-head
    cross-entropy that drafting's argmax answers to; without negatives it is the subset's."""
    _, _, target = setup
    drafter, seq, f, anchors = block_case(target, 2)
    vocab = torch.unique(seq)
    V = target.config.vocab_size
    to_sub = torch.full((V,), -1, dtype=torch.long)
    to_sub[vocab] = torch.arange(vocab.numel())
    head = target.lm_head.weight.detach()
    rest = (to_sub < 0).nonzero().view(-1)
    drawn, correction = train_block.sampled_rest(rest, rest.numel(), torch.Generator())
    with torch.no_grad():
        rows, log_weight = train_block.loss_columns(head[vocab], head[drawn], correction)
        _, with_rest, _ = train_block.block_loss(drafter, rows, to_sub, f, seq[None], anchors[None], 4.0,
                                                   log_weight=log_weight)
        _, subset_only, _ = train_block.block_loss(drafter, head[vocab], to_sub, f, seq[None], anchors[None], 4.0)
        hidden = train_block.block_forward(drafter, f, seq[None], anchors[None])[0, :, 1:]
        labels = seq[anchors[:, None] + torch.arange(1, 8)]
        w = torch.exp(-torch.arange(7.0) / 4.0).expand(3, 7)
        full = torch.nn.functional.cross_entropy((hidden @ head.T).reshape(-1, V), labels.reshape(-1), reduction="none")
    expected = (full * w.reshape(-1)).sum() / w.sum()
    assert with_rest == pytest.approx(expected.item(), rel=1e-4)
    assert subset_only < with_rest - 1e-3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_sampled_column_weighs_as_the_tokens_it_stands_for(temperature):
    """A column with log-weight log 2 is the same as that column twice: the hard loss is equal
    and the gradient on it is the sum of the two columns' gradients, at any distillation
    temperature (the weight is added after dividing by it)."""
    import math

    from hybrid_sd.train.common import mixed_loss
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    labels = torch.tensor([0, 1, 0])

    def twice(x):  # column 2 twice
        return torch.cat([x, x[:, 2:]], dim=1)

    with torch.enable_grad():
        full_in = twice(student).requires_grad_()
        full, full_hard = mixed_loss(full_in, labels, twice(teacher), 0.5, temperature)
        full.sum().backward()
        part_in = student.clone().requires_grad_()
        part, part_hard = mixed_loss(part_in, labels, teacher, 0.5, temperature, torch.tensor([0.0, 0.0, math.log(2)]))
        part.sum().backward()
    torch.testing.assert_close(part_hard, full_hard)
    merged = torch.cat([full_in.grad[:, :2], full_in.grad[:, 2:].sum(1, keepdim=True)], dim=1)
    torch.testing.assert_close(part_in.grad, merged)


def test_fit_minutes_sets_the_step_count_from_the_speed_of_the_first_steps(setup, capsys):
    from hybrid_sd.train.common import FIT_PROBE_STEPS, fit_total
    # 20 steps in 2 s, 3 s into a 63 s budget: 0.95 * 60 s at 0.1 s a step
    assert fit_total(25, 2.0, 3.0, 63.0) == 25 + 570
    assert fit_total(25, 2.0, 70.0, 63.0) == 26  # over budget already: one more step
    ckpt = tiny_run(setup, "ar", "fit", "--fit-minutes", "0.02", "--epochs", "40")
    log = [r for r in torch.load(ckpt / "last.pt", weights_only=False)["log"] if "loss" in r]
    said = capsys.readouterr()
    assert f"--fit-minutes 0.02: {len(log)} steps" in said.out + said.err
    assert torch.load(ckpt / "last.pt", weights_only=False)["total"] == len(log)
    # one epoch of 3 batches is shorter than the probe: the count still reaches past it
    # (stopped before the fit, the resumed process fits)
    ckpt = tiny_run(setup, "ar", "fit-short", "--fit-minutes", "0.02", "--epochs", "1", "--stop-at", "8")
    assert torch.load(ckpt / "last.pt", weights_only=False)["fitted"] is False
    tiny_run(setup, "ar", "fit-short", "--fit-minutes", "0.02", "--epochs", "1", "--resume")
    saved = torch.load(ckpt / "last.pt", weights_only=False)
    said = capsys.readouterr()
    assert saved["fitted"] and saved["step"] == saved["total"] > 8 + FIT_PROBE_STEPS
    assert f"--fit-minutes 0.02: {saved['total']} steps" in said.out + said.err


def test_fit_minutes_and_steps_together_are_refused(setup, capsys):
    tmp, path, _ = setup
    assert train_ar.main(["--data", str(tmp / "data"), "--target", str(path), "--out", str(tmp / "x"),
                          "--fit-minutes", "1", "--steps", "10"]) == 2
    assert "--fit-minutes sets the step count" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["ar", "block"])
def test_training_on_cuda_follows_the_cpu_run(setup, kind):
    """--device cuda: the drafter is built on the CPU and moved, each batch moves over, the target
    features and the distillation teacher are computed on the GPU (CUDA runs first, on its own
    copy of the data), so the first steps' losses are the CPU run's up to rounding; the
    checkpoint loads on the CPU."""
    import shutil
    tmp, path, target = setup
    runs = {}
    for dev in ("cuda", "cpu"):
        shutil.copytree(tmp / "data", tmp / f"data-{dev}-{kind}", ignore=shutil.ignore_patterns("*.features.*"))
        runs[dev] = tiny_run(setup, kind, f"{dev}-{kind}", "--steps", "6", "--device", dev, "--kd", "0.5",
                             "--data", str(tmp / f"data-{dev}-{kind}"))
    losses = {dev: [r["loss"] for r in torch.load(ck / "last.pt", weights_only=False)["log"] if "loss" in r]
              for dev, ck in runs.items()}
    assert len(losses["cuda"]) == 6
    torch.testing.assert_close(torch.tensor(losses["cuda"]), torch.tensor(losses["cpu"]), rtol=2e-3, atol=2e-3)
    cls = ARDrafter if kind == "ar" else BlockDrafter
    cls.from_pretrained(runs["cuda"].parent / f"out-cuda-{kind}", target)


@pytest.mark.slow
def test_gpu_train_script_dry_run_on_the_cpu(tmp_path):
    """scripts/gpu-train's own logic (data, both trainers side by side, packing into pieces),
    at tiny size on the CPU, so that a lent GPU machine gets a script that runs."""
    import io
    import lzma
    import os
    import subprocess
    import tarfile
    from pathlib import Path
    script = Path(__file__).parent.parent / "scripts" / "gpu-train"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "DEVICE": "cpu",
           "PER_CATEGORY": "1", "HELDOUT": "1", "BATCH": "8", "DATA_MINUTES": "5", "TRAIN_MINUTES": "0.05"}
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (tmp_path / "out" / "run.log").read_text()
    assert "ar training ended with 0" in log and "block training ended with 0" in log, log
    for name in ("data", "ar", "block"):
        pieces = sorted((tmp_path / "out").glob(f"{name}.tar.xz.*"))
        joined = io.BytesIO(b"".join(p.read_bytes() for p in pieces))
        with tarfile.open(fileobj=lzma.LZMAFile(joined)) as tar:
            names = tar.getnames()
        assert any(n.endswith(".jsonl") for n in names) if name == "data" else f"{name}/model.safetensors" in names
