"""Trainer integration: the router losses keep their configured weight under gradient accumulation and data
parallelism, the callback logs router metrics, and LoRA on attention + experts round-trips."""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from hf_moe import HfMoeForCausalLM, router_metrics
from hf_moe.integrations import MoETrainerCallback, lora_config, moe_blocks

from . import trainer_worker as worker
from .conftest import assert_rel_close, tiny_config


def reference_aux_gradient(seed: int, micro_batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """By hand: configured coefficients times the token-weighted mean of the micro-batches' router losses."""
    net = worker.model(seed, worker.AUX, worker.Z)
    total = sum(b[:, 1:].numel() for b in micro_batches)
    loss = 0.0
    for batch in micro_batches:
        out = net(batch, output_router_logits=True)
        loss = loss + (batch[:, 1:].numel() / total) * (worker.AUX * out.aux_loss + worker.Z * out.z_loss)
    loss.backward()
    return [p.grad for n, p in net.named_parameters() if n.endswith("router.weight")]


@pytest.mark.parametrize("grad_accum,batch_size", [(1, 8), (4, 2)])
def test_router_loss_weight_is_the_configured_one_under_gradient_accumulation(grad_accum, batch_size):
    grads, seen = worker.aux_gradient(1234, grad_accum, batch_size)
    assert len(seen) == grad_accum
    expected = reference_aux_gradient(1234, seen)
    for got, want in zip(grads, expected):
        assert_rel_close(got, want, 1e-4, f"router grad, grad_accum={grad_accum}")


def test_router_loss_weight_is_the_configured_one_over_two_processes(tmp_path):
    out = str(tmp_path / "aux")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(os.path.dirname(__file__), "trainer_worker.py"), out, "2", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, timeout=300, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]  # the workers' tracebacks
    ranks = [torch.load(f"{out}.{r}.pt") for r in range(2)]
    for got_0, got_1 in zip(ranks[0]["grads"], ranks[1]["grads"]):
        torch.testing.assert_close(got_0, got_1)  # DDP made the gradients equal
    seen = ranks[0]["seen"] + ranks[1]["seen"]  # 2 micro-batches per process form the global step
    assert sum(b.shape[0] for b in seen) == worker.SAMPLES
    expected = reference_aux_gradient(1234, seen)
    for got, want in zip(ranks[0]["grads"], expected):
        assert_rel_close(got, want, 1e-4, "router grad, 2 processes x grad_accum 2")


def test_callback_logs_router_metrics(tmp_path):
    model = HfMoeForCausalLM(tiny_config(num_hidden_layers=3, moe_layers=[0, 2]))
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 97, (16, 12))]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    callback = MoETrainerCallback(per_layer=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(callback)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for entry in logged:
        assert 1.0 <= entry["moe/max_load"] <= 6.0  # max/mean tokens per expert over 6 experts
        assert entry["moe/worst_layer"] in (0.0, 1.0)
        assert entry["moe/max_load"] == max(entry["moe/layer_0/max_load"], entry["moe/layer_1/max_load"])
        assert 0.0 < entry["moe/routing_entropy"] <= torch.log(torch.tensor(6.0)).item() + 1e-6
        assert entry["moe/aux_loss"] > 0 and entry["moe/z_loss"] > 0
    assert trainer.callback_handler.callbacks[0] is callback, "callback must run before the printer/reporters"
    # the logged aux loss is the mean over the logged steps' forwards: recompute the last one's inputs' value
    assert not callback._hooks, "hooks are removed at the end of training"


@pytest.mark.parametrize("case", ["padding", "sigmoid"])
def test_callback_routing_entropy_is_the_one_router_metrics_defines(case):
    """The callback's `moe/routing_entropy` is the mean over layers of `router_metrics`' routing entropy: over real
    tokens only, of the distribution the router scores (sigmoid scores normalised per token), checked against a
    float64 computation by hand."""
    sigmoid = case == "sigmoid"
    model = HfMoeForCausalLM(tiny_config(scoring_func="sigmoid" if sigmoid else "softmax")).train()
    ids = torch.randint(0, 97, (2, 8))
    mask = torch.ones_like(ids)
    if case == "padding":
        mask[0, :3] = 0
    callback, args = MoETrainerCallback(), SimpleNamespace(max_grad_norm=1.0)
    callback.on_train_begin(args, None, None, model=model)
    out = model(ids, attention_mask=mask, output_router_logits=True)
    callback.on_train_end(args, None, None)
    logged = callback.metrics()["moe/routing_entropy"]

    real = mask.reshape(-1).bool()
    by_hand = []
    for logits in out.router_logits:
        x = logits.detach().double()[real]
        probs = x.sigmoid() / x.sigmoid().sum(-1, keepdim=True) if sigmoid else x.softmax(-1)
        by_hand.append(-(probs * probs.log()).sum(-1).mean().item())
    assert logged == pytest.approx(math.fsum(by_hand) / len(by_hand), rel=1e-5)
    defined = [layer["routing_entropy"] for layer in router_metrics(out)]
    assert logged == pytest.approx(math.fsum(defined) / len(defined), rel=1e-5)


def test_lora_on_attention_and_experts_round_trips(tmp_path):
    torch.manual_seed(0)
    base = HfMoeForCausalLM(tiny_config(num_shared_experts=1, first_k_dense=1, num_hidden_layers=3)).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, lora_config(r=4, router=True, init_lora_weights=False))
    names = [n for n, _ in peft_model.named_parameters() if "lora" in n]
    for part in ("q_proj", "o_proj", "experts", "router", "shared_experts", "layers.0.mlp.gate_proj"):
        assert any(part in n for n in names), f"no LoRA weights on {part}"
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        adapted = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)

    fresh = HfMoeForCausalLM(tiny_config(num_shared_experts=1, first_k_dense=1, num_hidden_layers=3)).eval()
    fresh.load_state_dict(state)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert_rel_close(reloaded(ids).logits, adapted, 1e-6, "adapter reload")
        merged = reloaded.merge_and_unload()
        assert_rel_close(merged(ids).logits, adapted, 1e-5, "merge_and_unload")
        assert (merged(ids).logits - HfMoeForCausalLM(tiny_config(num_shared_experts=1, first_k_dense=1,
                num_hidden_layers=3)).eval()(ids).logits).abs().max() > 0


