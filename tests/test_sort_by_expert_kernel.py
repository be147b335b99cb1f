"""The Triton sorts by expert (`hf_moe.moe.kernels.sort_by_expert`: one launch, and the counting sort) against a
plain-Python stable sort and counts: random ids, one expert for all, empty experts, sentinel slots, `num_slots`
truncation, one pair, several blocks with a partial last one, the size limits; the torch path beyond them; opcheck,
torch.compile and CUDA-graph capture; on a GPU the counting sort at training sizes against torch's.

Runs on a CUDA device (`python -m pytest tests/test_sort_by_expert_kernel.py`); on the CPU only under Triton's
interpreter (`TRITON_INTERPRET=1` with Triton installed), and skips otherwise (the CI suite has no Triton).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from hf_moe.moe.experts.grouped import (
    TRITON_SORT_MAX_EXPERTS,
    TRITON_SORT_MAX_PAIRS,
    TRITON_SORT_ONE_LAUNCH_MAX_PAIRS,
    sort_by_expert,
)

from .conftest import count_calls, requires_cuda

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if CUDA else "cpu"


def _reference(ids: list[list[int]], num_experts: int, num_slots: int | None):
    """`(token, order, position, offsets)` as Python lists: a stable sort of the flat pairs by expert id (ties in
    flat index order), its inverse, counts of ids ≤ e, and the truncation to `num_slots + 1` rows."""
    flat = [e for row in ids for e in row]
    top_k = len(ids[0])
    order = sorted(range(len(flat)), key=lambda i: (flat[i], i))
    position = [0] * len(flat)
    for row, i in enumerate(order):
        position[i] = row
    offsets = [sum(1 for e in flat if e <= expert) for expert in range(num_experts)]
    if num_slots is not None and num_slots < len(flat):
        order = order[: num_slots + 1]
        position = [min(p, num_slots) for p in position]
    return [i // top_k for i in order], order, position, offsets


def _check(ids: torch.Tensor, num_experts: int, num_slots: int | None = None, block_size: int | None = None) -> None:
    """The sort of `ids` by the rule (`block_size=None`) or by the counting sort with `block_size` pairs per
    program equals the reference."""
    if block_size is None:
        token, order, position, offsets = sort_by_expert(ids.to(DEVICE), num_experts, num_slots, triton=True,
                                                         counting=True)
    else:
        from hf_moe.moe.kernels.sort_by_expert import counting_sort_by_expert

        token, order, position, offsets = counting_sort_by_expert(ids.to(DEVICE), num_experts, num_slots, block_size)
    want = _reference(ids.tolist(), num_experts, num_slots)
    for name, got, expected, dtype in zip(("token", "order", "position", "offsets"), (token, order, position, offsets),
                                          want, (torch.int64, torch.int64, torch.int64, torch.int32)):
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
        assert got.cpu().tolist() == expected, name


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts the calls of the one-launch kernel's entry point, so each test shows that it (not torch) sorted."""
    from hf_moe.moe.kernels import sort_by_expert as module

    return count_calls(monkeypatch, module, "sort_by_expert")


@pytest.fixture
def counting_calls(monkeypatch) -> list[int]:
    """Counts the calls of the counting sort's entry point."""
    from hf_moe.moe.kernels import sort_by_expert as module

    return count_calls(monkeypatch, module, "counting_sort_by_expert")


