"""CUDA graphs for the MoE blocks of a model in training: each block's forward and backward replay as two graphs.

In eager mode an MoE block issues ~60-100 small kernels per forward (router, sort, gathers, dispatch), and the host
that issues them falls behind the GPU; under expert parallelism every all-to-all adds ~100-300 µs of host time on
top. Captured in CUDA graphs (`torch.cuda.make_graphed_callables`), the blocks cost one launch per forward and one
per backward. Needs: CUDA, fixed shapes (the batch size and sequence length given here), nothing in the block that
waits for the GPU (under expert parallelism the padded dispatch, `padded_dispatch=True`), and blocks called in the
same order every step (a decoder does). Calls that do not match what was captured (another shape, eval mode, no
gradients, generation) run the block eagerly, as before.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import warnings
import weakref

import torch
from torch import nn

from .block import HfMoeSparseMoeBlock, moe_blocks
from .experts import base_layer
from .types import RouterOutput

# RouterOutput tensors a graphed block returns next to its output (the router's statistics computed in the graph);
# z_loss and drop_fraction follow when the router set them (or its statistics compute the z_loss), otherwise they are
# computed from these on first read, outside the graph; token_entropy follows when the router's statistics give one.
_ROUTING_TENSORS = ("logits", "top_k_index", "top_k_weights", "tokens_per_expert", "aux_loss")
_OPTIONAL_TENSORS = ("probs", "z_loss", "drop_fraction", "token_entropy")
_NOT_DIFFERENTIABLE = ("top_k_index", "tokens_per_expert", "drop_fraction")


class _BlockTensors(nn.Module):
    """One MoE block as a function of tensors only (what `make_graphed_callables` captures): `(hidden_states,
    [token_mask]) -> (output, *routing tensors)`."""

    def __init__(self, block: HfMoeSparseMoeBlock, optional: tuple[str, ...]) -> None:
        super().__init__()
        self.block = block
        self.optional = optional

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        out, routing = self.block.compute(hidden_states, token_mask)
        return (out, *(getattr(routing, name) for name in _ROUTING_TENSORS + self.optional))


class _GraphedBlock:
    """The captured graphs of one block and the calls they serve (plain object: not a submodule of the block)."""

    def __init__(self, graphed: nn.Module, shape: torch.Size, dtype: torch.dtype, masked: bool,
                 optional: tuple[str, ...], capacity: int | None, block: nn.Module) -> None:
        self.graphed, self.shape, self.dtype, self.masked = graphed, shape, dtype, masked
        self.optional, self.capacity = optional, capacity
        self.parameters = parameter_state(block)
        self._pending: weakref.ref | None = None  # autograd node of the last replay, until its backward starts

    def serves(self, block: nn.Module, hidden_states: torch.Tensor, token_mask: torch.Tensor | None) -> bool:
        """Whether this call of `block` replays the graphs: a training call with gradients at the captured shape,
        dtype and mask presence, on the parameters that were captured. When those changed (an adapter added, a
        weight replaced, moved or frozen) the graphs can never serve again: they are dropped with a warning, and
        the block runs eagerly from then on."""
        if not (
            block.training
            and torch.is_grad_enabled()
            and hidden_states.shape == self.shape
            and hidden_states.dtype == self.dtype
            and hidden_states.is_cuda
            and (token_mask is not None) == self.masked
        ):
            return False
        if parameter_state(block) != self.parameters:
            warnings.warn(
                "An MoE block's parameters changed after capture_moe_cuda_graphs (an adapter added, a weight replaced, "
                "moved or frozen); its CUDA graphs would still read the old ones, so they are dropped and the block "
                "runs eagerly. Capture after such changes (after get_peft_model, for instance).",
                stacklevel=3,
            )
            block.set_cuda_graphs(None)
            return False
        return True

    def __call__(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, RouterOutput]:
        if self._pending is not None and self._pending() is not None:
            raise RuntimeError(
                "A CUDA-graphed MoE block was called again before the backward of its previous call: the replay "
                "would overwrite the buffers that backward reads. Run backward after each forward (accumulate "
                "gradients micro-batch by micro-batch, not over one summed loss), or drop the previous outputs first."
            )
        out, *tensors = self.graphed(hidden_states, *([token_mask] if self.masked else []))
        if out.grad_fn is not None:
            self._pending = weakref.ref(out.grad_fn)
            out.grad_fn.register_prehook(functools.partial(_backward_started, weakref.ref(self)))
        fields = dict(zip(_ROUTING_TENSORS + self.optional, tensors))
        for name in _NOT_DIFFERENTIABLE:  # copies: the graph's buffers are overwritten by the next replay
            if fields.get(name) is not None:
                fields[name] = fields[name].detach().clone()
        routing = RouterOutput(**fields, token_mask=token_mask, capacity=self.capacity)
        return out, routing

    def __deepcopy__(self, memo: dict) -> None:
        """A copy of a captured model (a reference model, an EMA copy) runs its blocks eagerly: these graphs read
        the original's weights."""
        return None


