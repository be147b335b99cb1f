"""Expert parallelism (CPU, gloo, 2 and 4 processes): forward, gradients and AdamW steps with clipping equal a
single process on the concatenated batch; save/load across layouts; LoRA under EP; clear errors, no hangs."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel, get_peft_model

from hf_moe import HfMoeForCausalLM
from hf_moe.integrations import lora_config
from hf_moe.parallel import init_expert_parallel

from . import ep_worker
from .conftest import FLOAT64_TOL, assert_rel_close, tiny_config
from .worker_cases import skew_routing

WORKER = os.path.join(os.path.dirname(__file__), "ep_worker.py")


def launch(world: int, *args: str, skewed: bool = False) -> None:
    if torch.cuda.is_available() and world > torch.cuda.device_count():
        pytest.skip(f"{world} processes need {world} GPUs under NCCL; this machine has {torch.cuda.device_count()}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), WORKER,
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MOE_TEST_SKEW": "1" if skewed else "0",
           "HF_MOE_TEST_SEED": str(torch.initial_seed())}  # the test's seed, so a failure replays
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]


def make_checkpoint(workdir, rows: int, **overrides) -> tuple[HfMoeForCausalLM, torch.Tensor]:
    fields = dict(num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.05, num_shared_experts=1,
                  first_k_dense=1, num_hidden_layers=3)
    model = HfMoeForCausalLM(tiny_config(**{**fields, **overrides}))
    model.save_pretrained(workdir / "model")
    batch = torch.randint(1, 97, (rows, 12))
    torch.save(batch, workdir / "batch.pt")
    return model, batch


@pytest.mark.parametrize("world,ep_size,skewed,impl,overrides", [
    (2, 2, False, "hf_moe_grouped", {}), (4, 4, True, "eager", {}), (4, 2, False, "hf_moe_grouped", {}),
    (2, 2, False, "hf_moe_grouped", {"gated_experts": False, "hidden_act": "relu2"}),
    (2, 2, False, "hf_moe_gathered", {"router_type": "product_key", "num_experts": 16, "gated_experts": False,
                                      "moe_intermediate_size": 1})],
                         ids=["W2-P2", "W4-P4-skewed", "W4-P2-D2", "W2-P2-non-gated-relu2", "W2-P2-product-key"])
def test_expert_parallel_training_equals_one_process(tmp_path, monkeypatch, world, ep_size, skewed, impl, overrides):
    reference, batch = make_checkpoint(tmp_path, rows=2 * world, **overrides)
    launch(world, "train", str(tmp_path), str(ep_size), impl, skewed=skewed)
    if skewed:
        from hf_moe import HfMoeRouter

        monkeypatch.setattr(HfMoeRouter, "forward", HfMoeRouter.forward)  # restored after the test
        skew_routing()
    ranks = [torch.load(tmp_path / f"train{r}.pt") for r in range(world)]
    for r, result in enumerate(ranks):  # the dispatcher alone, fp32, skewed routings, a rank without tokens
        for what, err in result["dispatcher_errors"].items():
            assert err <= 1e-5, f"dispatcher vs one process, rank {r}, {what}: relative error {err:.2e}"

    reference.double().train()
    reference.set_experts_implementation("eager")  # transformers' grouped_mm has no float64 kernel on CPU
    rows = batch.shape[0] // world
    # per-rank load-balancing loss: the W ranks compute one process's mean of the W per-rank losses
    per_rank = sum(reference(batch[r * rows : (r + 1) * rows], labels=batch[r * rows : (r + 1) * rows]).loss
                   for r in range(world)) / world
    per_rank.backward()
    ref_local_aux = {n: p.grad.clone() for n, p in reference.named_parameters()}
    reference.zero_grad()

    out = reference(batch, labels=batch)
    out.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    for r, result in enumerate(ranks):
        assert_rel_close(result["logits"], out.logits[r * rows : (r + 1) * rows].detach(), FLOAT64_TOL,
                         f"logits rank {r}")
        assert result["padded_dispatchers"] and all(result["padded_dispatchers"])
        assert_rel_close(result["padded_logits"], out.logits[r * rows : (r + 1) * rows].detach(), FLOAT64_TOL,
                         f"padded dispatch logits rank {r}")
    if skewed:
        routed = reference.model.layers[1].mlp.router(torch.randn(50, 32)).top_k_index.unique().tolist()
        assert routed == [0, 1], "the skewed router must leave ranks 1..3 without tokens"
        assert all(r["grads"]["model.layers.1.mlp.experts.down_proj"].abs().sum() == 0 for r in ranks[1:])

    def full(result_key, rank_results, step=None):
        """Experts reassembled from the first EP group's shards; everything else from rank 0."""
        first_group = sorted((r for r in rank_results if r["edp_rank"] == 0), key=lambda r: r["ep_rank"])
        tensors = {}
        for name, value in (rank_results[0][result_key] if step is None else rank_results[0][result_key][step]).items():
            if ".mlp.experts." in name:
                value = torch.cat([(r[result_key] if step is None else r[result_key][step])[name] for r in first_group])
            tensors[name] = value
        return tensors

    local_aux = full("local_aux_grads", ranks)
    for name, ref in ref_local_aux.items():
        assert_rel_close(local_aux[name], ref, FLOAT64_TOL, f"grad with per-rank aux loss {name}")
    grads = full("grads", ranks)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert_rel_close(grads[name], ref, FLOAT64_TOL, f"grad {name}")
    for r in ranks[1:]:  # replicas agree exactly: DDP for the rest, edp all-reduce for the experts
        for name, value in r["grads"].items():
            if ".mlp.experts." not in name:
                assert torch.equal(value, ranks[0]["grads"][name]), name

    optimizer = torch.optim.AdamW(reference.parameters(), lr=ep_worker.LR)
    for step in range(1, ep_worker.STEPS + 1):
        if step > 1:
            reference(batch, labels=batch).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), ep_worker.MAX_NORM)
        assert abs(norm.item() - ranks[0]["norms"][step - 1]) <= FLOAT64_TOL * norm.item(), f"grad norm at step {step}"
        optimizer.step()
        optimizer.zero_grad()
        if step in (1, ep_worker.STEPS):
            params = full("params", ranks, step)
            for name, p in reference.named_parameters():
                # Adam divides by |g| + eps, which magnifies any difference in a near-zero gradient: float64 all
                # the way (routing sent in float64, the clip factor in float64) keeps the steps equal
                assert_rel_close(params[name], p.detach(), FLOAT64_TOL, f"param {name} after step {step}")
            for r in ranks[1:]:
                for name, value in r["params"][step].items():
                    if ".mlp.experts." not in name:
                        assert torch.equal(value, ranks[0]["params"][step][name]), f"replicas drifted: {name}"

    saved = HfMoeForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float64, experts_implementation="eager")
    saved.eval()
    with torch.no_grad():
        logits = saved(batch).logits
        assert_rel_close(logits, reference.eval()(batch).logits, FLOAT64_TOL, "saved checkpoint vs reference")
    for r, result in enumerate(ranks):
        assert_rel_close(result["final_logits"], logits[r * rows : (r + 1) * rows], FLOAT64_TOL,
                         f"final logits rank {r}")


