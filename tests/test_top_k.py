"""`hf_moe.top_k.top_k_lower_index_first`, the tie rule routers and the sparse-attention indexer select by: of
exactly tied values the lower index is kept, on CPU and CUDA, at every row length (CUDA's top-k takes other code
paths for long rows), and appended lower values (a static cache's unwritten slots) change nothing. The reference is
numpy's lexicographic sort by (−value, index)."""

import numpy as np
import pytest
import torch

from hf_moe.top_k import top_k_lower_index_first

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device"))]


def reference(values: torch.Tensor, k: int) -> np.ndarray:
    """Per row, the indices of the k largest values, ties to the lower index, best first."""
    rows = values.double().cpu().numpy()
    index = np.arange(rows.shape[-1])
    return np.stack([np.lexsort((index, -row))[:k] for row in rows])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("rows", "length", "k"), [(64, 9, 3), (16, 4096, 64), (4, 70_000, 2048), (2, 300_000, 2048)])
def test_ties_go_to_the_lower_index_at_every_length(device, rows, length, k):
    """Values from 5 levels (ReLU sums tie at 0 like this), so every row ties across the k-th place."""
    generator = torch.Generator().manual_seed(length)
    values = torch.randint(0, 5, (rows, length), generator=generator).float().to(device)
    got_values, got_index = top_k_lower_index_first(values, k)
    want = reference(values, k)
    assert np.array_equal(np.sort(got_index.cpu().numpy(), axis=-1), np.sort(want, axis=-1))
    assert torch.equal(got_values, values.gather(-1, got_index))
    assert (got_values[:, :-1] >= got_values[:, 1:]).all(), "values not best first"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [float("-inf"), torch.finfo(torch.float32).min])
def test_appended_masked_slots_change_no_selection(device, masked):
    """A row of 6 keys, 4 of them tied at 0, and the same row with 1..300 masked slots after it keep the same keys;
    a row with fewer unmasked keys than k keeps all of them and the lowest masked slots."""
    row = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0, 0.0]], device=device)
    want = top_k_lower_index_first(row, 3)[1].sort().values
    assert want.tolist() == [[0, 1, 4]]
    for extra in (1, 2, 6, 300):
        padded = torch.cat([row, torch.full((1, extra), masked, device=device)], dim=-1)
        assert torch.equal(top_k_lower_index_first(padded, 3)[1].sort().values, want), extra
        if padded.shape[-1] >= 8:
            assert top_k_lower_index_first(padded, 8)[1].sort().values.tolist() == [list(range(8))]


@pytest.mark.parametrize("device", DEVICES)
def test_signed_zeros_tie_on_the_cpu_and_rank_plus_zero_first_on_cuda(device):
    """The one documented difference between the devices: −0 at index 0, +0 at index 1, one place left."""
    row = torch.tensor([[-0.0, 0.0, -1.0]], device=device)
    assert top_k_lower_index_first(row, 1)[1].item() == (1 if device == "cuda" else 0)
    assert top_k_lower_index_first(row + 0.0, 1)[1].item() == 0, "adding +0 makes them equal"