def _backward_started(graphed: weakref.ref, grad_outputs: tuple[torch.Tensor, ...]) -> None:
    """Pre-hook of a replay's autograd node (holding no reference to the graphs, which must be freeable)."""
    owner = graphed()
    if owner is not None:
        owner._pending = None


def parameter_state(module: nn.Module) -> tuple[tuple[int, int, bool], ...]:
    """What CUDA graphs of `module` depend on: each parameter's identity, memory and whether it takes a gradient."""
    return tuple((id(p), p.data_ptr(), p.requires_grad) for p in module.parameters())


@contextlib.contextmanager
def graph_owned_cublas_workspaces():
    """Around a capture: the graph's cuBLAS workspace allocated in the graph's own memory. cuBLAS keeps one workspace
    per handle and stream, allocated on first use; a graph captured on a stream whose workspace existed before (the
    warm-up steps made it) writes to memory the workspace table owns, which anything that clears the table frees —
    torch.compile's CUDA graphs clear it around each of their captures — and the graph's replays then write to freed
    memory (an illegal address once the allocator hands it back to the driver). Cleared before the capture, the
    workspace is allocated in the graph's pool and lives as long as the graph; cleared after, eager matmuls do not
    share the graph's memory. (torch's own CUDA-graph trees do the same; a CPU-only torch has no table.)"""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)
    clear()
    try:
        yield
    finally:
        clear()


_CUDA_GRAPH = torch.cuda.graph


@contextlib.contextmanager
def _capture(*args, **kwargs):
    """`torch.cuda.graph` in thread-local mode, with the graph's own cuBLAS workspace."""
    with graph_owned_cublas_workspaces(), _CUDA_GRAPH(*args, **{**kwargs, "capture_error_mode": "thread_local"}):
        yield


@contextlib.contextmanager
def _thread_local_capture():
    """Captures in thread-local mode: `make_graphed_callables` captures in global mode, where a CUDA call from any
    other thread (NCCL's watchdog querying its events, under torch.distributed) invalidates the capture; and with
    [`graph_owned_cublas_workspaces`] around each capture."""
    torch.cuda.graph = _capture
    try:
        yield
    finally:
        torch.cuda.graph = _CUDA_GRAPH


