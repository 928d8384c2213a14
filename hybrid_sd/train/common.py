"""Shared training pieces: sequences, cached target features, draft vocabulary, schedules."""
from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import UserError
from .data import feature_key, features_path, read_features, read_jsonl, split_shards, write_features_atomic


@dataclass
class Sequence:
    tokens: torch.Tensor     # [T] prompt + response
    response_start: int      # first response position
    category: str
    shard: Path | None = None  # where it came from (its features are stored beside it)
    row: int = -1              # its row in that shard


def load_sequences(data_dir: Path, split: str, max_len: int = 512) -> list[Sequence]:
    out = []
    for shard in split_shards(data_dir, split):
        for i, row in enumerate(read_jsonl(shard)):
            ids = (row["prompt_ids"] + row["response_ids"])[:max_len]
            if len(row["response_ids"]) >= 2 and len(row["prompt_ids"]) < len(ids):
                out.append(Sequence(torch.tensor(ids), len(row["prompt_ids"]), row["category"], shard, i))
    return out


@torch.inference_mode()
def target_features(target, sequences: list[Sequence], layers: tuple[int, ...], batch_tokens: int = 4096,
                    ) -> list[torch.Tensor]:
    """Per sequence, the target's hidden states `layers` at every position: [T, len(layers) * H] fp16.

    They are read from the feature file beside each sequence's shard (written by the data
    command as it generates, or here the first time a trainer needs a layer it lacks); missing
    ones are computed in right-padded batches (causal attention keeps the padding out of real
    rows) and added to those files (atomically), so no epoch, run or later growth of the data
    recomputes them. A position the file does not hold (an answer's last, never read) is zero.
    """
    H = target.config.hidden_size
    out = [torch.zeros(len(s.tokens), len(layers) * H, dtype=torch.float16) for s in sequences]
    by_shard: dict[Path | None, list[int]] = {}
    for i, s in enumerate(sequences):
        by_shard.setdefault(s.shard, []).append(i)
    todo: dict[tuple[int, ...], list[int]] = {}  # missing layers -> sequences
    for shard, idx in by_shard.items():
        stored = read_features(features_path(shard)) if shard is not None else {}
        for i in idx:
            s, missing = sequences[i], []
            for c, layer in enumerate(layers):
                f = stored.get(feature_key(s.row, layer))
                if f is None or f.shape[-1] != H or f.shape[0] < len(s.tokens) - 1:  # absent, foreign, short
                    missing.append(layer)
                    continue
                n = min(len(s.tokens), f.shape[0])
                out[i][:n, c * H:(c + 1) * H] = f[:n]
            if missing:
                todo.setdefault(tuple(missing), []).append(i)
        del stored
    for missing, idx in todo.items():
        computed = _compute_features(target, [sequences[i] for i in idx], missing, batch_tokens)
        for i, f in zip(idx, computed):
            for m, layer in enumerate(missing):
                c = layers.index(layer)
                out[i][:, c * H:(c + 1) * H] = f[:, m * H:(m + 1) * H]
        for shard in {sequences[i].shard for i in idx} - {None}:
            tensors = read_features(features_path(shard))
            for i, f in zip(idx, computed):
                if sequences[i].shard == shard:
                    for m, layer in enumerate(missing):
                        tensors[feature_key(sequences[i].row, layer)] = f[:, m * H:(m + 1) * H]
            write_features_atomic(features_path(shard), tensors)
    return out


def _compute_features(target, sequences: list[Sequence], layers: tuple[int, ...], batch_tokens: int):
    H = target.config.hidden_size
    device = target.lm_head.weight.device
    out = [torch.empty(len(s.tokens), len(layers) * H, dtype=torch.float16) for s in sequences]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].tokens))
    bar = tqdm(total=len(sequences), desc=f"target features {layers}", unit="seq")
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(sequences[order[j]].tokens) <= batch_tokens:
            j += 1
        group = order[i:j]
        width = max(len(sequences[g].tokens) for g in group)
        batch = torch.zeros(len(group), width, dtype=torch.long)
        for r, g in enumerate(group):
            batch[r, :len(sequences[g].tokens)] = sequences[g].tokens
        _, f = target(batch.to(device), torch.arange(width, device=device), capture=layers)
        f = f.cpu()
        for r, g in enumerate(group):
            out[g][:] = f[r, :len(sequences[g].tokens)]
        bar.update(len(group))
        i = j
    bar.close()
    return out


