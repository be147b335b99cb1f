"""Top-k with one tie rule on every device: of exactly tied values, the lower index is kept.

Selections that must not depend on the device, the row's length or the kernel (routers, whose upcycled experts tie
bitwise; the sparse-attention indexer, whose ReLU sums tie at 0) take their top-k here.
"""

from __future__ import annotations

import torch


def top_k_lower_index_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.topk(k)` over the last dim, with exactly tied scores going to the lower index on every device.

    CUDA's top-k keeps, of the values equal to the k-th, the first ones in index order, so it is used as it is. The
    CPU's does not: it picked experts 3 and 5 of the scores `[a, a, b, b, b, b]` (b > a), and which of a row's tied
    keys it keeps changes with the row's length, so there a stable descending sort decides. Values come best first.
    Of +0 and −0, CUDA's radix select keeps +0 first while the CPU's sort ties them; callers whose scores may hold −0
    and must not depend on it add +0 first.
    """
    if scores.is_cuda:
        return scores.topk(k, dim=-1)
    values, index = scores.sort(dim=-1, descending=True, stable=True)
    return values[..., :k].contiguous(), index[..., :k].contiguous()  # laid out as topk's results