def test_compiled_expert_parallel_model_breaks_at_the_dispatcher_and_equals_eager(tmp_path):
    make_checkpoint(tmp_path, rows=4)
    launch(2, "compile", str(tmp_path), "2")
    for rank in range(2):
        result = torch.load(tmp_path / f"compile{rank}.pt")
        eager, compiled = result["eager"], result["compiled"]
        # every break is at a dispatcher (explain also lists the first one as met in the model's layer loop, which
        # dynamo then leaves to compile layer by layer); none at an output hook's ContextVar, which the frames
        # resuming after a break could not trace while the model recorded its routing through hooks
        reasons = result["reasons"]
        assert len(reasons) >= result["moe_blocks"] == 2, reasons
        assert all("AllToAllDispatcher.__call__" in r for r in reasons), reasons
        assert_rel_close(compiled["logits"], eager["logits"], 1e-5, "logits")
        assert_rel_close(compiled["loss"], eager["loss"], 1e-5, "loss")
        assert compiled["grads"].keys() == eager["grads"].keys()
        for name, grad in eager["grads"].items():
            assert_rel_close(compiled["grads"][name], grad, 1e-4, name)


def test_lora_on_attention_and_experts_under_expert_parallelism(tmp_path):
    """W = 4 = P 2 × D 2: the expert adapters of the two replicas of each expert shard must start and stay equal."""
    model, batch = make_checkpoint(tmp_path, rows=4)
    launch(4, "lora", str(tmp_path), "2")
    ranks = [torch.load(tmp_path / f"lora{r}.pt") for r in range(4)]
    for r in ranks:
        assert "Call hf_moe.parallel.prepare_for_ddp(model)" in r["guard"], r["guard"]
    # the optimiser lowers the mean over the ranks' rows; one rank's own row may go up (seed 2321207201 did)
    losses = [sum(step) / len(ranks) for step in zip(*(r["losses"] for r in ranks))]
    assert losses[-1] < losses[0], f"LoRA under EP must train (same batch every step): mean losses {losses}"
    for r in (0, 1):  # rank r and r + 2 hold the same experts
        assert ranks[r]["expert_lora"].keys() == ranks[r + 2]["expert_lora"].keys() and ranks[r]["expert_lora"]
        for name, value in ranks[r]["expert_lora"].items():
            assert torch.equal(value, ranks[r + 2]["expert_lora"][name]), f"expert replicas drifted: {name}"
    adapted = PeftModel.from_pretrained(model.eval(), tmp_path / "adapter").eval()
    names = [n for n, _ in adapted.named_parameters() if "lora" in n]
    assert any("experts" in n for n in names) and any("q_proj" in n for n in names)
    with torch.no_grad():
        logits = adapted(batch).logits
    for r in range(4):
        assert_rel_close(ranks[r]["logits"], logits[r : r + 1], 1e-5, f"adapter on one process, rank {r}")
    fresh = get_peft_model(HfMoeForCausalLM.from_pretrained(tmp_path / "model"), lora_config(r=4))
    assert fresh is not None