def frequent_tokens(sequences: list[Sequence], size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The `size` most frequent response tokens (plus `always`), sorted by id."""
    counts = Counter()
    for s in sequences:
        counts.update(s.tokens[s.response_start:].tolist())
    chosen = set(always)
    for token, _ in counts.most_common():
        if len(chosen) >= size:
            break
        chosen.add(token)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def finish_training(drafter, args, log: list[dict], target, eos, data_dir: Path, k: int) -> Path:
    """Save the drafter (fp16, published format) and its training log; with
    `--eval-per-category`, measure held-out tokens per round at draft length k into the log."""
    import json

    drafter.eval()
    out = Path(args.out)
    drafter.save_pretrained(out, dtype=torch.float16)
    record = {"args": vars(args), "log": log}
    if args.eval_per_category:
        from ..eval.acceptance import heldout_tau
        tau = heldout_tau(target, eos, drafter, k, data_dir, args.eval_per_category)
        record["heldout_tau"] = {"k": k, **tau}
        print(f"held-out tokens per round at k={k}: " + ", ".join(f"{c} {t:.2f}" for c, t in tau.items()))
    (out / "training_log.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return out


# ---- the training recipe both trainers share ---------------------------------------------
def add_recipe_args(p, *, kd: float, clip: float = 1.0, steps_per_eval: int = 200) -> None:
    """Flags of the shared recipe: distillation, schedule, clipping, held-out checks during
    training, checkpoints and resuming."""
    p.add_argument("--kd", type=float, default=kd,
                   help="weight of distillation against the target's own next-token distribution (its final norm "
                        f"and LM head on its last hidden state, over the drafter's vocabulary); 1 - kd goes to the "
                        f"hard label (default {kd})")
    p.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature of the distillation")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps in all (default: --epochs passes over the data); the schedule spans them")
    p.add_argument("--fit-minutes", type=float, default=None,
                   help="set the step count so that the optimisation (its warm-up and cosine decay, from the first "
                        "step on: loading and target features come before) fills this many minutes, from the speed of "
                        "its first steps; instead of --steps")
    p.add_argument("--warmup", type=float, default=0.05, help="linear warm-up, as a fraction of the steps, then cosine")
    p.add_argument("--clip", type=float, default=clip, help=f"gradient norm clipping (default {clip})")
    p.add_argument("--eval-every", type=int, default=steps_per_eval,
                   help="measure held-out tokens per round every N steps (0: only at the end)")
    p.add_argument("--eval-prompts", type=int, default=1, help="held-out prompts per category for those checks")
    p.add_argument("--ckpt-dir", default=None,
                   help="where training checkpoints go (default: the user cache, hybrid_sd/ckpt/KIND)")
    p.add_argument("--ckpt-every", type=int, default=100, help="save a training checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --ckpt-dir")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps; --resume continues to the end")
    p.add_argument("--device", default="cpu",
                   help="where the target's features are computed and the drafter trains: cpu or cuda[:N]; "
                        "the data stay on the CPU and each batch moves over")


def default_ckpt_dir(kind: str) -> Path:
    from ..models.embedded import cache_root
    return cache_root() / "ckpt" / kind


def with_last_hidden(target, sequences: list[Sequence], layers: tuple[int, ...],
                     last: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The drafter's features and, when `last`, the target's last hidden state (before its final
    norm: the distillation teacher) per sequence, from one cached pass."""
    L = target.config.num_hidden_layers
    wanted = tuple(layers) + ((L,) if last and L not in layers else ())
    feats = target_features(target, sequences, wanted)
    if not last:
        return feats, None
    H = target.config.hidden_size
    col = wanted.index(L)
    width = len(layers) * H
    return [f[:, :width] for f in feats], [f[:, col * H:(col + 1) * H] for f in feats]


def teacher_logits(target, last_hidden: torch.Tensor, head_rows: torch.Tensor) -> torch.Tensor:
    """The target's logits over a vocabulary subset (`head_rows` = its LM head's rows) from its
    last hidden state [N, H]."""
    with torch.no_grad():
        return (target.model.norm(last_hidden.float()) @ head_rows.T).float()


def mixed_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, kd: float,
               temperature: float = 1.0, log_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (1 - kd) * CE(hard label) + kd * T^2 * CE(softmax(teacher / T)), and the
    hard-label CE alone (comparable across kd). `log_weight` [columns] is added to both
    softmaxes after the temperature: a sampled column standing for many tokens weighs log(many)."""
    shift = 0.0 if log_weight is None else log_weight
    hard = F.cross_entropy(logits + shift, labels, reduction="none")
    if teacher is None or kd <= 0:
        return hard, hard.detach()
    soft = F.cross_entropy(logits / temperature + shift, torch.softmax(teacher / temperature + shift, dim=-1),
                           reduction="none") * temperature ** 2
    return (1 - kd) * hard + kd * soft, hard.detach()


def check_recipe(args) -> torch.device:
    """Refuse a bad recipe flag before any work; the device the run trains on."""
    from ..cli import resolve_device
    if not 0 <= args.kd <= 1:
        raise UserError(f"--kd must be between 0 and 1, got {args.kd}")
    if not args.kd_temperature > 0:  # NaN too
        raise UserError(f"--kd-temperature must be positive, got {args.kd_temperature}")
    if not 0 <= args.warmup < 1:
        raise UserError(f"--warmup must be a fraction in [0, 1), got {args.warmup}")
    if args.fit_minutes is not None and not args.fit_minutes > 0:  # NaN too
        raise UserError(f"--fit-minutes must be positive, got {args.fit_minutes}")
    if args.fit_minutes is not None and args.steps is not None:
        raise UserError("--fit-minutes sets the step count: drop --steps")
    for flag in ("steps", "stop_at"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("eval_every", "eval_prompts"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 0, got {getattr(args, flag)}")
    if args.ckpt_every < 1:
        raise UserError(f"--ckpt-every must be at least 1, got {args.ckpt_every}")
    if not args.clip > 0:  # NaN too
        raise UserError(f"--clip must be positive, got {args.clip}")
    return resolve_device(args.device)


class Checkpoints:
    """One training checkpoint per run directory (`last.pt`: model, optimizer, step, position in
    the epoch, random states, log), replaced atomically."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.path = self.dir / "last.pt"

    def save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="last.pt.", dir=self.dir)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self) -> dict:
        if not self.path.is_file():
            raise UserError(f"no training checkpoint to resume in {self.dir}; drop --resume to start a new run")
        try:
            return torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # a cut-short or foreign file
            raise UserError(f"{self.path}: not a readable training checkpoint ({type(e).__name__})") from None


