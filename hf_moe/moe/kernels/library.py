"""How hf-moe's Triton kernels meet torch.compile and torch.export: each launcher is also a torch custom op,
`hf_moe::<name>` (`register_kernel_op`).

While torch.compile or torch.export trace, a call is the op: one opaque node whose output shapes come from its fake
implementation, so dynamo traces the MoE block as one graph and inductor schedules the code around it. In eager mode
the launcher runs directly: the dispatcher would add host time to every launch, which few-token steps (decode) pay
in full. The ops are functional (no argument is mutated) except the optimizer's row update, which declares the
tensors it updates in place; autograd stays with the `autograd.Function`s that call
them (the experts' two nodes, the router's softmax top-k), whose forward and backward dynamo traces, so no op needs
`register_autograd`. The launchers read shapes, strides and pointers only, never a value on the device (grids are
sized from upper bounds such as the number of rows), so nothing waits for the GPU.

This module imports no Triton: it registers what a kernel module hands it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def register_kernel_op(name: str, launcher: F, fake: Callable, mutates_args: tuple[str, ...] = ()) -> F:
    """Register `launcher` (fully type-annotated, returning new tensors or updating `mutates_args` in place) as the
    custom op `hf_moe::{name}` with `fake` as its fake (meta) implementation. Returns the function to call: the op
    while torch.compile or torch.export trace, `launcher` itself otherwise."""
    op = torch.library.custom_op(f"hf_moe::{name}", launcher, mutates_args=mutates_args)
    op.register_fake(fake)

    @functools.wraps(launcher)
    def call(*args, **kwargs):
        return (op if torch.compiler.is_compiling() else launcher)(*args, **kwargs)

    return call  # type: ignore[return-value]
