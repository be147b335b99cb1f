"""CUDA-graph decoding (`hf_moe.CUDAGraphConfig`) on the CPU: where it cannot serve, generate is exactly what it
was; the graph bookkeeping (keys, replay buffers, least-recently-used eviction, dropped graphs) with the CUDA-only
capture replaced by a stand-in. The graphs themselves run in tests/test_decode_graphs_cuda.py."""

import contextlib
import gc
import warnings
import weakref

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, GenerationMixin, StaticCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from hf_moe import CUDAGraphConfig, HfMoeForCausalLM, modeling_hf_moe, moe_blocks
from hf_moe.decode_graphs import (
    CapturedStep,
    DecodeGraphs,
    _static_cache_bytes,
    decode_graphs,
    default_graph_decoding,
)
from hf_moe.moe import cuda_graphs
from hf_moe.moe.dispatch import LocalDispatcher

from .conftest import tiny_config


def tiny_model() -> HfMoeForCausalLM:
    torch.manual_seed(0)
    return HfMoeForCausalLM(tiny_config()).eval()


def test_generate_on_cpu_is_unchanged():
    """transformers uses a compile config only on a GPU: on the CPU the static-cache generate stays eager."""
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    graphs = model.generate(ids, cache_implementation="static", compile_config=CUDAGraphConfig(), **kwargs)
    assert torch.equal(graphs, dynamic)