def epoch_batches(n_items: int, batch: int, generator: torch.Generator, lengths: list[int] | None = None,
                  group: int = 16) -> list[list[int]]:
    """One epoch's batches of item indices in random order. With `lengths`, items are shuffled,
    sorted by length within spans of `group` batches and cut there, and the batches shuffled
    again: each batch holds items of similar length, so right padding wastes little."""
    order = torch.randperm(n_items, generator=generator).tolist()
    if lengths is None:
        return [order[i:i + batch] for i in range(0, n_items, batch)]
    batches = []
    for i in range(0, n_items, batch * group):
        span = sorted(order[i:i + batch * group], key=lambda g: lengths[g])
        batches += [span[j:j + batch] for j in range(0, len(span), batch)]
    return [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]


FIT_SKIP_STEPS, FIT_PROBE_STEPS = 5, 20  # --fit-minutes: steps left out of the timing, steps timed


def fit_total(step: int, probe_seconds: float, elapsed: float, budget: float) -> int:
    """The step count that fills `budget` seconds at the speed of the last FIT_PROBE_STEPS
    steps (taking `probe_seconds`), `elapsed` seconds and `step` steps into the run; held-out
    checks and checkpoints take a little of it, hence 0.95."""
    per_step = probe_seconds / FIT_PROBE_STEPS
    return max(step + 1, step + int(0.95 * (budget - elapsed) / per_step))


