"""Bucketed shapes: every variable length on the hot path is rounded up to a small set.

A bucket is a static shape (later, a CUDA-graph key); padding beyond the real length is
masked by position, so it never changes a result.
"""
from __future__ import annotations

KV_BLOCK = 64  # attention spans are rounded up to a multiple of this many positions
GRAPH_KV_BLOCK = 256  # coarser when every (tokens, span) pair is a captured graph: fewer graphs
DRAFT_BUCKETS = (1, 2, 3, 4, 5, 6, 7)  # draft lengths a router may choose (verify shapes k + 1)
# tree node budgets (verify shapes nodes + 1) with a measured cost. The CPU row kernel computes
# rows 8 at a time (kernels/cpu_rows.cpp), so its verify cost steps up at 9, 17, 25 rows: 8 and
# 15 nodes bound the flat stretch of two blocks, 16 starts the third
TREE_BUCKETS = (4, 8, 15, 16, 32, 64)
CATCHUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # catch-up lengths with a measured cost (longer: linear)
PREFILL_BUCKETS = (16, 32, 64, 128, 256)  # prompt chunk lengths when prefill runs as graphs (longer: chunked)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding n rows."""
    return next(b for b in buckets if b >= n)


def chunks(start: int, end: int, buckets: tuple[int, ...], pad: bool):
    """Rows [start, end) as (chunk start, real rows n, rows run): padded, chunks of at most the
    largest bucket, each run at its bucket -- the caller repeats the chunk's last row (same
    position, same input: the same K/V written again, so padding never changes a cache);
    unpadded, one chunk of its own length."""
    while start < end:
        n = min(end - start, buckets[-1]) if pad else end - start
        yield start, n, (bucket_for(n, buckets) if pad else n)
        start += n


def kv_bucket(length: int, max_len: int, block: int = KV_BLOCK) -> int:
    """Smallest multiple of `block` covering `length` positions, capped at the cache size."""
    return min(max_len, -(-length // block) * block)


def kv_buckets(max_len: int, block: int = KV_BLOCK) -> list[int]:
    """Every span kv_bucket can return for a cache of max_len positions."""
    return sorted({kv_bucket(n, max_len, block) for n in range(1, max_len + 1, block)} | {max_len})
