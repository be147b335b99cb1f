"""`capture_moe_cuda_graphs`: training steps with the MoE blocks replayed from CUDA graphs equal eager ones.

The GPU tests (skipped without CUDA) train two copies of one model, eager and graphed, on the same fresh batches and
compare losses, logits and every gradient after each step; the graphed copy must also fall back to eager for
another batch shape, in eval mode and in `generate`. CPU tests check the clear errors.
"""

import copy
import gc

import pytest
import torch
import torch.distributed as dist
from peft import get_peft_model

from hf_moe import HfMoeForCausalLM, capture_moe_cuda_graphs, release_moe_cuda_graphs
from hf_moe.integrations import lora_config
from hf_moe.parallel import AllToAllDispatcher

from .conftest import assert_rel_close, requires_cuda, tiny_config


def test_refuses_a_model_that_cannot_be_captured():
    model = HfMoeForCausalLM(tiny_config())
    with pytest.raises(ValueError, match="needs the model on a CUDA device; its weights are on cpu"):
        capture_moe_cuda_graphs(model.train(), batch_size=2, sequence_length=8)


@requires_cuda
@pytest.mark.parametrize("attention_mask", [False, True])
def test_graphed_training_steps_equal_eager_ones(attention_mask):
    config = tiny_config(num_hidden_layers=3, first_k_dense=1, num_experts=8, num_experts_per_tok=2,
                         router_aux_loss_coef=0.02, num_shared_experts=1)
    eager = HfMoeForCausalLM(config).to("cuda", torch.bfloat16).train()
    graphed = capture_moe_cuda_graphs(copy.deepcopy(eager), batch_size=2, sequence_length=16,
                                      attention_mask=attention_mask)
    assert all(block.cuda_graphs is not None for block in graphed.modules() if hasattr(block, "cuda_graphs"))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 16), device="cuda")
        kwargs = {"attention_mask": torch.ones_like(ids)} if attention_mask else {}
        outs = [m(input_ids=ids, labels=ids, **kwargs) for m in (eager, graphed)]
        for out in outs:
            out.loss.backward()
        assert_rel_close(outs[1].logits, outs[0].logits, 1e-6, f"logits, step {step}")
        assert_rel_close(outs[1].aux_loss, outs[0].aux_loss, 1e-6, f"aux loss, step {step}")
        assert_rel_close(outs[1].z_loss, outs[0].z_loss, 1e-6, f"z loss, step {step}")
        for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
            assert_rel_close(q.grad, p.grad, 1e-6, f"grad {name}, step {step}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    # another shape, eval mode and generation run the blocks eagerly
    ids = torch.randint(0, config.vocab_size, (3, 5), device="cuda")
    assert_rel_close(graphed(input_ids=ids).logits, eager(input_ids=ids).logits, 1e-6, "another shape")
    graphed.eval()
    eager.eval()
    with torch.no_grad():
        assert_rel_close(graphed(input_ids=ids).logits, eager(input_ids=ids).logits, 1e-6, "eval")
        kwargs = dict(max_new_tokens=4, do_sample=False, cache_implementation="dynamic")  # eager decode steps
        assert torch.equal(graphed.generate(ids, **kwargs), eager.generate(ids, **kwargs))
    del outs, out
    release_moe_cuda_graphs(graphed)
    assert not any(isinstance(o, torch.cuda.CUDAGraph) for o in gc.get_objects())  # freed, pool included
    graphed.train()
    ids = torch.randint(0, config.vocab_size, (2, 16), device="cuda")
    assert_rel_close(graphed(input_ids=ids).logits, eager.train()(input_ids=ids).logits, 1e-6, "released, eager")


@requires_cuda
def test_graphed_model_refuses_two_forwards_before_backward():
    config = tiny_config(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2)
    model = HfMoeForCausalLM(config).to("cuda", torch.bfloat16).train()
    capture_moe_cuda_graphs(model, batch_size=2, sequence_length=16)
    ids = torch.randint(0, config.vocab_size, (2, 16), device="cuda")
    first = model(input_ids=ids, labels=ids)
    with pytest.raises(RuntimeError, match="called again before the backward of its previous call"):
        model(input_ids=ids, labels=ids)
    first.loss.backward()
    second = model(input_ids=ids, labels=ids)  # the first outputs are still alive, but their backward has run
    del second
    model(input_ids=ids, labels=ids).loss.backward()  # dropped outputs never need their buffers


@requires_cuda
def test_lora_adapters_captured_after_get_peft_model_train_as_eagerly():
    config = tiny_config(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, num_shared_experts=1)
    base = HfMoeForCausalLM(config).to("cuda", torch.bfloat16)
    eager = get_peft_model(base, lora_config(r=4, router=True, init_lora_weights=False)).train()
    graphed = capture_moe_cuda_graphs(copy.deepcopy(eager), batch_size=2, sequence_length=16)
    assert all(b.cuda_graphs is not None for b in graphed.modules() if hasattr(b, "cuda_graphs"))
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (eager, graphed)]
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 16), device="cuda")
        outs = [m(input_ids=ids, labels=ids) for m in (eager, graphed)]
        for out in outs:
            out.loss.backward()
        assert_rel_close(outs[1].logits, outs[0].logits, 1e-6, f"logits, step {step}")
        trained = [(n, p, q) for (n, p), q in zip(eager.named_parameters(), graphed.parameters()) if p.requires_grad]
        assert any("experts" in n and "lora" in n for n, _, _ in trained)
        for name, p, q in trained:
            assert_rel_close(q.grad, p.grad, 1e-6, f"grad {name}, step {step}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    assert all(b.cuda_graphs is not None for b in graphed.modules() if hasattr(b, "cuda_graphs"))  # replayed


def test_graphs_are_dropped_when_the_blocks_parameters_change(monkeypatch):
    from hf_moe.moe.cuda_graphs import _GraphedBlock

    model = HfMoeForCausalLM(tiny_config()).to(torch.bfloat16).train()
    block = model.model.layers[0].mlp
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16)

    def capture():
        block.cuda_graphs = _GraphedBlock(lambda *a: None, x.shape, x.dtype, False, (), None, block)
        return block.cuda_graphs

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # serves() asks the input only
    graphed = capture()
    assert graphed.serves(block, x, None)
    assert not graphed.serves(block, x[:, :4], None)  # another shape: eager, graphs kept
    assert block.cuda_graphs is graphed
    block.router.weight.requires_grad_(False)
    with pytest.warns(UserWarning, match="parameters changed after capture_moe_cuda_graphs"):
        assert not graphed.serves(block, x, None)
    assert block.cuda_graphs is None
    block.router.weight.requires_grad_(True)
    graphed = capture()
    with torch.no_grad():
        block.router.weight.copy_(torch.randn_like(block.router.weight))  # in place, as an optimizer step
    assert graphed.serves(block, x, None)
    get_peft_model(model, lora_config(r=2))  # replaces the experts by PEFT's wrapper, freezes the base weights
    with pytest.warns(UserWarning, match="an adapter added"):
        assert not graphed.serves(block, x, None)
    assert block.cuda_graphs is None