def test_lora_config_refuses_an_empty_target():
    with pytest.raises(ValueError, match="nothing to adapt"):
        lora_config(attention=False, experts=False, dense_mlp=False, shared_experts=False)


@pytest.mark.parametrize("mode", ["ep", "fsdp"])
def test_trainer_with_expert_parallelism_syncs_experts_and_clips_globally(tmp_path, mode):
    """A plain Trainer under a 2-process launch with experts sharded 2 ways (DDP for the rest, or FSDP2 for
    everything): the callback's sync and global clip give the single-process gradient (token-weighted, as the
    Trainer normalises) and identical replicas."""
    model = worker.model(1234, worker.AUX, worker.Z)
    model.save_pretrained(tmp_path / "ckpt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(os.path.dirname(__file__), "trainer_worker.py"), str(tmp_path / "ep"), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, timeout=300, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"ep.{r}.pt") for r in range(2)]
    for name, value in ranks[0]["params"].items():
        if ".mlp.experts." not in name:
            assert torch.equal(value, ranks[1]["params"][name]), f"replicas drifted: {name}"
    # reference: one process; each micro-step is both ranks' micro-batches together (the load-balancing loss is
    # global over ranks), weighted by its share of the step's tokens; then clipped by the global norm
    model.train()
    micro_steps = list(zip(ranks[0]["seen"], ranks[1]["seen"]))
    assert len(micro_steps) == 2
    for rank0, rank1 in micro_steps:
        batch = torch.cat([rank0, rank1])
        (model(batch, labels=batch).loss / len(micro_steps)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    grads = dict(ranks[0]["grads"])
    for name in grads:
        if ".mlp.experts." in name:
            grads[name] = torch.cat([ranks[0]["grads"][name], ranks[1]["grads"][name]])
    for name, p in model.named_parameters():
        assert_rel_close(grads[name], p.grad, 1e-4, f"grad {name}")


def test_callback_updates_expert_bias_once_per_step_and_resume_restores_it(tmp_path):
    """Aux-loss-free balancing through the Trainer: biases move once per optimizer step, and a run resumed from a
    checkpoint ends with exactly the biases and router weights of the uninterrupted run."""
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 97, (24, 12))]

    def run(out, steps, resume=None, save_steps=None):
        torch.manual_seed(7)
        model = HfMoeForCausalLM(tiny_config(use_expert_bias=True, expert_bias_update_rate=0.01))
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 max_steps=steps, report_to=[], use_cpu=True, disable_tqdm=True, seed=3,
                                 save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                                 logging_strategy="no")
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MoETrainerCallback()])
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a", 3)
    biases = [b.router.expert_bias.clone() for b in moe_blocks(straight)]
    for bias in biases:  # 3 steps of ±0.01 (an odd count, so an oscillating sign cannot return to 0)
        assert bias.abs().max() > 0 and bias.abs().max() <= 0.03 + 1e-6
        assert torch.allclose(bias / 0.01, (bias / 0.01).round(), atol=1e-4), "one update per optimizer step"
    run(tmp_path / "b", 3, save_steps=2)
    resumed = run(tmp_path / "c", 3, resume=str(tmp_path / "b" / "checkpoint-2"))
    for a, b in zip(moe_blocks(straight), moe_blocks(resumed)):
        assert torch.equal(a.router.expert_bias, b.router.expert_bias)
        assert_rel_close(b.router.weight, a.router.weight, 1e-6, "router weight after resume")
