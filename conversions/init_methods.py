"""How upcycled experts, shared experts and routers are initialised from one dense SwiGLU MLP.

Dense MLP: `y = W_d · (act(W_g x) ⊙ (W_u x))`, `W_g, W_u: [I, H]`, `W_d: [H, I]`. With granularity G the
intermediate dimension is cut into G slices of width I/G, `y = Σ_s W_d[:, s] · (act(W_g[s] x) ⊙ (W_u[s] x))`.
Routed expert `e` holds slice `e mod G` and belongs to virtual group `e // G`; its router row is shared by its
whole group. If top-k is a multiple of G, top-k selects whole groups, the renormalised weights of a group sum
to G·w, and putting the factor G on `down_proj` (never on gate/up: SiLU is not homogeneous) makes every
selected group compute w·y — the dense MLP, for any router (He et al. 2024, "Upcycling Large Language Models
into Mixture of Experts"). G = 1 is plain Sparse Upcycling (Komatsuzaki et al. 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class InitMethod:
    """`copy`, `noise:STD` (add N(0, STD²)) or `drop:R` (Drop-Upcycling with re-initialised fraction R)."""

    kind: str
    value: float = 0.0

    @classmethod
    def parse(cls, text: str) -> InitMethod:
        kind, _, arg = str(text).partition(":")
        if kind == "copy" and not arg:
            return cls("copy")
        if kind in ("noise", "drop") and arg:
            try:
                value = float(arg)
            except ValueError:
                value = math.nan
            if kind == "noise" and math.isfinite(value) and value >= 0:  # nan or inf would be written as weights
                return cls(kind, value)
            if kind == "drop" and 0 <= value <= 1:
                return cls(kind, value)
        raise ValueError(f"init={text!r} is invalid: expected 'copy', 'noise:STD' with a finite STD >= 0 (e.g. "
                         f"noise:0.01) or 'drop:R' with R in [0, 1] (e.g. drop:0.5).")

    @property
    def preserves_function(self) -> bool:
        return self.kind == "copy" or self.value == 0

    def __str__(self) -> str:
        return self.kind if self.kind == "copy" else f"{self.kind}:{self.value:g}"


def _generator(seed: int, *keys: int) -> torch.Generator:
    """A generator private to (seed, keys): each expert's randomness does not depend on write order."""
    value = seed
    for k in keys:
        value = (value * 1_000_003 + k) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def drop_indices(width: int, ratio: float, seed: int, layer: int, expert: int) -> torch.Tensor:
    """The intermediate neurons of one expert that Drop-Upcycling re-initialises: a random subset of round(R·width)."""
    count = round(ratio * width)
    return torch.randperm(width, generator=_generator(seed, layer, expert, 0))[:count].sort().values


def _reinit_like(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fresh normal values with the mean and standard deviation of the values they replace."""
    if values.numel() < 2:
        return values
    mean, std = values.mean(), values.std()
    return torch.randn(values.shape, generator=generator) * std + mean


def expert_gate_up(gate: torch.Tensor, up: torch.Tensor, expert: int, granularity: int, init: InitMethod,
                   seed: int, layer: int) -> torch.Tensor:
    """`[2·I/G, H]` gate-then-up rows of routed expert `expert` from the dense `gate, up: [I, H]`."""
    width = gate.shape[0] // granularity
    rows = slice((expert % granularity) * width, (expert % granularity + 1) * width)
    if init.preserves_function:  # an exact copy: no float32 round trip
        return torch.cat([gate[rows], up[rows]])
    g, u = gate[rows].to(torch.float32, copy=True), up[rows].to(torch.float32, copy=True)
    if init.kind == "noise":
        rng = _generator(seed, layer, expert, 1)
        g += torch.randn(g.shape, generator=rng) * init.value
        u += torch.randn(u.shape, generator=rng) * init.value
    else:
        idx = drop_indices(width, init.value, seed, layer, expert)
        rng = _generator(seed, layer, expert, 1)
        g[idx] = _reinit_like(g[idx], rng)
        u[idx] = _reinit_like(u[idx], rng)
    return torch.cat([g, u])


def expert_down(down: torch.Tensor, expert: int, granularity: int, scale: float, init: InitMethod,
                seed: int, layer: int) -> torch.Tensor:
    """`[H, I/G]` down projection of routed expert `expert` from the dense `down: [H, I]`, times `scale`."""
    width = down.shape[1] // granularity
    cols = slice((expert % granularity) * width, (expert % granularity + 1) * width)
    if init.preserves_function and scale == 1:
        return down[:, cols].contiguous()
    d = down[:, cols].float() * scale
    if init.kind == "noise" and init.value > 0:
        d += torch.randn(d.shape, generator=_generator(seed, layer, expert, 2)) * init.value
    elif init.kind == "drop" and init.value > 0:
        idx = drop_indices(width, init.value, seed, layer, expert)
        d[:, idx] = _reinit_like(d[:, idx], _generator(seed, layer, expert, 2))
    return d.contiguous()


def router_normal(num_experts: int, hidden_size: int, granularity: int, std: float, seed: int,
                  layer: int) -> torch.Tensor:
    """`[E, H]` rows drawn from N(0, std²), one per virtual group and repeated within it."""
    rows = torch.randn(num_experts // granularity, hidden_size, generator=_generator(seed, layer, 10**6)) * std
    return rows.repeat_interleave(granularity, dim=0)


def router_from_centroids(centroids: torch.Tensor, granularity: int, std: float) -> torch.Tensor:
    """`[E, H]` router rows pointing at the unit `centroids [E/G, H]`, with the norm of a N(0, std²) row."""
    hidden_size = centroids.shape[1]
    return (F.normalize(centroids, dim=-1) * std * math.sqrt(hidden_size)).repeat_interleave(granularity, dim=0)


def spherical_kmeans(x: torch.Tensor, k: int, seed: int, max_iters: int = 100) -> torch.Tensor:
    """Unit centroids `[k, H]` of the directions of `x [T, H]` (cosine k-means, k-means++ seeding).

    Router logits are dot products, so clustering directions (not Euclidean positions) is what makes a
    token's largest logit point at its cluster.
    """
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least {k} calibration tokens (one per virtual group), got {x.shape[0]}; "
                         f"use a longer calibration text.")
    rng = _generator(seed, 7)
    x = F.normalize(x.double(), dim=-1)
    centroids = x[torch.randint(x.shape[0], (1,), generator=rng)]
    while centroids.shape[0] < k:
        distance = (1 - (x @ centroids.T).max(dim=1).values).clamp(min=0)
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        centroids = torch.cat([centroids, x[torch.multinomial(weights, 1, generator=rng)]])
    assign = None
    for _ in range(max_iters):
        new_assign = (x @ centroids.T).argmax(dim=1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        if empty.any():  # re-seed empty clusters with the tokens farthest from their centroid
            far = (x * centroids[assign]).sum(-1).argsort()[: int(empty.sum())]
            sums[empty] = x[far]
        centroids = F.normalize(sums, dim=-1)
    return centroids.float()