def test_a_second_replay_before_backward_raises():
    from hf_moe.moe.cuda_graphs import _ROUTING_TENSORS, _GraphedBlock

    class Replay(torch.autograd.Function):  # stands in for make_graphed_callables' autograd Function
        @staticmethod
        def forward(ctx, hidden_states, weight):
            ctx.save_for_backward(hidden_states)
            return hidden_states * weight

        @staticmethod
        def backward(ctx, grad):
            return None, (grad * ctx.saved_tensors[0]).sum((0, 1))

    weight = torch.randn(4, requires_grad=True)

    def replay(hidden_states):
        return (Replay.apply(hidden_states, weight), *(torch.rand(2, 3) for _ in _ROUTING_TENSORS))

    graphed = _GraphedBlock(replay, torch.Size((1, 2, 4)), torch.float32, False, (), None, torch.nn.Linear(4, 4))
    x = torch.randn(1, 2, 4)
    out, _ = graphed(x, None)
    with pytest.raises(RuntimeError, match="called again before the backward of its previous call"):
        graphed(x, None)
    out.pow(2).sum().backward()
    out, _ = graphed(x, None)  # the previous output is alive, but its backward has run
    del out
    out, _ = graphed(x, None)  # the previous output was dropped: nothing will read its buffers
    out.sum().backward()


def test_capture_out_of_memory_names_the_tokens(monkeypatch):
    model = HfMoeForCausalLM(tiny_config()).to(torch.bfloat16).train()
    # past the device check (parameters only: the activations keep their CPU paths)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: isinstance(self, torch.nn.Parameter)))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB.")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", out_of_memory)
    expected = r"Capture fewer tokens \(batch_size × sequence_length, here 2 × 8\)"
    with pytest.raises(torch.OutOfMemoryError, match=expected):
        capture_moe_cuda_graphs(model, batch_size=2, sequence_length=8)


