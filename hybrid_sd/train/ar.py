"""Train an EAGLE-3-style AR drafter for a target: `python -m hybrid_sd.train.ar`.

Training-time test: the head is unrolled on its own outputs for `--ttt-steps` steps (default:
its draft length, 6), as it runs when drafting. At step j, the row anchored at t sits at
position t+j, takes its own step-(j-1) output as hidden input and the embedding of x_{t+1+j},
and attends to the step-0 rows at positions <= t plus its own chain's rows of steps 1..j
(exactly what a query sees while drafting). Step j predicts x_{t+2+j}; losses are weighted
`--step-decay`^j. The data are the target's own greedy answers, so the next token of the
text is the target's argmax: hard labels are the target's greedy choice. With `--kd`, part
of the loss is distillation against the target's whole next-token distribution (its final
norm and LM head on its cached last hidden state, over the draft vocabulary). The draft
vocabulary is the most frequent response tokens (d2t/t2d of the published format); `--init`
says what starts from the target (LM head rows and final norm; the last layer's MLP; its
attention). The loop, schedule, checkpoints and held-out checks: common.run_training.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig

from ..cli import Parser
from ..drafters.ar import ARDrafter
from ..errors import UserError, exit_code
from ..models.transformer import apply_rope, rope_parameters
from .common import (Sequence, add_recipe_args, check_recipe, default_ckpt_dir, finish_training, frequent_tokens,
                     heldout_check, load_sequences, mixed_loss, run_training, teacher_logits, with_last_hidden)

DEFAULT_OUT = "ar-drafter"
DEFAULT_DRAFT_VOCAB = 2048


INIT_CHOICES = ("none", "head", "mlp", "full")


def set_vocabulary(drafter: ARDrafter, vocab_ids: torch.Tensor) -> None:
    """The published maps of a draft vocabulary (target ids, sorted): d2t offsets and t2d membership."""
    drafter.d2t.copy_(vocab_ids - torch.arange(len(vocab_ids)))
    drafter.t2d.zero_()
    drafter.t2d[vocab_ids] = True


def new_drafter(target, vocab_ids: torch.Tensor, intermediate: int | None = None, init: str = "mlp") -> ARDrafter:
    """A fresh EAGLE-3 head for `target` over the draft vocabulary `vocab_ids`, initialised from
    the target as far as `init` says: "none" (random), "head" (LM head rows over the draft
    vocabulary and the final norm), "mlp" (also the last layer's MLP and its norm), "full" (also
    the last layer's o_proj; q/k/v's hidden half and hidden_norm from the last layer, their
    embedding half and input_layernorm from the first, which reads embeddings too; fc passing
    the deepest feature through, so the residual starts as the target's own stream)."""
    if init not in INIT_CHOICES:
        raise UserError(f"--init {init!r}: choose from {', '.join(INIT_CHOICES)}")
    tc = target.config
    config = LlamaConfig(
        hidden_size=tc.hidden_size, intermediate_size=intermediate or tc.intermediate_size, num_hidden_layers=1,
        num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
        head_dim=target.head_dim, rms_norm_eps=tc.rms_norm_eps, vocab_size=tc.vocab_size,
        max_position_embeddings=tc.max_position_embeddings, rope_parameters=dict(rope_parameters(tc)))
    config.draft_vocab_size = len(vocab_ids)
    drafter = ARDrafter(config, target.model.embed_tokens, tc.num_hidden_layers, target.head_dim)
    H = tc.hidden_size
    with torch.no_grad():
        for p in drafter.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
        set_vocabulary(drafter, vocab_ids)
        if init == "none":
            return drafter
        drafter.lm_head.weight.copy_(target.lm_head.weight[vocab_ids])
        drafter.norm.weight.copy_(target.model.norm.weight)
        first, last, mine = target.model.layers[0], target.model.layers[-1], drafter.midlayer
        if init in ("mlp", "full") and mine.mlp.gate_proj.weight.shape == last.mlp.gate_proj.weight.shape:
            mine.mlp.load_state_dict(last.mlp.state_dict())
            mine.post_attention_layernorm.load_state_dict(last.post_attention_layernorm.state_dict())
        if init == "full":
            attn = mine.self_attn
            attn.o_proj.weight.copy_(last.self_attn.o_proj.weight)
            for name in ("q_proj", "k_proj", "v_proj"):
                w = getattr(attn, name).weight  # [out, embedding half | hidden half]
                w[:, :H].copy_(getattr(first.self_attn, name).weight)
                w[:, H:].copy_(getattr(last.self_attn, name).weight)
            mine.input_layernorm.load_state_dict(first.input_layernorm.state_dict())
            mine.hidden_norm.load_state_dict(last.input_layernorm.state_dict())
            if drafter.fc.in_features == len(drafter.feature_layers) * H:
                drafter.fc.weight.zero_()
                drafter.fc.weight[:, -H:].copy_(torch.eye(H))
    return drafter


def head_map(target_rows: torch.Tensor, drafter_rows: torch.Tensor) -> torch.Tensor:
    """The linear map M [H, H] with target_rows @ M ~ drafter_rows (least squares): how training
    moved the drafter's LM head away from the target's, to carry over to tokens it never had."""
    return torch.linalg.lstsq(target_rows.float(), drafter_rows.float()).solution


def with_vocabulary(drafter: ARDrafter, target, vocab_ids: torch.Tensor) -> ARDrafter:
    """`drafter` over another draft vocabulary: rows of tokens it had keep their trained LM head
    rows; a new token's row is the target's, moved by the map that training made of the kept ones
    (`head_map`). Raw target rows would outshout the trained ones: resized to 8,192, the shipped
    drafter's top-1 accuracy fell from 0.67 to 0.25 with them and stayed at 0.63 with the map."""
    config = copy.copy(drafter.config)
    config.draft_vocab_size = len(vocab_ids)
    fresh = ARDrafter(config, target.model.embed_tokens, target.config.num_hidden_layers, target.head_dim,
                      drafter.feature_layers)
    state = {k: v for k, v in drafter.state_dict().items() if k not in ("lm_head.weight", "d2t", "t2d")}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert set(missing) == {"lm_head.weight", "d2t", "t2d"} and not unexpected, (missing, unexpected)
    old_ids = drafter.d2t + torch.arange(drafter.draft_vocab)
    old_row = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    old_row[old_ids] = torch.arange(len(old_ids))
    with torch.no_grad():
        rows = old_row[vocab_ids]
        kept = rows >= 0
        head = target.lm_head.weight[vocab_ids].clone()
        head[kept] = drafter.lm_head.weight[rows[kept]]
        if kept.any() and not kept.all():
            moved = head_map(target.lm_head.weight[vocab_ids[kept]], head[kept])
            head[~kept] = (head[~kept].float() @ moved).to(head.dtype)
        fresh.lm_head.weight.copy_(head)
        set_vocabulary(fresh, vocab_ids)
    return fresh


def shifted(x: torch.Tensor, by: int, length: int) -> torch.Tensor:
    """x[:, by:by+length] along dim 1, zero-padded where it runs past the end."""
    part = x[:, by:by + length]
    pad = length - part.shape[1]
    return torch.cat([part, part.new_zeros(part.shape[0], pad, *part.shape[2:])], dim=1) if pad > 0 else part


def loss_rows(lengths: torch.Tensor, response_start: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a right-padded batch that can carry a loss in some TTT step, [B, R'] (padded
    with the last row), and which of them are real. Row t at step j predicts x_{t+2+j}, which
    must lie inside the response: t >= response_start - 1 - steps and t <= length - 3. Rows
    before that only lend their step-0 K/V to the attention."""
    first = (response_start - 1 - steps).clamp(min=0)
    count = (lengths - 2 - first).clamp(min=0)
    width = max(1, int(count.max()))
    offsets = torch.arange(width, device=lengths.device)
    rows = (first[:, None] + offsets[None, :]).clamp(max=int(lengths.max()) - 2)
    return rows, offsets[None, :] < count[:, None]


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[b, rows[b, r]] for x [B, T, C] and rows [B, R'] (indices clamped into x)."""
    rows = rows.clamp(max=x.shape[1] - 1)
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


def ttt_forward(drafter: ARDrafter, embed, feats, tokens, steps: int, rows: torch.Tensor | None = None):
    """Yield (j, normed hidden [B, R', H]) for TTT steps j = 0..steps-1, row t at position t+j.

    Every row's step-0 keys and values enter the attention (KV-only, as a catch-up computes
    them); queries, the MLP and later steps run only for `rows` [B, R'] (default: all rows),
    since the others cannot carry a loss. Output row r of item b is row rows[b, r]."""
    B, T = tokens.shape
    R = T - 1  # row t pairs f_t with x_{t+1}
    if rows is None:
        rows = torch.arange(R, device=tokens.device).expand(B, R)
    layer, attn = drafter.midlayer, drafter.midlayer.self_attn
    nH, nKV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    cos, sin = drafter.rope_cos, drafter.rope_sin
    g_all = drafter.fuse(feats[:, :R].float())
    emb_all = embed(tokens)
    scale = hd ** -0.5

    def keys_values(a, pos):  # [B, nH, rows, hd] each, KV heads repeated for the query heads
        k = apply_rope(attn.k_proj(a).view(B, -1, nKV, hd).transpose(1, 2), cos[pos][:, None], sin[pos][:, None])
        v = attn.v_proj(a).view(B, -1, nKV, hd).transpose(1, 2)
        return k.repeat_interleave(nH // nKV, 1), v.repeat_interleave(nH // nKV, 1)

    a_all, _ = layer.row_input(g_all, emb_all[:, 1:1 + R])
    key0, value0 = keys_values(a_all, torch.arange(R, device=tokens.device).expand(B, R))
    causal = (torch.arange(R, device=tokens.device)[None, None, :] <= rows[:, :, None])[:, None]  # [B, 1, R', R]: step-0 keys s <= t
    g = gather_rows(g_all, rows)
    keys, values = [], []
    for j in range(steps):
        emb = gather_rows(shifted(emb_all, 1 + j, R), rows)  # x_{t+1+j}, zero past the end
        a, residual = layer.row_input(g, emb)
        pos = rows + j
        q = apply_rope(attn.q_proj(a).view(B, -1, nH, hd).transpose(1, 2), cos[pos][:, None], sin[pos][:, None])
        if j > 0:  # the own chain's rows of steps 1..j
            k, v = keys_values(a, pos)
            keys.append(k)
            values.append(v)
        s0 = (q @ key0.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
        diag = [(q * k).sum(-1, keepdim=True) * scale for k in keys]
        w = torch.softmax(torch.cat([s0] + diag, dim=-1), dim=-1)
        out = w[..., :R] @ value0
        for i, v in enumerate(values):
            out = out + w[..., R + i:R + i + 1] * v
        h = residual + attn.o_proj(out.transpose(1, 2).reshape(B, -1, nH * hd))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        normed = drafter.norm(h)
        yield j, normed
        g = normed if drafter.norm_output else h


def ttt_loss(drafter: ARDrafter, embed, feats, tokens, lengths, response_start, target_to_draft, steps: int,
             decay: float = 0.8, teacher=None, kd: float = 0.0, temperature: float = 1.0):
    """Weighted training-time-test loss over a right-padded batch (step j weighs decay^j); also
    top-1 accuracy and hard-label cross-entropy per step. With distillation (kd > 0),
    `teacher(positions)` gives the target's logits over the draft vocabulary at those positions
    [N] x [N] (batch item, position: the one whose next token is the label); see common.mixed_loss."""
    rows, real = loss_rows(lengths, response_start, steps)
    items = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(rows)
    total, accs, ces = 0.0, [], []
    for j, normed in ttt_forward(drafter, embed, feats, tokens, steps, rows):
        # labels x_{t+2+j}: inside the sequence, inside the response, inside the draft vocabulary
        label_pos = rows + 2 + j
        labels = target_to_draft[tokens.gather(1, label_pos.clamp(max=tokens.shape[1] - 1))]
        valid = real & (label_pos < lengths[:, None]) & (label_pos >= response_start[:, None]) & (labels >= 0)
        if valid.any():
            logits = drafter.lm_head(normed[valid]).float()
            soft = teacher(items[valid], label_pos[valid] - 1) if teacher is not None and kd > 0 else None
            loss, hard = mixed_loss(logits, labels[valid], soft, kd, temperature)
            total = total + (decay ** j) * loss.mean()
            accs.append((logits.argmax(-1) == labels[valid]).float().mean().item())
            ces.append(hard.mean().item())
    return total, accs, ces


def collate(sequences: list[Sequence], feats: list[torch.Tensor], group: list[int]):
    """A right-padded batch of training items: tokens [B, T], features [B, T, C], lengths, response starts."""
    T = max(len(sequences[g].tokens) for g in group)
    tokens = torch.zeros(len(group), T, dtype=torch.long)
    f = torch.zeros(len(group), T, feats[group[0]].shape[-1], dtype=torch.float16)
    for r, g in enumerate(group):
        n = len(sequences[g].tokens)
        tokens[r, :n] = sequences[g].tokens
        f[r, :n] = feats[g]
    lengths = torch.tensor([len(sequences[g].tokens) for g in group])
    starts = torch.tensor([sequences[g].response_start for g in group])
    return tokens, f, lengths, starts


@torch.enable_grad()
def train(args) -> Path:
    from ..models.loading import load_target
    from .data import default_data_dir

    device = check_recipe(args)
    if args.ttt_steps < 1:
        raise UserError(f"--ttt-steps must be at least 1, got {args.ttt_steps}")
    torch.manual_seed(args.seed)
    data_dir = Path(args.data) if args.data else default_data_dir()
    target, _, eos = load_target(args.target, load_tokenizer=False)
    target.requires_grad_(False)
    train_seqs = load_sequences(data_dir, "train")
    if args.start_from:  # go on training a drafter in the published format
        drafter = ARDrafter.from_pretrained(args.start_from, target)
        vocab_ids = drafter.d2t + torch.arange(drafter.draft_vocab)
        if args.draft_vocab not in (None, drafter.draft_vocab):  # another size: the data's own vocabulary
            vocab_ids = frequent_tokens(train_seqs, args.draft_vocab)
            drafter = with_vocabulary(drafter, target, vocab_ids)
    else:
        vocab_ids = frequent_tokens(train_seqs, args.draft_vocab or DEFAULT_DRAFT_VOCAB)
        drafter = new_drafter(target, vocab_ids, args.intermediate, args.init)
    target.to(device)  # built on the CPU (checkpoints load there), trained where asked
    drafter.to(device)
    feats, last = with_last_hidden(target, train_seqs, drafter.feature_layers, last=args.kd > 0)
    target_to_draft = torch.full((target.config.vocab_size,), -1, dtype=torch.long, device=device)
    target_to_draft[vocab_ids.to(device)] = torch.arange(len(vocab_ids), device=device)
    head_rows = target.lm_head.weight[vocab_ids.to(device)].detach()
    drafter.reset(max(len(s.tokens) for s in train_seqs) + args.ttt_steps + 8)
    drafter.train()
    embed = target.model.embed_tokens

    def step_fn(group, generator):
        tokens, f, lengths, starts = (t.to(device) for t in collate(train_seqs, feats, group))
        teacher = None
        if last is not None:
            h = collate(train_seqs, last, group)[1].to(device)  # [B, T, H]

            def teacher(items, positions):  # the target's logits at the position before each label
                return teacher_logits(target, h[items, positions], head_rows)
        loss, accs, ces = ttt_loss(drafter, embed, f, tokens, lengths, starts, target_to_draft, args.ttt_steps,
                                   args.step_decay, teacher, args.kd, args.kd_temperature)
        loss.backward()
        return {"loss": loss.item(), "acc": accs, "ce": ces}

    identity = {"sequences": len(train_seqs), "tokens": sum(len(s.tokens) for s in train_seqs),
                "vocab": int(vocab_ids.sum()), "draft_vocab": len(vocab_ids), "batch": args.batch,
                "ttt_steps": args.ttt_steps, "kd": args.kd, "init": args.init, "start_from": args.start_from, "seed": args.seed, "lr": args.lr,
                "steps": args.steps, "epochs": args.epochs}
    evaluate = heldout_check(target, eos, drafter, ARDrafter.default_k, data_dir, args.eval_prompts)
    log, complete = run_training("ar", drafter, len(train_seqs), step_fn, args, evaluate, identity,
                                 lengths=[len(s.tokens) for s in train_seqs])  # padded batches: group by length
    if not complete:
        print(f"stopped at step {log[-1]['step']}; --resume continues", file=sys.stderr)
        return Path(args.ckpt_dir) if args.ckpt_dir else default_ckpt_dir("ar")
    return finish_training(drafter, args, log, target, eos, data_dir, k=ARDrafter.default_k)


def main(argv=None) -> int:
    from ..cli import nonnegative_float, nonnegative_int, out_dir, positive_float, positive_int, seed  # argument checks
    p = Parser(prog="python -m hybrid_sd.train.ar", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data directory from hybrid_sd.train.data (default: user cache)")
    p.add_argument("--target", default=None, help="target checkpoint directory (default: embedded SmolLM2)")
    p.add_argument("--out", default=DEFAULT_OUT, type=out_dir, help="drafter directory (checked before training)")
    p.add_argument("--epochs", type=positive_int, default=2)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=6e-4)
    p.add_argument("--ttt-steps", type=positive_int, default=ARDrafter.default_k,
                   help="training-time-test steps: the head unrolled on its own outputs (default: its draft length)")
    p.add_argument("--step-decay", type=nonnegative_float, default=0.8, help="loss weight of TTT step j: decay^j")
    p.add_argument("--init", default="mlp", choices=INIT_CHOICES,
                   help="what starts from the target (see new_drafter)")
    p.add_argument("--draft-vocab", type=positive_int, default=None,
                   help=f"draft vocabulary: the data's N most frequent response tokens (default {DEFAULT_DRAFT_VOCAB}; "
                        "with --start-from, the drafter's own)")
    p.add_argument("--start-from", default=None, metavar="DIR",
                   help="go on training this drafter (published EAGLE-3 format) instead of a fresh one; its shapes "
                        "are kept (--init and --intermediate are not used), and its draft vocabulary unless "
                        "--draft-vocab asks for another size (then the data's most frequent tokens; rows it had keep "
                        "their weights, new ones are the target's moved as training moved the kept ones)")
    p.add_argument("--intermediate", type=positive_int, default=None, help="MLP width (default: the target's)")
    p.add_argument("--max-minutes", type=positive_float, default=None, help="stop early after this long")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--eval-per-category", type=nonnegative_int, default=2,
                   help="held-out prompts per category to measure tokens per round on after training (0: skip)")
    add_recipe_args(p, kd=0.0, clip=0.5)
    return exit_code(train, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
