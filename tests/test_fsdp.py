"""FSDP2 composed with expert parallelism through accelerate (CPU, gloo): W = 4 processes, started by two accelerate
launchers as two "nodes", at P = 2 and P = 4 (skewed routing, activation checkpointing) train exactly as one process
on the whole batch, with clipping active; their shards tile the model; accelerate's distributed checkpoint saved at
W = 4, P = 2 resumes at W = 2 with P = 2 and P = 1 to the same next step; the standard checkpoint loads in one
process; a LoRA adapter on attention and experts trained under FSDP2 + EP loads in one process with the same logits;
bf16 mixed precision keeps float32 master weights and optimizer state; RowSparseAdamW on experts sharded along their
rows steps as in one process."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from hf_moe import HfMoeForCausalLM, HfMoeRouter, RowSparseAdamW

from . import fsdp_worker
from .conftest import FLOAT64_TOL, assert_rel_close, rel_err, tiny_config
from .worker_cases import skew_routing

WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")


def launch(world: int, mode: str, workdir, nodes: int = 1) -> list[dict]:
    """`world` processes on this machine: one torchrun, or `nodes` accelerate launchers that rendezvous on
    localhost as `nodes` machines (`--num_machines`, `--machine_rank`)."""
    if torch.cuda.is_available() and world > torch.cuda.device_count():
        pytest.skip(f"{world} processes need {world} GPUs under NCCL; this machine has {torch.cuda.device_count()}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nodes == 1:
        commands = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        commands = [[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", str(nodes),
                     "--machine_rank", str(rank), "--num_processes", str(world), "--main_process_ip", "127.0.0.1",
                     "--main_process_port", str(port)] for rank in range(nodes)]
    runs = [subprocess.Popen([*cmd, WORKER, mode, str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env) for cmd in commands]
    for run in runs:
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output[-8000:]
    return [torch.load(workdir / f"{mode}{r}.pt") for r in range(world)]


def reference_run(model: HfMoeForCausalLM, batch: torch.Tensor, steps: int, row_sparse: bool = False) -> dict:
    """One process on the whole batch: logits and clip norm per step, parameters after each step (`row_sparse`:
    RowSparseAdamW with the experts row-sparse)."""
    model = model.double().train()
    model.set_experts_implementation("eager")  # transformers' grouped_mm has no float64 kernel on CPU
    tables = [p for n, p in model.named_parameters() if ".experts." in n] if row_sparse else []
    optimizer = RowSparseAdamW(model.parameters(), lr=fsdp_worker.LR, row_sparse=tables)
    run = {"logits": [], "norms": [], "params": []}
    for _ in range(steps):
        out = model(batch, labels=batch)
        out.loss.backward()
        run["norms"].append(torch.nn.utils.clip_grad_norm_(model.parameters(), fsdp_worker.MAX_NORM).item())
        run["logits"].append(out.logits.detach())
        optimizer.step()
        optimizer.zero_grad()
        run["params"].append({n: p.detach().clone() for n, p in model.named_parameters()})
    return run


def check_steps(ranks: list[dict], ref: dict, first: int, what: str) -> None:
    """Each rank's logits and norms at steps first, first+1, ... against the reference's, on that rank's rows."""
    rows = ref["logits"][0].shape[0] // len(ranks)
    for r, result in enumerate(ranks):
        assert not result["missing_grads"], f"{what}: rank {r} has weights without a gradient"
        for i, (logits, norm) in enumerate(zip(result["logits"], result["norms"])):
            step = first + i
            assert norm > fsdp_worker.MAX_NORM, f"{what}: clipping must be active (norm {norm})"
            assert abs(norm - ref["norms"][step]) <= FLOAT64_TOL * ref["norms"][step], \
                f"{what}: norm at step {step + 1}"
            assert_rel_close(logits, ref["logits"][step][r * rows : (r + 1) * rows], FLOAT64_TOL,
                             f"{what}: logits rank {r} step {step + 1}")


