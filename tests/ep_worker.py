"""Worker for the expert-parallel tests, launched by torchrun with the gloo backend.

    python -m torch.distributed.run --standalone --nproc_per_node W tests/ep_worker.py MODE WORKDIR P [IMPL]

MODE `train`: loads WORKDIR/model under expert parallelism (P ranks per EP group), takes this rank's rows of
WORKDIR/batch.pt, records logits and synced gradients, runs five AdamW steps with clipping (recording parameters
after steps 1 and 5), saves one checkpoint to WORKDIR/saved, and writes WORKDIR/rank<r>.pt.
MODE `bad`: tries impossible layouts and writes the error each rank raised to WORKDIR/rank<r>.txt.
MODE `lora`: LoRA on attention and experts under EP, a few steps, adapter gathered and saved to WORKDIR/adapter.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_moe import HfMoeForCausalLM  # noqa: E402
from hf_moe.parallel import (  # noqa: E402
    clip_grad_norm_,
    expert_parallel_groups,
    init_expert_parallel,
    save_expert_parallel,
    sync_expert_gradients,
)

LR, MAX_NORM, STEPS = 1e-3, 0.5, 5


def skew_routing() -> None:
    """Send every token to experts 0 and 1 (weights: their renormalised probabilities), so that the other experts,
    and under P=4 whole ranks, receive no tokens. Patched identically in the worker and the test's reference."""
    from hf_moe.moe.router import HfMoeRouter, RouterOutput, load_balancing_loss, router_z_loss

    def forward(self, hidden_states, token_mask=None, **kwargs):
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        logits = torch.nn.functional.linear(hidden_states.to(dtype), self.weight.to(dtype))
        probs = logits.softmax(dim=-1)
        index = torch.tensor([0, 1], device=hidden_states.device).expand(hidden_states.shape[0], 2)
        weights = probs[:, :2] / probs[:, :2].sum(dim=-1, keepdim=True)
        aux, counts = load_balancing_loss(probs, index, self.num_experts, token_mask, self.aux_loss_group)
        return RouterOutput(logits, index, weights.to(hidden_states.dtype), counts, aux,
                            router_z_loss(logits, token_mask))

    HfMoeRouter.forward = forward


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the global batch, on this rank's device (the tests also run on GPUs with NCCL)."""
    from accelerate import PartialState

    rows = batch.shape[0] // dist.get_world_size()
    return batch[dist.get_rank() * rows : (dist.get_rank() + 1) * rows].to(PartialState().device)


def to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}


def train(workdir: str, ep_size: int, impl: str) -> dict:
    from accelerate import Accelerator

    model = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "model"), expert_parallel_size=ep_size,
                                             dtype=torch.float64)  # fp64: Adam amplifies fp32 rounding
    model.set_experts_implementation(impl)
    model.train()
    groups = expert_parallel_groups(model)
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    ddp, optimizer = accelerator.prepare(model, optimizer)
    ids = local_rows(torch.load(os.path.join(workdir, "batch.pt")))
    result = {"ep_rank": groups.ep_rank, "edp_rank": groups.edp_rank, "params": {}}
    for step in range(1, STEPS + 1):
        out = ddp(input_ids=ids, labels=ids)
        accelerator.backward(out.loss)
        sync_expert_gradients(ddp)
        if step == 1:
            result["logits"] = out.logits.detach()
            result["grads"] = {n.removeprefix("module."): p.grad.clone() for n, p in ddp.named_parameters()}
        result.setdefault("norms", []).append(clip_grad_norm_(ddp, MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad()
        if step in (1, STEPS):
            result["params"][step] = snapshot(ddp)
    model.eval()
    with torch.no_grad():
        result["final_logits"] = model(ids).logits
    save_expert_parallel(model, os.path.join(workdir, "saved"))
    return result


def bad(workdir: str) -> str:
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    errors = []
    for ep_size, num_experts in [(3, 6), (2, 5), (2 if rank == 0 else 1, 6)]:
        try:
            init_expert_parallel(ep_size, num_experts)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    return "\n".join(errors)


def lora(workdir: str, ep_size: int) -> dict:
    from accelerate import Accelerator
    from peft import get_peft_model

    from hf_moe.integrations import lora_config, save_adapter_expert_parallel
    from hf_moe.parallel import finish_gradients, prepare_for_ddp

    model = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "model"), expert_parallel_size=ep_size)
    model = prepare_for_ddp(get_peft_model(model, lora_config(r=4, init_lora_weights=False)))
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ddp, optimizer = accelerator.prepare(model, optimizer)
    ids = local_rows(torch.load(os.path.join(workdir, "batch.pt")))
    losses = []
    for _ in range(4):
        loss = ddp(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        finish_gradients(ddp, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_adapter_expert_parallel(model, os.path.join(workdir, "adapter"))
    return {"losses": losses, "logits": logits}


if __name__ == "__main__":
    mode, workdir, ep_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    impl = sys.argv[4] if len(sys.argv) > 4 else "hf_moe_grouped"
    if os.environ.get("HF_MOE_TEST_SKEW") == "1":
        skew_routing()
    if mode == "bad":
        torch.distributed.init_process_group("gloo")
        text = bad(workdir)
        with open(os.path.join(workdir, f"rank{dist.get_rank()}.txt"), "w") as f:
            f.write(text)
    else:
        result = train(workdir, ep_size, impl) if mode == "train" else lora(workdir, ep_size)
        torch.save(to_cpu(result), os.path.join(workdir, f"{mode}{dist.get_rank()}.pt"))
    dist.destroy_process_group()