def run_training(kind: str, drafter, n_items: int, step_fn, args, evaluate=None,
                 identity: dict | None = None, lengths: list[int] | None = None) -> tuple[list[dict], bool]:
    """The optimisation loop both trainers share: AdamW, linear warm-up then cosine, gradient
    clipping, a tqdm bar with ETA, held-out checks every --eval-every steps, and a checkpoint
    every --ckpt-every steps (and when stopping) that --resume continues from exactly.

    `step_fn(indices, generator)` runs forward and backward on those training items and returns
    its metrics (with "loss"); all of its randomness must come from `generator`. `evaluate()`
    returns held-out tokens per round. `identity` (data size, vocabulary, settings that shape
    the run) must match to resume; with `lengths`, batches hold items of similar length
    (epoch_batches). Returns the log and whether the run is complete (False when
    --stop-at stopped it before the end)."""
    import json

    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    total = args.steps or math.ceil(n_items / args.batch) * args.epochs
    gen = torch.Generator().manual_seed(args.seed)
    ckpt = Checkpoints(Path(args.ckpt_dir) if args.ckpt_dir else default_ckpt_dir(kind))
    identity = json.loads(json.dumps(identity or {}))  # comparable after a round trip
    state = {"step": 0, "epoch": -1, "order": [], "pos": 0, "log": [], "seconds": 0.0,
             "fitted": args.fit_minutes is None, "warmup": max(1, round(total * args.warmup))}
    if args.resume:
        saved = ckpt.load()
        theirs = saved.get("identity", {})
        if theirs != identity:
            diff = ", ".join(f"{k}: {theirs.get(k)} there, {v} here" for k, v in identity.items() if theirs.get(k) != v)
            raise UserError(f"{ckpt.path} is from another run ({diff or 'different settings'}); "
                            "use another --ckpt-dir or drop --resume")
        drafter.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        state = {k: saved.get(k, state[k]) for k in state}  # checkpoints before --fit-minutes: fitted
        total = saved["total"]
        print(f"resuming {kind} from step {state['step']}/{total} ({ckpt.path})", file=sys.stderr)

    def save():
        state["seconds"] = base + time.time() - t0
        ckpt.save({"model": drafter.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                   "torch_rng": torch.get_rng_state(), "total": total, "identity": identity,
                   "args": vars(args), **state})

    # --fit-minutes: this process times steps probe..probe+FIT_PROBE_STEPS (its first ones, with
    # allocations and kernel warm-up, are left out), then sets the count; until then the count
    # only has to reach past the probe. A run resumed after the fit keeps its count.
    probe = state["step"] + FIT_SKIP_STEPS
    if not state["fitted"]:
        total = max(total, probe + FIT_PROBE_STEPS + 1)
    bar = tqdm(total=total, initial=state["step"], desc=f"train {kind}", unit="step", dynamic_ncols=True)
    t0, base = time.time(), state["seconds"]
    while state["step"] < total:
        if not state["fitted"] and state["step"] == probe:
            t_probe = time.time()
        if not state["fitted"] and state["step"] == probe + FIT_PROBE_STEPS:
            total = fit_total(state["step"], time.time() - t_probe, base + time.time() - t0, args.fit_minutes * 60)
            if state["step"] < state["warmup"]:  # still warming up: over the new count (past it: no second ramp)
                state["warmup"] = max(1, round(total * args.warmup))
            bar.total, state["fitted"] = total, True
            bar.write(f"--fit-minutes {args.fit_minutes:g}: {total} steps")
        if state["pos"] >= len(state["order"]):
            state["order"] = epoch_batches(n_items, args.batch, gen, lengths)
            state["pos"], state["epoch"] = 0, state["epoch"] + 1
        indices = state["order"][state["pos"]]
        state["pos"] += 1
        lr = cosine_lr(state["step"], total, args.lr, state["warmup"])
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        metrics = step_fn(indices, gen)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.clip))
        opt.step()
        state["step"] += 1
        step = state["step"]
        rounded = {k: round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v] for k, v in metrics.items()}
        record = {"step": step, "epoch": state["epoch"], "seconds": round(base + time.time() - t0, 1),
                  "lr": round(lr, 7), "grad_norm": round(grad_norm, 3), **rounded}
        state["log"].append(record)
        bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else f"{v[0]:.2f}" if v else "-"
                         for k, v in metrics.items() if k in ("loss", "acc", "acc1")}, refresh=False)
        bar.update()
        if evaluate is not None and args.eval_every and step % args.eval_every == 0 and step < total:
            tau = evaluate()
            state["log"].append({"step": step, "seconds": round(base + time.time() - t0, 1), "heldout_tau": tau})
            bar.write(f"step {step}: held-out tokens per round " + ", ".join(f"{c} {t:.2f}" for c, t in tau.items()))
        stop = bool(args.stop_at and step >= args.stop_at) or bool(
            args.max_minutes and time.time() - t0 > args.max_minutes * 60)
        if step % args.ckpt_every == 0 or stop or step == total:
            save()
        if stop:
            break
    bar.close()
    return state["log"], not (args.stop_at and state["step"] < total)


def heldout_check(target, eos, drafter, k: int, data_dir: Path, per_category: int):
    """A quick held-out tokens-per-round measurement in the middle of training (the drafter goes
    back to training mode, with any rope tables the engine grew made trainable again)."""
    def evaluate():
        from ..eval.acceptance import heldout_tau
        drafter.eval()
        tau = heldout_tau(target, eos, drafter, k, data_dir, per_category)
        drafter.train()
        for name in ("rope_cos", "rope_sin"):  # grown inside inference mode: clone to train on
            t = getattr(drafter, name, None)
            if t is not None and t.is_inference():
                setattr(drafter, name, t.clone())
        return tau
    return evaluate
