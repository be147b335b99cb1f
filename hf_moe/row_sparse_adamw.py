"""Row-sparse AdamW for the tables of product-key layers (docs/product_key.md, "Optimizer").

A product-key layer keeps one row per expert in each of its two tables (10⁴–10⁶ rows) and a batch reaches only the
rows of the experts it routes to, while AdamW reads and writes every row's parameter and both moments at each step.
[`RowSparseAdamW`] steps a row of a row-sparse parameter only when its gradient has a nonzero entry — the rows the
step's batches touched, after gradient accumulation and data-parallel reduction — and leaves the other rows and
their moments as they are: lazy Adam, as `torch.optim.SparseAdam`, with AdamW's decoupled weight decay on the
touched rows. With every row touched it is AdamW. Its other parameters step through torch's AdamW itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .moe import kernels
from .moe.block import moe_blocks
from .moe.experts.module import base_layer, input_projection
from .moe.ops import triton_serves
from .moe.router.product_key import ProductKeyRouter
from .parallel.fsdp import local_rows

# AdamW options the row update does not implement; `fused` also lets a GradScaler hand the optimizer scaled gradients
_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable", "fused")


def row_sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tables of `model`'s product-key layers (each block's experts' input and output projections),
    in module order: the parameters to hand [`RowSparseAdamW`] as `row_sparse`."""
    tables = []
    for block in moe_blocks(model):
        if isinstance(base_layer(block.router), ProductKeyRouter):
            experts = base_layer(block.experts)
            tables += [p for p in (input_projection(experts)[0], experts.down_proj) if p.requires_grad]
    return tables