def check_params(full: dict, ref_params: dict, what: str) -> None:
    assert full.keys() == ref_params.keys(), what
    for name, value in ref_params.items():
        assert_rel_close(full[name], value, FLOAT64_TOL, f"{what}: {name}")


def check_shards(ranks: list[dict], ep_size: int, full: dict) -> None:
    """Non-expert weights: the W ranks' FSDP shards, in rank order, tile the weight. Experts: EP rank e's D shards
    (global ranks d·P + e) tile its E/P experts, and the P EP ranks' experts tile all E."""
    world = len(ranks)
    for name, value in full.items():
        if ".mlp.experts." in name:
            parts = [torch.cat([ranks[d * ep_size + e]["shards"][name] for d in range(world // ep_size)])
                     for e in range(ep_size)]
            assert torch.equal(torch.cat(parts), value), f"P={ep_size}: expert shards of {name}"
        else:
            assert torch.equal(torch.cat([r["shards"][name] for r in ranks]), value), f"P={ep_size}: shards of {name}"


def test_fsdp2_with_expert_parallelism_equals_one_process(tmp_path, monkeypatch):
    model = HfMoeForCausalLM(tiny_config(num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.05,
                                         num_shared_experts=1, first_k_dense=1, num_hidden_layers=3))
    model.save_pretrained(tmp_path / "model")
    batch = torch.randint(1, 97, (8, 12))
    torch.save(batch, tmp_path / "batch.pt")
    train = launch(4, "train", tmp_path, nodes=2)  # two launchers as two "nodes" of 2 processes
    resumed = launch(2, "resume", tmp_path)

    steps = fsdp_worker.STEPS
    ref = reference_run(HfMoeForCausalLM.from_pretrained(tmp_path / "model"), batch, steps + 1)
    check_steps([r[2] for r in train], ref, 0, "W=4 P=2")
    check_params(train[0][2]["full"], ref["params"][steps - 1], f"W=4 P=2 after step {steps}")
    check_shards([r[2] for r in train], 2, train[0][2]["full"])
    saved = HfMoeForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float64)
    check_params(dict(saved.named_parameters()), ref["params"][steps - 1], "standard checkpoint, one process")
    for ep_size in (2, 1):  # accelerate's distributed checkpoint from W=4, P=2, resumed at W=2
        check_params(resumed[0][ep_size]["loaded"], ref["params"][steps - 1], f"loaded at W=2 P={ep_size}")
        check_steps([r[ep_size] for r in resumed], ref, steps, f"resumed at W=2 P={ep_size}")
        check_params(resumed[0][ep_size]["full"], ref["params"][steps], f"resumed at W=2 P={ep_size}, next step")

    assert all(r["plain"]["sharded_layers"] == 3 for r in resumed)  # fully_shard_moe without accelerate
    check_steps([r["plain"] for r in resumed], ref, 0, "W=2 P=2 without accelerate")
    for ep_size in (2, 1):  # LoRA on attention and experts under FSDP2 + EP: the saved adapter, on one process
        base = HfMoeForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float64).eval()
        with torch.no_grad():
            plain = base(batch).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / f"adapter{ep_size}").eval()
        names = [n for n, _ in adapted.named_parameters() if "lora" in n]
        assert any("experts" in n for n in names) and any("q_proj" in n for n in names)
        with torch.no_grad():
            logits = adapted(batch).logits
        assert rel_err(logits, plain) > 1e-3, "the adapter must change the logits"
        for r, result in enumerate(resumed):
            assert_rel_close(result[f"lora{ep_size}"]["logits"], logits[4 * r : 4 * (r + 1)], FLOAT64_TOL,
                             f"LoRA under FSDP2 at W=2 P={ep_size}: adapter on one process, rank {r}")

    bf16 = train[0]["bf16"]
    assert bf16["logits_dtype"] == "torch.bfloat16"
    assert bf16["weight_dtypes"] == ["torch.float32"] and bf16["state_dtypes"] == ["torch.float32"], bf16
    assert_rel_close(bf16["logits"], ref["logits"][0][:2].float(), 3e-2, "bf16 compute vs float64 one process")

    monkeypatch.setattr(HfMoeRouter, "forward", HfMoeRouter.forward)  # restored after the test
    skew_routing()
    ref = reference_run(HfMoeForCausalLM.from_pretrained(tmp_path / "model"), batch, steps)
    check_steps([r[4] for r in train], ref, 0, "W=4 P=4 skewed, activation checkpointing")
    check_params(train[0][4]["full"], ref["params"][steps - 1], f"W=4 P=4 skewed after step {steps}")
    check_shards([r[4] for r in train], 4, train[0][4]["full"])
    assert all(r[4]["checkpointed"] == 3 for r in train), "accelerate's activation checkpointing wraps the 3 layers"
    calls = [r[4]["expert_calls"] for r in train]  # ranks 1..3 receive no token, yet run their experts module
    assert len(set(calls)) == 1 and calls[0] >= 2 * steps, f"experts module calls per rank: {calls}"

    # RowSparseAdamW under FSDP2 (experts sharded along their rows): experts 2.. get no token, so no gradient, and
    # keep their weights, where AdamW's weight decay would move them
    start = dict(HfMoeForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float64).named_parameters())
    ref = reference_run(HfMoeForCausalLM.from_pretrained(tmp_path / "model"), batch, steps, row_sparse=True)
    assert all(r["row_sparse"]["placements"] == ["(Shard(dim=0),)"] for r in resumed), resumed[0]["row_sparse"]
    assert "sharded along dim 0 or replicated; got placements (Shard(dim=1),)" in resumed[0]["row_sparse"][
        "columns_refused"], "a DTensor sharded by columns has no whole rows to step"
    check_steps([r["row_sparse"] for r in resumed], ref, 0, "W=2 RowSparseAdamW")
    check_params(resumed[0]["row_sparse"]["full"], ref["params"][steps - 1], "W=2 RowSparseAdamW")
    for name, value in ref["params"][steps - 1].items():
        if ".experts." in name:
            assert torch.equal(value[2:], start[name][2:]) and not torch.equal(value[:2], start[name][:2]), name


