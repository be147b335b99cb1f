"""Worker for the expert-parallel tests, launched by torchrun with the gloo backend.

    python -m torch.distributed.run --standalone --nproc_per_node W tests/ep_worker.py MODE WORKDIR P [IMPL]

MODE `train`: checks the all-to-all dispatcher alone against one process on skewed routings (`dispatcher_checks`),
then loads WORKDIR/model under expert parallelism (P ranks per EP group), takes this rank's rows of
WORKDIR/batch.pt, records the gradients with the per-rank load-balancing loss, then logits and synced gradients with
the global one, runs five AdamW steps with clipping (recording parameters after steps 1 and 5), saves one checkpoint
to WORKDIR/saved, loads the checkpoint once more with padded dispatch for its logits, and writes
WORKDIR/train<r>.pt.
MODE `bad`: tries impossible layouts and writes the error each rank raised to WORKDIR/rank<r>.txt.
MODE `compile`: loads WORKDIR/model under expert parallelism and compiles it: the dispatcher is the one graph break
of each MoE block, and the compiled logits, loss and gradients equal eager (WORKDIR/compile<r>.pt).
MODE `lora`: checks that forgetting `prepare_for_ddp` after `get_peft_model` raises; then LoRA on attention and
experts under EP, a few steps, adapter gathered and saved to WORKDIR/adapter.
"""

import contextlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_moe import HfMoeForCausalLM  # noqa: E402
from hf_moe.moe.block import moe_blocks  # noqa: E402
from hf_moe.parallel import (  # noqa: E402
    AllToAllDispatcher,  # noqa: E402
    clip_grad_norm_,
    expert_parallel_groups,
    init_expert_parallel,
    save_expert_parallel,
    sync_expert_gradients,
)
from hf_moe.parallel import all_to_all as dispatch  # noqa: E402
from hf_moe.parallel.weight_grad_queue import WEIGHT_GRADS  # noqa: E402
from tests.worker_cases import local_rows, skew_routing, to_cpu  # noqa: E402

