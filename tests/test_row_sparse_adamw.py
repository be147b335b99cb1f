"""`hf_moe.RowSparseAdamW`: equal to torch's AdamW when every row is touched, lazy Adam otherwise (untouched rows and
their moments kept bit for bit, touched rows against a float64 loop and against torch's SparseAdam), its groups and
checkpoints, bad input, `row_sparse_parameters`, the Trainer; the Triton kernel against the torch path (on CUDA, or
on the CPU under Triton's interpreter)."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hf_moe
from hf_moe import HfMoeForCausalLM, RowSparseAdamW, row_sparse_parameters
from hf_moe.row_sparse_adamw import step_touched_rows

from .conftest import tiny_config

TRITON_RUNS = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def lazy_adamw_float64(start: torch.Tensor, grads: list[torch.Tensor], lr: float, betas: tuple[float, float],
                       eps: float, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lazy AdamW written row by row in float64: a row moves only at the steps where its gradient is nonzero."""
    b1, b2 = betas
    p = start.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g = g.double()
        for r in range(p.shape[0]):
            if not bool(g[r].ne(0).any()):
                continue
            p[r] = p[r] - lr * weight_decay * p[r]
            m[r] = b1 * m[r] + (1 - b1) * g[r]
            v[r] = b2 * v[r] + (1 - b2) * g[r] ** 2
            p[r] = p[r] - lr * (m[r] / (1 - b1**t)) / ((v[r] / (1 - b2**t)).sqrt() + eps)
    return p, m, v


def sparse_grads(rows: int, cols: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Gradients whose rows are zero at random steps; row 0 never touched, row 1 only at the first and last step."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for t in range(steps):
        g = torch.randn(rows, cols, generator=gen)
        g[torch.rand(rows, generator=gen) < 0.5] = 0
        g[0] = 0
        g[1] = torch.randn(cols, generator=gen) if t in (0, steps - 1) else 0
        grads.append(g)
    return grads


def run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype).clone()
        optimizer.step()