@pytest.mark.parametrize(("ep_size", "edp_size", "num_experts"), [(2, 2, 8), (2, 3, 8), (3, 4, 9), (4, 2, 8)])
def test_all_experts_view_places_each_ranks_shard_at_its_experts(ep_size, edp_size, num_experts):
    """The view checkpoints read: on every rank of the W = P × D layout its FSDP shard (torch.chunk of the E/P experts
    of its EP rank over its expert-data-parallel group) sits at those experts' offset in the all-experts tensor. One
    process with torch's fake process group for each rank in turn (layout arithmetic, no communication)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from hf_moe.parallel import fsdp
    from hf_moe.parallel.groups import ExpertParallelGroups

    world = ep_size * edp_size
    for rank in range(world):
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        try:
            groups = ExpertParallelGroups(None, None, ep_size, rank % ep_size, edp_size, rank // ep_size, world)
            mesh = fsdp._expert_mesh(groups, "cpu")
            mine = torch.arange(num_experts).chunk(ep_size)[groups.ep_rank].chunk(edp_size)
            shard = mine[groups.edp_rank] if groups.edp_rank < len(mine) else torch.empty(0, dtype=torch.long)
            local = DTensor.from_local(shard[:, None].float(), mesh["edp"], [Shard(0)], run_check=False,
                                       shape=(num_experts // ep_size, 1), stride=(1, 1))
            view = fsdp._all_experts_view(local, mesh, num_experts)
            shape, offset = compute_local_shape_and_global_offset(view.shape, view.device_mesh, view.placements)
            assert view.shape == (num_experts, 1) and torch.equal(view.to_local(), local.to_local())
            assert shape[0] == len(shard) and (not len(shard) or offset[0] == shard[0]), (rank, shape, offset)
        finally:
            fsdp._expert_mesh.cache_clear()
            dist.destroy_process_group()