LR, MAX_NORM, STEPS = 1e-3, 0.5, 5


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b| (as tests/conftest.py), 0 for two empty tensors."""
    if b.numel() == 0:
        return 0.0 if a.numel() == 0 else float("inf")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def dispatcher_checks(groups, impl: str) -> dict[str, float]:
    """The all-to-all dispatcher alone against one process holding all experts, in float32.

    Every rank draws the same global batch, routing and loss weights; rank r feeds its own rows through the
    expert-parallel path and compares outputs, input and routing-weight gradients with the single-process ones, and
    expert gradients (summed over the expert-data-parallel group) with the matching slice of the full experts'.
    Cases: random top-2 routing with dropped slots (sentinel index E, weight 0) where rank 1 has no tokens at all;
    top-1 routing that sends every token to the last expert, so every other expert and rank receives nothing. Each
    runs with `impl` and with transformers' `grouped_mm` (which does not skip sentinel slots, so the dispatcher
    compacts for it), with and without the backward overlap, and in padded mode (equal rows on every rank there).
    Also checks that each token crosses to a rank once, however many of its experts live there: the rows sent
    equal the distinct (token, owning rank) pairs (padded: every token to every rank). Returns errors by name.
    """
    from accelerate import PartialState

    from hf_moe import HfMoeConfig, RouterOutput
    from hf_moe.moe.experts import HfMoeExperts

    world, rank, num_experts, device = dist.get_world_size(), dist.get_rank(), 8, PartialState().device
    errors = {}
    variants = [(impl, True, False), (impl, False, False), (impl, False, True), ("grouped_mm", True, False),
                ("grouped_mm", False, True)]  # (experts implementation, overlap, padded)
    if impl == "grouped_mm":
        variants = variants[-2:]
    cases = [(case, top_k, *variant) for case, top_k in (("random-with-empty-rank", 2), ("all-to-last-expert", 1))
             for variant in variants]
    for case, top_k, name, overlap, padded in cases:
        config = HfMoeConfig(hidden_size=16, intermediate_size=12, num_experts=num_experts, num_experts_per_tok=top_k,
                             num_attention_heads=2, num_hidden_layers=1, vocab_size=8)
        config._experts_implementation = name
        g = torch.Generator().manual_seed(7)
        full = HfMoeExperts(config)
        with torch.no_grad():
            for p in full.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        # padded mode needs the same number of tokens on every rank
        rows = [5, 0, 7, 3][:world] if case.startswith("random") and not padded else [4] * world
        total = sum(rows)
        x = torch.randn(total, 16, generator=g)
        if case.startswith("random"):
            index = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(total)])
            dropped = torch.rand(total, top_k, generator=g) < 0.2
            index[dropped] = num_experts  # the sentinel: never sent anywhere
            weights = torch.rand(total, top_k, generator=g).masked_fill(dropped, 0.0)
        else:
            index = torch.full((total, 1), num_experts - 1)
            dropped = torch.zeros(total, 1, dtype=torch.bool)
            weights = torch.rand(total, 1, generator=g)
        out_grad = torch.randn(total, 16, generator=g)

        # one process: every expert, the whole batch (dropped slots sent to expert 0 with weight 0)
        ref_x, ref_w = x.clone().requires_grad_(), weights.clone().requires_grad_()
        ref_out = full(ref_x, index.masked_fill(dropped, 0), ref_w)
        (ref_out * out_grad).sum().backward()

        # expert parallel: this rank's rows and experts
        first = sum(rows[:rank])
        mine = slice(first, first + rows[rank])
        start, end = groups.expert_range(num_experts)
        local = HfMoeExperts(config, num_experts=end - start)
        with torch.no_grad():
            local.gate_up_proj.copy_(full.gate_up_proj[start:end])
            local.down_proj.copy_(full.down_proj[start:end])
        local.to(device)  # NCCL moves only GPU tensors
        ep_x, ep_w = x[mine].to(device).requires_grad_(), weights[mine].to(device).requires_grad_()
        routing = RouterOutput(logits=torch.zeros(rows[rank], num_experts, device=device),
                               top_k_index=index[mine].to(device), top_k_weights=ep_w,
                               tokens_per_expert=torch.zeros(num_experts, device=device),
                               aux_loss=torch.zeros((), device=device), z_loss=torch.zeros((), device=device))
        sent_rows = []
        with record_sent_rows(sent_rows):
            dispatcher = AllToAllDispatcher(groups.ep_group, num_experts, overlap_weight_grads=overlap, padded=padded)
            out = dispatcher(ep_x, routing, local)
        owners = {(t, e // (num_experts // groups.ep_size)) for t, row in enumerate(index[mine].tolist()) for e in row
                  if e < num_experts}
        label = f"{name}{'' if overlap else ' (no overlap)'}{' padded' if padded else ''} {case}"
        # each token crosses once to each rank that owns one of its experts; padded: once to every rank
        expected_rows = rows[rank] * groups.ep_size if padded else len(owners)
        errors[f"{label}: token rows sent minus expected"] = abs(sent_rows[0] - expected_rows)
        deferred = []
        with count_deferred_weight_grads(deferred):
            (out * out_grad[mine].to(device)).sum().backward()
        # hf_moe_grouped defers both weight gradients of a rank that received tokens, and only with overlap on
        defers = overlap and name == "hf_moe_grouped" and ((index >= start) & (index < end)).any()
        expected = 2 if defers else 0
        errors[f"{label}: deferred weight gradients minus expected"] = abs(len(deferred) - expected)
        errors[f"{label}: weight gradients left pending after backward"] = len(WEIGHT_GRADS)
        expert_grads = [torch.zeros_like(p) if p.grad is None else p.grad  # None: no token reached this rank
                        for p in (local.gate_up_proj, local.down_proj)]
        for grad in expert_grads:
            dist.all_reduce(grad, group=groups.edp_group)
        kept = ~dropped[mine]
        ep_w_grad = ep_w.grad.cpu()
        errors[f"{label}: output"] = rel_err(out, ref_out[mine])
        errors[f"{label}: input grad"] = rel_err(ep_x.grad, ref_x.grad[mine])
        errors[f"{label}: routing-weight grad"] = rel_err(ep_w_grad[kept], ref_w.grad[mine][kept])
        errors[f"{label}: dropped-slot weight grad is zero"] = ep_w_grad[~kept].abs().sum().item()
        errors[f"{label}: gate_up_proj grad"] = rel_err(expert_grads[0], full.gate_up_proj.grad[start:end])
        errors[f"{label}: down_proj grad"] = rel_err(expert_grads[1], full.down_proj.grad[start:end])
    return errors


@contextlib.contextmanager
def count_deferred_weight_grads(deferred: list):
    """Record every weight gradient the experts hand to the process's `WeightGradQueue`."""
    original = WEIGHT_GRADS.defer

    def defer(work):
        deferred.append(work)
        original(work)

    WEIGHT_GRADS.defer = defer
    try:
        yield
    finally:
        del WEIGHT_GRADS.defer