def _damaged_checkpoints(workdir) -> None:
    """Copies of WORKDIR/model whose layer-1 gate/up experts tensor has a wrong shape."""
    from safetensors.torch import load_file, save_file

    name = "model.layers.1.mlp.experts.gate_up_proj"
    good = load_file(workdir / "model" / "model.safetensors")
    weight = good[name]
    for variant, bad in [("broadcastable", weight[:, :, :1].contiguous()),
                         ("sixteen_experts", torch.cat([weight, weight])),
                         ("transposed", weight.transpose(1, 2).contiguous()), ("four_experts", weight[:4])]:
        shutil.copytree(workdir / "model", workdir / variant)
        save_file({**good, name: bad}, workdir / variant / "model.safetensors", metadata={"format": "pt"})


def test_bad_layouts_raise_the_same_clear_error_on_every_rank(tmp_path):
    make_checkpoint(tmp_path, rows=2)
    _damaged_checkpoints(tmp_path)
    launch(2, "bad", str(tmp_path), "2")
    texts = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2)]
    for lines in texts:
        if not torch.cuda.is_available():  # on GPUs accelerate's state rightly sees both processes
            assert "accelerate's state sees 1 process(es) but torch.distributed has 2" in lines[0]
        assert "expected a divisor of the world size 2" in lines[1]
        assert "expected a divisor of num_experts=5" in lines[2]
        assert "ranks disagree on (expert_parallel_size, num_experts)" in lines[3]
        assert "needs the same number of tokens (batch × sequence) on every rank" in lines[4]
        assert "got [3, 4]" in lines[4]
        for line, shape in zip(lines[5:9], ([8, 48, 1], [16, 48, 32], [8, 32, 48], [4, 48, 32])):
            assert f"tensor 'model.layers.1.mlp.experts.gate_up_proj' has shape {shape}" in line
            assert "expects [8, 48, 32]" in line
        assert "revision='v2' cannot apply" in lines[9]
        assert lines[10] == "config passed on: 0.375 0.25"


def test_a_stalled_rank_ends_the_job_within_the_users_timeout(tmp_path):
    """Rank 1 sleeps 60 s inside the MoE layer; the expert-parallel groups carry the user's 10 s timeout (set with
    accelerate's InitProcessGroupKwargs), so rank 0's all-to-all fails after about 10 s instead of waiting."""
    if torch.cuda.is_available():
        pytest.skip("checks gloo's timeout error; NCCL's watchdog aborts the process instead")
    make_checkpoint(tmp_path, rows=4)
    worker = os.path.join(os.path.dirname(__file__), "stall_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
           str(tmp_path), "10", "60"]
    start = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env)
    job_seconds = time.monotonic() - start
    assert (tmp_path / "rank0.json").exists(), result.stdout[-3000:] + result.stderr[-5000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["outcome"] != "finished", f"rank 0 waited {rank0['seconds']:.0f} s for the stalled rank"
    assert "timed out" in rank0["outcome"].lower() or "timeout" in rank0["outcome"].lower(), rank0["outcome"]
    assert 8 <= rank0["seconds"] < 40, rank0
    assert result.returncode != 0
    print(f"rank 0: {rank0}; whole job {job_seconds:.0f} s")
    assert job_seconds < 150  # the launcher stopped the sleeping rank too (startup on 2 cores included)


def test_expert_parallel_needs_a_distributed_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="needs a distributed launch"):
        init_expert_parallel(2, 8)



@pytest.mark.parametrize("num_tokens", [0, 9])
def test_padded_plan_restricts_each_tokens_routing_to_each_rank(num_tokens):
    """Every token to every rank, rank-major; on rank p only the slots of p's experts (as local ids) keep their weight,
    the others become the sentinel `num_local` with weight 0. Checked slot by slot against a loop; T = 0 is empty."""
    from hf_moe.parallel.all_to_all import _padded_plan

    ep_size, num_local, top_k = 3, 2, 3
    index = torch.randint(0, ep_size * num_local + 1, (num_tokens, top_k))  # includes the dropped-slot sentinel
    weights = torch.rand(num_tokens, top_k)
    send_token, row_of, meta = _padded_plan(index, weights, ep_size, num_local)
    assert meta.shape == (ep_size * num_tokens, 2 * top_k)
    for p in range(ep_size):
        for t in range(num_tokens):
            row = p * num_tokens + t
            assert send_token[row] == t and row_of[t, p] == row
            for j, e in enumerate(index[t].tolist()):
                mine = p * num_local <= e < (p + 1) * num_local
                assert meta[row, top_k + j] == (e - p * num_local if mine else num_local)
                assert meta[row, j] == (weights[t, j] if mine else 0.0)
