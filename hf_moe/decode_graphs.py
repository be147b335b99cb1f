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
as transformers does with any compile config it cannot use. A replay runs the step's kernels and nothing else: no
Python, so no module hooks (`record_routing`, user hooks), and no cache whose state lives on the host (sliding
windows, offloading), which decode eagerly.

A plain `generate` call that asks for no cache (see [`default_graph_decoding`]) decodes this way by default on a GPU.
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
from transformers.cache_utils import StaticLayer
from transformers.generation.configuration_utils import CompileConfig, GenerationConfig

from .moe.block import moe_blocks
from .moe.cuda_graphs import graph_owned_cublas_workspaces, parameter_state
from .moe.dispatch import LocalDispatcher

# Outputs recorded by hooks (attentions, hidden states, router outputs): a graph replays kernels, not hooks.
_RECORDED_OUTPUTS = ("output_attentions", "output_hidden_states", "output_router_logits", "output_router_metrics")


@dataclass
class CUDAGraphConfig(CompileConfig):
    """A `compile_config` for `generate` that makes `HfMoeForCausalLM` replay its static-cache decode step from
    CUDA graphs instead of compiling it: `max_graphs` graphs are kept per model (one per batch size and cache
    memory), the least recently used one dropped first."""

    max_graphs: int = 4