@contextlib.contextmanager
def record_sent_rows(rows: list[int]):
    """Append the number of rows each `all_to_all_single` of the dispatcher sends (2-D inputs only)."""
    original = dispatch.dist.all_to_all_single

    def recording(output, input, *args, **kwargs):
        if input.dim() == 2:
            rows.append(input.shape[0])
        return original(output, input, *args, **kwargs)

    dispatch.dist.all_to_all_single = recording
    try:
        yield
    finally:
        dispatch.dist.all_to_all_single = original


def moe_routers(model):
    return [m for n, m in model.named_modules() if n.endswith("mlp.router")]


def train(workdir: str, ep_size: int, impl: str) -> dict:
    from accelerate import Accelerator

    groups = init_expert_parallel(ep_size, 8)
    result = {"dispatcher_errors": dispatcher_checks(groups, impl)}
    model = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "model"), expert_parallel_size=ep_size,
                                             dtype=torch.float64)  # fp64: Adam amplifies fp32 rounding
    model.set_experts_implementation(impl)
    model.train()
    groups = expert_parallel_groups(model)
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    ddp, optimizer = accelerator.prepare(model, optimizer)
    ids = local_rows(torch.load(os.path.join(workdir, "batch.pt")))
    result.update({"ep_rank": groups.ep_rank, "edp_rank": groups.edp_rank, "params": {}})

    # per-rank load-balancing loss: W ranks = one process averaging the W per-rank losses
    global_reduction = moe_routers(model)[0].loss_reduction
    for router in moe_routers(model):
        router.set_loss_reduction(None)
    accelerator.backward(ddp(input_ids=ids, labels=ids).loss)
    sync_expert_gradients(ddp)
    result["local_aux_grads"] = {n.removeprefix("module."): p.grad.clone() for n, p in ddp.named_parameters()}
    optimizer.zero_grad()
    for router in moe_routers(model):
        router.set_loss_reduction(global_reduction)
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
    # padded dispatch through from_pretrained: the untrained checkpoint's logits, compared with one process
    padded = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "model"), expert_parallel_size=ep_size,
                                              dtype=torch.float64, padded_dispatch=True)
    padded.set_experts_implementation(impl)
    result["padded_dispatchers"] = [block.dispatcher.padded for block in moe_blocks(padded)
                                    if isinstance(block.dispatcher, AllToAllDispatcher)]
    result["padded_logits"] = padded.train()(input_ids=ids).logits
    return result


