"""Shape bucketing (and, on CUDA, graph capture and replay) for the engine's step functions."""
from .buckets import CATCHUP_BUCKETS, DRAFT_BUCKETS, KV_BLOCK, kv_bucket

__all__ = ["CATCHUP_BUCKETS", "DRAFT_BUCKETS", "KV_BLOCK", "kv_bucket"]
