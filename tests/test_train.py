"""Training: each command runs end to end on a tiny target, lowers its loss and writes a
checkpoint that loads; and the training forward computes exactly what drafting computes."""
import json

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


def test_block_training_forward_equals_drafting(setup):
    _, _, target = setup
    drafter = train_block.new_drafter(target, 2, 8, mask_token_id=2)
    drafter.reset(64)
    seq = torch.randint(4, 96, (30,), generator=torch.Generator().manual_seed(1))
    _, f = target(seq[None], torch.arange(30), capture=drafter.feature_layers)
    anchors = torch.tensor([3, 10, 17])
    trained = train_block.block_forward(drafter, f[0], seq, anchors)
    for i, a in enumerate(anchors.tolist()):
        ctx = context_for(target, seq[:a + 1].tolist(), drafter.feature_layers)  # bonus x_a at n = a
        drafter.reset(64)
        drafter.catch_up(ctx, ctx.n)
        n, B = ctx.n, drafter.block_size
        hidden = drafter.forward_block(ctx.tokens[n:n + 1], torch.arange(n, n + B), drafter.cache.max_len)
        torch.testing.assert_close(hidden, trained[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["ar", "block"])
def test_training_command_end_to_end(setup, kind):
    tmp, path, target = setup
    out = tmp / f"out-{kind}"
    common = ["--data", str(tmp / "data"), "--target", str(path), "--out", str(out), "--epochs", "6",
              "--batch", "4", "--lr", "3e-3"]
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


def test_missing_data_is_a_clear_error(setup, capsys):
    tmp, path, _ = setup
    assert train_ar.main(["--data", str(tmp / "nothing"), "--target", str(path), "--out", str(tmp / "x")]) == 2
    assert "run python -m hybrid_sd.train.data first" in capsys.readouterr().err


def test_data_command_builds_resumes_and_grows(tmp_path, monkeypatch):
    """The data command answers every prompt with the target, keeps the held-out split apart,
    and a larger --per-category grows the set without touching what was answered."""
    import shutil

    from hybrid_sd.models.embedded import default_target_dir
    from hybrid_sd.train import data

    # a tiny random model that speaks SmolLM2's tokenizer and chat template
    target_dir = save_hf_checkpoint(tmp_path / "target", tiny_config("llama", vocab_size=49152, eos_token_id=2,
                                                                     bos_token_id=1, pad_token_id=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(default_target_dir() / name, target_dir / name)
    # a random model rarely ends a sampled question; hand out numbered ones instead
    def questions(tokenizer, model, eos, want, seed, batch, avoid=()):
        pool = [f"Question number {seed + i} about anything?" for i in range(want + len(avoid))]
        return [q for q in pool if q not in set(avoid)][:want]
    monkeypatch.setattr(data, "chat_questions", questions)

    out = tmp_path / "data"
    args = ["--target", str(target_dir), "--out", str(out), "--heldout", "1", "--max-new-tokens", "5", "--batch", "2"]
    assert data.main(args + ["--per-category", "2"]) == 0
    train, heldout = data.read_split(out, "train"), data.read_split(out, "heldout")
    assert sorted(r["category"] for r in train) == sorted(data.CATEGORIES * 2)
    assert len(heldout) == 4 and not {r["prompt"] for r in heldout} & {r["prompt"] for r in train}
    assert all(1 <= len(r["response_ids"]) <= 5 for r in train)
    first_shard = (out / "train" / "math-000.jsonl").stat().st_mtime_ns

    assert data.main(args + ["--per-category", "3"]) == 0
    grown = data.read_split(out, "train")
    assert sorted(r["category"] for r in grown) == sorted(data.CATEGORIES * 3)
    assert {r["prompt"] for r in train} <= {r["prompt"] for r in grown}
    assert data.read_split(out, "heldout") == heldout
    assert (out / "train" / "math-000.jsonl").stat().st_mtime_ns == first_shard  # answered once, kept
