"""Shape bucketing (and, on CUDA, graph capture and replay) for the engine's step functions."""
from .buckets import KV_BLOCK, kv_bucket

__all__ = ["KV_BLOCK", "kv_bucket"]
