"""CUDA-graph replay of a function of tensors, for the streaming step on a GPU.

A streaming step encodes one frame with the full backbone: a few hundred small kernels whose
launches, not their arithmetic, set the step's time. `GraphedCall` captures the function once
per input shape and dtype and afterwards copies the inputs into the captured buffers and
replays the whole graph with one launch.
"""

from __future__ import annotations

import torch

MAX_GRAPHS = 16  # shapes kept: a streaming policy needs one per window length at most


class GraphedCall:
    """`GraphedCall(fn)(*tensors)` returns what `fn(*tensors)` returns (one tensor), from a replayed
    CUDA graph. The result is the graph's own output buffer, overwritten by the next call with
    the same shapes: whoever keeps it copies it (`StreamingPolicy` does)."""

    def __init__(self, fn):
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        key = tuple((t.shape, t.dtype, t.device) for t in tensors)
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS:
                self.graphs.clear()
            self.graphs[key] = self._capture(tensors)
        graph, inputs, output = self.graphs[key]
        for buffer, tensor in zip(inputs, tensors):
            buffer.copy_(tensor)
        graph.replay()
        return output

    def _capture(self, tensors) -> tuple:
        inputs = [t.detach().clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(2):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*inputs)
        return graph, inputs, output
