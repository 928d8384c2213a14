"""Train a DFlash-style block drafter for a target: `python -m hybrid_sd.train.block`.

Per sequence, up to `--anchors` random anchor positions a inside the target's response; the
block after each anchor is [x_a, MASK, ..., MASK] at positions a..a+B-1, sees the target
features of positions < a only (as keys/values, like at inference) and itself
bidirectionally, and slot i is trained to predict x_{a+i} with weight exp(-(i-1)/gamma)
(DFlash's recipe; with `--kd`, partly against the target's whole distribution there). The
target's embedding and LM head are used frozen; for speed the loss is a softmax over the
most frequent response tokens (the LM head's rows for them) and, each step, `--negatives`
tokens drawn from the rest (a sampled softmax: they weigh log(rest / drawn) so that they stand
for all of it). The full head drafts at inference, so the rest must be pushed down too:
trained on the frequent tokens alone, a drafter's argmax fell outside them on 29-49 % of
held-out slots, its labels on ~5 %. Draft layers start from evenly spaced target layers (same
shapes; q/k norms at 1; `--init none`: at random). The loop, schedule, checkpoints and held-out checks:
common.run_training.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import Qwen3Config

from ..cli import Parser
from ..drafters.block import BlockDrafter, default_target_layer_ids
from ..errors import UserError, exit_code
from ..models.transformer import apply_rope, rope_parameters
from .common import (add_recipe_args, check_recipe, default_ckpt_dir, finish_training, frequent_tokens, heldout_check,
                     load_sequences, mixed_loss, run_training, teacher_logits, with_last_hidden)

DEFAULT_OUT = "block-drafter"


INIT_CHOICES = ("none", "layers")


def new_drafter(target, n_layers: int, block_size: int, mask_token_id: int,
                layer_ids: list[int] | None = None, init: str = "layers") -> BlockDrafter:
    """A fresh block drafter; with init "layers", draft layer i starts as the target layer
    `layer_ids[i]` (attention, MLP and norms; q/k norms at 1) and the final norm as the target's,
    with "none" all at random (norms at 1). `fc` always starts at random."""
    if init not in INIT_CHOICES:
        raise UserError(f"--init {init!r}: choose from {', '.join(INIT_CHOICES)}")
    tc = target.config
    config = Qwen3Config(
        hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size, num_hidden_layers=n_layers,
        num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
        head_dim=target.head_dim, rms_norm_eps=tc.rms_norm_eps, vocab_size=tc.vocab_size,
        max_position_embeddings=tc.max_position_embeddings, rope_theta=rope_parameters(tc).get("rope_theta", 1e6),
        tie_word_embeddings=False)
    ids = layer_ids or default_target_layer_ids(tc.num_hidden_layers, n_layers)
    if len(ids) != n_layers or not all(0 <= i < tc.num_hidden_layers for i in ids):
        raise UserError(f"--target-layer-ids {ids}: need {n_layers} ids in [0, {tc.num_hidden_layers})")
    drafter = BlockDrafter(config, target, ids, mask_token_id, block_size)
    with torch.no_grad():
        torch.nn.init.normal_(drafter.fc.weight, std=0.02)
        if init == "none":
            random_matrices(drafter.layers)
            return drafter
        for mine, source_idx in zip(drafter.layers, ids):
            copy_target_layer(mine, target.model.layers[source_idx])
        drafter.norm.weight.copy_(target.model.norm.weight)
    return drafter


@torch.no_grad()
def random_matrices(module) -> None:
    """Every weight matrix of `module` drawn afresh (norms keep their ones)."""
    for p in module.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)


@torch.no_grad()
def copy_target_layer(mine, src) -> None:
    """A draft layer's attention projections, MLP and norms from a target layer of the same
    shapes; its q/k norms stay as they are (at 1 in a fresh layer)."""
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(mine.self_attn, name).weight.copy_(getattr(src.self_attn, name).weight)
    mine.mlp.load_state_dict(src.mlp.state_dict())
    mine.input_layernorm.load_state_dict(src.input_layernorm.state_dict())
    mine.post_attention_layernorm.load_state_dict(src.post_attention_layernorm.state_dict())


def same_shapes(mine, src) -> bool:
    """Whether a target layer's attention projections and MLP fit a draft layer's."""
    names = [f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
    theirs, ours = src.state_dict(), mine.state_dict()
    return all(n in theirs and theirs[n].shape == ours[n].shape for n in names)


@torch.no_grad()
def grown(drafter: BlockDrafter, target, extra: int) -> BlockDrafter:
    """`drafter` with `extra` draft layers appended that start as the identity, so that the grown
    drafter drafts exactly what `drafter` did until training moves it: each new layer is a copy of
    an evenly spaced target layer whose two residual outputs (o_proj, the MLP's down_proj) are
    zero. The capacity question of #14 asks what more layers buy over the same training; a grown
    drafter answers it from the shipped one's start rather than from scratch."""
    c = drafter.config
    config = Qwen3Config(**{**c.to_dict(), "num_hidden_layers": c.num_hidden_layers + extra, "layer_types": None})
    bigger = BlockDrafter(config, target, drafter.target_layer_ids, drafter.mask_token_id, drafter.block_size)
    missing, unexpected = bigger.load_state_dict(drafter.state_dict(), strict=False)
    new_prefixes = tuple(f"layers.{i}." for i in range(c.num_hidden_layers, config.num_hidden_layers))
    assert not unexpected and all(k.startswith(new_prefixes) for k in missing), (missing, unexpected)
    sources = default_target_layer_ids(target.config.num_hidden_layers, extra)
    for mine, source_idx in zip(bigger.layers[c.num_hidden_layers:], sources):
        src = target.model.layers[source_idx]
        if same_shapes(mine, src):
            copy_target_layer(mine, src)
        else:  # a drafter narrower or wider than its target: the new layers start at random
            random_matrices(mine)
        for out in (mine.self_attn.o_proj, mine.mlp.down_proj):  # the residual outputs: zero adds nothing
            out.weight.zero_()
            if out.bias is not None:
                out.bias.zero_()
    p = drafter.fc.weight
    return bigger.to(device=p.device, dtype=p.dtype)


def block_forward(drafter: BlockDrafter, feats: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor):
    """Normed hidden states [N, A, B, H] of the blocks after `anchors` [N, A] in N right-padded
    sequences (`feats` [N, T, F], `tokens` [N, T]), in one pass: a block sees the context before
    its anchor and nothing past it, so no row reads a sequence's padding. Batched over sequences
    because a loop of small passes is bound by kernel launches on a GPU."""
    B = drafter.block_size
    (N, A), T = anchors.shape, tokens.shape[1]
    L = A * B  # block rows per sequence
    device = tokens.device
    embed, _ = drafter.target_io
    cos, sin = drafter.rope_cos, drafter.rope_sin
    ctx = drafter.context(feats.float()).reshape(N * T, -1)  # fused features of every position
    ctx_pos = torch.arange(T, device=device).repeat(N)
    block_pos = (anchors[..., None] + torch.arange(B, device=device)).reshape(-1)  # [N*L]
    block = torch.full((N, A, B), drafter.mask_token_id, dtype=torch.long, device=device)
    block[..., 0] = tokens.gather(1, anchors)
    x = embed(block.reshape(-1))
    blk_id = torch.arange(A, device=device).repeat_interleave(B)
    sees_ctx = torch.arange(T, device=device) < anchors.repeat_interleave(B, dim=1)[..., None]  # [N, L, T]
    sees_blk = (blk_id[:, None] == blk_id[None, :]).expand(N, L, L)  # its own block, both directions
    mask = torch.cat([sees_ctx, sees_blk], dim=2)[:, None]

    def per_sequence(t: torch.Tensor, rows: int) -> torch.Tensor:  # [1, heads, N*rows, d] -> [N, heads, rows, d]
        return t[0].unflatten(1, (N, rows)).transpose(0, 1)

    for layer in drafter.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(h).view(N * L, attn.n_heads, -1)).transpose(0, 1)
        q = apply_rope(q, cos[block_pos], sin[block_pos])
        k_c, v_c = attn.kv(ctx, cos[ctx_pos], sin[ctx_pos])
        k_b, v_b = attn.kv(h, cos[block_pos], sin[block_pos])
        k = torch.cat([per_sequence(k_c, T), per_sequence(k_b, L)], dim=2)
        v = torch.cat([per_sequence(v_c, T), per_sequence(v_b, L)], dim=2)
        y = F.scaled_dot_product_attention(per_sequence(q[None], L), k, v, attn_mask=mask, enable_gqa=True)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(N * L, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return drafter.norm(x).view(N, A, B, -1)


def sampled_rest(rest_ids: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """`n` ids drawn uniformly without replacement from `rest_ids` (the tokens outside the loss
    vocabulary) and the log-correction log(len(rest) / n) that lets them stand for all the rest
    in a softmax."""
    n = min(n, rest_ids.numel())
    if n == 0:
        return rest_ids[:0], 0.0
    drawn = rest_ids[torch.randperm(rest_ids.numel(), generator=generator)[:n]]
    return drawn, math.log(rest_ids.numel() / n)


def loss_columns(head_rows: torch.Tensor, negatives: torch.Tensor | None, correction: float):
    """The LM head rows a step's softmaxes run over (the loss vocabulary's, then the drawn
    negatives') and their log-weights (None without negatives), built once per step."""
    if negatives is None:
        return head_rows, None
    log_weight = torch.zeros(head_rows.shape[0] + negatives.shape[0], device=head_rows.device)
    log_weight[head_rows.shape[0]:] = correction
    return torch.cat([head_rows, negatives]), log_weight


def block_loss(drafter, rows, target_to_sub, feats, tokens, anchors, gamma, last=None, target=None,
               kd: float = 0.0, temperature: float = 1.0, log_weight: torch.Tensor | None = None,
               lengths: torch.Tensor | None = None, anchor_real: torch.Tensor | None = None):
    """Position-weighted loss of the blocks after `anchors` [N, A] in N right-padded sequences
    (`tokens` [N, T] of `lengths` tokens; `anchor_real` [N, A] False where a short sequence's
    anchors are padding), averaged over the sequences. Slot i weighs exp(-(i-1)/gamma), DFlash's
    decay: early slots decide how much of a draft is accepted. With kd > 0, partly distilled
    against the target's distribution at the position before each label (`last` [N, T, H]: the
    target's last hidden states). `rows`, `log_weight`: from loss_columns; the drawn negatives
    join both softmaxes as classes no label names. Also the weighted hard-label cross-entropy
    (comparable across kd; with negatives, a sampled estimate of the full-vocabulary one) and
    top-1 accuracy per slot over the loss vocabulary and the drawn tokens (unweighted logits, as
    drafting sees them), each averaged over the sequences that have that slot."""
    B = drafter.block_size
    (N, A), T = anchors.shape, tokens.shape[1]
    device = tokens.device
    lengths = torch.full((N,), T, device=device) if lengths is None else lengths
    anchor_real = torch.ones(N, A, dtype=torch.bool, device=device) if anchor_real is None else anchor_real
    normed = block_forward(drafter, feats, tokens, anchors)[:, :, 1:]  # slots 1..B-1
    label_pos = anchors[..., None] + torch.arange(1, B, device=device)  # [N, A, B-1]
    labels = target_to_sub[tokens.gather(1, label_pos.clamp(max=T - 1).flatten(1)).view_as(label_pos)]
    valid = (label_pos < lengths[:, None, None]) & (labels >= 0) & anchor_real[..., None]
    logits = (normed[valid] @ rows.T).float()
    teacher = None
    if last is not None and kd > 0:
        seq_of = torch.arange(N, device=device)[:, None, None].expand_as(label_pos)
        teacher = teacher_logits(target, last[seq_of[valid], (label_pos - 1)[valid]], rows)
    ce, hard = mixed_loss(logits, labels[valid], teacher, kd, temperature, log_weight)
    decay = torch.exp(-torch.arange(B - 1, dtype=torch.float32, device=device) / gamma)
    weights = decay * valid  # each sequence's weights sum to 1 (0 when it has no label)
    weights = (weights / weights.sum((1, 2), keepdim=True).clamp_min(1e-30))[valid]
    loss = (ce * weights).sum() / N
    hit = torch.zeros(N, A, B - 1, device=device)
    hit[valid] = (logits.argmax(-1) == labels[valid]).float()
    counted = valid.sum(1)  # [N, B-1]
    per_sequence = torch.where(counted > 0, hit.sum(1) / counted.clamp_min(1), torch.nan)
    return loss, (hard * weights).sum().item() / N, per_sequence.nanmean(0).tolist()


@torch.enable_grad()
def train(args) -> Path:
    from ..models.loading import load_target
    from .data import default_data_dir

    device = check_recipe(args)
    if args.grow_layers and not args.start_from:
        raise UserError("--grow-layers adds layers to a trained drafter: give it --start-from DIR")
    torch.manual_seed(args.seed)
    data_dir = Path(args.data) if args.data else default_data_dir()
    target, tokenizer, eos = load_target(args.target, load_tokenizer=args.mask_token_id is None)
    target.requires_grad_(False)
    mask_id = args.mask_token_id
    if mask_id is None:  # an existing special token the target never emits in answers
        mask_id = tokenizer.convert_tokens_to_ids(args.mask_token)
        if mask_id is None or mask_id == tokenizer.unk_token_id:
            raise UserError(f"mask token {args.mask_token!r} is not in the tokenizer; pass --mask-token-id")
    seqs = load_sequences(data_dir, "train")
    layer_ids = [int(x) for x in args.target_layer_ids.split(",")] if args.target_layer_ids else None
    if args.start_from:  # go on training a drafter in the published format: its shapes and mask token
        drafter = BlockDrafter.from_pretrained(args.start_from, target)
        if args.grow_layers:
            drafter = grown(drafter, target, args.grow_layers)
    else:
        drafter = new_drafter(target, args.layers, args.block_size, mask_id, layer_ids, args.init)
    target.to(device)  # built on the CPU (checkpoints load there), trained where asked
    drafter.to(device)
    feats, last = with_last_hidden(target, seqs, drafter.feature_layers, last=args.kd > 0)
    vocab_ids = frequent_tokens(seqs, args.loss_vocab)
    target_to_sub = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    target_to_sub[vocab_ids] = torch.arange(len(vocab_ids))
    rest_ids = (target_to_sub < 0).nonzero().view(-1)  # on the CPU, where the seeded draws are made
    target_to_sub = target_to_sub.to(device)
    head_rows = target.lm_head.weight[vocab_ids.to(device)].detach()
    drafter.reset(max(len(s.tokens) for s in seqs) + drafter.block_size)
    drafter.train()

    def step_fn(group, generator):
        drawn, correction = sampled_rest(rest_ids, args.negatives, generator)
        negatives = target.lm_head.weight[drawn.to(device)].detach() if drawn.numel() else None
        rows, log_weight = loss_columns(head_rows, negatives, correction)
        picks = []
        for g in group:  # anchors: random positions whose next token is in the response (the bonus is x_a)
            seq = seqs[g]
            candidates = torch.arange(max(1, seq.response_start - 1), seq.tokens.numel() - 1)
            picks.append(candidates[torch.randperm(candidates.numel(), generator=generator)[:args.anchors]])
        # right-padded to the longest sequence (and anchor count) of the batch
        lengths = torch.tensor([seqs[g].tokens.numel() for g in group])
        tokens = pad_sequence([seqs[g].tokens for g in group], batch_first=True)
        batch_feats = pad_sequence([feats[g] for g in group], batch_first=True)
        batch_last = pad_sequence([last[g] for g in group], batch_first=True) if last is not None else None
        anchors = pad_sequence(picks, batch_first=True)
        anchor_real = pad_sequence([torch.ones(p.numel(), dtype=torch.bool) for p in picks], batch_first=True)
        loss, ce, acc = block_loss(drafter, rows, target_to_sub, batch_feats.to(device), tokens.to(device),
                                   anchors.to(device), args.gamma,
                                   batch_last.to(device) if last is not None else None, target, args.kd,
                                   args.kd_temperature, log_weight, lengths.to(device), anchor_real.to(device))
        loss.backward()
        acc = torch.tensor(acc).nan_to_num(0.0).tolist()
        return {"loss": loss.item(), "ce": ce, "acc1": acc[0], "acc": acc}

    identity = {"sequences": len(seqs), "tokens": sum(len(s.tokens) for s in seqs), "vocab": int(vocab_ids.sum()),
                "loss_vocab": len(vocab_ids), "negatives": args.negatives, "batch": args.batch,
                "layers": list(drafter.target_layer_ids),
                "block_size": drafter.block_size, "anchors": args.anchors, "kd": args.kd, "init": args.init,
                "start_from": args.start_from, **({"grow_layers": args.grow_layers} if args.grow_layers else {}),
                "seed": args.seed, "lr": args.lr,
                "steps": args.steps, "epochs": args.epochs}
    k = drafter.block_size - 1
    evaluate = heldout_check(target, eos, drafter, k, data_dir, args.eval_prompts)
    log, complete = run_training("block", drafter, len(seqs), step_fn, args, evaluate, identity,
                                 lengths=[len(s.tokens) for s in seqs])
    if not complete:
        print(f"stopped at step {log[-1]['step']}; --resume continues", file=sys.stderr)
        return Path(args.ckpt_dir) if args.ckpt_dir else default_ckpt_dir("block")
    return finish_training(drafter, args, log, target, eos, data_dir, k=k)


def main(argv=None) -> int:
    from ..cli import int_at_least, layer_ids, nonnegative_int, out_dir, positive_float, positive_int, seed  # argument checks
    p = Parser(prog="python -m hybrid_sd.train.block", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data directory from hybrid_sd.train.data (default: user cache)")
    p.add_argument("--target", default=None, help="target checkpoint directory (default: embedded SmolLM2)")
    p.add_argument("--out", default=DEFAULT_OUT, type=out_dir, help="drafter directory (checked before training)")
    p.add_argument("--layers", type=positive_int, default=3)
    p.add_argument("--target-layer-ids", default=None, type=layer_ids,
                   help="target layer outputs to read, DFlash numbering, e.g. 1,14,26 (default: evenly spaced)")
    p.add_argument("--block-size", type=int_at_least(2), default=8, help="the bonus and block size - 1 drafts (>= 2)")
    p.add_argument("--anchors", type=positive_int, default=32, help="anchors per sequence per step")
    p.add_argument("--gamma", type=positive_float, default=4.0, help="loss weight decay over block slots (4 for block 8)")
    p.add_argument("--epochs", type=positive_int, default=2)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=6e-4)
    p.add_argument("--loss-vocab", type=positive_int, default=4096)
    p.add_argument("--negatives", type=nonnegative_int, default=4096,
                   help="tokens drawn each step from outside the loss vocabulary to push down (sampled softmax; "
                        "0: the loss vocabulary alone)")
    p.add_argument("--mask-token", default="<reponame>", help="an existing special token never emitted in answers")
    p.add_argument("--mask-token-id", type=nonnegative_int, default=None)
    p.add_argument("--max-minutes", type=positive_float, default=None)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--init", default="layers", choices=INIT_CHOICES,
                   help="draft layers from evenly spaced target layers, or at random")
    p.add_argument("--start-from", default=None, metavar="DIR",
                   help="go on training this drafter (published DFlash format) instead of a fresh one; its layers, "
                        "layer ids, block size and mask token are kept, --init, --layers, --target-layer-ids, "
                        "--block-size and --mask-token are not used")
    p.add_argument("--grow-layers", type=nonnegative_int, default=0, metavar="N",
                   help="with --start-from: append N draft layers that start as the identity (target layers with "
                        "zeroed residual outputs), so that training begins from the drafter's own drafts")
    p.add_argument("--eval-per-category", type=nonnegative_int, default=2,
                   help="held-out prompts per category to measure tokens per round on after training (0: skip)")
    add_recipe_args(p, kd=0.0, clip=1.0)
    return exit_code(train, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
