"""torch.compile on the CPU: the MoE block compiles as one graph (no graph break) and, like the whole model,
computes what eager computes, forward and backward."""

import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, DynamicCache, Trainer, TrainingArguments

from hf_moe import HfMoeForCausalLM
from hf_moe.integrations import MoETrainerCallback
from hf_moe.moe.block import HfMoeSparseMoeBlock

from .conftest import aot_graph_backend, assert_rel_close, tiny_config

BLOCK_CASES = {
    "dropless": {},
    "shared_expert": {"num_shared_experts": 1, "shared_expert_gate": True},
    "capacity": {"drop_tokens": True, "capacity_factor": 1.0},
}


def tiny_block(**overrides) -> HfMoeSparseMoeBlock:
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(**overrides))
    return next(m for m in model.modules() if isinstance(m, HfMoeSparseMoeBlock)).train()


def forward_backward(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The output, the input's gradient and every parameter's gradient of `sum(out · probe)`."""
    x = x.detach().requires_grad_(True)
    out = module(x)
    probe = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).view_as(out)  # differs in every element
    (out * probe).sum().backward()
    return (out.detach(), x.grad, *(p.grad for p in module.parameters()))


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_compiles_fullgraph_with_no_graph_break(case):
    block = tiny_block(**BLOCK_CASES[case])
    x = torch.randn(2, 7, block.experts.hidden_dim)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_compiled_block_forward_and_backward_equal_eager(case):
    block = tiny_block(**BLOCK_CASES[case])
    compiled = torch.compile(copy.deepcopy(block), fullgraph=True)
    x = torch.randn(2, 7, block.experts.hidden_dim)
    torch._dynamo.reset()
    got, want = forward_backward(compiled, x), forward_backward(block, x)
    assert len(got) == len(want) >= 5
    for name, g, w in zip(["out", "x.grad", *(n for n, _ in block.named_parameters())], got, want):
        assert g is not None and w is not None, name
        assert_rel_close(g, w, 1e-5, name)


@pytest.mark.parametrize("output_router_logits", [False, True])
def test_compiled_model_training_step_equals_eager(output_router_logits):
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(num_hidden_layers=1, router_aux_loss_coef=0.1)).train()
    compiled_model = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True)  # its first call: no eager forward before it
    got = compiled(input_ids=ids, labels=ids, output_router_logits=output_router_logits)
    want = model(input_ids=ids, labels=ids, output_router_logits=output_router_logits)
    got.loss.backward()
    want.loss.backward()
    assert_rel_close(got.logits, want.logits, 1e-5, "logits")
    assert_rel_close(got.loss, want.loss, 1e-5, "loss")
    if output_router_logits:
        assert_rel_close(got.aux_loss, want.aux_loss, 1e-5, "aux_loss")
        assert len(got.router_logits) == len(want.router_logits) == 1
        assert_rel_close(got.router_logits[0], want.router_logits[0], 1e-5, "router_logits")
    for (name, param), compiled_param in zip(model.named_parameters(), compiled_model.parameters()):
        assert param.grad is not None and compiled_param.grad is not None, name
        assert_rel_close(compiled_param.grad, param.grad, 1e-5, name)


@pytest.mark.parametrize("given", ["nothing", "padding_mask", "position_ids", "cache"])
def test_compiled_model_gives_sdpa_its_causal_flag_unless_something_else_masks(given):
    """Given no padding mask, cache or positions, the compiled forward calls SDPA with `is_causal=True` and no mask,
    as eager code does (transformers 5.17's masks skip it there but materialise it under torch.compile, which SDPA's
    kernels run ~3× slower on a GPU); given any of them, the mask transformers builds (a padding mask applied). Same
    loss as eager."""
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(num_hidden_layers=1)).train()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    inputs = {"padding_mask": {"attention_mask": torch.ones_like(ids)},
              "position_ids": {"position_ids": torch.arange(9).expand(2, -1)},
              "cache": {"past_key_values": DynamicCache(config=model.config), "use_cache": True},
              "nothing": {}}[given]
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    got = torch.compile(model, backend=capture, fullgraph=True)(input_ids=ids, labels=ids, **copy.deepcopy(inputs))
    want = model(input_ids=ids, labels=ids, **inputs)
    assert_rel_close(got.loss, want.loss, 1e-6, "loss")
    calls = [node for g in graphs for node in g.graph.nodes if "scaled_dot_product_attention" in str(node.target)]
    assert len(calls) == 1, [str(n.target) for g in graphs for n in g.graph.nodes]
    if given == "nothing":
        assert calls[0].kwargs.get("is_causal") is True and calls[0].kwargs.get("attn_mask") is None
    elif given == "padding_mask":  # its values cannot be read while tracing: it is applied
        assert calls[0].kwargs.get("is_causal") is False and calls[0].kwargs.get("attn_mask") is not None


def test_compiled_model_computes_rope_once_as_one_op():
    """RoPE's cosines and sines reach the compiled graph as one `hf_moe::rotary_cos_sin` node and no `cos`/`sin`
    operator, so inductor cannot fuse their evaluation into every layer's kernels (once per head, forward and
    backward); the training step equals eager."""
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(num_hidden_layers=2)).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    backend, graphs = aot_graph_backend()
    torch._dynamo.reset()
    compiled = copy.deepcopy(model)
    torch.compile(compiled, backend=backend, fullgraph=True)(input_ids=ids, labels=ids).loss.backward()
    model(input_ids=ids, labels=ids).loss.backward()
    targets = [str(node.target) for graph in graphs["forward"] + graphs["backward"] for node in graph.nodes
               if node.op == "call_function"]
    assert targets.count("hf_moe.rotary_cos_sin.default") == 1, targets
    assert not [t for t in targets if t in ("aten.cos.default", "aten.sin.default")], targets
    for (name, param), compiled_param in zip(model.named_parameters(), compiled.parameters()):
        assert_rel_close(compiled_param.grad, param.grad, 1e-5, name)


def test_layers_compiled_one_by_one_train_as_eager():
    """Each decoder layer compiled on its own with `fullgraph=True` (as FSDP2 recipes compile one unit per layer),
    the model around them eager: the routing reaches the router losses through no hook, so nothing breaks a layer's
    graph, and two training steps give eager's losses and gradients."""
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(num_hidden_layers=2, router_aux_loss_coef=0.1)).train()
    compiled_model = copy.deepcopy(model)
    torch._dynamo.reset()
    for layer in compiled_model.model.layers:
        layer.compile(fullgraph=True)
    for step in range(2):
        ids = torch.randint(0, model.config.vocab_size, (2, 9))
        got = compiled_model(input_ids=ids, labels=ids, output_router_logits=True)
        want = model(input_ids=ids, labels=ids, output_router_logits=True)
        got.loss.backward()
        want.loss.backward()
        assert_rel_close(got.loss, want.loss, 1e-5, f"loss, step {step}")
        assert_rel_close(got.aux_loss, want.aux_loss, 1e-5, f"aux_loss, step {step}")
        assert len(got.router_logits) == len(want.router_logits) == 2
    for (name, param), compiled_param in zip(model.named_parameters(), compiled_model.parameters()):
        assert param.grad is not None and compiled_param.grad is not None, name
        assert_rel_close(compiled_param.grad, param.grad, 1e-5, name)


