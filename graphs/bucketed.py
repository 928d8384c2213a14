"""One step function, run per shape bucket: replayed as a CUDA graph, compiled, or eager.

`BucketedGraphs(step, mode)` wraps `step(key, *inputs) -> outputs`, where `key` is a tuple
of ints that fixes every shape and host-side constant of the step (e.g. (tokens, kv_len)) and
`inputs` are tensors of those shapes. Calling `graphs(key, *inputs)`:

  cuda     the first call per key captures a `torch.cuda.CUDAGraph` over static copies of
           the inputs (all graphs share one memory pool); every call copies the inputs into
           the static buffers and replays. The outputs are the graph's static buffers, and
           a graph captured earlier may use their memory for its temporaries (one pool):
           read them before any other graph of the device replays, or construct with
           `copy_outputs=True` to get copies.
  compile  `torch.compile(step, dynamic=False)`: one specialisation per key.
  eager    the step itself.

The engine calls the same object whatever the device, so it never branches on the mode.
A step may write to tensors it closes over (a KV cache at given positions): replay repeats
exactly those writes, so a step must depend on nothing but its key, its inputs and
persistent buffers -- no host syncs, no data-dependent shapes, no Python state changes.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

MODES = ("auto", "cuda", "compile", "eager")
_POOLS: dict[int, object] = {}  # one memory pool per CUDA device, shared by every graph on it


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """`auto`: CUDA graphs on a CUDA device, eager elsewhere (compiling on the CPU costs ~80 s
    per shape, more than a generation saves)."""
    if mode not in MODES:
        raise ValueError(f"graphs mode must be one of {', '.join(MODES)}, got {mode!r}")
    device = torch.device(device)
    if mode == "auto":
        return "cuda" if device.type == "cuda" else "eager"
    if mode == "cuda" and device.type != "cuda":
        raise ValueError(f"--graphs cuda needs a CUDA device (the model is on {device}); "
                         "use --graphs compile or eager")
    return mode


def graph_pool(device: torch.device):
    index = torch.device(device).index or 0
    if index not in _POOLS:
        _POOLS[index] = torch.cuda.graph_pool_handle()
    return _POOLS[index]


class BucketedGraphs:
    def __init__(self, step: Callable, mode: str, device: torch.device | str, name: str = "step",
                 copy_outputs: bool = False):
        self.step, self.name, self.copy_outputs = step, name, copy_outputs
        self.mode = resolve_mode(mode, device)
        self.device = torch.device(device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], object]] = {}
        self.compiled = None
        if self.mode == "compile":
            import torch._dynamo as dynamo  # one specialisation per key: allow many
            import torch._inductor.config as inductor
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 256)
            # weights are constants at inference: lets inductor lower the CPU's oneDNN-packed
            # linears (it requires their weights to be graph constants)
            inductor.freezing = True
            self.compiled = torch.compile(step, dynamic=False)

    def __call__(self, key: tuple, *inputs: torch.Tensor):
        if self.mode == "eager":
            return self.step(key, *inputs)
        if self.mode == "compile":
            return self.compiled(key, *inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.capture(key, inputs)
        graph, static_inputs, outputs = entry
        for static, x in zip(static_inputs, inputs):
            if static.data_ptr() != x.data_ptr():
                static.copy_(x)
        graph.replay()
        if self.copy_outputs:
            return tuple(x.clone() if x is not None else None for x in outputs)
        return outputs

    def forget(self) -> None:
        """Drop every captured graph (the buffers a step closes over were reallocated)."""
        self.graphs.clear()

    def capture(self, key: tuple, inputs) -> tuple:
        """Warm up on a side stream (kernels pick their algorithms), then capture one graph."""
        static_inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(key, *static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=graph_pool(self.device)):
            outputs = self.step(key, *static_inputs)
        torch.cuda.synchronize(self.device)
        self.graphs[key] = (graph, static_inputs, outputs)
        return self.graphs[key]

    def warm_up(self, examples: dict[tuple, tuple[torch.Tensor, ...]]) -> dict:
        """Run (and, on CUDA, capture) every key once on example inputs; report the time it
        took and, on CUDA, the memory the graphs hold."""
        before = torch.cuda.memory_reserved(self.device) if self.mode == "cuda" else 0
        t0 = time.perf_counter()
        for key, inputs in examples.items():
            self(key, *inputs)
        if self.mode == "cuda":
            torch.cuda.synchronize(self.device)
        return {"name": self.name, "mode": self.mode, "keys": len(examples), "seconds": time.perf_counter() - t0,
                "memory_bytes": (torch.cuda.memory_reserved(self.device) - before) if self.mode == "cuda" else 0}