class RowSparseAdamW(torch.optim.AdamW):
    """AdamW whose row-sparse parameters are stepped row by row, only the rows whose gradient has a nonzero entry
    (a row: a slice along dim 0, an expert of a table); the other parameters are torch's AdamW.

        optimizer = hf_moe.RowSparseAdamW(model.parameters(), lr=1e-3,
                                          row_sparse=hf_moe.row_sparse_parameters(model))
        # with the Trainer:
        Trainer(..., optimizer_cls_and_kwargs=(hf_moe.RowSparseAdamW,
                                               {"lr": 1e-3, "row_sparse": hf_moe.row_sparse_parameters(model)}))

    The `row_sparse` parameters move to param groups of their own (after the group each came from, with its options
    and `"row_sparse": True`); a group passed with `"row_sparse": True` is row-sparse as a whole. The flag stays with
    the groups when their parameters are replaced (`hf_moe.fully_shard_moe(model, accelerator, optimizer)`) and when
    a checkpoint is loaded. A row-sparse row is updated with AdamW's formula (bias correction at the table's step
    count) when touched and not at all otherwise: its moments do not decay and no weight decay applies while no batch
    reaches it (lazy Adam). The state has AdamW's keys (`step`, `exp_avg`, `exp_avg_sq`). On CUDA a Triton kernel
    updates the touched rows in place (an untouched row costs one read of its gradient); on the CPU torch ops update
    the touched rows only ([`step_touched_rows`]). `amsgrad`, `maximize`, `capturable`, `differentiable` and `fused`
    are refused for row-sparse groups.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        row_sparse: Iterable[torch.Tensor] = (),
        **kwargs,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)
        self.defaults["row_sparse"] = False
        chosen = {id(p): p for p in row_sparse}
        stepped = {id(p) for group in self.param_groups for p in group["params"]}
        missing = [tuple(p.shape) for key, p in chosen.items() if key not in stepped]
        if missing:
            raise ValueError(f"row_sparse holds parameters this optimizer does not step (shapes {missing}): pass them "
                             "in `params` as well")
        groups = []
        for group in self.param_groups:
            group.setdefault("row_sparse", False)
            sparse = [p for p in group["params"] if id(p) in chosen]
            dense = [p for p in group["params"] if id(p) not in chosen]
            if dense or not sparse:
                groups.append({**group, "params": dense})
            if sparse:
                groups.append({**group, "params": sparse, "row_sparse": True})
        self.param_groups = groups
        for group in self.row_sparse_groups:
            on = [name for name in _UNSUPPORTED if group[name]]
            if on:
                raise ValueError(f"RowSparseAdamW does not support {', '.join(f'{n}=True' for n in on)} for row-sparse "
                                 "parameters: leave the option off, or set it only in param groups of dense parameters")
            scalars = [p for p in group["params"] if p.dim() == 0]
            if scalars:
                raise ValueError(f"row-sparse parameters need a dimension of rows; got {len(scalars)} scalar(s)")

    @property
    def row_sparse_groups(self) -> list[dict]:
        return [group for group in self.param_groups if group["row_sparse"]]

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as torch's optimizers do; which groups are row-sparse stays as this optimizer was built."""
        flags = [group["row_sparse"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flag in zip(self.param_groups, flags):
            group["row_sparse"] = flag

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = []  # the row-sparse gradients, hidden from torch's AdamW while it steps the other parameters
        for group in self.row_sparse_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step_rows(param, group)
                    held.append((param, param.grad))
                    param.grad = None
        try:
            super().step()
        finally:
            for param, grad in held:
                param.grad = grad
        return loss

    # A compiled step (`torch.compile(optimizer.step)`) runs this eagerly: it reads the step count on the host, and
    # inductor's CPU code generation fails on the torch path (torch 2.13: a KeyError in its outer-loop fusion when
    # several mutated outputs read the per-row reduction). The dense parameters' AdamW compiles as usual.
    @torch.compiler.disable
    def _step_rows(self, param: torch.Tensor, group: dict) -> None:
        grad = param.grad
        if grad.is_sparse:
            raise ValueError(f"RowSparseAdamW takes dense gradients (the rows without one are zero); got a sparse "
                             f"gradient for a parameter of shape {tuple(param.shape)}")
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        tensors = [local_rows(t) for t in (param, grad, state["exp_avg"], state["exp_avg_sq"])]
        beta1, beta2 = group["betas"]
        hyper = (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
                 int(state["step"].item()))
        if triton_serves(tensors[0]) and kernels.row_sparse_adamw.serves(*tensors):
            kernels.row_sparse_adamw.row_sparse_adamw(*tensors, *hyper)
        else:
            step_touched_rows(*tensors, *hyper)


def step_touched_rows(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int, gather: bool | None = None,
) -> None:
    """[`RowSparseAdamW`]'s row update with torch ops (CPU, and CUDA without the kernel), in float32 (float64 for
    float64 tables). With `gather` (default: on the CPU, where finding the touched rows waits for nothing) the
    touched rows are gathered, updated and written back, or all updated in place when every row is touched;
    otherwise the whole table is updated and the touched rows kept with a `where`, without a host sync. All three
    give the same bits."""
    touched = grad.ne(0).reshape(grad.shape[0], -1).any(dim=1)
    hyper = (lr, beta1, beta2, eps, weight_decay, step)
    compute = torch.promote_types(param.dtype, torch.float32)
    tensors, targets = (param, grad, exp_avg, exp_avg_sq), (param, exp_avg, exp_avg_sq)
    if not (param.device.type == "cpu" if gather is None else gather):
        keep = touched.view(-1, *([1] * (param.dim() - 1)))
        for target, new in zip(targets, _adamw_(*(t.to(compute, copy=True) for t in tensors), *hyper)):
            target.copy_(torch.where(keep, new, target))
        return
    rows = touched.nonzero().squeeze(1)
    if rows.numel() == param.shape[0] and param.dtype == compute:
        _adamw_(param, grad.to(compute), exp_avg, exp_avg_sq, *hyper)
        return
    for target, new in zip(targets, _adamw_(*(t.index_select(0, rows).to(compute) for t in tensors), *hyper)):
        target.index_copy_(0, rows, new.to(target.dtype))


def _adamw_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step in place on `(param, exp_avg, exp_avg_sq)` (float32 or float64), torch's single-tensor AdamW's
    operations in its order; returns them."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
    return param, exp_avg, exp_avg_sq