def test_compiled_static_cache_generate_equals_dynamic_cache():
    assert HfMoeForCausalLM._can_compile_fullgraph
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    dynamic = model.generate(ids, max_new_tokens=4, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles generation on accelerators only by default
    torch._dynamo.reset()
    static = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static",
                            compile_config=compile_config)
    assert "_compiled_call" in model.__dict__, "generate did not compile the forward"
    assert torch.equal(static, dynamic)


def _train_with_callback(tmp_path, torch_compile: bool, steps: int = 3) -> tuple[Trainer, dict, HfMoeForCausalLM]:
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(num_hidden_layers=1, router_aux_loss_coef=0.1))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 97, (4 * steps, 12))]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             torch_compile=torch_compile)
    if torch_compile:
        torch._dynamo.reset()
        counters.clear()
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(MoETrainerCallback())
    trainer.train()
    return trainer, before, model


def test_trainer_with_torch_compile_and_callback_trains_without_graph_breaks(tmp_path):
    """The callback records every layer's routing through a hook that torch.compile traces: no graph break, and the
    logged router metrics are the eager run's. The model never ran eagerly before its first compiled step."""
    trainer, before, model = _train_with_callback(tmp_path, torch_compile=True)
    assert trainer.model_wrapped is not model, "the Trainer did not compile the model"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert math.isfinite(entry["loss"]) and entry["moe/aux_loss"] > 0 and entry["moe/max_load"] >= 1.0
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert any("experts" in name for name in moved) and any("router" in name for name in moved)
    eager, _, _ = _train_with_callback(tmp_path, torch_compile=False)
    want = [entry for entry in eager.state.log_history if "loss" in entry]
    for got_entry, want_entry in zip(logged, want, strict=True):
        for key in ("loss", "moe/aux_loss", "moe/z_loss", "moe/max_load", "moe/routing_entropy", "moe/experts_used"):
            assert math.isclose(got_entry[key], want_entry[key], rel_tol=1e-4), key


