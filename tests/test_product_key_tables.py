"""The product-key experts' table gradients (`hf_moe.moe.kernels.product_key_tables`) against float64 maths: runs
of every length (one pair, past the run-end scan, past the long-run length, several segments), rows over several
column tiles or slices, sentinel slots; deterministic, and the custom op equal to the eager path.

Runs on a CUDA device; on the CPU only under Triton's interpreter (`TRITON_INTERPRET=1` with Triton installed), and
skips otherwise (the CI suite has no Triton).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
DEVICE = "cuda" if CUDA else "cpu"


def _gradients_equal_float64(index: torch.Tensor, experts: int, hidden: int, act: str) -> tuple[tuple, tuple]:
    """The experts' gradients `(x, up, down, weights)` at `index` against a float64 einsum (relative error < 1e-5);
    the custom op and a second eager call give the same bits. Returns the gradients and the float64 ones."""
    from hf_moe.moe.kernels.product_key_experts import product_key_experts, product_key_experts_op

    tokens = index.shape[0]
    index = index.to(DEVICE)
    # drawn on the CPU, so a GPU checks the data that the interpreter checks (and that has nonzero gradients)
    x = torch.randn(tokens, hidden).to(DEVICE).requires_grad_()
    up = (torch.randn(experts, hidden) * hidden**-0.5).to(DEVICE).requires_grad_()
    down = (torch.randn(experts, hidden) * hidden**-0.5).to(DEVICE).requires_grad_()
    weights = torch.rand(index.shape).to(DEVICE).requires_grad_()
    grad = torch.randn(tokens, hidden).to(DEVICE)
    leaves = (x, up, down, weights)
    got = torch.autograd.grad(product_key_experts(x, up, down, index, weights, act), leaves, grad)
    again = torch.autograd.grad(product_key_experts(x, up, down, index, weights, act), leaves, grad)
    via_op = torch.autograd.grad(product_key_experts_op(x, up, down, index, weights, act)[0], leaves, grad)
    ref = [t.detach().double().cpu().requires_grad_() for t in leaves]
    i = index.cpu().clamp(max=experts - 1)
    pre = torch.einsum("tkh,th->tk", ref[1][i], ref[0])
    coeff = {"silu": F.silu, "relu2": lambda h: torch.relu(h) ** 2}[act](pre) * ref[3] * (index < experts).cpu()
    want = torch.autograd.grad(torch.einsum("tk,tkh->th", coeff, ref[2][i]), ref, grad.double().cpu())
    for name, g, w, h, a in zip(("x", "up", "down", "weights"), got, want, via_op, again):
        assert w.norm() > 0, f"{name}: the reference gradient is zero (relu² of pre-activations all ≤ 0): no check"
        err = ((g.double().cpu() - w).norm() / w.norm()).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
        for other in (h, a):
            assert torch.equal(g, other), f"{name}: not bit-identical across calls and paths"
    return got, want


@pytest.mark.parametrize("tokens,hidden,experts,top_k", [(100, 8, 2, 2), (3, 20, 500, 4), (4, 1100, 3, 2)])
def test_table_gradients_for_long_runs_singletons_and_wide_rows(tokens, hidden, experts, top_k):
    """Runs longer than the kernel's 64-position scan for a run's end (T·k ≫ E), nearly every run one pair
    (E ≫ T·k), a row over two column tiles (H > 1024); sentinel slots (E and above) among them get nothing."""
    torch.manual_seed(0)
    index = torch.randint(0, experts, (tokens, top_k))
    index[1, 0], index[2, top_k - 1] = experts, experts + 2
    _gradients_equal_float64(index, experts, hidden, "relu2")


@pytest.mark.parametrize("hidden,segment", [(24, None), (200, None), (200, 256)])
def test_table_gradients_when_a_few_experts_take_most_pairs(hidden, segment, monkeypatch):
    """A collapsed router: most pairs on expert 0 and many on expert 3 (runs past the long-run length, which the
    second kernel sums in tiles over column slices — two slices at H 200 —, with `segment` 256 in segments whose
    partial sums the last one to finish adds), the rest short runs and sentinels."""
    from hf_moe.moe.kernels import product_key_tables

    if segment is not None:
        monkeypatch.setattr(product_key_tables, "_SEGMENT", segment)
    long_run = product_key_tables._LONG_RUN
    torch.manual_seed(0)
    tokens, experts, top_k = 700, 6, 2
    index = torch.randint(0, experts, (tokens, top_k))
    index[torch.rand(tokens, top_k) < 0.6] = 0
    index[:, 1][torch.rand(tokens) < 0.5] = 3
    index[5, 0], index[9, 1] = experts, experts + 1
    counts = torch.bincount(index.flatten(), minlength=experts + 2)
    assert counts[0] >= long_run and counts[3] >= long_run and counts[1] < long_run
    assert segment is None or counts[0] > 2 * segment and counts[3] > segment  # runs of 3 and 2 segments
    got, want = _gradients_equal_float64(index, experts, hidden, "silu")
    for e in (0, 3):  # the long runs' rows in particular
        err = ((got[1][e].double().cpu() - want[1][e]).norm() / want[1][e].norm()).item()
        assert err < 1e-5, f"up row of expert {e}: relative error {err:.2e}"


@pytest.mark.skipif(CUDA, reason="orders the interpreter's programs; a GPU orders them itself")
def test_table_gradients_do_not_depend_on_the_order_programs_finish(monkeypatch):
    """Under Triton's interpreter programs run one after another in grid order, so the segment that finishes last is
    always the run's last one. Run every launch's programs in reverse and in a shuffled order too: whichever segment
    arrives last must add the same partials in the same order, so the gradients are bit-identical."""
    from triton.runtime import interpreter

    from hf_moe.moe.kernels import product_key_tables

    monkeypatch.setattr(product_key_tables, "_SEGMENT", 256)
    torch.manual_seed(1)
    tokens, experts, top_k, hidden = 700, 6, 2, 200
    keys = torch.randint(0, experts, (tokens, top_k), dtype=torch.int32)
    keys[torch.rand(tokens, top_k) < 0.6] = 0  # expert 0: a run of 3+ segments
    keys[3, 1] = experts  # a sentinel
    inputs = (torch.randn(tokens, hidden), torch.randn(tokens, hidden), keys, torch.randn(tokens, top_k),
              torch.randn(tokens, top_k), torch.empty(experts, hidden))
    builder = interpreter.interpreter_builder
    set_grid_idx = builder.set_grid_idx
    orders: dict[tuple[str, int], list[int]] = {}  # (order, programs) → the program run at each step

    def gradients(order: str) -> tuple[torch.Tensor, ...]:
        def remapped(x: int, y: int, z: int) -> None:
            nx, ny, nz = builder.grid_dim
            n = nx * ny * nz
            if (order, n) not in orders:
                orders[order, n] = {"natural": list(range(n)), "reversed": list(range(n))[::-1],
                                    "shuffled": torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist()
                                    }[order]
            j = orders[order, n][(x * ny + y) * nz + z]
            set_grid_idx(j // (ny * nz), (j // nz) % ny, j % nz)

        monkeypatch.setattr(builder, "set_grid_idx", remapped)
        return product_key_tables.table_gradients(*inputs)

    natural = gradients("natural")
    assert (keys == 0).sum() > 2 * 256
    for order in ("reversed", "shuffled"):
        for name, a, b in zip(("up", "down"), gradients(order), natural):
            assert torch.equal(a, b), f"{name}: programs run {order} change the gradient"