def test_capture_names_the_error_that_invalidated_it(monkeypatch):
    """Out of memory inside the captured region: leaving the capture raises CUDA's "previous error during capture",
    which must not hide the real cause (nor pass for a host sync)."""
    model = HfMoeForCausalLM(tiny_config()).to(torch.bfloat16).train()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: isinstance(self, torch.nn.Parameter)))

    def out_of_memory_in_capture(*args, **kwargs):
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB.")
        finally:  # what torch.cuda.graph's exit raises then
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", out_of_memory_in_capture)
    with pytest.raises(torch.OutOfMemoryError, match=r"restart the process.*Tried to allocate 14.00 GiB"):
        capture_moe_cuda_graphs(model, batch_size=2, sequence_length=8)


def test_refuses_what_a_graph_cannot_replay(monkeypatch):
    model = HfMoeForCausalLM(tiny_config())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # get past the device check
    with pytest.raises(ValueError, match="needs bf16 weights; they are torch.float32"):  # offsets read on the host
        capture_moe_cuda_graphs(model.train(), batch_size=2, sequence_length=8)
    model = model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="call model.train"):
        capture_moe_cuda_graphs(model.eval(), batch_size=2, sequence_length=8)
    with pytest.raises(ValueError, match="no MoE block"):
        capture_moe_cuda_graphs(torch.nn.Linear(2, 2), batch_size=2, sequence_length=8)
    block = model.model.layers[0].mlp
    for padded, weight_grads in [(False, None), (True, object())]:  # the default dispatch syncs; overlap is Python
        dispatcher = object.__new__(AllToAllDispatcher)  # no process group needed to ask whether it is capturable
        dispatcher.padded, dispatcher.weight_grads = padded, weight_grads
        block.set_dispatcher(dispatcher)
        with pytest.raises(ValueError, match="needs padded dispatch without the backward overlap"):
            capture_moe_cuda_graphs(model.train(), batch_size=2, sequence_length=8)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        capture_moe_cuda_graphs(model.train(), batch_size=2, sequence_length=8)
    hashed = HfMoeForCausalLM(tiny_config(router_type="hash")).to(torch.bfloat16)
    with pytest.raises(ValueError, match="hash routing"):
        capture_moe_cuda_graphs(hashed.train(), batch_size=2, sequence_length=8)
    biased = HfMoeForCausalLM(tiny_config(use_expert_bias=True)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="aux-loss-free balancing"):
        capture_moe_cuda_graphs(biased.train(), batch_size=2, sequence_length=8)


def test_refuses_a_model_already_wrapped_by_ddp(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(HfMoeForCausalLM(tiny_config()).train())
        with pytest.raises(ValueError, match="capture before DDP wraps the model"):
            capture_moe_cuda_graphs(ddp, batch_size=2, sequence_length=8)
    finally:
        dist.destroy_process_group()


def test_a_copy_of_a_captured_model_runs_its_blocks_eagerly():
    from hf_moe.moe.cuda_graphs import _GraphedBlock

    model = HfMoeForCausalLM(tiny_config())
    block = model.model.layers[0].mlp
    block.cuda_graphs = _GraphedBlock(lambda *a: None, torch.Size((1, 2, 32)), torch.bfloat16, False, (), None, block)
    copied = copy.deepcopy(model)
    assert copied.model.layers[0].mlp.cuda_graphs is None  # its graphs would read the original's weights
    assert model.model.layers[0].mlp.cuda_graphs is block.cuda_graphs
    ids = torch.randint(0, 97, (2, 6))
    torch.testing.assert_close(copied.eval()(ids).logits, model.eval()(ids).logits)


def test_release_drops_every_blocks_graphs():
    from hf_moe.moe.cuda_graphs import _GraphedBlock

    model = HfMoeForCausalLM(tiny_config(num_hidden_layers=3))
    blocks = [m for m in model.modules() if hasattr(m, "cuda_graphs")]
    for block in blocks:
        block.cuda_graphs = _GraphedBlock(lambda *a: None, torch.Size((1, 2, 32)), torch.bfloat16, False, (), None,
                                          block)
    assert release_moe_cuda_graphs(model) is model
    assert len(blocks) == 3 and all(block.cuda_graphs is None for block in blocks)

