"""Fine-grained FP8 checkpoints (transformers' `quant_method: "fp8"`, as DeepSeek-V3/R1, Qwen3-*-FP8 and MiniMax-M2
ship) read as the float tensors they stand for.

A quantized tensor `W` is stored as float8 e4m3 beside `<W>_scale_inv` (`...weight` → `...weight_scale_inv`, a fused
`experts.gate_up_proj` → `experts.gate_up_proj_scale_inv`): one float scale per block of `weight_block_size =
[rows, cols]` over `W`'s last two dims, the edge blocks partial, and `W` stands for `W.float() * scale` with each scale
spread over its block. A fused expert tensor `[E, R, C]` is blocked per expert (scales `[E, ⌈R/rows⌉, ⌈C/cols⌉]`,
transformers' `FP8Experts`) or as one `[E·R, C]` matrix (scales `[⌈E·R/rows⌉, ⌈C/cols⌉]`, blocks that straddle
experts). Which tensors are quantized is read from the tensors themselves (float8 with a scale beside it); the others
(norms, routers, biases, `modules_to_not_convert`) read as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from ..checkpoint_files import SafetensorsReader, TensorInfo
from .family import InteropError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SCALE_SUFFIX = "_scale_inv"
# quantization_config keys transformers' FineGrainedFP8Config reads or writes (MiniMax-M2 names the skip list
# `ignored_layers`); any other key might change what the tensors mean.
_KNOWN_KEYS = {"quant_method", "activation_scheme", "weight_block_size", "fmt", "modules_to_not_convert",
               "ignored_layers", "modules_to_convert", "dequantize", "scale_fmt", "expert_dtype"}
_E4M3_NAMES = (None, "e4m3", "float8_e4m3fn")


@dataclass(frozen=True)
class Fp8Blocks:
    """The block quantization of a checkpoint: `block = (rows, cols)` of one scale."""

    block: tuple[int, int]

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        """The scales of a `[rows, cols]` matrix: one per block, edge blocks partial."""
        return -(-rows // self.block[0]), -(-cols // self.block[1])

    def scale_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The scale shapes a quantized tensor of `shape` may have: blocks over each matrix of its last two dims,
        and for a fused `[E, R, C]` tensor also blocks over it seen as one `[E·R, C]` matrix."""
        if len(shape) < 2:
            return []
        *lead, rows, cols = shape
        shapes = [(*lead, *self.grid(rows, cols))]
        if len(lead) == 1:
            shapes.append(self.grid(lead[0] * rows, cols))
        return shapes


