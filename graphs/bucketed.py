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
  trace    the CPU's capture: a key's first TRACE_AFTER - 1 calls run eager, the next records
           the step as a TorchScript trace (~0.5 s for SmolLM2's 30 layers: one eager run with
           recording), which every later call runs without Python between the ops (measured
           ~0.89x eager for a 1-token step, ~0.94x for a 7-token verify). Keys met rarely are
           never traced, so no shape pays for a capture it does not use again.
  eager    the step itself.

The engine calls the same object whatever the device, so it never branches on the mode.
A step may write to tensors it closes over (a KV cache at given positions): replay repeats
exactly those writes, so a step must depend on nothing but its key, its inputs and
persistent buffers -- no host syncs, no data-dependent shapes, no Python state changes.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import torch

MODES = ("auto", "cuda", "compile", "trace", "eager")
STATIC_MODES = ("cuda", "compile")  # every key is a capture: variable lengths pad to buckets
# a trace of SmolLM2's step costs ~6 eager steps and saves ~10 % of each later one: only keys
# called this often are traced (their later calls are then likely to repay it)
TRACE_AFTER = 32
_POOLS: dict[int, object] = {}  # one memory pool per CUDA device, shared by every graph on it


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """`auto`: CUDA graphs on a CUDA device, eager elsewhere (compiling on the CPU costs ~80 s
    per shape, more than a generation saves; a trace repays its cost only over long runs:
    docs/performance.md)."""
    if mode not in MODES:
        raise ValueError(f"graphs mode must be one of {', '.join(MODES)}, got {mode!r}")
    device = torch.device(device)
    if mode == "auto":
        return "cuda" if device.type == "cuda" else "eager"
    if mode == "cuda" and device.type != "cuda":
        raise ValueError(f"--graphs cuda needs a CUDA device (the model is on {device}); "
                         "use --graphs compile or eager")
    if mode == "trace" and device.type != "cpu":
        raise ValueError(f"--graphs trace is the CPU's capture (the model is on {device}); use --graphs cuda or eager")
    return mode


def static_shapes(mode: str) -> bool:
    """Whether every key of `mode` is a capture: callers then pad variable lengths to buckets to
    keep the keys few. Eager and trace run any key (trace captures only the keys that recur)."""
    return mode in STATIC_MODES


def graph_pool(device: torch.device):
    index = torch.device(device).index or 0
    if index not in _POOLS:
        _POOLS[index] = torch.cuda.graph_pool_handle()
    return _POOLS[index]


class BucketedGraphs:
    def __init__(self, step: Callable, mode: str, device: torch.device | str, name: str = "step",
                 copy_outputs: bool = False, writes: Callable[[], list[torch.Tensor]] = list):
        """`writes()`: the tensors the step writes in place (its caches). A trace drops writes
        to tensors that are neither its inputs nor feed its outputs, so trace mode passes these
        as inputs; they are read when a key is traced (reallocating them means `forget()`)."""
        self.step, self.name, self.copy_outputs, self.writes = step, name, copy_outputs, writes
        self.mode = resolve_mode(mode, device)
        self.device = torch.device(device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], object]] = {}
        self.traces: dict[tuple, Callable] = {}
        self.calls: dict[tuple, int] = {}
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
        if self.mode == "trace":
            traced = self.traces.get(key)
            if traced is None:
                self.calls[key] = self.calls.get(key, 0) + 1
                if self.calls[key] < TRACE_AFTER:
                    return self.step(key, *inputs)
                traced = self.trace(key, inputs)
            return traced(*inputs)
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
        self.traces.clear()
        self.calls.clear()

    def trace(self, key: tuple, inputs) -> Callable:
        """Record the step of `key` as a TorchScript trace. The tensors it only reads (weights) become
        constants, held by reference; those it writes (`writes()`) are extra inputs, so that
        the trace keeps the writes and makes them where the eager step would. A trace returns
        tensors only: the step's None outputs are put back by position."""
        kept: list[bool] = []  # per output of the step: a tensor (True) or None
        shape = {"tuple": True}  # whether the step returns a tuple or one value
        n_inputs, written = len(inputs), tuple(self.writes())

        def tensors_only(*xs):  # xs: the inputs, then the written tensors (read by the step itself)
            out = self.step(key, *xs[:n_inputs])
            shape["tuple"] = isinstance(out, tuple)
            outs = out if shape["tuple"] else (out,)
            kept[:] = [o is not None for o in outs]
            return tuple(o for o in outs if o is not None) or (torch.zeros(()),)

        with warnings.catch_warnings():  # shapes read as Python numbers are constants per key: intended
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is; see docs/performance.md
            traced = torch.jit.trace(tensors_only, (*inputs, *written), check_trace=False)
        single = not shape["tuple"]

        def run(*xs):
            with torch.jit.optimized_execution(False):  # the plain interpreter: no profiling runs
                found = iter(traced(*xs, *written))
            outs = tuple(next(found) if k else None for k in kept)
            return outs[0] if single else outs

        self.traces[key] = run
        return run

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

    def warm_up(self, examples: dict[tuple, tuple[torch.Tensor, ...]], progress: Callable[[], None] | None = None) -> dict:
        """Run (and, on CUDA, capture; compiling, compile) every key once on example inputs,
        calling `progress()` after each; report the time it took and, on CUDA, the memory the
        graphs hold."""
        before = torch.cuda.memory_reserved(self.device) if self.mode == "cuda" else 0
        t0 = time.perf_counter()
        for key, inputs in examples.items():
            self(key, *inputs)
            if progress is not None:
                progress()
        if self.mode == "cuda":
            torch.cuda.synchronize(self.device)
        return {"name": self.name, "mode": self.mode, "keys": len(examples), "seconds": time.perf_counter() - t0,
                "memory_bytes": (torch.cuda.memory_reserved(self.device) - before) if self.mode == "cuda" else 0}