class CapturedStep:
    """One captured decode step: its static input tensors and the logits it writes. It holds no cache: a replay
    returns the cache of the step it serves."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], logits: torch.Tensor,
                 output_type: type) -> None:
        self.graph, self.inputs, self.logits, self.output_type = graph, inputs, logits, output_type

    def replay(self, tensors: dict[str, torch.Tensor], cache: Any) -> Any:
        for name, tensor in tensors.items():
            self.inputs[name].copy_(tensor)
        self.graph.replay()
        # the logits copied out of the graph's memory: the next replay overwrites it
        return self.output_type(logits=self.logits.clone(), past_key_values=cache)


def _cache_memory(cache: Any) -> tuple | None:
    """What a graph of a step on `cache` writes to: each layer's key, value and length tensors (address, shape) —
    or None where replaying is not the step: a layer other than transformers' plain `StaticLayer` (a sliding
    window rolls by a host counter that a replay would not advance), an uninitialised layer, offloaded layers
    (moved by the host every step)."""
    layers = getattr(cache, "layers", None)
    if not layers or getattr(cache, "offloading", False):
        return None
    if not all(type(layer) is StaticLayer and layer.is_initialized for layer in layers):
        return None
    return tuple((t.data_ptr(), t.shape) for layer in layers
                 for t in (layer.keys, layer.values, layer.cumulative_length))


def _module_state(model: nn.Module) -> tuple:
    """What graphs of `model` read besides their inputs: its parameters and buffers (identity and memory)."""
    return parameter_state(model), tuple((id(b), b.data_ptr()) for b in model.buffers())


class DecodeGraphs:
    """The CUDA graphs of one model's decode steps, keyed by what a graph depends on: the tensors' shapes, dtypes,
    devices and strides, the memory of the cache it writes, the other arguments' values and autocast. A step no
    graph can serve runs eagerly.

    Kept outside the model ([`decode_graphs`]), which it holds weakly: the model stays free of CUDA graphs (it can
    be copied, pickled or deleted as before)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)
        self.graphs: OrderedDict[tuple, CapturedStep] = OrderedDict()
        self.state = _module_state(model)
        self.max_graphs = CUDAGraphConfig.max_graphs
        self.uncapturable: str | None = None  # why a step of this model could not be captured
        self.stream: torch.cuda.Stream | None = None

    @property
    def model(self) -> nn.Module:
        return self._model()

    def for_generate(self, config: CUDAGraphConfig) -> Callable[..., Any]:
        """The forward of one `generate` call's decode steps. Graphs captured on other parameters or buffers (an
        adapter added, weights moved or replaced since) are dropped here, once per call."""
        if config.max_graphs < 1:
            raise ValueError(f"CUDAGraphConfig.max_graphs must be at least 1, got {config.max_graphs}")
        self.max_graphs = config.max_graphs
        state = _module_state(self.model)
        if state != self.state:
            self.graphs.clear()
            self.state, self.uncapturable = state, None
        return self.step

    def step(self, **kwargs: Any) -> Any:
        """One decode step (the model's keyword arguments): replayed, captured on its first call, or eager."""
        tensors = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        others = {name: value for name, value in kwargs.items() if name not in tensors}
        cache = others.get("past_key_values")
        memory = _cache_memory(cache)
        if memory is None or self.uncapturable is not None or not self._serves(tensors, others):
            return self.model(**kwargs)
        key = (
            tuple((name, t.shape, t.dtype, t.device, t.stride()) for name, t in sorted(tensors.items())),
            tuple((name, value) for name, value in sorted(others.items()) if name != "past_key_values"),
            memory,
            torch.is_autocast_enabled("cuda"),
        )
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            return graph.replay(tensors, cache)
        output, graph = self._capture(tensors, others)
        if graph is not None:
            self.graphs[key] = graph
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        return output

    def _serves(self, tensors: dict[str, torch.Tensor], others: dict[str, Any]) -> bool:
        """A plain inference decode step (one token per sequence) on CUDA tensors, asking for nothing hooks record
        (in its arguments or its config's defaults)."""
        config = self.model.config
        ids = tensors.get("input_ids")
        return (
            not torch.is_grad_enabled()
            and not self.model.training
            and ids is not None
            and ids.dim() == 2
            and ids.shape[1] == 1
            and all(t.is_cuda and not t.requires_grad for t in tensors.values())
            and not any(getattr(config, name, False) if others.get(name) is None else others[name]
                        for name in _RECORDED_OUTPUTS)
            and all(value is None or isinstance(value, (bool, int, float, str)) for name, value in others.items()
                    if name != "past_key_values")
        )

    def _capture(self, tensors: dict[str, torch.Tensor], others: dict[str, Any]) -> tuple[Any, CapturedStep | None]:
        """Run this step eagerly (its output is this step's result; it also warms up what the step launches), then
        capture the same step reading static copies of its input tensors, on the same side stream. Capture records
        kernels without running them, so the cache is written once, by the eager run."""
        inputs = {name: t.clone() for name, t in tensors.items()}
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            output = self.model(**inputs, **others)
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with graph_owned_cublas_workspaces(), torch.cuda.graph(graph, stream=self.stream,
                                                                   capture_error_mode="thread_local"):
                static_output = self.model(**inputs, **others)
        except RuntimeError as error:  # the step waits for the GPU somewhere (e.g. float32 experts looping on the host)
            cause = error.__context__ if isinstance(error.__context__, RuntimeError) else error
            self.uncapturable = str(cause).splitlines()[0]
            warnings.warn(
                f"The decode step could not be captured in a CUDA graph ({self.uncapturable}); this model decodes "
                "eagerly. bf16/fp16 models run their experts on device-only kernels, which capture.",
                stacklevel=4,
            )
            return output, None
        return output, CapturedStep(graph, inputs, static_output.logits, type(static_output))


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, DecodeGraphs] = weakref.WeakKeyDictionary()


def decode_graphs(model: nn.Module) -> DecodeGraphs:
    """The decode graphs of `model` (created empty on first use; dropped with the model)."""
    graphs = _GRAPHS.get(model)
    if graphs is None:
        graphs = _GRAPHS[model] = DecodeGraphs(model)
    return graphs


# generate() settings under which the cache outlives the call, the step is not one token of one sequence, or the
# user chose how to decode: the call keeps transformers' default (a dynamic cache, eager steps).
_CHOSEN_SETTINGS = ("cache_implementation", "compile_config", "disable_compile", "return_dict_in_generate",
                    "prompt_lookup_num_tokens", "assistant_early_exit", "custom_generate", "assistant_model",
                    "past_key_values", "synced_gpus", "negative_prompt_ids", "guidance_scale")
