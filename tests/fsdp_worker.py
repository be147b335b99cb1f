"""Worker for the FSDP2 + expert-parallel tests, launched by torchrun (gloo on CPUs).

    python -m torch.distributed.run --standalone --nproc_per_node W tests/fsdp_worker.py MODE WORKDIR

Every run goes through accelerate's own FSDP2 path (`prepare`, `save_state`, `load_state`) after
`hf_moe.parallel.fully_shard_moe`. Each rank trains on its rows of WORKDIR/batch.pt (float64: Adam amplifies
float32 rounding) and writes WORKDIR/MODE<rank>.pt.

MODE `train` (W = 4): P = 2 with the model's own routing, then P = 4 with skewed routing (ranks 1..3 receive no
token) and accelerate's activation checkpointing; each takes STEPS AdamW steps with clipping by `finish_gradients`,
recording logits and norms per step and this rank's shards after the last step. The P = 2 run then writes
accelerate's distributed checkpoint to WORKDIR/state and one standard checkpoint to WORKDIR/saved. Last, one bf16
mixed-precision step at P = 2 (loss, and the dtypes of weights and optimizer state).
MODE `resume` (W = 2): P = 2 and P = 1, each loads WORKDIR/state and takes one more step; then, at each P, LoRA
on attention and experts takes two steps and saves one adapter to WORKDIR/adapter<P>. Last, P = 2 sharded by
`fully_shard_moe` alone (no accelerate) takes STEPS steps from WORKDIR/model, and with skewed routing and
`RowSparseAdamW` on the experts (sharded along their rows) STEPS more.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: E402
from torch.distributed.tensor import Shard, distribute_tensor  # noqa: E402

from hf_moe import HfMoeForCausalLM, HfMoeRouter, RowSparseAdamW, moe_blocks  # noqa: E402
from hf_moe.parallel import finish_gradients, fsdp, fully_shard_moe, save_expert_parallel  # noqa: E402
from tests.worker_cases import local_rows, skew_routing, to_cpu  # noqa: E402

LR, MAX_NORM, STEPS = 1e-3, 0.5, 3
ROUTER_FORWARD = HfMoeRouter.forward


def fsdp2(accelerator: Accelerator, **plugin_kwargs) -> Accelerator:
    """Make `accelerator` drive FSDP2. accelerate turns FSDP on only for GPU launches; on CPU processes the state
    is switched after creation (in accelerate's two state singletons), so accelerate's own FSDP2 code (prepare,
    save_state, load_state) runs here too."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            **plugin_kwargs)
    if torch.cuda.is_available():
        plugin.set_mixed_precision(accelerator.mixed_precision)
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    accelerator.free_memory()  # forget the models of an earlier run: save_state/load_state act on every model
    return accelerator


def load(workdir: str, ep_size: int, accelerator: Accelerator, dtype=torch.float64, **plugin_kwargs):
    """The model under EP with P = `ep_size`, sharded and prepared with its optimizer."""
    model = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "model"), expert_parallel_size=ep_size,
                                             dtype=dtype, device=accelerator.device).train()
    fsdp2(accelerator, **plugin_kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    fully_shard_moe(model, accelerator, optimizer)
    return accelerator.prepare(model, optimizer)


def step(model, optimizer, accelerator, ids, record: dict) -> None:
    out = model(input_ids=ids, labels=ids)
    accelerator.backward(out.loss)
    # FSDP reduce-scatters only weights with a gradient: every rank must have one for every weight
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    record["missing_grads"] = record.get("missing_grads", []) + missing
    record.setdefault("norms", []).append(finish_gradients(model, max_norm=MAX_NORM).item())
    record.setdefault("logits", []).append(out.logits.detach())
    optimizer.step()
    optimizer.zero_grad()


def shards(model) -> dict[str, torch.Tensor]:
    """This rank's FSDP shard of every parameter, by name (without activation checkpointing's wrapper)."""
    return {n.replace("._checkpoint_wrapped_module", ""): p.to_local().detach().clone()
            for n, p in model.named_parameters()}


def full_state(model) -> dict[str, torch.Tensor] | None:
    """The full state dict (every expert) on rank 0, through the checkpoint view `fully_shard_moe` installs."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None


def train(workdir: str) -> dict:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    batch = torch.load(os.path.join(workdir, "batch.pt"))
    result = {}
    for ep_size, skewed in ((2, False), (4, True)):
        HfMoeRouter.forward = ROUTER_FORWARD
        if skewed:
            skew_routing()
        model, optimizer = load(workdir, ep_size, accelerator, activation_checkpointing=skewed)
        ids, record, calls = local_rows(batch), {}, []
        for block in moe_blocks(model):  # FSDP's collectives need every rank in the experts module, tokens or not
            block.experts.register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        for _ in range(STEPS):
            step(model, optimizer, accelerator, ids, record)
        record["shards"], record["full"], record["expert_calls"] = shards(model), full_state(model), len(calls)
        record["checkpointed"] = sum("CheckpointWrapper" in type(m).__name__ for m in model.modules())
        if not skewed:
            accelerator.save_state(os.path.join(workdir, "state"))
            save_expert_parallel(model, os.path.join(workdir, "saved"))
        result[ep_size] = record
    HfMoeRouter.forward = ROUTER_FORWARD
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model, optimizer = load(workdir, 2, accelerator, dtype=torch.bfloat16, mixed_precision_policy=policy)
    ids = local_rows(batch)
    out = model(input_ids=ids, labels=ids)
    accelerator.backward(out.loss)
    finish_gradients(model, max_norm=MAX_NORM)
    optimizer.step()
    result["bf16"] = {"logits": out.logits.detach().float(), "logits_dtype": str(out.logits.dtype),
                      "weight_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                      "state_dtypes": sorted({str(v.dtype) for s in optimizer.state.values() for k, v in s.items()
                                              if k != "step"})}
    return result


def resume(workdir: str) -> dict:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    batch = torch.load(os.path.join(workdir, "batch.pt"))
    result = {}
    for ep_size in (2, 1):
        model, optimizer = load(workdir, ep_size, accelerator)
        accelerator.load_state(os.path.join(workdir, "state"))
        record = {"loaded": full_state(model)}
        step(model, optimizer, accelerator, local_rows(batch), record)
        record["full"] = full_state(model)
        result[ep_size] = record
        result[f"lora{ep_size}"] = lora(workdir, ep_size, accelerator, local_rows(batch))
    # without accelerate: fully_shard_moe shards the decoder layers and the root too
    model = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "model"), expert_parallel_size=2,
                                             dtype=torch.float64, device=accelerator.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    fully_shard_moe(model, optimizer=optimizer)
    result["plain"] = {"sharded_layers": sum(type(m).__name__ == "FSDPHfMoeDecoderLayer" for m in model.modules())}
    for _ in range(STEPS):
        step(model, optimizer, accelerator, local_rows(batch), result["plain"])
    result["row_sparse"] = row_sparse(workdir, accelerator, local_rows(batch))
    return result


def row_sparse(workdir: str, accelerator: Accelerator, ids: torch.Tensor) -> dict:
    """RowSparseAdamW built on the unsharded model with the experts row-sparse, then `fully_shard_moe` (no EP: each
    expert weight sharded along its rows over both ranks); every token routed to experts 0 and 1. Also what
    `local_rows` says of a DTensor sharded by columns."""
    skew_routing()
    model = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "model"), dtype=torch.float64)
    model = model.to(accelerator.device).train()
    tables = [p for n, p in model.named_parameters() if ".experts." in n]
    optimizer = RowSparseAdamW(model.parameters(), lr=LR, row_sparse=tables)
    fully_shard_moe(model, optimizer=optimizer)
    record = {"placements": sorted({str(p.placements) for group in optimizer.row_sparse_groups
                                    for p in group["params"]})}
    for _ in range(STEPS):
        step(model, optimizer, accelerator, ids, record)
    record["full"] = full_state(model)
    HfMoeRouter.forward = ROUTER_FORWARD
    columns = distribute_tensor(torch.zeros(4, 4), init_device_mesh(accelerator.device.type, (2,)), [Shard(1)])
    try:
        fsdp.local_rows(columns)
        record["columns_refused"] = ""
    except ValueError as error:
        record["columns_refused"] = str(error)
    return record


def lora(workdir: str, ep_size: int, accelerator: Accelerator, ids: torch.Tensor) -> dict:
    """LoRA on attention and experts under FSDP2 + EP: two steps, then the logits and one saved adapter."""
    from peft import get_peft_model

    from hf_moe.integrations import lora_config, save_adapter_expert_parallel

    model = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "model"), expert_parallel_size=ep_size,
                                             dtype=torch.float64, device=accelerator.device)
    torch.manual_seed(0)  # the same adapter initialisation on every rank (non-zero lora_B: the adapter matters)
    model = get_peft_model(model, lora_config(r=4, init_lora_weights=False)).train()
    fsdp2(accelerator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    fully_shard_moe(model, accelerator, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    for _ in range(2):
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        finish_gradients(model, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_adapter_expert_parallel(model, os.path.join(workdir, f"adapter{ep_size}"))
    return {"logits": logits}


if __name__ == "__main__":
    mode, workdir = sys.argv[1], sys.argv[2]
    result = train(workdir) if mode == "train" else resume(workdir)
    torch.save(to_cpu(result), os.path.join(workdir, f"{mode}{dist.get_rank()}.pt"))
    dist.destroy_process_group()