def fp8_blocks(cfg: PretrainedConfig) -> Fp8Blocks | None:
    """The FP8 block quantization `cfg.quantization_config` declares (None for an unquantized config); refuses a
    quantization hf-moe cannot read exactly, naming the value. Defaults are transformers' (`FineGrainedFP8Config`)."""
    qc: Any = getattr(cfg, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    method = qc.get("quant_method")
    if method != "fp8":
        raise _refuse("quant_method", method, "hf-moe imports float checkpoints and fine-grained FP8 ones "
                      "(quant_method 'fp8', block scales in `*_scale_inv` tensors) only")
    unknown = sorted(set(qc) - _KNOWN_KEYS)
    if unknown:
        raise InteropError(f"quantization_config field(s) {unknown} are not known to hf-moe's FP8 reader, which cannot "
                           "tell whether they change what the tensors mean; refusing rather than ignoring them.")
    scheme = qc.get("activation_scheme", "dynamic")
    if str(scheme).lower() != "dynamic":
        raise _refuse("activation_scheme", scheme, "static activation scales (`activation_scale` tensors) clip the "
                      "activations of transformers' FP8 matmuls, which a float model does not; only 'dynamic' "
                      "(scales computed from each input) reads exactly as dequantized weights")
    block = qc.get("weight_block_size", [128, 128])
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise _refuse("weight_block_size", block, "expected two positive integers [rows, cols] (per-tensor FP8 "
                      "scales are not read)")
    for key, expected, values in (("fmt", "e4m3", _E4M3_NAMES), ("scale_fmt", "float", (None, "float")),
                                  ("expert_dtype", "fp8", (None, "fp8"))):
        if qc.get(key) not in values:
            raise _refuse(key, qc[key], f"expected {expected!r}: hf-moe reads float8 e4m3 weights with float scales")
    if qc.get("modules_to_convert"):
        raise _refuse("modules_to_convert", qc["modules_to_convert"], "FP8 embeddings carry a per-tensor "
                      "`weight_scale` hf-moe does not read")
    for key in ("modules_to_not_convert", "ignored_layers"):
        value = qc.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise _refuse(key, value, "expected a list of module names")
    return Fp8Blocks((block[0], block[1]))


def _refuse(field: str, value: Any, why: str) -> InteropError:
    return InteropError(f"quantization_config.{field}={value!r} cannot be read exactly: {why}.")


def compute_dtype(cfg: PretrainedConfig) -> torch.dtype:
    """The dtype a quantized checkpoint computes in: its config's `dtype` (`torch_dtype`), else bfloat16, the dtype
    transformers dequantizes FP8 weights to when it has no other."""
    dtype = getattr(cfg, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in FLOAT_DTYPES else torch.bfloat16


def scale_pairs(blocks: Fp8Blocks | None, tensors: dict[str, TensorInfo], where: str) -> dict[str, str]:
    """Quantized tensor name → its scale's name, for every float8 tensor of a quantized checkpoint (`tensors`: its
    header; `{}` when `blocks` is None). Refuses, naming the tensor: float8 tensors without quantization_config, a
    float8 tensor other than e4m3, one without its scale, a scale without its tensor, beside an unquantized one or
    not float, and a scale whose shape is not a block grid of its tensor."""
    float8 = {n for n, info in tensors.items() if str(info.dtype).startswith(("F8", "torch.float8"))}
    if blocks is None:
        if float8:
            raise InteropError(f"{where}: float8 tensor(s) {sorted(float8)[:4]} but config.json has no "
                               "quantization_config; hf-moe reads FP8 checkpoints that declare their block scales "
                               "(quant_method 'fp8').")
        return {}
    fp8 = sorted(n for n in float8 if not n.endswith(SCALE_SUFFIX))
    scales = {n for n in tensors if n.endswith(SCALE_SUFFIX)}
    orphans = sorted(n for n in scales if n.removesuffix(SCALE_SUFFIX) not in tensors)
    if orphans:
        raise InteropError(f"{where}: scale(s) {orphans[:4]} without the tensor they scale "
                           f"({orphans[0].removesuffix(SCALE_SUFFIX)!r} is not in the checkpoint).")
    odd = sorted(f"{n} ({tensors[n].dtype})" for n in fp8 if tensors[n].dtype != torch.float8_e4m3fn)
    if odd:
        raise InteropError(f"{where}: float8 tensor(s) {odd[:4]}; hf-moe reads float8 e4m3 (float8_e4m3fn) only.")
    unscaled = sorted(n for n in fp8 if n + SCALE_SUFFIX not in tensors)
    if unscaled:
        raise InteropError(f"{where}: float8 tensor(s) {unscaled[:4]} without their block scales "
                           f"({unscaled[0] + SCALE_SUFFIX!r}); their values cannot be known.")
    pairs = {n.removesuffix(SCALE_SUFFIX): n for n in sorted(scales)}
    for name, scale in pairs.items():
        info = tensors[scale]
        if name not in fp8:
            raise InteropError(f"{where}: {scale} scales {name}, which is stored as {tensors[name].dtype}, not "
                               "float8; a scale beside an unquantized tensor has no meaning.")
        if info.dtype not in FLOAT_DTYPES:
            raise InteropError(f"{where}: {scale} is {info.dtype}; hf-moe reads float scales only "
                               "(quantization_config.scale_fmt 'float').")
        expected = blocks.scale_shapes(tensors[name].shape)
        if tuple(info.shape) not in expected:
            raise InteropError(f"{where}: {scale} has shape {list(info.shape)}; a {list(tensors[name].shape)} tensor "
                               f"in blocks of {list(blocks.block)} has scales of shape "
                               f"{' or '.join(str(list(s)) for s in expected)}.")
    return pairs


def dequantize(values: torch.Tensor, scales: torch.Tensor, block: tuple[int, int],
               first_row: int = 0) -> torch.Tensor:
    """`values.float() * scale` per block, in float32 (the product of an e4m3 value and a float32 scale, rounded
    once). `values [..., R, C]` are rows `first_row ...` of the blocked matrix and `scales [..., S, ⌈C/cols⌉]` its
    scales from block row `first_row // rows` on. Scales are spread one block column at a time, so no scale tensor
    of `values`' size is ever made."""
    rows = (torch.arange(values.shape[-2]) + first_row) // block[0] - first_row // block[0]
    per_row = scales.to(torch.float32).index_select(-2, rows)
    out = values.to(torch.float32)
    for j in range(per_row.shape[-1]):
        out[..., j * block[1]:(j + 1) * block[1]] *= per_row[..., j:j + 1]
    return out


def read_dequantized(reader: SafetensorsReader, name: str, scale: str, block: tuple[int, int],
                     start: int | None = None, end: int | None = None) -> torch.Tensor:
    """The float32 values of the quantized tensor `name` (rows `[start, end)` of its dim 0 when given: the experts of
    a fused tensor), reading only the scales those rows need."""
    values = reader.get(name, start, end)
    shape, scale_shape = reader.tensors[name].shape, reader.tensors[scale].shape
    if len(scale_shape) == len(shape):  # blocks over each matrix of the last two dims
        return dequantize(values, reader.get(scale, start, end), block)
    # a fused [E, R, C] tensor blocked as one [E·R, C] matrix: the rows of experts [start, end) begin inside a block
    rows = shape[1]
    first, last = (start or 0) * rows, (shape[0] if end is None else end) * rows
    flat = values.reshape(-1, shape[2])
    scales = reader.get(scale, first // block[0], -(-last // block[0]))
    return dequantize(flat, scales, block, first).reshape(values.shape)