_DEFAULT_CACHE_SHARE = 0.5  # of the GPU memory free at the call: a static cache above it keeps the dynamic cache


def default_graph_decoding(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """Why a `generate(*args, **kwargs)` call of `model` keeps transformers' dynamic cache and eager steps, or None:
    it then decodes from CUDA graphs (`cache_implementation="static"`, `compile_config=CUDAGraphConfig()`).

    Eager decoding of a few sequences is host time (hundreds of small kernels a step); a static cache replayed from
    CUDA graphs decodes the same tokens several times faster at the cost of one capture. It is the default only where
    nothing changes for the caller: a bf16/fp16 model in eval mode on one CUDA device, its experts local and its
    attention sdpa or eager over full (not sliding) layers, no cache, compile or decoding strategy asked for (num_beams
    1, no assistant, no guidance), no cache handed back (`return_dict_in_generate`), no outputs recorded by hooks, and a
    static cache for the whole `max_length` that fits in half the free GPU memory. `cache_implementation="dynamic"` or
    `disable_compile=True` keep the eager default."""
    user_config = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
    configs = [c for c in (user_config, model.generation_config) if isinstance(c, GenerationConfig)]

    def settings(name: str) -> list[Any]:
        return ([kwargs[name]] if name in kwargs else []) + [getattr(c, name, None) for c in configs]

    for name in _CHOSEN_SETTINGS:
        if any(value is not None and value is not False and not (name == "guidance_scale" and value == 1)
               for value in settings(name)):
            return f"generate() was given {name}"
    if any(value not in (None, 1) for name in ("num_beams", "num_return_sequences") for value in settings(name)):
        return "generate() asks for several sequences per prompt"
    if any(value is False for value in settings("use_cache")):
        return "generate() was given use_cache=False"
    config = model.config
    if any(getattr(config, name, False) or any(settings(name)) for name in _RECORDED_OUTPUTS):
        return "generate() records outputs through hooks, which a replay does not run"
    if model.training:
        return "the model is in training mode"
    if set(config.attention_layer_types) != {"full_attention"} or getattr(config, "index_topk", None) is not None:
        return "the model has sliding-window or sparse attention layers, whose caches a replay cannot advance"
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attn_implementation={config._attn_implementation!r} (graphed decoding runs sdpa and eager)"
    if not all(type(block.dispatcher) is LocalDispatcher for block in moe_blocks(model)):
        return "the experts are distributed (expert parallelism)"
    parameters = list(model.parameters())
    if any(type(p) is not nn.Parameter or p.dtype not in (torch.bfloat16, torch.float16) for p in parameters):
        return "the model's parameters are not all bf16/fp16 tensors (distributed, quantized or float32)"
    devices = {p.device for p in parameters} | {b.device for b in model.buffers()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return "the model is not on one CUDA device"
    device = next(iter(devices))
    inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids", kwargs.get("inputs_embeds")))
    batch, prompt = inputs.shape[:2] if isinstance(inputs, torch.Tensor) and inputs.dim() > 1 else (1, 0)
    new_tokens = next((v for v in settings("max_new_tokens") if v is not None), None)
    max_length = prompt + new_tokens if new_tokens is not None else next((v for v in settings("max_length") if v), 20)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if _static_cache_bytes(config, batch, max_length, parameters[0].element_size()) > _DEFAULT_CACHE_SHARE * free:
        return f"a static cache of {batch} × {max_length} tokens would take more than half the free GPU memory"
    return None


def _static_cache_bytes(config: Any, batch: int, max_length: int, element_size: int) -> int:
    """The memory of a static cache of `batch` sequences of `max_length` tokens over every layer."""
    if getattr(config, "kv_lora_rank", None):  # multi-head latent attention caches the latent and the rotary key
        per_token = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        per_token = 2 * config.num_key_value_heads * config.head_dim
    return config.num_hidden_layers * batch * max_length * per_token * element_size
