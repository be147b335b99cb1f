"""Expert parallel = one process, on GPUs over NCCL (fp32 and bf16), or on CPUs over gloo.

Every rank builds the same model and global batch. The expert-parallel copy (experts sharded over P = all ranks,
DDP through accelerate for the rest, `finish_gradients` for the experts) runs this rank's rows; each rank also runs
the unsharded model on the whole batch as the single-process reference, in the same dtype, and in float64 as the
truth. Printed per dtype: the relative L2 error of the logits, of the loss and of the worst parameter gradient
(the full model assembled from the shards), for expert parallel (default and padded dispatch, and on GPUs in bf16
padded with the MoE blocks in CUDA graphs) and for the single process, both against float64. fp32 must agree with one process to 1e-5; bf16 must be no worse than 2x the single
process's own bf16 error.

    torchrun --nproc_per_node 2 -m benchmarks ep-equivalence            # GPUs (NCCL) or CPUs (gloo)

Exits 1 if a bound is broken.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator

import hf_moe
from hf_moe.parallel import expert_parallelize, finish_gradients, init_expert_parallel

from .record import ResultFile


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def gather_experts(name: str, grad: torch.Tensor, groups) -> torch.Tensor:
    if ".mlp.experts." not in name:
        return grad
    parts = [torch.empty_like(grad) for _ in range(groups.ep_size)]
    dist.all_gather(parts, grad.contiguous(), group=groups.ep_group)
    return torch.cat(parts)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    groups = init_expert_parallel(world, 16)
    config = hf_moe.HfMoeConfig(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=16,
                                num_experts_per_tok=4, qk_norm=True, router_aux_loss_coef=0.01,
                                router_z_loss_coef=0.001)
    config._experts_implementation = "hf_moe_grouped"
    torch.manual_seed(0)
    base = hf_moe.HfMoeForCausalLM(config)
    with torch.no_grad():
        for p in base.parameters():  # larger weights than the default init, so that routing and experts matter
            p.normal_(0, 0.05)
    batch = torch.randint(0, 512, (2 * world, 64), generator=torch.Generator().manual_seed(1)).to(device)
    rows = batch.shape[0] // world
    mine = batch[rank * rows : (rank + 1) * rows]

    def single(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        model = copy.deepcopy(base).to(device, dtype).train()
        if dtype == torch.float64:
            model.set_experts_implementation("eager")  # no grouped GEMM kernel in float64
        out = model(batch, labels=batch)
        out.loss.backward()
        return out.logits, out.loss, {n: p.grad for n, p in model.named_parameters()}

    truth = single(torch.float64)
    failures = []
    results = ResultFile(__name__)
    for dtype in (torch.float32, torch.bfloat16):
        ref_logits, ref_loss, ref_grads = single(dtype)
        one = (rel_l2(ref_logits, truth[0]), rel_l2(ref_loss, truth[1]),
               max(rel_l2(ref_grads[n], g) for n, g in truth[2].items()))
        variants = [(False, False), (True, False)]  # (padded, graphed)
        if dtype == torch.bfloat16 and device.type == "cuda":  # CUDA graphs need the bf16 grouped GEMMs (no sync)
            variants.append((True, True))
        for padded, graphed in variants:
            ep = "EP padded graphed" if graphed else "EP padded" if padded else "EP"
            model = expert_parallelize(copy.deepcopy(base).to(device, dtype).train(), groups, padded_dispatch=padded)
            if graphed:
                hf_moe.capture_moe_cuda_graphs(model, rows, batch.shape[1])
            ddp = accelerator.prepare(model)
            out = ddp(input_ids=mine, labels=mine)
            accelerator.backward(out.loss)
            finish_gradients(ddp)
            logits = accelerator.gather(out.logits.contiguous())
            loss = accelerator.reduce(out.loss.detach(), "mean")
            grads = {n.removeprefix("module."): gather_experts(n, p.grad, groups) for n, p in ddp.named_parameters()}
            errors = {
                ep: (rel_l2(logits, truth[0]), rel_l2(loss, truth[1]),
                     max(rel_l2(grads[n], g) for n, g in truth[2].items())),
                f"{ep} vs one process": (rel_l2(logits, ref_logits), rel_l2(loss, ref_loss),
                                         max(rel_l2(grads[n], g) for n, g in ref_grads.items())),
            }
            if not padded:
                errors["one process"] = one
            if rank == 0:
                for who, (e_logits, e_loss, e_grad) in errors.items():
                    results.write({"P": world, "dtype": str(dtype).removeprefix("torch."), "compared": who,
                                   "rel_l2_logits": e_logits, "rel_l2_loss": e_loss, "rel_l2_worst_grad": e_grad})
                    print(f"P={world} {str(dtype).removeprefix('torch.')} {who:>30}: rel L2 logits {e_logits:.2e}  "
                          f"loss {e_loss:.2e}  worst grad {e_grad:.2e}", flush=True)
            if dtype == torch.float32 and max(errors[f"{ep} vs one process"]) > 1e-5:
                failures.append(f"fp32 {ep} differs from one process: {errors[f'{ep} vs one process']}")
            if dtype == torch.bfloat16 and any(e > 2 * s + 1e-3 for e, s in zip(errors[ep], one)):
                failures.append(f"bf16 {ep} error {errors[ep]} > 2x one process {one}")
    if rank == 0:
        results.write({"P": world, "device": device.type, "failures": failures})
        results.close()
        print("EQUIVALENCE " + ("FAILED: " + "; ".join(failures) if failures else "OK"), flush=True)
    accelerator.free_memory()  # live graphs that captured NCCL calls block the teardown: drop every reference
    del ddp, out, logits, loss, grads
    hf_moe.release_moe_cuda_graphs(model)
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