@pytest.mark.parametrize("shapes", ["static", "dynamic"])
def test_exported_model_equals_eager(shapes):
    """torch.export of the whole model: the exported program computes the eager model's logits, loss and router
    outputs (a registered pytree), and with dynamic batch and sequence dimensions it serves another shape."""
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    kwargs = {"input_ids": ids, "labels": ids, "use_cache": False, "output_router_logits": True}
    dynamic_shapes = None
    if shapes == "dynamic":
        batch, length = torch.export.Dim("batch", max=64), torch.export.Dim("length", max=100)
        dynamic_shapes = {"input_ids": {0: batch, 1: length}, "labels": {0: batch, 1: length},
                          "use_cache": None, "output_router_logits": None}
    exported = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic_shapes).module()
    if shapes == "dynamic":
        ids = torch.randint(0, model.config.vocab_size, (3, 5))
        kwargs.update(input_ids=ids, labels=ids)
    with torch.no_grad():
        got, want = exported(**kwargs), model(**kwargs)
    assert got.logits.shape == (*ids.shape, model.config.vocab_size)
    assert_rel_close(got.logits, want.logits, 1e-5, "logits")
    assert_rel_close(got.loss, want.loss, 1e-5, "loss")
    assert_rel_close(got.aux_loss, want.aux_loss, 1e-5, "aux_loss")
    routing, want_routing = got.router_outputs[0], want.router_outputs[0]
    assert type(routing) is type(want_routing)
    assert torch.equal(routing.top_k_index, want_routing.top_k_index)
    assert_rel_close(routing.top_k_weights, want_routing.top_k_weights, 1e-5, "top_k_weights")
    assert_rel_close(routing.z_loss, want_routing.z_loss, 1e-5, "z_loss")


def test_granite_multipliers_and_post_norms_compile_fullgraph_as_eager():
    """Granite's multipliers (embeddings, residual branches, attention scale, logits) and FlexOlmo's norms after each
    sublayer: static-cache generation, its decode steps compiled with fullgraph=True, computes the logits of eager
    generation with a dynamic cache."""
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(num_hidden_layers=1, embedding_multiplier=12.0, residual_multiplier=0.22,
                                         attention_multiplier=0.125, logits_scaling=6.0,
                                         norm_placement="post")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    dynamic = model.generate(ids, **kwargs)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    static = model.generate(ids, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert "_compiled_call" in model.__dict__, "generate did not compile the forward"
    assert torch.equal(static.sequences, dynamic.sequences)
    for step, (got, want) in enumerate(zip(static.logits, dynamic.logits, strict=True)):
        assert_rel_close(got, want, 1e-5, f"logits of step {step}")
