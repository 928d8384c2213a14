"""Shape bucketing and the bucketed step runner (CUDA graph replay, torch.compile, TorchScript traces or eager)."""
from .bucketed import MODES, TRACE_AFTER, BucketedGraphs, resolve_mode, static_shapes
from .buckets import (CATCHUP_BUCKETS, DRAFT_BUCKETS, GRAPH_KV_BLOCK, KV_BLOCK, PREFILL_BUCKETS, TREE_BUCKETS,
                      bucket_for, chunks, kv_bucket, kv_buckets)
from .compile_cache import use_compile_cache

__all__ = ["BucketedGraphs", "CATCHUP_BUCKETS", "bucket_for", "chunks", "DRAFT_BUCKETS", "GRAPH_KV_BLOCK", "KV_BLOCK", "MODES", "PREFILL_BUCKETS", "TREE_BUCKETS",
           "kv_bucket", "kv_buckets", "resolve_mode", "static_shapes", "TRACE_AFTER",
           "use_compile_cache"]
