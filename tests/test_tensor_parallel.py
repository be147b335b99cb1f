"""transformers' own tensor parallelism on HfMoe (CPU, gloo, 2 processes): `from_pretrained(..., tp_plan="auto")`
shards attention by head and every MLP, routed experts included, by its intermediate dimension; logits, losses and
gradients equal one process's, and the model saves back to the checkpoint it came from."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from hf_moe import HfMoeForCausalLM

from .conftest import assert_rel_close, tiny_config

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")
WORLD = 2
# Deliberately whole on every rank: norms read the replicated residual stream, the router and the shared-expert gate
# must give every rank the same whole decision.
REPLICATED = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight", "q_norm.weight",
              "k_norm.weight", "mlp.router.weight", "mlp.shared_expert_gate.weight")


def test_tp_plan_auto_shards_experts_and_equals_one_process(tmp_path):
    config = tiny_config(first_k_dense=1, num_hidden_layers=3, num_shared_experts=1, shared_expert_gate=True,
                         qk_norm=True, attention_bias=True, router_aux_loss_coef=0.05)
    HfMoeForCausalLM(config).save_pretrained(tmp_path / "model")
    batch = torch.randint(1, config.vocab_size, (2, 12))
    torch.save(batch, tmp_path / "batch.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), WORKER,
           str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"tp{r}.pt") for r in range(WORLD)]

    reference = HfMoeForCausalLM.from_pretrained(tmp_path / "model")
    full = dict(reference.named_parameters())
    unsharded = sorted(set(full) - set(ranks[0]["sharded"]))
    assert all(name.endswith(REPLICATED) for name in unsharded), f"left replicated by no plan entry: {unsharded}"
    assert any(name.endswith("experts.gate_up_proj") for name in ranks[0]["sharded"])

    half = config.moe_intermediate_size // WORLD
    for r, tp in enumerate(ranks):
        assert tp["world"] == WORLD
        for name, local in tp["local"].items():  # each rank holds its half of every expert's intermediate dim
            if name.endswith("experts.gate_up_proj"):
                gate, up = full[name].detach().chunk(2, dim=1)
                expected = torch.cat([gate[:, r * half : (r + 1) * half], up[:, r * half : (r + 1) * half]], dim=1)
                assert torch.equal(local, expected), f"{name}: rank {r} does not hold its gate and up rows"
            elif name.endswith("experts.down_proj"):
                assert torch.equal(local, full[name].detach()[:, :, r * half : (r + 1) * half]), f"{name}: rank {r}"

    reference.train()
    for implementation in ("hf_moe_grouped", "eager"):
        reference.set_experts_implementation(implementation)
        reference.zero_grad(set_to_none=True)
        out = reference(batch, labels=batch)
        out.loss.backward()
        for r, tp in enumerate(ranks):
            got = tp[implementation]
            what = f"{implementation}, rank {r}"
            assert_rel_close(got["logits"], out.logits.detach(), 1e-5, f"logits, {what}")
            assert_rel_close(got["loss"], out.loss.detach(), 1e-5, f"loss, {what}")
            for name, param in full.items():
                assert_rel_close(got["grads"][name], param.grad, 1e-5, f"grad of {name}, {what}")

    saved = load_file(tmp_path / "saved" / "model.safetensors")
    original = load_file(tmp_path / "model" / "model.safetensors")
    assert saved.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(saved[name], tensor), f"saved under TP: {name} differs from the checkpoint"
