"""Expert weight gradients deferred to run while an expert-parallel all-to-all is in flight.

In backward, an expert layer under expert parallelism must send its input gradient back over the network before
the layers below can go on, but its weight gradients are needed only by the optimizer. So the experts' backward
computes the input gradient, hands its two weight-gradient GEMMs to a [`WeightGradQueue`] and returns; the
dispatcher's backward all-to-alls start asynchronously, run the oldest pending GEMM while the bytes travel, then
wait. Whatever is still pending when the backward pass ends runs then (a final autograd callback), so `.grad`
is complete when `backward()` returns, exactly as without deferral.

Deferred gradients are accumulated into `.grad` directly (as autograd's `AccumulateGrad` would), so tensor hooks
on those expert parameters do not fire; that is why deferral only applies to leaf parameters under expert
parallelism, where DDP ignores the experts and `finish_gradients` syncs them after backward.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch


class WeightGradQueue:
    """Weight-gradient work handed over by experts' backward; run by the all-to-alls it can hide behind."""

    def __init__(self) -> None:
        self._pending: deque[Callable[[], None]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def defer(self, work: Callable[[], None]) -> None:
        """Queue `work`; call from inside a backward pass (which then runs it when it ends, at the latest)."""
        self._pending.append(work)
        torch.autograd.Variable._execution_engine.queue_callback(self.run_all)

    def run_oldest(self) -> None:
        if self._pending:
            self._pending.popleft()()

    def run_all(self) -> None:
        while self._pending:
            self._pending.popleft()()


WEIGHT_GRADS = WeightGradQueue()
"""The process's queue: every expert-parallel layer shares it, so a layer's weight gradients can also hide behind
the next layer's (in backward order) first all-to-all."""
