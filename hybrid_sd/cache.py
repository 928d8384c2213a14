"""Static KV cache: fixed buffers, explicit write positions, rollback by setting a length.

Writes go to the positions the caller names, and every read is masked by position
(a query at position p sees keys at positions <= p), so entries past the committed length
are never read: rejecting a draft is `cache.length = n`, never a copy.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", batch: int = 1):
        # one tensor per layer, [batch, head, pos, dim]: torch.compile then writes each in
        # place, where slices of one stacked tensor made it copy a whole layer per write.
        # Decoding uses batch 1; batched data generation (train/generate.py) shares positions
        # across rows.
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # committed positions; everything at or past it is scratch

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer a write may change (what a traced step must take as inputs)."""
        return self.k + self.v

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k/v [batch, heads, T, dim] at `positions` [T] and return the layer's full K/V."""
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.k[layer], self.v[layer]

    def move(self, sources: torch.Tensor, start: int) -> None:
        """Rows at positions `sources` [a] to positions start..start+a-1, in every layer (a draft
        tree's accepted path into place; the gather copies first, so the ranges may overlap)."""
        end = start + sources.numel()
        for k, v in zip(self.k, self.v):
            k[:, :, start:end] = k[:, :, sources]
            v[:, :, start:end] = v[:, :, sources]