def test_every_row_touched_is_adamw():
    torch.manual_seed(0)
    start = [torch.randn(40, 8), torch.randn(5, 3, 4), torch.randn(6)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    grads = [[torch.randn_like(t) for t in start] for _ in range(4)]
    optimizer = RowSparseAdamW(ours, lr=1e-2, weight_decay=0.1, row_sparse=ours[:2])
    run(optimizer, ours, grads)
    adamw = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    run(adamw, theirs, grads)
    for a, b in zip(ours, theirs):  # the CPU path runs torch's single-tensor AdamW's operations in its order
        assert torch.equal(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[a][key], adamw.state[b][key]), key


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_touched_rows_are_lazy_adamw_and_untouched_rows_stay(dtype, tol):
    torch.manual_seed(1)
    start = torch.randn(30, 16).to(dtype)
    grads = sparse_grads(30, 16, steps=5)
    table = torch.nn.Parameter(start.clone())
    optimizer = RowSparseAdamW([table], lr=3e-2, betas=(0.8, 0.95), weight_decay=0.2, row_sparse=[table])
    for g in grads:
        before = (table.detach().clone(), *(optimizer.state[table].get(k) for k in ("exp_avg", "exp_avg_sq")))
        run(optimizer, [table], [[g]])
        untouched = g.eq(0).all(dim=1)
        assert torch.equal(table[untouched], before[0][untouched]), "an untouched row moved"
        if before[1] is not None:
            assert torch.equal(optimizer.state[table]["exp_avg"][untouched], before[1][untouched])
            assert torch.equal(optimizer.state[table]["exp_avg_sq"][untouched], before[2][untouched])
    assert torch.equal(table[0], start[0]) and not torch.equal(table[1], start[1])
    want = lazy_adamw_float64(start, grads, 3e-2, (0.8, 0.95), 1e-8, 0.2)
    got = (table.detach(), optimizer.state[table]["exp_avg"], optimizer.state[table]["exp_avg_sq"])
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < tol, f"{name}: relative error {err:.2e} against the float64 loop"


@pytest.mark.parametrize("dtype,every_row", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_gathered_and_masked_torch_paths_give_the_same_bits(dtype, every_row):
    """The CPU's path (touched rows gathered, or the table in place when every row is touched) and the one for GPUs
    without the kernel (whole table, `where`)."""
    torch.manual_seed(6)
    grad = sparse_grads(40, 3 * 5, steps=1, seed=7)[0].view(40, 3, 5).to(dtype)
    if every_row:
        grad = torch.randn(40, 3, 5)
    grad[5, 1, 2] = float("nan")
    tensors = [torch.randn(40, 3, 5).to(dtype), grad, torch.randn(40, 3, 5).to(dtype), torch.rand(40, 3, 5).to(dtype)]
    gathered, masked = [t.clone() for t in tensors], [t.clone() for t in tensors]
    step_touched_rows(*gathered, 1e-2, 0.9, 0.99, 1e-8, 0.1, 2, gather=True)
    step_touched_rows(*masked, 1e-2, 0.9, 0.99, 1e-8, 0.1, 2, gather=False)
    for a, b in zip(gathered, masked):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert not torch.equal(gathered[0], tensors[0]) and gathered[0][5, 1, 2].isnan()


def test_without_weight_decay_equals_torch_sparse_adam():
    """torch.optim.SparseAdam is lazy Adam on sparse gradients (its eps is added before the bias correction of the
    second moment: equal up to eps, which is tiny here)."""
    torch.manual_seed(2)
    start = torch.randn(25, 6)
    grads = sparse_grads(25, 6, steps=6, seed=3)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    run(RowSparseAdamW([ours], lr=1e-2, eps=1e-12, weight_decay=0.0, row_sparse=[ours]), [ours], [[g] for g in grads])
    sparse_adam = torch.optim.SparseAdam([theirs], lr=1e-2, eps=1e-12)
    for g in grads:
        theirs.grad = g.to_sparse(sparse_dim=1)
        sparse_adam.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_groups_checkpoints_and_adamw_state_interchange():
    torch.manual_seed(3)
    table, dense = torch.nn.Parameter(torch.randn(12, 4)), torch.nn.Parameter(torch.randn(4, 4))
    grads = [[torch.randn(4, 4), g] for g in sparse_grads(12, 4, steps=4, seed=4)]
    optimizer = RowSparseAdamW([{"params": [dense]}, {"params": [table], "row_sparse": True, "lr": 2e-2}], lr=1e-2)
    assert [g["row_sparse"] for g in optimizer.param_groups] == [False, True]
    split = RowSparseAdamW([dense, table], lr=1e-2, row_sparse=[table])
    assert [(g["row_sparse"], len(g["params"])) for g in split.param_groups] == [(False, 1), (True, 1)]

    params = [dense, table]
    run(optimizer, params, grads[:2])
    saved = copy.deepcopy(optimizer.state_dict())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = RowSparseAdamW([{"params": [copies[0]]}, {"params": [copies[1]], "row_sparse": True, "lr": 2e-2}])
    plain = {**saved, "param_groups": [{k: v for k, v in g.items() if k != "row_sparse"} for g in
                                       saved["param_groups"]]}
    resumed.load_state_dict(plain)  # e.g. torch AdamW's checkpoint of the same groups: the flags stay as built
    assert [g["row_sparse"] for g in resumed.param_groups] == [False, True]
    run(optimizer, params, grads[2:])
    run(resumed, copies, grads[2:])
    for a, b in zip(params, copies):
        assert torch.equal(a, b), "resumed from the checkpoint, the steps must be the same"
    adamw = torch.optim.AdamW([{"params": [copies[0]]}, {"params": [copies[1]], "lr": 2e-2}])
    adamw.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # and back to torch's AdamW
    assert torch.equal(adamw.state[copies[1]]["exp_avg"], optimizer.state[table]["exp_avg"])
    assert adamw.state[copies[1]]["step"].item() == 4


def test_compiled_step_equals_eager():
    torch.manual_seed(5)
    start = [torch.randn(20, 8), torch.randn(4, 4)]
    grads = [[g, torch.randn(4, 4)] for g in sparse_grads(20, 8, steps=3, seed=6)]
    eager, compiled = ([torch.nn.Parameter(t.clone()) for t in start] for _ in range(2))
    run(RowSparseAdamW(eager, lr=1e-2, weight_decay=0.1, row_sparse=eager[:1]), eager, grads)
    optimizer = RowSparseAdamW(compiled, lr=1e-2, weight_decay=0.1, row_sparse=compiled[:1])
    optimizer.step = torch.compile(optimizer.step)
    run(optimizer, compiled, grads)
    assert torch.equal(compiled[0], eager[0]), "the row-sparse table"
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused_with_the_value():
    table, other = torch.nn.Parameter(torch.randn(6, 2)), torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"does not step \(shapes \[\(3, 2\)\]\)"):
        RowSparseAdamW([table], row_sparse=[other])
    with pytest.raises(ValueError, match="amsgrad=True"):
        RowSparseAdamW([table], amsgrad=True, row_sparse=[table])
    with pytest.raises(ValueError, match="fused=True"):  # a GradScaler would hand it scaled gradients
        RowSparseAdamW([{"params": [table], "fused": True}], row_sparse=[table])
    with pytest.raises(ValueError, match="scalar"):
        scalar = torch.nn.Parameter(torch.tensor(1.0))
        RowSparseAdamW([scalar], row_sparse=[scalar])
    optimizer = RowSparseAdamW([table], row_sparse=[table])
    table.grad = torch.randn(6, 2).to_sparse()
    with pytest.raises(ValueError, match=r"sparse gradient for a parameter of shape \(6, 2\)"):
        optimizer.step()
    RowSparseAdamW([table], amsgrad=True)  # dense AdamW options stay for dense parameters


def product_key_model() -> HfMoeForCausalLM:
    torch.manual_seed(0)
    return HfMoeForCausalLM(tiny_config(router_type="product_key", num_experts=64, num_experts_per_tok=2,
                                        moe_intermediate_size=1, gated_experts=False, num_hidden_layers=3,
                                        moe_layers=[0, 2], norm_topk_prob=False, router_aux_loss_coef=0.0,
                                        router_z_loss_coef=0.0))


def test_row_sparse_parameters_are_the_product_key_tables():
    model = product_key_model()
    tables = row_sparse_parameters(model)
    blocks = [block for block in hf_moe.moe_blocks(model)]
    assert len(blocks) == 2 and len(tables) == 4
    assert all(t is p for t, p in zip(tables, [p for b in blocks for p in (b.experts.up_proj, b.experts.down_proj)]))
    assert row_sparse_parameters(HfMoeForCausalLM(tiny_config())) == []


def test_trainer_steps_only_the_rows_its_batches_routed_to(tmp_path):
    """A row moves when a token that reaches the loss chose its expert: the last position of a sequence has no label
    and no later position reads it (and no router loss here), so the experts only it chose get a zero gradient and
    stay."""
    model = product_key_model()
    tables = row_sparse_parameters(model)
    start = [t.detach().clone() for t in tables]
    batch, length = 2, 6
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 97, (2 * batch, length))]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch, max_steps=2,
                             weight_decay=0.1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(RowSparseAdamW, {"lr": 1e-2, "row_sparse": tables}))
    with hf_moe.record_routing(model) as routings:
        trainer.train()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), RowSparseAdamW)
    assert len(routings) == 4  # two steps, two product-key layers
    for layer, (up, down) in enumerate(zip(tables[::2], tables[1::2])):
        routed = torch.zeros(64, dtype=torch.bool)
        for routing in routings[layer::2]:
            routed[routing.top_k_index.view(batch, length, -1)[:, :-1].flatten()] = True
        assert 0 < routed.sum() < 64
        for table, before in ((up, start[2 * layer]), (down, start[2 * layer + 1])):
            moved = (table.detach() != before).flatten(1).any(dim=1)
            assert torch.equal(moved, routed), f"layer {layer}: moved rows {moved.nonzero().flatten().tolist()}, " \
                                               f"routed {routed.nonzero().flatten().tolist()}"


@pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("shape,dtype", [((37, 1024), torch.float32), ((37, 1, 1024), torch.bfloat16),
                                         ((5, 3000), torch.float32), ((9, 7), torch.bfloat16)])
def test_kernel_equals_the_torch_path(shape, dtype):
    from hf_moe.moe.kernels.row_sparse_adamw import row_sparse_adamw

    torch.manual_seed(4)
    rows = shape[0]
    grad = torch.randn(shape).to(dtype)
    grad[torch.rand(rows) < 0.4] = 0
    grad[1] = 0
    grad[2].view(-1)[-1] = 3.0  # one nonzero entry in the last column tile touches the row
    grad[2].view(-1)[:-1] = 0
    grad[3], grad[4] = 0, 0
    grad[3].view(-1)[0] = float("nan")  # NaN counts as touched and propagates
    grad[4].view(-1)[1] = -2.0
    param, exp_avg, exp_avg_sq = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype), torch.rand(shape).to(dtype)
    ours = [t.to(DEVICE) for t in (param, grad, exp_avg, exp_avg_sq)]
    want = [t.clone() for t in (param, grad, exp_avg, exp_avg_sq)]
    hyper = (1e-2, 0.9, 0.99, 1e-8, 0.1, 3)
    row_sparse_adamw(*ours, *hyper)
    step_touched_rows(*want, *hyper)
    untouched = grad.eq(0).reshape(rows, -1).all(dim=1)
    for name, a, b, before in zip(("param", "exp_avg", "exp_avg_sq"), (ours[0], ours[2], ours[3]),
                                  (want[0], want[2], want[3]), (param, exp_avg, exp_avg_sq)):
        a = a.cpu()
        assert torch.equal(a[untouched], before[untouched]), f"{name}: an untouched row changed"
        assert a[3].isnan().any() and b[3].isnan().any(), f"{name}: the NaN row"
        ok = ~untouched
        ok[3] = False
        torch.testing.assert_close(a[ok].float(), b[ok].float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                   atol=1e-6 if dtype == torch.float32 else 1e-2, msg=name)
    torch.library.opcheck(torch.ops.hf_moe.row_sparse_adamw.default,
                          [t.to(DEVICE) for t in (param, grad, exp_avg, exp_avg_sq)] + list(hyper))
