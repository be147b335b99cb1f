"""FSDP2 wrapping of an expert-parallel model on one GPU (W = 1, NCCL, bf16): correctness against float64.

    torchrun --nproc_per_node 1 -m benchmarks fsdp-gpu          # ~1 minute on an H200

One process holds a float32 checkpoint of a 4-layer MoE (16 experts, H 512). Each variant loads it with
`expert_parallel_size=1`, shards it with `hf_moe.fully_shard_moe` and takes 3 AdamW steps with clipping
(`finish_gradients`) on a fixed batch:

- `accelerate`: `Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))` with bf16 mixed precision
  (bf16 compute, fp32 reduce and master weights), transformer-based wrap and activation checkpointing;
- `offload`: `fully_shard_moe(model, mp_policy=bf16/fp32, offload_policy=CPUOffloadPolicy())` without accelerate.

Against one float64 process on the same batch (eager experts), it prints the relative error (max|a-b|/max|b|) of the
first step's logits and gradients, and of the weights after 3 steps, next to the same errors of the unsharded model
run in bf16 (`dtype=torch.bfloat16`, no FSDP): FSDP's bf16 compute with fp32 reduction should be no worse. PASS when
every FSDP error is ≤ 2× the plain bf16 one (or ≤ 1e-2 for weights), the weights and Adam state stay float32 and the
loss falls. Rows go to benchmarks/results/fsdp-gpu-<time>.jsonl; `$OUT/fsdp_gpu.json` too when OUT is set.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.distributed as dist

from .record import ResultFile

STEPS, LR, MAX_NORM = 3, 1e-3, 1.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: at W = 1 an FSDP shard is all of it (also where CPU offload keeps it on the host)."""
    return t.to_local() if hasattr(t, "to_local") else t


def run(model, optimizer, ids, sharded: bool) -> dict:
    """STEPS steps; the first step's logits and gradients, the losses, and the weights after the last step."""
    from hf_moe.parallel import finish_gradients

    record = {"losses": []}
    for step in range(STEPS):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if step == 0:
            record["logits"] = out.logits.float().detach()
            record["grads"] = {n.replace("._checkpoint_wrapped_module", ""): full(p.grad).float().clone()
                               for n, p in model.named_parameters()}
        if sharded:
            finish_gradients(model, max_norm=MAX_NORM)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()
        record["losses"].append(out.loss.item())
    record["params"] = {n.replace("._checkpoint_wrapped_module", ""): full(p).float().detach().clone()
                        for n, p in model.named_parameters()}
    record["dtypes"] = sorted({str(full(p).dtype) for p in model.parameters()} |
                              {str(v.dtype) for s in optimizer.state.values() for k, v in s.items() if k != "step"})
    return record


def errors(record: dict, ref: dict) -> dict:
    return {"logits": rel(record["logits"], ref["logits"]),
            "grads": max(rel(record["grads"][n], g) for n, g in ref["grads"].items()),
            "params": max(rel(record["params"][n], p) for n, p in ref["params"].items())}


def main() -> None:
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    import hf_moe

    if not torch.cuda.is_available() or "RANK" not in os.environ:
        raise SystemExit("fsdp-gpu needs a GPU and torchrun: torchrun --nproc_per_node 1 -m benchmarks fsdp-gpu")
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            activation_checkpointing=True, mixed_precision_policy=bf16)
    accelerator = Accelerator(fsdp_plugin=plugin)
    device = accelerator.device
    config = hf_moe.HfMoeConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
                                num_hidden_layers=4, num_attention_heads=8, num_experts=16, num_experts_per_tok=4,
                                first_k_dense=1, num_shared_experts=1, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (4, 256), device=device)
    results = {}
    with tempfile.TemporaryDirectory() as path:
        hf_moe.HfMoeForCausalLM(config).save_pretrained(path)

        def plain(dtype, implementation=None):
            kwargs = {"experts_implementation": implementation} if implementation else {}
            model = hf_moe.HfMoeForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device).train()
            return run(model, torch.optim.AdamW(model.parameters(), lr=LR), ids, sharded=False)

        ref = plain(torch.float64, "eager")
        results["plain bf16"] = plain(torch.bfloat16)
        for variant in ("accelerate", "offload"):
            model = hf_moe.HfMoeForCausalLM.from_pretrained(path, expert_parallel_size=1, device=device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
            if variant == "accelerate":
                hf_moe.fully_shard_moe(model, accelerator, optimizer)
                model, optimizer = accelerator.prepare(model, optimizer)
            else:
                hf_moe.fully_shard_moe(model, optimizer=optimizer, mp_policy=bf16, offload_policy=CPUOffloadPolicy())
            results[variant] = run(model, optimizer, ids, sharded=True)
    base = errors(results["plain bf16"], ref)
    rows, ok = [], True
    print(f"{'variant':<12} {'logits':>9} {'grads':>9} {'weights':>9}  losses / dtypes")
    for name, record in results.items():
        err = errors(record, ref)
        passed = name == "plain bf16" or (
            err["logits"] <= 2 * base["logits"] and err["grads"] <= 2 * base["grads"]
            and err["params"] <= max(2 * base["params"], 1e-2) and record["dtypes"] == ["torch.float32"]
            and record["losses"][-1] < record["losses"][0])
        ok &= passed
        verdict = "" if name == "plain bf16" else "PASS" if passed else "FAIL"
        print(f"{name:<12} {err['logits']:>9.2e} {err['grads']:>9.2e} {err['params']:>9.2e}  "
              f"{[round(x, 4) for x in record['losses']]} {record['dtypes']} {verdict}")
        rows.append({"variant": name, **err, "losses": record["losses"], "dtypes": record["dtypes"], "pass": passed})
    print("fsdp-gpu:", "PASS" if ok else "FAIL")
    with ResultFile(__name__) as out:
        for row in rows:
            out.write(row)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "fsdp_gpu.json"), "w") as f:
            json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