@pytest.mark.parametrize("num_experts", [8, 128, TRITON_SORT_MAX_EXPERTS])
@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 8), (3, 2), (16, 8), (TRITON_SORT_ONE_LAUNCH_MAX_PAIRS // 8, 8)])
def test_random_ids_equal_a_stable_python_sort(kernel_calls, num_experts, tokens, top_k):
    gen = torch.Generator().manual_seed(tokens * 1000 + num_experts)
    _check(torch.randint(0, num_experts, (tokens, top_k), generator=gen), num_experts)
    assert kernel_calls


@pytest.mark.parametrize("num_experts", [8, 128, TRITON_SORT_MAX_EXPERTS])
def test_one_expert_for_all_pairs_keeps_the_flat_order(kernel_calls, num_experts):
    for expert in (0, num_experts // 2, num_experts - 1):
        _check(torch.full((37, 4), expert), num_experts)
    _check(torch.full((TRITON_SORT_ONE_LAUNCH_MAX_PAIRS // 2, 2), 3), num_experts)
    assert kernel_calls


@pytest.mark.parametrize("num_experts", [8, 128])
def test_sentinel_slots_sort_last_past_the_last_offset(kernel_calls, num_experts):
    gen = torch.Generator().manual_seed(num_experts)
    ids = torch.randint(0, num_experts, (24, 4), generator=gen)
    ids[torch.rand(24, 4, generator=gen) < 0.4] = num_experts
    _check(ids, num_experts)
    _check(torch.full((5, 2), num_experts), num_experts)  # every slot dropped
    ids[0, 0] = num_experts + 3  # ids past the sentinel keep their value order
    _check(ids, num_experts)
    assert kernel_calls


@pytest.mark.parametrize("num_experts", [8, 128, TRITON_SORT_MAX_EXPERTS])
def test_num_slots_keeps_the_real_rows_and_one_dropped_row(kernel_calls, num_experts):
    """As under expert parallelism: `num_slots` real slots, the rest sentinels; also a `num_slots` at and past the
    number of pairs (nothing cut) and one below the real slots (the rule applied as it is)."""
    gen = torch.Generator().manual_seed(num_experts)
    ids = torch.full((64, 8), num_experts)
    real = torch.rand(64, 8, generator=gen) < 0.2
    ids[real] = torch.randint(0, num_experts, (int(real.sum()),), generator=gen)
    num_real = int(real.sum())
    for num_slots in (num_real, 0, num_real // 2, ids.numel() - 1, ids.numel(), ids.numel() + 5):
        _check(ids, num_experts, num_slots)
    _check(torch.tensor([[num_experts]]), num_experts, 0)
    assert kernel_calls


def test_int32_and_strided_ids(kernel_calls):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (8, 12), generator=gen)
    _check(ids.to(torch.int32), 16)
    _check(ids.t(), 16)  # not contiguous
    assert kernel_calls


def test_past_the_limits_torch_sorts(kernel_calls, counting_calls):
    gen = torch.Generator().manual_seed(0)
    _check(torch.randint(0, 8, (TRITON_SORT_MAX_PAIRS // 4 + 1, 4), generator=gen), 8)
    _check(torch.randint(0, TRITON_SORT_MAX_EXPERTS + 1, (4, 2), generator=gen), TRITON_SORT_MAX_EXPERTS + 1)
    _check(torch.randint(0, TRITON_SORT_MAX_EXPERTS + 2, (600, 2), generator=gen), TRITON_SORT_MAX_EXPERTS + 1)
    assert not kernel_calls and not counting_calls


def test_without_token_returns_none():
    token, order, _, _ = sort_by_expert(torch.tensor([[2, 0], [1, 2]], device=DEVICE), 4, with_token=False,
                                        triton=True)
    assert token is None and order.cpu().tolist() == [1, 2, 0, 3]


def test_op_passes_opcheck():
    from hf_moe.moe.kernels import sort_by_expert as module  # noqa: F401  (registers the op)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (6, 4), generator=gen).to(DEVICE)  # 9: a sentinel of 8 experts
    for num_slots in (None, ids.numel() - 1, (ids < 8).sum().item()):
        torch.library.opcheck(torch.ops.hf_moe.sort_by_expert.default, (ids, 8, num_slots))


def test_compiled_sort_is_the_op_and_equals_eager():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (5, 2), generator=gen).to(DEVICE)

    def sort(ids):
        return sort_by_expert(ids, 8, 6, triton=True)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(sort)(ids)
    assert explanation.graph_break_count == 0
    assert "hf_moe.sort_by_expert" in "\n".join(g.print_readable(print_output=False) for g in explanation.graphs)
    for got, want in zip(torch.compile(sort, fullgraph=True)(ids), sort(ids)):
        assert torch.equal(got, want)


# The counting sort, with blocks of 16–64 pairs so that small inputs (the interpreter is slow) span several blocks.


@pytest.mark.parametrize("num_experts", [1, 7, 8, 13, 128])
@pytest.mark.parametrize("tokens,top_k,block_size", [(1, 1, 16), (4, 4, 16), (37, 4, 16), (64, 8, 32), (50, 3, 64)])
def test_counting_sort_equals_a_stable_python_sort(num_experts, tokens, top_k, block_size):
    """Random ids over several blocks with a partial last one (37·4 = 148 pairs in blocks of 16), E not a power of
    two, more experts than pairs (most of them empty), one expert."""
    gen = torch.Generator().manual_seed(tokens * 1000 + num_experts)
    _check(torch.randint(0, num_experts, (tokens, top_k), generator=gen), num_experts, block_size=block_size)


@pytest.mark.parametrize("num_experts", [8, 13])
def test_counting_sort_one_expert_and_empty_experts(num_experts):
    for expert in (0, num_experts // 2, num_experts - 1):
        _check(torch.full((37, 4), expert), num_experts, block_size=16)
    ids = torch.randint(0, 2, (40, 4), generator=torch.Generator().manual_seed(0)) * (num_experts - 1)
    ids[:10] = 3  # expert 3 only in the first blocks, 0 and E - 1 in all, the others in none
    _check(ids, num_experts, block_size=16)


@pytest.mark.parametrize("num_experts", [8, 13])
def test_counting_sort_sentinels_sort_last(num_experts):
    gen = torch.Generator().manual_seed(num_experts)
    ids = torch.randint(0, num_experts, (40, 4), generator=gen)
    ids[torch.rand(40, 4, generator=gen) < 0.4] = num_experts
    _check(ids, num_experts, block_size=16)
    _check(torch.full((20, 2), num_experts), num_experts, block_size=16)  # every slot dropped


def test_counting_sort_orders_ids_past_the_sentinel_as_the_sentinel():
    """Outside the sentinel contract (ids > E) the rows past `offsets[-1]` hold those pairs in flat order (torch's
    sort orders them by value); everything before `offsets[-1]` is the same."""
    from hf_moe.moe.kernels.sort_by_expert import counting_sort_by_expert

    ids = torch.tensor([[3, 8], [9, 1], [8, 12], [0, 3], [10, 8]] * 8)
    token, order, position, offsets = counting_sort_by_expert(ids.to(DEVICE), 8, None, 16)
    want = _reference(ids.clamp(max=8).tolist(), 8, None)
    assert [t.cpu().tolist() for t in (token, order, position, offsets)] == list(want)


@pytest.mark.parametrize("num_experts", [8, 13])
def test_counting_sort_num_slots_keeps_the_real_rows_and_one_dropped_row(num_experts):
    gen = torch.Generator().manual_seed(num_experts)
    ids = torch.full((40, 4), num_experts)
    real = torch.rand(40, 4, generator=gen) < 0.3
    ids[real] = torch.randint(0, num_experts, (int(real.sum()),), generator=gen)
    num_real = int(real.sum())
    for num_slots in (num_real, 0, num_real // 2, ids.numel() - 1, ids.numel(), ids.numel() + 5):
        _check(ids, num_experts, num_slots, block_size=16)


def test_counting_sort_int32_and_strided_ids_and_bad_block_size():
    from hf_moe.moe.kernels.sort_by_expert import counting_sort_by_expert

    ids = torch.randint(0, 16, (10, 12), generator=torch.Generator().manual_seed(0))
    _check(ids.to(torch.int32), 16, block_size=16)
    _check(ids.t(), 16, block_size=32)  # not contiguous
    for block_size in (8, 24):
        with pytest.raises(ValueError, match="block_size"):
            counting_sort_by_expert(ids.to(DEVICE), 16, None, block_size)


def test_the_rule_counts_past_the_one_launch_limit(kernel_calls, counting_calls):
    """Past `TRITON_SORT_ONE_LAUNCH_MAX_PAIRS` pairs the counting sort runs (its own block size: several blocks)."""
    gen = torch.Generator().manual_seed(0)
    tokens = TRITON_SORT_ONE_LAUNCH_MAX_PAIRS // 4 + 1
    ids = torch.randint(0, 13, (tokens, 4), generator=gen)
    ids[torch.rand(tokens, 4, generator=gen) < 0.1] = 13
    _check(ids, 13)
    _check(ids, 13, num_slots=int((ids < 13).sum()))
    assert len(counting_calls) == 2 and not kernel_calls
    _check(ids[: TRITON_SORT_ONE_LAUNCH_MAX_PAIRS // 4], 13)
    assert len(counting_calls) == 2 and kernel_calls


def test_without_counting_many_pairs_go_to_torch_sort(kernel_calls, counting_calls):
    """Without `counting` (the plan's `counting_sort=False`) pairs past the one-launch kernel go to torch's sort."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 13, (TRITON_SORT_ONE_LAUNCH_MAX_PAIRS // 4 + 1, 4), generator=gen)
    got = sort_by_expert(ids.to(DEVICE), 13, triton=True)
    assert [t.cpu().tolist() for t in got] == list(_reference(ids.tolist(), 13, None))
    assert not kernel_calls and not counting_calls


def test_counting_op_passes_opcheck():
    from hf_moe.moe.kernels import sort_by_expert as module  # noqa: F401  (registers the op)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (12, 4), generator=gen).to(DEVICE)  # 10: a sentinel of 9 experts
    for num_slots, block_size in ((None, 16), (ids.numel() - 1, 32), ((ids < 9).sum().item(), None)):
        torch.library.opcheck(torch.ops.hf_moe.counting_sort_by_expert.default, (ids, 9, num_slots, block_size))


def test_compiled_counting_sort_is_the_op_and_equals_eager():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (TRITON_SORT_ONE_LAUNCH_MAX_PAIRS // 2 + 3, 2), generator=gen).to(DEVICE)

    def sort(ids):
        return sort_by_expert(ids, 8, 900, triton=True, counting=True)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(sort)(ids)
    assert explanation.graph_break_count == 0
    assert "hf_moe.counting_sort_by_expert" in "\n".join(
        g.print_readable(print_output=False) for g in explanation.graphs
    )
    for got, want in zip(torch.compile(sort, fullgraph=True)(ids), sort(ids)):
        assert torch.equal(got, want)


@requires_cuda
@pytest.mark.parametrize("tokens,top_k,num_experts", [(8192, 8, 128), (32768, 8, 128), (8192, 2, 8), (4096, 8, 256),
                                                      (TRITON_SORT_MAX_PAIRS // 8, 8, TRITON_SORT_MAX_EXPERTS)])
def test_counting_sort_at_training_sizes_equals_torch_sort(counting_calls, tokens, top_k, num_experts):
    """Uniform, skewed (Zipf) and half-dropped ids, against torch's stable sort (the Python reference at the
    smallest size)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    probs = 1.0 / torch.arange(1, num_experts + 1, device="cuda", dtype=torch.float32) ** 1.2
    skewed = torch.multinomial(probs.expand(tokens, -1), top_k, generator=gen)
    dropped = skewed.masked_fill(torch.rand(tokens, top_k, device="cuda", generator=gen) < 0.5, num_experts)
    for ids in (torch.randint(0, num_experts, (tokens, top_k), device="cuda", generator=gen), skewed, dropped):
        got = sort_by_expert(ids, num_experts, triton=True, counting=True)
        want = sort_by_expert(ids, num_experts, triton=False)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    if tokens * top_k <= 65536 and num_experts <= 128:
        _check(ids.cpu(), num_experts)
    assert counting_calls


@requires_cuda
def test_counting_sort_is_captured_in_a_cuda_graph_and_replays_new_ids():
    ids = torch.randint(0, 128, (512, 8), generator=torch.Generator().manual_seed(0)).cuda()
    sort_by_expert(ids, 128, counting=True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = sort_by_expert(ids, 128, counting=True)
    for seed in range(3):
        ids.copy_(torch.randint(0, 129, (512, 8), generator=torch.Generator().manual_seed(seed + 1)))
        graph.replay()
        assert [t.cpu().tolist() for t in outs] == list(_reference(ids.tolist(), 128, None))


@requires_cuda
def test_kernel_is_captured_in_a_cuda_graph_and_replays_new_ids():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (16, 8), generator=gen).cuda()
    sort_by_expert(ids, 128)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = sort_by_expert(ids, 128)
    for seed in range(3):
        ids.copy_(torch.randint(0, 129, (16, 8), generator=torch.Generator().manual_seed(seed + 1)))
        graph.replay()
        want = _reference(ids.tolist(), 128, None)
        assert [t.cpu().tolist() for t in outs] == list(want)
