"""Static-cache decoding replayed from CUDA graphs, without torch.compile.

An eager decode step of a batch of a few tokens is host time: the GPU finishes each of its few hundred small
kernels before Python has issued the next. transformers removes that host time by compiling the step
(`generate(..., cache_implementation="static")` compiles the model's forward in `mode="reduce-overhead"`), which
costs seconds to minutes on the first call. Capturing the eager step in a CUDA graph removes the same host time at
the cost of one eager step: the step's shapes are fixed by the static cache, and the cache advances through its own
device counter, so one graph replays every later step of the same batch.

Usage: `model.generate(..., cache_implementation="static", compile_config=hf_moe.CUDAGraphConfig())`. transformers
asks the model for its compiled forward when the cache is static and the device a GPU; `HfMoeForCausalLM` then
returns [`DecodeGraphs.step`] instead of a compiled forward. Elsewhere (CPU, a dynamic cache) generate runs eagerly,
as transformers does with any compile config it cannot use.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.generation.configuration_utils import CompileConfig

from .moe.cuda_graphs import parameter_state

# Keyword arguments a decode step may carry besides tensors: values that must be equal for a graph to serve, or that
# a graph of the plain step cannot produce (what is recorded by hooks: attentions, hidden states, router outputs).
_RECORDED_OUTPUTS = ("output_attentions", "output_hidden_states", "output_router_logits", "output_router_metrics")


@dataclass
class CUDAGraphConfig(CompileConfig):
    """A `compile_config` for `generate` that makes `HfMoeForCausalLM` replay its static-cache decode step from
    CUDA graphs instead of compiling it: `max_graphs` graphs are kept per model (one per batch size and cache),
    the least recently used one dropped first."""

    max_graphs: int = 4


class CapturedStep:
    """One captured decode step: its static input tensors, its output and the cache it writes to (`graph` None: the
    step could not be captured, and such steps run eagerly)."""

    def __init__(
        self, graph: torch.cuda.CUDAGraph | None, inputs: dict[str, torch.Tensor], output: Any, cache: Any
    ) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output
        self.cache = weakref.ref(cache)

    def replay(self, tensors: dict[str, torch.Tensor]) -> Any:
        for name, tensor in tensors.items():
            self.inputs[name].copy_(tensor)
        self.graph.replay()
        return _detached_output(self.output)


def _detached_output(output: Any) -> Any:
    """The step's output with its logits copied out of the graph's memory (the next replay overwrites it)."""
    fields = {key: value for key, value in output.items()}
    fields["logits"] = fields["logits"].clone()
    return type(output)(**fields)


class DecodeGraphs:
    """The CUDA graphs of one model's decode steps, keyed by what a graph depends on: the tensors' shapes, dtypes
    and devices, the cache object, and the other arguments' values. A step no graph can serve runs eagerly.

    Kept outside the model ([`decode_graphs`]), which it holds weakly: the model stays free of CUDA graphs (it can
    be copied, pickled or deleted as before)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self.graphs: OrderedDict[tuple, CapturedStep] = OrderedDict()
        self.parameters = parameter_state(model)
        self.max_graphs = CUDAGraphConfig.max_graphs

    @property
    def model(self) -> nn.Module:
        return self._model()

    def for_generate(self, config: CUDAGraphConfig) -> Callable[..., Any]:
        """The forward of one `generate` call's decode steps. Graphs captured on other parameters (an adapter added,
        weights moved or replaced since) are dropped here, once per call."""
        if config.max_graphs < 1:
            raise ValueError(f"CUDAGraphConfig.max_graphs must be at least 1, got {config.max_graphs}")
        self.max_graphs = config.max_graphs
        state = parameter_state(self.model)
        if state != self.parameters:
            self.graphs.clear()
            self.parameters = state
        return self.step

    def step(self, **kwargs: Any) -> Any:
        tensors = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        others = {name: value for name, value in kwargs.items() if name not in tensors}
        if not self._serves(tensors, others):
            return self.model(**kwargs)
        cache = others.get("past_key_values")
        key = (
            tuple((name, t.shape, t.dtype, t.device, t.stride()) for name, t in sorted(tensors.items())),
            tuple((name, id(value) if name == "past_key_values" else value) for name, value in sorted(others.items())),
        )
        graph = self.graphs.get(key)
        if graph is not None and graph.cache() is cache:
            self.graphs.move_to_end(key)
            return graph.replay(tensors) if graph.graph is not None else self.model(**kwargs)
        output, graph = self._capture(tensors, others)
        self.graphs[key] = graph
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return output

    def _serves(self, tensors: dict[str, torch.Tensor], others: dict[str, Any]) -> bool:
        """A plain inference step on CUDA tensors with a static cache, asking for nothing hooks record."""
        cache = others.get("past_key_values")
        return (
            not torch.is_grad_enabled()
            and not self.model.training
            and bool(tensors)
            and all(t.is_cuda and not t.requires_grad for t in tensors.values())
            and cache is not None
            and getattr(cache, "is_compileable", False)
            and not any(others.get(name) for name in _RECORDED_OUTPUTS)
            and all(value is None or isinstance(value, (bool, int, float, str)) for name, value in others.items()
                    if name != "past_key_values")
        )

    def _capture(self, tensors: dict[str, torch.Tensor], others: dict[str, Any]) -> tuple[Any, CapturedStep]:
        """Run this step eagerly (its output is this step's result; it also warms up what the step launches), then
        capture the same step reading static copies of its input tensors. Capture records kernels without running
        them, so the cache is written once, by the eager run."""
        inputs = {name: t.clone() for name, t in tensors.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            output = self.model(**inputs, **others)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_output = self.model(**inputs, **others)
        except RuntimeError as error:  # the step waits for the GPU somewhere (e.g. float32 experts looping on the host)
            warnings.warn(
                f"The decode step could not be captured in a CUDA graph ({str(error).splitlines()[0]}); this batch "
                "decodes eagerly. bf16/fp16 models run their experts on device-only kernels, which capture.",
                stacklevel=4,
            )
            return output, CapturedStep(None, {}, None, others.get("past_key_values"))
        return output, CapturedStep(graph, inputs, static_output, others.get("past_key_values"))


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, DecodeGraphs] = weakref.WeakKeyDictionary()


def decode_graphs(model: nn.Module) -> DecodeGraphs:
    """The decode graphs of `model` (created empty on first use; dropped with the model)."""
    graphs = _GRAPHS.get(model)
    if graphs is None:
        graphs = _GRAPHS[model] = DecodeGraphs(model)
    return graphs
