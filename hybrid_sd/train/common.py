"""Shared training pieces: sequences, cached target features, draft vocabulary, schedules."""
from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .data import read_split


@dataclass
class Sequence:
    tokens: torch.Tensor     # [T] prompt + response
    response_start: int      # first response position
    category: str


def load_sequences(data_dir: Path, split: str, max_len: int = 512) -> list[Sequence]:
    out = []
    for row in read_split(data_dir, split):
        ids = (row["prompt_ids"] + row["response_ids"])[:max_len]
        if len(row["response_ids"]) >= 2 and len(row["prompt_ids"]) < len(ids):
            out.append(Sequence(torch.tensor(ids), len(row["prompt_ids"]), row["category"]))
    return out


@torch.inference_mode()
def target_features(target, sequences: list[Sequence], layers: tuple[int, ...], cache_dir: Path | None = None,
                    batch_tokens: int = 4096) -> list[torch.Tensor]:
    """Per sequence, the target's hidden states `layers` at every position: [T, len(layers) * H] fp16.

    Each layer is cached in its own file under `cache_dir` (written atomically), so the AR and
    block trainers share the layers they both read and no epoch or run recomputes them. Missing
    layers are computed together, in right-padded batches (causal attention keeps the padding
    out of real rows).
    """
    def path(layer):
        return cache_dir / f"hidden-{layer}.safetensors" if cache_dir is not None else None

    per_layer: dict[int, list[torch.Tensor]] = {}
    for layer in layers:
        if path(layer) is not None and path(layer).is_file():
            stored = load_file(str(path(layer)))
            if len(stored) == len(sequences) and all(stored[f"s{i}"].shape[0] == len(s.tokens)
                                                     for i, s in enumerate(sequences)):
                per_layer[layer] = [stored[f"s{i}"] for i in range(len(sequences))]
    missing = tuple(sorted(set(layers) - set(per_layer)))
    if missing:
        computed = {layer: [None] * len(sequences) for layer in missing}
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].tokens))
        bar = tqdm(total=len(sequences), desc=f"target features {missing}", unit="seq")
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
            _, f = target(batch, torch.arange(width), capture=missing)
            f = f.view(len(group), width, len(missing), -1)
            for r, g in enumerate(group):
                for c, layer in enumerate(missing):
                    computed[layer][g] = f[r, :len(sequences[g].tokens), c].to(torch.float16).clone()
            bar.update(len(group))
            i = j
        bar.close()
        for layer, feats in computed.items():
            per_layer[layer] = feats
            if cache_dir is not None:
                cache_dir.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=path(layer).name + ".", dir=cache_dir)
                os.close(fd)
                save_file({f"s{i}": x for i, x in enumerate(feats)}, tmp)
                os.replace(tmp, path(layer))
    return [torch.cat([per_layer[layer][i] for layer in layers], dim=-1) for i in range(len(sequences))]


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
    (out / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    return out
