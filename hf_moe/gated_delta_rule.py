"""The gated delta rule (Yang, Kautz & Hatamizadeh, "Gated Delta Networks", 2024): the recurrence of Gated DeltaNet.

Per head, a state `S` (`[key_dim, value_dim]`) is decayed, corrected towards the current value and read by the
query at every token:

    S_t = exp(g_t) · S_{t-1} + k_t · δ_tᵀ,   δ_t = β_t · (v_t − (exp(g_t) · S_{t-1})ᵀ k_t),   o_t = S_tᵀ q_t

with `g_t ≤ 0` the log decay and `β_t ∈ (0, 1)` the write strength. `recurrent_gated_delta_rule` runs it token by
token (decode); `chunk_gated_delta_rule` gives the same result with matrix products inside chunks and the recurrence
only across chunks (prefill and training). Both take queries and keys already normalised and scaled, one key head per
value head, in the compute dtype (float32, or float64); no host syncs, so both compile with `fullgraph=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def recurrent_gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule one token at a time. `query`/`key` `[B, T, H, Dk]`, `value` `[B, T, H, Dv]`, `log_decay`/`beta`
    `[B, T, H]`, `initial_state` `[B, H, Dk, Dv]` (zeros if None). Returns the outputs `[B, T, H, Dv]` and the
    state after the last token."""
    batch, length, heads, key_dim = key.shape
    state = initial_state if initial_state is not None else key.new_zeros(batch, heads, key_dim, value.shape[-1])
    outputs = []
    for t in range(length):
        state = state * log_decay[:, t, :, None, None].exp()
        k_t = key[:, t].unsqueeze(-2)  # [B, H, 1, Dk]
        delta = beta[:, t, :, None] * (value[:, t] - (k_t @ state).squeeze(-2))
        state = state + k_t.transpose(-1, -2) @ delta.unsqueeze(-2)
        outputs.append((query[:, t].unsqueeze(-2) @ state).squeeze(-2))
    return torch.stack(outputs, dim=1), state


def _chunked(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """`[B, T, H, ...]` → `[B, H, N, C, ...]`, zero-padded at the end to whole chunks (a padded token has zero key,
    write strength and log decay, so it changes neither the outputs before it nor the final state)."""
    x = x.transpose(1, 2)
    pad = -x.shape[2] % chunk_size
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(x.shape[0], x.shape[1], -1, chunk_size, *x.shape[3:])


def chunk_gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule in chunks of `chunk_size` tokens; same arguments and results as `recurrent_gated_delta_rule`.

    Inside a chunk entering with state `S₀`, with `γ_t` the log decay summed from the chunk's start to token `t`:
    the corrections solve the unit lower-triangular system `(I + L) δ = β v − β e^γ K S₀` with
    `L_ts = β_t e^{γ_t−γ_s} k_t·k_s` (s < t), so `δ = U − W S₀` where `U`, `W` are solved for every chunk at once;
    then `o_t = e^{γ_t} q_tᵀ S₀ + Σ_{s≤t} e^{γ_t−γ_s} (q_t·k_s) δ_s` and the state leaving the chunk is
    `e^{γ_C} S₀ + Σ_s e^{γ_C−γ_s} k_s δ_sᵀ`. Every exponent is ≤ 0, so nothing overflows.
    """
    length = key.shape[1]
    q, k, v = (_chunked(x, chunk_size) for x in (query, key, value))  # [B, H, N, C, D]
    g, b = (_chunked(x, chunk_size) for x in (log_decay, beta))  # [B, H, N, C]
    gamma = g.cumsum(-1)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=k.device).tril()
    # e^{γ_t−γ_s} for s ≤ t, 0 above the diagonal (masked before exp: γ_t−γ_s > 0 there and may overflow)
    pair_decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    system = b[..., :, None] * (k @ k.transpose(-1, -2)) * pair_decay  # strictly lower part is L; diagonal unread
    u, w = (torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
            for rhs in (b[..., None] * v, (b * gamma.exp())[..., None] * k))
    scores = (q @ k.transpose(-1, -2)) * pair_decay
    q_from_start = q * gamma.exp()[..., None]
    k_to_end = (k * (gamma[..., -1:] - gamma).exp()[..., None]).transpose(-1, -2)
    chunk_decay = gamma[..., -1].exp()[..., None, None]

    batch, heads, chunks = k.shape[:3]
    state = initial_state if initial_state is not None else k.new_zeros(batch, heads, k.shape[-1], v.shape[-1])
    outputs = []
    for n in range(chunks):
        delta = u[:, :, n] - w[:, :, n] @ state
        outputs.append(q_from_start[:, :, n] @ state + scores[:, :, n] @ delta)
        state = chunk_decay[:, :, n] * state + k_to_end[:, :, n] @ delta
    out = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :length]  # [B, H, T, Dv]
    return out.transpose(1, 2), state
