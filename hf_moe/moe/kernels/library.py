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


_LIBRARY = torch.library.Library("hf_moe", "FRAGMENT")


def register_kernel_op(name: str, launcher: F, fake: Callable, mutates_args: tuple[str, ...] = ()) -> F:
    """Register `launcher` (fully type-annotated, returning new tensors or updating `mutates_args` in place) as the
    custom op `hf_moe::{name}` with `fake` as its fake (meta) implementation. Returns the function to call: the op
    while torch.compile or torch.export trace, `launcher` itself otherwise.

    A functional op is defined with its schema and `launcher` as its one kernel (`torch.library.Library`), which the
    dispatcher calls directly: `torch.library.custom_op` wraps every call in Python (output aliasing check, autograd
    layer), ~75 µs of host time per call on an H100's host, more than the launch itself, paid by every call of the
    op in compiled code (docs/decisions/compile.md). Autograd never reaches these ops (see above); the mutating
    op keeps `custom_op`, which bumps the version counters of what it updates."""
    if mutates_args:
        op = torch.library.custom_op(f"hf_moe::{name}", launcher, mutates_args=mutates_args)
        op.register_fake(fake)
    else:
        _LIBRARY.define(name + torch.library.infer_schema(launcher, mutates_args=()))
        _LIBRARY.impl(name, launcher, "CompositeExplicitAutograd")
        torch.library.register_fake(f"hf_moe::{name}", fake, lib=_LIBRARY)
        op = getattr(torch.ops.hf_moe, name).default

    @functools.wraps(launcher)
    def call(*args, **kwargs):
        return (op if torch.compiler.is_compiling() else launcher)(*args, **kwargs)

    return call  # type: ignore[return-value]
