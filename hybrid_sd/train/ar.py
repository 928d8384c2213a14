"""Train an EAGLE-3-style AR drafter for a target: `python -m hybrid_sd.train.ar`.

Training-time test: the head is unrolled on its own outputs for `--ttt-steps` steps, as it
runs when drafting. At step j, the row anchored at t sits at position t+j, takes its own
step-(j-1) output as hidden input and the embedding of x_{t+1+j}, and attends to the
step-0 rows at positions <= t plus its own chain's rows of steps 1..j (exactly what a query
sees while drafting). Step j predicts x_{t+2+j}; losses are weighted 0.8^j. The data are the
target's own greedy answers, so the next token of the text is the target's argmax: hard
labels are the target's greedy choice. The draft vocabulary is the most frequent response
tokens (d2t/t2d of the published format); the LM head and final norm start from the
target's rows, the MLP from the target's last layer.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaConfig

from ..cli import Parser
from ..drafters.ar import ARDrafter, default_aux_layers
from ..errors import exit_code
from ..models.transformer import apply_rope, rope_parameters
from .common import finish_training, Sequence, cosine_lr, frequent_tokens, load_sequences, target_features

DEFAULT_OUT = "ar-drafter"


def new_drafter(target, vocab_ids: torch.Tensor, intermediate: int | None = None) -> ARDrafter:
    tc = target.config
    config = LlamaConfig(
        hidden_size=tc.hidden_size, intermediate_size=intermediate or tc.intermediate_size, num_hidden_layers=1,
        num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
        head_dim=target.head_dim, rms_norm_eps=tc.rms_norm_eps, vocab_size=tc.vocab_size,
        max_position_embeddings=tc.max_position_embeddings, rope_parameters=dict(rope_parameters(tc)))
    config.draft_vocab_size = len(vocab_ids)
    drafter = ARDrafter(config, target.model.embed_tokens, tc.num_hidden_layers, target.head_dim)
    with torch.no_grad():
        for p in drafter.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
        drafter.d2t.copy_(vocab_ids - torch.arange(len(vocab_ids)))
        drafter.t2d.zero_()
        drafter.t2d[vocab_ids] = True
        drafter.lm_head.weight.copy_(target.lm_head.weight[vocab_ids])
        drafter.norm.weight.copy_(target.model.norm.weight)
        last = target.model.layers[-1]
        if drafter.midlayer.mlp.gate_proj.weight.shape == last.mlp.gate_proj.weight.shape:
            drafter.midlayer.mlp.load_state_dict(last.mlp.state_dict())
            drafter.midlayer.post_attention_layernorm.load_state_dict(last.post_attention_layernorm.state_dict())
    return drafter


def shifted(x: torch.Tensor, by: int, length: int) -> torch.Tensor:
    """x[:, by:by+length] along dim 1, zero-padded where it runs past the end."""
    part = x[:, by:by + length]
    pad = length - part.shape[1]
    return torch.cat([part, part.new_zeros(part.shape[0], pad, *part.shape[2:])], dim=1) if pad > 0 else part


def ttt_forward(drafter: ARDrafter, embed, feats, tokens, steps: int):
    """Yield (j, normed hidden [B, R, H]) for TTT steps j = 0..steps-1 (row t at position t+j)."""
    B, T = tokens.shape
    R = T - 1  # row t pairs f_t with x_{t+1}
    layer, attn = drafter.midlayer, drafter.midlayer.self_attn
    nH, nKV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    cos, sin = drafter.rope_cos, drafter.rope_sin
    g = drafter.fuse(feats[:, :R].float())
    emb_all = embed(tokens)
    rows = torch.arange(R)
    causal = rows[None, :] <= rows[:, None]  # step-0 keys s <= t
    keys, values = [], []
    for j in range(steps):
        emb = shifted(emb_all, 1 + j, R)  # x_{t+1+j}, zero past the end
        a, residual = layer.row_input(g, emb)
        pos = rows + j
        q = apply_rope(attn.q_proj(a).view(B, R, nH, hd).transpose(1, 2), cos[pos], sin[pos])
        k = apply_rope(attn.k_proj(a).view(B, R, nKV, hd).transpose(1, 2), cos[pos], sin[pos])
        v = attn.v_proj(a).view(B, R, nKV, hd).transpose(1, 2)
        keys.append(k.repeat_interleave(nH // nKV, 1))
        values.append(v.repeat_interleave(nH // nKV, 1))
        scale = hd ** -0.5
        s0 = (q @ keys[0].transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
        diag = [(q * keys[i]).sum(-1, keepdim=True) * scale for i in range(1, j + 1)]  # own chain
        w = torch.softmax(torch.cat([s0] + diag, dim=-1), dim=-1)
        out = w[..., :R] @ values[0]
        for i in range(1, j + 1):
            out = out + w[..., R + i - 1:R + i] * values[i]
        h = residual + attn.o_proj(out.transpose(1, 2).reshape(B, R, nH * hd))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        normed = drafter.norm(h)
        yield j, normed
        g = normed if drafter.norm_output else h


def ttt_loss(drafter: ARDrafter, embed, feats, tokens, lengths, response_start, target_to_draft, steps: int):
    """Weighted training-time-test loss over a right-padded batch; also top-1 accuracy per step."""
    R = tokens.shape[1] - 1
    rows = torch.arange(R)
    total, accs = 0.0, []
    for j, normed in ttt_forward(drafter, embed, feats, tokens, steps):
        # labels x_{t+2+j}: inside the sequence, inside the response, inside the draft vocabulary
        label_pos = rows + 2 + j
        labels = target_to_draft[shifted(tokens, 2 + j, R)]
        valid = (label_pos[None, :] < lengths[:, None]) & (label_pos[None, :] >= response_start[:, None]) & (labels >= 0)
        if valid.any():
            logits = drafter.lm_head(normed[valid]).float()
            total = total + (0.8 ** j) * F.cross_entropy(logits, labels[valid])
            accs.append((logits.argmax(-1) == labels[valid]).float().mean().item())
    return total, accs


def batches(sequences: list[Sequence], feats: list[torch.Tensor], batch: int, generator: torch.Generator):
    order = torch.randperm(len(sequences), generator=generator).tolist()
    for i in range(0, len(order), batch):
        group = order[i:i + batch]
        T = max(len(sequences[g].tokens) for g in group)
        tokens = torch.zeros(len(group), T, dtype=torch.long)
        f = torch.zeros(len(group), T, feats[group[0]].shape[-1], dtype=torch.float16)
        for r, g in enumerate(group):
            n = len(sequences[g].tokens)
            tokens[r, :n] = sequences[g].tokens
            f[r, :n] = feats[g]
        lengths = torch.tensor([len(sequences[g].tokens) for g in group])
        starts = torch.tensor([sequences[g].response_start for g in group])
        yield tokens, f, lengths, starts


@torch.enable_grad()
def train(args) -> Path:
    from ..models.loading import load_target
    from .data import default_data_dir

    torch.manual_seed(args.seed)
    data_dir = Path(args.data) if args.data else default_data_dir()
    target, _, eos = load_target(args.target, load_tokenizer=False)
    target.requires_grad_(False)
    train_seqs = load_sequences(data_dir, "train")
    layers = default_aux_layers(target.config.num_hidden_layers)
    feats = target_features(target, train_seqs, layers, data_dir / "features")
    vocab_ids = frequent_tokens(train_seqs, args.draft_vocab)
    target_to_draft = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    target_to_draft[vocab_ids] = torch.arange(len(vocab_ids))
    drafter = new_drafter(target, vocab_ids, args.intermediate)
    drafter.reset(max(len(s.tokens) for s in train_seqs) + args.ttt_steps + 8)
    drafter.train()
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_seqs) / args.batch)
    total = steps_per_epoch * args.epochs
    gen = torch.Generator().manual_seed(args.seed)
    log = []
    bar = tqdm(total=total, desc="train ar", unit="step")
    step = 0
    t0 = time.time()
    for epoch in range(args.epochs):
        for tokens, f, lengths, starts in batches(train_seqs, feats, args.batch, gen):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, args.lr, warmup=max(1, total // 20))
            loss, accs = ttt_loss(drafter, target.model.embed_tokens, f, tokens, lengths, starts, target_to_draft,
                                  args.ttt_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            step += 1
            log.append({"step": step, "epoch": epoch, "loss": round(loss.item(), 4), "acc": [round(a, 4) for a in accs]})
            bar.set_postfix(loss=f"{loss.item():.3f}", acc0=f"{accs[0]:.2f}" if accs else "-")
            bar.update()
            if args.max_minutes and time.time() - t0 > args.max_minutes * 60:
                break
        if args.max_minutes and time.time() - t0 > args.max_minutes * 60:
            break
    bar.close()
    return finish_training(drafter, args, log, target, eos, data_dir, k=6)


def main(argv=None) -> int:
    p = Parser(prog="python -m hybrid_sd.train.ar", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data directory from hybrid_sd.train.data (default: user cache)")
    p.add_argument("--target", default=None, help="target checkpoint directory (default: embedded SmolLM2)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--ttt-steps", type=int, default=4)
    p.add_argument("--draft-vocab", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: the target's)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-per-category", type=int, default=2,
                   help="held-out prompts per category to measure tokens per round on after training (0: skip)")
    return exit_code(train, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