def test_compiled_call_is_the_models_decode_graphs_and_runs_cpu_steps_eagerly():
    model = tiny_model()
    step = model.get_compiled_call(CUDAGraphConfig())
    assert step.__self__ is decode_graphs(model) is decode_graphs(model)
    assert decode_graphs(tiny_model()) is not decode_graphs(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    with torch.no_grad():
        assert torch.equal(step(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not decode_graphs(model).graphs


def test_max_graphs_must_be_positive():
    with pytest.raises(ValueError, match="max_graphs must be at least 1, got 0"):
        tiny_model().get_compiled_call(CUDAGraphConfig(max_graphs=0))


def test_graphs_do_not_keep_the_model_alive():
    model = tiny_model()
    decode_graphs(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def static_cache(layers: int = 2, sliding_window: int | None = None) -> StaticCache:
    """A transformers StaticCache whose layers are allocated (as after a prefill), on the CPU."""
    cache = StaticCache(config=tiny_config(num_hidden_layers=layers, sliding_window=sliding_window), max_cache_len=8)
    for layer in cache.layers:
        layer.lazy_initialization(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    return cache


class _StandInGraph:
    """Replays like a CUDA graph: recomputes the recorded step from the static inputs into the static logits."""

    def __init__(self, inputs, logits):
        self.inputs, self.logits, self.replays = inputs, logits, 0

    def replay(self):
        self.replays += 1
        self.logits.copy_(self.inputs["input_ids"].float() * 2)


@pytest.fixture
def stand_in(monkeypatch):
    """A model whose logits are 2·input_ids, with `DecodeGraphs`' CUDA-only parts replaced: every call serves, and a
    capture runs the step eagerly and records a stand-in graph over static copies of the inputs."""
    model = torch.nn.Linear(1, 1).eval()
    captures = []

    def forward(input_ids, past_key_values=None, **kwargs):
        return CausalLMOutputWithPast(logits=input_ids.float() * 2, past_key_values=past_key_values)

    def capture(self, tensors, others):
        inputs = {name: t.clone() for name, t in tensors.items()}
        graph = _StandInGraph(inputs, forward(**inputs).logits)
        captures.append(graph)
        return forward(**tensors, **others), CapturedStep(graph, inputs, graph.logits, CausalLMOutputWithPast)

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(DecodeGraphs, "_serves", lambda self, tensors, others: True)
    monkeypatch.setattr(DecodeGraphs, "_capture", capture)
    return model, captures


def test_steps_replay_the_graph_of_their_shape_and_cache(stand_in):
    model, captures = stand_in
    graphs = DecodeGraphs(model)
    step = graphs.for_generate(CUDAGraphConfig(max_graphs=2))
    cache, other_cache = static_cache(), static_cache()
    first = step(input_ids=torch.tensor([[3]]), past_key_values=cache, use_cache=True)
    assert len(captures) == 1 and first.logits.tolist() == [[6.0]]
    second = step(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True)
    assert captures[0].replays == 1 and second.logits.tolist() == [[10.0]] and second.past_key_values is cache
    step(input_ids=torch.tensor([[7]]), past_key_values=cache, use_cache=True)
    assert second.logits.tolist() == [[10.0]], "a replay overwrote an earlier step's returned logits"
    step(input_ids=torch.tensor([[1], [2]]), past_key_values=cache, use_cache=True)  # another batch size
    step(input_ids=torch.tensor([[1]]), past_key_values=other_cache, use_cache=True)  # another cache's memory
    assert len(captures) == 3 and len(graphs.graphs) == 2  # the least recently used (batch 1, `cache`) dropped
    out = step(input_ids=torch.tensor([[4]]), past_key_values=cache, use_cache=True)
    assert len(captures) == 4 and out.logits.tolist() == [[8.0]]
    step(input_ids=torch.tensor([[4]]), past_key_values=cache, use_cache=False)  # another argument value
    assert len(captures) == 5


def test_caches_a_replay_cannot_advance_decode_eagerly(stand_in):
    """A sliding window rolls by a host counter, an offloaded cache moves layers on the host, an unallocated layer has
    no memory yet: none of that happens in a replay."""
    model, captures = stand_in
    step = DecodeGraphs(model).for_generate(CUDAGraphConfig())
    offloaded = static_cache()
    offloaded.offloading = True
    unallocated = StaticCache(config=tiny_config(), max_cache_len=8)
    for cache in (static_cache(sliding_window=4), offloaded, unallocated, None):
        out = step(input_ids=torch.tensor([[3]]), past_key_values=cache)
        assert out.logits.tolist() == [[6.0]]
    assert not captures


def test_graphs_of_replaced_parameters_or_buffers_are_dropped(stand_in):
    model, captures = stand_in
    model.register_buffer("scale", torch.ones(1))
    graphs = DecodeGraphs(model)
    cache = static_cache()
    for replace in (None, lambda: setattr(model, "weight", torch.nn.Parameter(torch.ones(1, 1))),
                    lambda: setattr(model, "scale", torch.zeros(1))):
        step = graphs.for_generate(CUDAGraphConfig())
        step(input_ids=torch.tensor([[3]]), past_key_values=cache)
        assert len(graphs.graphs) == 1
        if replace is None:
            graphs.for_generate(CUDAGraphConfig())
            assert len(graphs.graphs) == 1  # nothing changed: kept
            continue
        replace()
        graphs.for_generate(CUDAGraphConfig())
        assert not graphs.graphs


class _Stream:
    def wait_stream(self, other):
        pass


def fake_cuda_capture(monkeypatch, model, forward, graph) -> None:
    """`model` runs `forward`, every step is served, and the CUDA parts of a capture are stand-ins (`graph` for
    `torch.cuda.graph`), so `DecodeGraphs._capture` runs on the CPU."""
    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(DecodeGraphs, "_serves", lambda self, tensors, others: True)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", _Stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", graph)


def test_a_step_that_cannot_be_captured_warns_once_and_decodes_eagerly(monkeypatch):
    """The capture fails (as a step that waits for the GPU does): the step's eager result is returned, the warning
    names the first cause, and no later step tries again until the parameters change."""
    model = torch.nn.Linear(1, 1).eval()
    calls = []

    def forward(input_ids, **kwargs):
        calls.append(input_ids)
        return CausalLMOutputWithPast(logits=input_ids.float() * 2)

    class FailingCapture:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            try:
                raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")
            except RuntimeError:
                raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904

        def __exit__(self, *exc):
            return False

    fake_cuda_capture(monkeypatch, model, forward, FailingCapture)
    graphs = DecodeGraphs(model)
    step = graphs.for_generate(CUDAGraphConfig())
    cache = static_cache()
    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph \\(Cannot copy between CPU and CUDA"):
        out = step(input_ids=torch.tensor([[3]]), past_key_values=cache)
    assert out.logits.tolist() == [[6.0]] and len(calls) == 1 and not graphs.graphs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert step(input_ids=torch.tensor([[5]]), past_key_values=cache).logits.tolist() == [[10.0]]
    assert len(calls) == 2  # eager, no capture attempted
    model.weight = torch.nn.Parameter(torch.ones(1, 1))
    graphs.for_generate(CUDAGraphConfig())
    assert graphs.uncapturable is None  # new parameters: capturing is tried again


def bf16_model(**overrides) -> HfMoeForCausalLM:
    torch.manual_seed(0)
    return HfMoeForCausalLM(tiny_config(**overrides)).to(torch.bfloat16).eval()


IDS = torch.ones(2, 5, dtype=torch.long)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({}, "not on one CUDA device"),  # every other condition holds: on a GPU this call would decode from graphs
    ({"guidance_scale": 1.0}, "not on one CUDA device"),
    ({"cache_implementation": "dynamic"}, "was given cache_implementation"),
    ({"generation_config": GenerationConfig(cache_implementation="offloaded")}, "was given cache_implementation"),
    ({"disable_compile": True}, "was given disable_compile"),
    ({"compile_config": CUDAGraphConfig()}, "was given compile_config"),
    ({"return_dict_in_generate": True}, "was given return_dict_in_generate"),
    ({"past_key_values": DynamicCache()}, "was given past_key_values"),
    ({"assistant_model": object()}, "was given assistant_model"),
    ({"guidance_scale": 1.5}, "was given guidance_scale"),
    ({"num_beams": 2}, "several sequences per prompt"),
    ({"num_return_sequences": 3}, "several sequences per prompt"),
    ({"use_cache": False}, "use_cache=False"),
    ({"output_attentions": True}, "records outputs"),
])
def test_plain_generate_calls_default_to_graphs_unless_the_call_chooses(kwargs, reason):
    assert reason in default_graph_decoding(bf16_model(), (IDS,), kwargs)


def _remote(model):
    class RemoteDispatcher(LocalDispatcher):  # stands in for expert parallelism's all-to-all
        pass
    for block in moe_blocks(model):
        block.set_dispatcher(RemoteDispatcher())
    return model


@pytest.mark.parametrize(("change", "reason"), [
    (lambda m: m.train(), "training mode"),
    (lambda m: m.float(), "not all bf16/fp16"),
    (lambda m: setattr(m.config, "output_router_logits", True), "records outputs"),
    (lambda m: setattr(m.generation_config, "cache_implementation", "dynamic"), "was given cache_implementation"),
    (lambda m: setattr(m.config, "_attn_implementation", "flex_attention"), "attn_implementation='flex_attention'"),
    (_remote, "expert parallelism"),
])
def test_models_graphs_cannot_serve_keep_the_dynamic_cache(change, reason):
    model = bf16_model()
    change(model)
    assert reason in default_graph_decoding(model, (IDS,), {})


def test_sliding_window_models_keep_the_dynamic_cache():
    assert "sliding-window" in default_graph_decoding(bf16_model(sliding_window=4), (IDS,), {})


MLA = {"num_key_value_heads": 4, "kv_lora_rank": 12, "q_lora_rank": 10, "qk_rope_head_dim": 4, "v_head_dim": 6,
       "qk_nope_head_dim": 8}


@pytest.mark.parametrize("overrides", [{}, MLA], ids=["gqa", "mla"])
def test_static_cache_estimate_is_the_cache_generate_allocates(overrides):
    model = bf16_model(**overrides)
    out = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static",
                         return_dict_in_generate=True)
    cache = out.past_key_values
    length = cache.layers[0].keys.shape[-2]  # the tokens transformers allocates per sequence
    assert 5 + 3 - 1 <= length <= 5 + 3
    allocated = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert _static_cache_bytes(model.config, 2, length, 2) == allocated


@pytest.mark.parametrize("reason", [None, "not on one CUDA device"])
def test_generate_asks_transformers_for_graphs_exactly_when_allowed(monkeypatch, reason):
    seen = {}

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    original = GenerationMixin.generate
    monkeypatch.setattr(GenerationMixin, "generate", spy)
    monkeypatch.setattr(modeling_hf_moe, "default_graph_decoding", lambda model, args, kwargs: reason)
    model = tiny_model()
    got = model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    if reason is None:
        assert seen["cache_implementation"] == "static" and isinstance(seen["compile_config"], CUDAGraphConfig)
    else:
        assert "cache_implementation" not in seen and "compile_config" not in seen
    monkeypatch.setattr(GenerationMixin, "generate", original)
    assert torch.equal(got, model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                           cache_implementation="dynamic"))  # on the CPU the static cache is eager


class _RecordingCapture:
    """Stands in for `torch.cuda.graph`: records where the capture begins and ends."""

    events: list = []

    def __init__(self, *args, **kwargs):
        self.kwargs = kwargs

    def __enter__(self):
        self.events.append(("begin", self.kwargs.get("capture_error_mode")))

    def __exit__(self, *exc):
        self.events.append("end")
        return False


def test_decode_captures_own_their_cublas_workspace(monkeypatch):
    """cuBLAS's workspace table is cleared after the eager step and before the capture (the graph allocates its
    workspace in its own pool instead of using the one the eager step made, which torch.compile's CUDA graphs free
    when they clear the table: the replay then wrote to freed memory, an illegal address on an H100) and again after
    it (eager matmuls do not share the graph's memory)."""
    events = _RecordingCapture.events = []
    model = torch.nn.Linear(1, 1).eval()

    def forward(input_ids, **kwargs):
        events.append("step")
        return CausalLMOutputWithPast(logits=input_ids.float() * 2)

    fake_cuda_capture(monkeypatch, model, forward, _RecordingCapture)
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: events.append("clear"), raising=False)
    step = DecodeGraphs(model).for_generate(CUDAGraphConfig())
    step(input_ids=torch.tensor([[3]]), past_key_values=static_cache())
    assert events == ["step", "clear", ("begin", "thread_local"), "step", "end", "clear"]


def test_training_captures_own_their_cublas_workspace(monkeypatch):
    """The same rule for `capture_moe_cuda_graphs`: around each capture `make_graphed_callables` makes."""
    events = _RecordingCapture.events = []
    monkeypatch.setattr(cuda_graphs, "_CUDA_GRAPH", _RecordingCapture)
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: events.append("clear"), raising=False)
    with cuda_graphs._thread_local_capture():
        for graph in ("forward", "backward"):
            with torch.cuda.graph(graph, pool=None):
                events.append(graph)
    assert torch.cuda.graph is cuda_graphs._CUDA_GRAPH
    assert events == ["clear", ("begin", "thread_local"), "forward", "end", "clear"] + [
        "clear", ("begin", "thread_local"), "backward", "end", "clear"]