def bad(workdir: str) -> str:
    from accelerate import PartialState

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    errors = []
    try:  # torchrun on CPUs: accelerate's state sees one process unless told cpu=True, so it would skip DDP
        PartialState()
        init_expert_parallel(2, 6)
        errors.append("no error")
    except RuntimeError as e:
        errors.append(str(e))
    PartialState._reset_state()
    for ep_size, num_experts in [(3, 6), (2, 5), (2 if rank == 0 else 1, 6)]:
        try:
            init_expert_parallel(ep_size, num_experts)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    # padded dispatch with a different number of tokens per rank: a clear error on every rank, not a hang
    from hf_moe import HfMoeConfig, RouterOutput
    from hf_moe.moe.experts import HfMoeExperts

    groups = init_expert_parallel(2, 4)
    config = HfMoeConfig(hidden_size=8, intermediate_size=4, num_experts=4, num_experts_per_tok=2,
                         num_attention_heads=2, num_hidden_layers=1, vocab_size=8)
    tokens, device = 3 + rank, PartialState().device
    with torch.device(device):
        routing = RouterOutput(logits=torch.randn(tokens, 4), top_k_index=torch.randint(0, 4, (tokens, 2)),
                               top_k_weights=torch.rand(tokens, 2), tokens_per_expert=torch.zeros(4),
                               aux_loss=torch.zeros(()), z_loss=torch.zeros(()))
        experts, x = HfMoeExperts(config, 2), torch.randn(tokens, 8)
    try:
        AllToAllDispatcher(groups.ep_group, 4, padded=True)(x, routing, experts)
        errors.append("no error")
    except ValueError as e:
        errors.append(str(e))
    # checkpoints whose expert tensors do not fit the config, and keyword arguments that cannot apply
    for variant in ("broadcastable", "sixteen_experts", "transposed", "four_experts"):
        try:
            HfMoeForCausalLM.from_pretrained(os.path.join(workdir, variant), expert_parallel_size=2)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    model_dir = os.path.join(workdir, "model")
    try:
        HfMoeForCausalLM.from_pretrained(model_dir, expert_parallel_size=2, revision="v2")
        errors.append("no error")
    except ValueError as e:
        errors.append(str(e))
    config = HfMoeConfig.from_pretrained(model_dir)
    config.router_aux_loss_coef = 0.375
    model = HfMoeForCausalLM.from_pretrained(model_dir, expert_parallel_size=2, config=config,
                                             router_z_loss_coef=0.25)
    errors.append(f"config passed on: {model.config.router_aux_loss_coef} {model.config.router_z_loss_coef}")
    return "\n".join(errors)


def lora(workdir: str, ep_size: int) -> dict:
    from accelerate import Accelerator
    from peft import get_peft_model

    from hf_moe.integrations import lora_config, save_adapter_expert_parallel
    from hf_moe.parallel import finish_gradients, prepare_for_ddp

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # created first: must see every process
    path = os.path.join(workdir, "model")
    forgot = get_peft_model(HfMoeForCausalLM.from_pretrained(path, expert_parallel_size=ep_size), lora_config(r=4))
    try:
        finish_gradients(accelerator.prepare(forgot))  # experts inside DDP: must refuse, not silently average
        guard = "no error"
    except RuntimeError as e:
        guard = str(e)

    model = HfMoeForCausalLM.from_pretrained(path, expert_parallel_size=ep_size)
    model = prepare_for_ddp(get_peft_model(model, lora_config(r=4, init_lora_weights=False)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
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
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n and "experts" in n}
    return {"losses": losses, "logits": logits, "guard": guard, "expert_lora": experts}


def compiled(workdir: str, ep_size: int) -> dict:
    """Eager and compiled (dynamo and AOT autograd; inductor adds nothing to what is checked here) forward + backward
    of this rank's rows, and the compiled model's graph breaks."""
    model = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "model"), expert_parallel_size=ep_size)
    model.train()
    ids = local_rows(torch.load(os.path.join(workdir, "batch.pt")))
    runs = {}
    for name, run in (("eager", model), ("compiled", torch.compile(model, backend="aot_eager"))):
        out = run(input_ids=ids, labels=ids)
        out.loss.backward()
        runs[name] = {"logits": out.logits.detach(), "loss": out.loss.detach(),
                      "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
        model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    reasons = [" ".join(line for line in str(r.reason).splitlines() if "debug context" in line)
               for r in explanation.break_reasons]
    return {**runs, "graph_breaks": explanation.graph_break_count, "reasons": reasons,
            "moe_blocks": len(moe_blocks(model))}


if __name__ == "__main__":
    mode, workdir, ep_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(int(os.environ.get("HF_MOE_TEST_SEED", "0")))  # e.g. LoRA's initialisation
    impl = sys.argv[4] if len(sys.argv) > 4 else "hf_moe_grouped"
    if os.environ.get("HF_MOE_TEST_SKEW") == "1":
        skew_routing()
    if mode == "bad":
        text = bad(workdir)
        with open(os.path.join(workdir, f"rank{dist.get_rank()}.txt"), "w") as f:
            f.write(text)
    else:
        modes = {"train": lambda: train(workdir, ep_size, impl), "lora": lambda: lora(workdir, ep_size),
                 "compile": lambda: compiled(workdir, ep_size)}
        result = modes[mode]()
        torch.save(to_cpu(result), os.path.join(workdir, f"{mode}{dist.get_rank()}.pt"))
    dist.destroy_process_group()
