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
def target_features(target, sequences: list[Sequence], layers: tuple[int, ...], cache_file: Path | None = None,
                    batch_tokens: int = 4096) -> list[torch.Tensor]:
    """Per sequence, the target's hidden states `layers` at every position: [T, len(layers) * H] fp16.

    Computed once in right-padded batches (causal attention keeps padding out of real rows) and
    cached in `cache_file` (written atomically) for every later epoch and run.
    """
    if cache_file is not None and cache_file.is_file():
        stored = load_file(str(cache_file))
        if len(stored) == len(sequences) and all(stored[f"s{i}"].shape[0] == len(s.tokens) for i, s in enumerate(sequences)):
            return [stored[f"s{i}"] for i in range(len(sequences))]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].tokens))
    feats: list[torch.Tensor | None] = [None] * len(sequences)
    bar = tqdm(total=len(sequences), desc="target features", unit="seq")
    i = 0
    while i < len(order):
        width = len(sequences[order[i]].tokens)
        j = i
        while j < len(order) and (j - i + 1) * len(sequences[order[j]].tokens) <= batch_tokens:
            j += 1
        j = max(j, i + 1)
        group = order[i:j]
        width = max(len(sequences[g].tokens) for g in group)
        batch = torch.zeros(len(group), width, dtype=torch.long)
        for r, g in enumerate(group):
            batch[r, :len(sequences[g].tokens)] = sequences[g].tokens
        _, f = target(batch, torch.arange(width), capture=layers)
        for r, g in enumerate(group):
            feats[g] = f[r, :len(sequences[g].tokens)].to(torch.float16).clone()
        bar.update(len(group))
        i = j
    bar.close()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=cache_file.name + ".", dir=cache_file.parent)
        os.close(fd)
        save_file({f"s{i}": f for i, f in enumerate(feats)}, tmp)
        os.replace(tmp, cache_file)
    return feats


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