def capture_moe_cuda_graphs(
    model: nn.Module, batch_size: int, sequence_length: int, attention_mask: bool = False, warmup_steps: int = 3
) -> nn.Module:
    """Capture every MoE block of `model` (on a CUDA device, in training mode, weights in their final place and
    dtype) in CUDA graphs for batches of `batch_size × sequence_length` tokens (per process), with a 2-D
    `attention_mask` passed to the model if `attention_mask`. Returns `model`; call after `expert_parallelize` /
    `from_pretrained(..., expert_parallel_size=P, padded_dispatch=True)`, after adding PEFT adapters
    (`get_peft_model`), and before DDP wraps it (`accelerator.prepare`). Collective under expert parallelism: call
    on every rank.

    The graphs read the weights in place (in-place optimizer steps are fine). Moving the model, replacing or
    freezing a block's parameters or adding adapters afterwards drops that block's graphs, with a warning, and the
    block runs eagerly from then on.

    Each forward must be followed by its backward before the next forward at the captured shape (a replay
    overwrites the buffers the previous backward reads: accumulate gradients micro-batch by micro-batch, not over
    one summed loss; a second forward while the first one's outputs are alive and its backward has not started
    raises), and a second backward through the same forward (`retain_graph=True`) is not supported. Copies of the
    model (`copy.deepcopy`) run their blocks eagerly.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "capture_moe_cuda_graphs: capture before DDP wraps the model (before accelerator.prepare): DDP keeps "
            "autograd nodes of the default stream that a capture must not reach."
        )
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("capture_moe_cuda_graphs: the model has no MoE block (HfMoeSparseMoeBlock).")
    first = base_layer(blocks[0].experts).down_proj
    if not first.is_cuda:
        raise ValueError(
            f"capture_moe_cuda_graphs needs the model on a CUDA device; its weights are on {first.device}."
        )
    if first.dtype != torch.bfloat16:
        raise ValueError(
            f"capture_moe_cuda_graphs needs bf16 weights; they are {first.dtype} (the experts' other paths read "
            "their offsets on the host, which a CUDA graph cannot contain)."
        )
    if not model.training:
        raise ValueError("capture_moe_cuda_graphs captures training steps: call model.train() first.")
    if getattr(model, "is_gradient_checkpointing", False):
        raise ValueError(
            "capture_moe_cuda_graphs does not combine with gradient checkpointing (the recomputed forward would replay "
            "the graph whose buffers backward reads): call model.gradient_checkpointing_disable() first."
        )
    for block in blocks:
        if not block.dispatcher.capturable:
            raise ValueError(
                "capture_moe_cuda_graphs under expert parallelism needs padded dispatch without the backward overlap "
                "(padded_dispatch=True, overlap_weight_grads=False): the default dispatch waits for the GPU once per "
                "layer, which a CUDA graph cannot contain."
            )
        router = base_layer(block.router)
        if router.reads_token_ids:
            raise ValueError(
                f"capture_moe_cuda_graphs: {type(router).__name__} routes by token id (hash routing), and the graphs "
                "take no token ids."
            )
        if getattr(router, "expert_bias", None) is not None:
            raise ValueError(
                "capture_moe_cuda_graphs: routers with an expert_bias (aux-loss-free balancing) accumulate their "
                "selection counts on the Python side, which a replayed graph would skip; train them eagerly."
            )
    shape = torch.Size((batch_size, sequence_length, first.shape[1]))  # down_proj [E, H, I]
    dtype = first.dtype
    functions, samples, probes = [], [], []
    for block in blocks:
        block.set_cuda_graphs(None)
        device = base_layer(block.experts).down_proj.device
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        mask = ()
        if attention_mask:
            mask = (torch.ones(batch_size * sequence_length, dtype=torch.bool, device=device),)
        with torch.no_grad():  # which optional routing tensors this router sets
            _, routing = block.compute(x, *mask)
        optional = tuple(
            n for n in _OPTIONAL_TENSORS
            if isinstance(routing.carried(n), torch.Tensor)
        )
        functions.append(_BlockTensors(block, optional))
        samples.append((x, *mask))
        probes.append((optional, routing.capacity))
    # The graphs' memory pool cannot reuse what the caching allocator keeps cached for eager steps: hand that back to
    # the driver first, so that a capture does not run out of memory where eager training fits.
    torch.cuda.empty_cache()
    try:
        with _thread_local_capture():
            graphed = torch.cuda.make_graphed_callables(
                tuple(functions), tuple(samples), num_warmup_iters=warmup_steps, allow_unused_input=True
            )
    except RuntimeError as e:  # OutOfMemoryError included
        cause = _capture_error(e)
        broken = (
            "" if cause is e else " A capture that fails half way leaves this process's CUDA graph state broken "
            "(later captures fail with 'operation failed due to a previous error during capture', and the random "
            "number generator may refuse to run): restart the process before capturing again."
        )
        if isinstance(cause, torch.OutOfMemoryError):
            raise torch.OutOfMemoryError(
                "capture_moe_cuda_graphs ran out of GPU memory: the graphs keep a memory pool of their own for the "
                "blocks' activations and weight gradients, next to the memory of eager training. Capture fewer tokens "
                f"(batch_size × sequence_length, here {batch_size} × {sequence_length}) or free memory first.{broken} "
                f"Cause: {cause}"
            ) from e
        router, experts = base_layer(blocks[0].router), base_layer(blocks[0].experts)
        raise RuntimeError(
            "capture_moe_cuda_graphs: an MoE block could not be captured; something in its forward or backward waits "
            f"for the GPU or copies to the host (router {type(router).__name__}, experts implementation "
            f"{experts.config._experts_implementation!r}; hf_moe_grouped is capturable).{broken} Cause: {cause}"
        ) from e
    for block, function, (optional, capacity) in zip(blocks, graphed, probes):
        block.set_cuda_graphs(_GraphedBlock(function, shape, dtype, attention_mask, optional, capacity, block))
    return model


def _capture_error(error: BaseException) -> BaseException:
    """The error that made a capture fail. An error inside the captured region invalidates the capture, and leaving
    `torch.cuda.graph` then raises CUDA's "operation failed due to a previous error during capture", which hides it
    (as the exception's context)."""
    context = error.__context__
    if "previous error during capture" in str(error) and isinstance(context, Exception):
        return context
    return error


def release_moe_cuda_graphs(model: nn.Module) -> nn.Module:
    """Drop the CUDA graphs of every MoE block of `model` and free their memory pool; the blocks run eagerly from
    then on. Returns `model`.

    Under expert parallelism call it on every rank before `torch.distributed.destroy_process_group()` (or
    `accelerator.end_training()`): NCCL cannot destroy a communicator that live graphs captured, and the call then
    hangs (pytorch/pytorch#115388). Whatever else holds a graphed step (its outputs, a loss, gradients still in
    `.grad`: `optimizer.zero_grad()`, `accelerator`'s list of prepared models: `accelerator.free_memory()`) keeps
    the graphs or their memory alive too; drop those first.
    """
    for block in moe_blocks(model):
        block.set_cuda_graphs(None)
    gc.collect()  # each block and its graphs reference each other
    return model
