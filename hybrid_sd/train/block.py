"""Train a DFlash-style block drafter for a target: `python -m hybrid_sd.train.block`.

Per sequence, up to `--anchors` random anchor positions a inside the target's response; the
block after each anchor is [x_a, MASK, ..., MASK] at positions a..a+B-1, sees the target
features of positions < a only (as keys/values, like at inference) and itself
bidirectionally, and slot i is trained to predict x_{a+i} with weight exp(-(i-1)/gamma).
The target's embedding and LM head are used frozen; for speed the loss is a softmax over
the most frequent response tokens (the LM head's rows for them), the full head drafts at
inference. Draft layers start from evenly spaced target layers (same shapes; q/k norms at 1).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import Qwen3Config

from ..cli import Parser
from ..drafters.block import BlockDrafter, default_target_layer_ids
from ..errors import UserError, exit_code
from ..models.transformer import apply_rope, rope_parameters
from .common import finish_training, cosine_lr, frequent_tokens, load_sequences, target_features

DEFAULT_OUT = "block-drafter"


def new_drafter(target, n_layers: int, block_size: int, mask_token_id: int,
                layer_ids: list[int] | None = None) -> BlockDrafter:
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
        for mine, source_idx in zip(drafter.layers, ids):
            src = target.model.layers[source_idx]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(mine.self_attn, name).weight.copy_(getattr(src.self_attn, name).weight)
            mine.mlp.load_state_dict(src.mlp.state_dict())
            mine.input_layernorm.load_state_dict(src.input_layernorm.state_dict())
            mine.post_attention_layernorm.load_state_dict(src.post_attention_layernorm.state_dict())
        drafter.norm.weight.copy_(target.model.norm.weight)
    return drafter


def block_forward(drafter: BlockDrafter, feats: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor):
    """Normed hidden states [A, B, H] of the blocks after `anchors` in one sequence."""
    B, A, T = drafter.block_size, anchors.numel(), tokens.numel()
    embed, _ = drafter.target_io
    cos, sin = drafter.rope_cos, drafter.rope_sin
    ctx = drafter.hidden_norm(drafter.fc(feats.float()))  # [T, H]: features of every position
    block_pos = (anchors[:, None] + torch.arange(B)).reshape(-1)  # [A*B]
    block = torch.full((A, B), drafter.mask_token_id, dtype=torch.long)
    block[:, 0] = tokens[anchors]
    x = embed(block.reshape(-1))
    ctx_pos = torch.arange(T)
    blk_id = torch.arange(A).repeat_interleave(B)
    sees_ctx = ctx_pos[None, :] < anchors.repeat_interleave(B)[:, None]  # strictly before the anchor
    sees_blk = blk_id[:, None] == blk_id[None, :]  # its own block, both directions
    mask = torch.cat([sees_ctx, sees_blk], dim=1)
    for layer in drafter.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(h).view(A * B, attn.n_heads, -1)).transpose(0, 1)
        q = apply_rope(q, cos[block_pos], sin[block_pos])
        k_c, v_c = attn.kv(ctx, cos[ctx_pos], sin[ctx_pos])
        k_b, v_b = attn.kv(h, cos[block_pos], sin[block_pos])
        k = torch.cat([k_c, k_b], dim=2)[0]
        v = torch.cat([v_c, v_b], dim=2)[0]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = x + attn.o_proj(y.transpose(0, 1).reshape(A * B, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return drafter.norm(x).view(A, B, -1)


def block_loss(drafter, head_rows, target_to_sub, feats, seq, anchors, gamma):
    B = drafter.block_size
    T = seq.tokens.numel()
    normed = block_forward(drafter, feats, seq.tokens, anchors)[:, 1:]  # slots 1..B-1
    label_pos = anchors[:, None] + torch.arange(1, B)
    labels = target_to_sub[seq.tokens[label_pos.clamp(max=T - 1)]]
    valid = (label_pos < T) & (labels >= 0)
    weights = torch.exp(-(torch.arange(B - 1, dtype=torch.float32)) / gamma).expand_as(label_pos)
    logits = normed[valid] @ head_rows.T
    ce = F.cross_entropy(logits.float(), labels[valid], reduction="none")
    loss = (ce * weights[valid]).sum() / weights[valid].sum()
    acc1 = (logits.argmax(-1) == labels[valid])[(label_pos[valid] == anchors[:, None].expand_as(label_pos)[valid] + 1)]
    return loss, acc1.float().mean().item() if acc1.numel() else 0.0


@torch.enable_grad()
def train(args) -> Path:
    from ..models.loading import load_target
    from .data import default_data_dir

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
    drafter = new_drafter(target, args.layers, args.block_size, mask_id, layer_ids)
    layers = drafter.feature_layers
    feats = target_features(target, seqs, layers, data_dir / "features")
    vocab_ids = frequent_tokens(seqs, args.loss_vocab)
    target_to_sub = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    target_to_sub[vocab_ids] = torch.arange(len(vocab_ids))
    head_rows = target.lm_head.weight[vocab_ids].detach()
    drafter.reset(max(len(s.tokens) for s in seqs) + args.block_size)
    drafter.train()
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    total = math.ceil(len(seqs) / args.batch) * args.epochs
    gen = torch.Generator().manual_seed(args.seed)
    log, step, t0 = [], 0, time.time()
    bar = tqdm(total=total, desc="train block", unit="step")
    out_of_time = False
    for epoch in range(args.epochs):
        order = torch.randperm(len(seqs), generator=gen).tolist()
        for i in range(0, len(order), args.batch):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, args.lr, warmup=max(1, total // 20))
            opt.zero_grad(set_to_none=True)
            losses, accs = [], []
            group_ids = order[i:i + args.batch]
            for g in group_ids:
                seq = seqs[g]
                T = seq.tokens.numel()
                candidates = torch.arange(max(1, seq.response_start - 1), T - 1)
                pick = torch.randperm(candidates.numel(), generator=gen)[:args.anchors]
                loss, acc = block_loss(drafter, head_rows, target_to_sub, feats[g], seq, candidates[pick], args.gamma)
                (loss / len(group_ids)).backward()
                losses.append(loss.item())
                accs.append(acc)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            mean_loss, mean_acc = sum(losses) / len(losses), sum(accs) / len(accs)
            log.append({"step": step, "epoch": epoch, "loss": round(mean_loss, 4), "acc1": round(mean_acc, 4)})
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc1=f"{mean_acc:.2f}")
            bar.update()
            if args.max_minutes and time.time() - t0 > args.max_minutes * 60:
                out_of_time = True
                break
        if out_of_time:
            break
    bar.close()
    return finish_training(drafter, args, log, target, eos, data_dir, k=drafter.block_size - 1)


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.train.block", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data directory from hybrid_sd.train.data (default: user cache)")
    p.add_argument("--target", default=None, help="target checkpoint directory (default: embedded SmolLM2)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--target-layer-ids", default=None,
                   help="target layer outputs to read, DFlash numbering, e.g. 1,14,26 (default: evenly spaced)")
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--anchors", type=int, default=32, help="anchors per sequence per step")
    p.add_argument("--gamma", type=float, default=4.0, help="loss weight decay over block slots (4 for block 8)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--loss-vocab", type=int, default=4096)
    p.add_argument("--mask-token", default="<reponame>", help="an existing special token never emitted in answers")
    p.add_argument("--mask-token-id", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-per-category", type=int, default=2,
                   help="held-out prompts per category to measure tokens per round on after training (0: skip)")
    return exit_code(train, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
