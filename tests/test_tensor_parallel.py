"""transformers' own tensor parallelism on HfMoe (CPU, gloo, 2 processes): `from_pretrained(..., tp_plan="auto")`
shards attention by head and every MLP, routed experts included, by its intermediate dimension; logits, losses and
gradients equal one process's, and the model saves back to the checkpoint it came from."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_moe import HfMoeForCausalLM

from .conftest import assert_rel_close, tiny_config

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")
WORLD = 2
# Deliberately whole on every rank: norms read the replicated residual stream, the router and the shared-expert gate
# must give every rank the same whole decision. The plan does not name the input embedding: transformers 5.17 keeps
# it whole, later versions may shard it.
REPLICATED = ("model.embed_tokens.weight", "input_layernorm.weight",
              "post_attention_layernorm.weight", "model.norm.weight", "q_norm.weight",
              "k_norm.weight", "mlp.router.weight", "mlp.shared_expert_gate.weight")


def run_tensor_parallel(tmp_path, config) -> tuple[torch.Tensor, list[dict]]:
    """Save a model of `config`, run the worker on WORLD ranks; the batch and what each rank wrote."""
    HfMoeForCausalLM(config).save_pretrained(tmp_path / "model")
    batch = torch.randint(1, config.vocab_size, (2, 12))
    torch.save(batch, tmp_path / "batch.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), WORKER,
           str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return batch, [torch.load(tmp_path / f"tp{r}.pt") for r in range(WORLD)]


def test_tp_plan_auto_shards_experts_and_equals_one_process(tmp_path):
    # The vocabulary divides by the ranks: transformers 5.17 gathers a colwise lm_head only in equal chunks. The
    # attention sinks are sharded by head with the heads.
    config = tiny_config(first_k_dense=1, num_hidden_layers=3, num_shared_experts=1, shared_expert_gate=True,
                         qk_norm=True, attention_bias=True, router_aux_loss_coef=0.05, vocab_size=96,
                         attention_sinks=True, sliding_window=5,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    batch, ranks = run_tensor_parallel(tmp_path, config)

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


@pytest.mark.parametrize("sparse", [{}, dict(index_topk=3, index_n_heads=4, index_head_dim=8)],
                         ids=["mla", "sparse_attention"])
def test_tp_plan_auto_shards_multi_head_latent_attention_by_head_and_equals_one_process(tmp_path, sparse):
    """MLA sharded by head, and with a lightning indexer (replicated, without gradients, as in one process) keeping 3
    of the 12 keys."""
    config = tiny_config(num_hidden_layers=1, vocab_size=96, num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=10,
                         qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=8, rope_interleave=True, **sparse)
    batch, ranks = run_tensor_parallel(tmp_path, config)
    reference = HfMoeForCausalLM.from_pretrained(tmp_path / "model").train()
    reference.set_experts_implementation("eager")
    out = reference(batch, labels=batch)
    out.loss.backward()
    for r, tp in enumerate(ranks):
        for name in ("q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight"):
            assert any(n.endswith(name) for n in tp["sharded"]), f"{name} is not sharded"
        got = tp["eager"]
        assert_rel_close(got["logits"], out.logits.detach(), 1e-5, f"logits, rank {r}")
        for name, param in reference.named_parameters():  # the latent projections' and norms' gradients are whole
            if param.grad is None:  # the indexer's
                assert ".indexer." in name and name not in got["grads"], name
                continue
            assert_rel_close(got["grads"][name], param.grad, 1e-5, f"grad of {name}, rank {r}")
