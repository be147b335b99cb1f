"""Shared by the routing tests: a router with decisive random logits, float64 reference logits and softmax, the
expected-routing assertion, and logits set exactly through an identity gate."""

import math

import torch

from hf_moe import HfMoeRouter
from hf_moe.moe.router.registry import build_router

from .conftest import assert_rel_close, tiny_config

H = 32


def make_router(**overrides) -> HfMoeRouter:
    router = build_router(tiny_config(**overrides), layer_idx=0)
    if router.weight is not None:
        with torch.no_grad():  # logits of std ≈ 1.7: decisive routing, no sigmoid saturating to 1.0 in float32
            router.weight.normal_(0.0, 0.3)
    return router.eval()


def ref_logits(router: HfMoeRouter, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ router.weight.detach().double().T


def ref_softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def descending(values: list[float], allowed=None) -> list[int]:
    candidates = range(len(values)) if allowed is None else allowed
    return sorted(candidates, key=lambda e: -values[e])


def assert_routing(out, index: list[list[int]], weights: list[list[float]], tol: float = 1e-5) -> None:
    assert out.top_k_index.tolist() == index
    assert_rel_close(out.top_k_weights, torch.tensor(weights, dtype=torch.float64), tol, "weights")


def routed_logits(router: HfMoeRouter, logits: torch.Tensor) -> torch.Tensor:
    """Make the router's logits exactly `logits` (identity gate over the first E input features)."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(router.num_experts, H))
    return torch.nn.functional.pad(logits, (0, H - router.num_experts))
