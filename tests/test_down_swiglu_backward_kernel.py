"""The down projection's input-gradient GEMM with the SwiGLU backward in its epilogue
(`hf_moe.moe.kernels.grouped_gemm.down_swiglu_backward`) against a float64 loop and the two kernels it fuses: the
checks of `tests/test_experts_own_gemms_cuda.py`, here also on the CPU under Triton's interpreter.

Runs on a CUDA device with TMA (sm90+), or on CPU tensors under the interpreter (`TRITON_INTERPRET=1` with Triton
installed); skips otherwise (the CI suite has no Triton). The interpreter runs the persistent kernel and its tensor
descriptors with two allowances: float16 operands (Triton 3.6's interpreter reads bfloat16 tiles through tensor
descriptors wrongly) and a device-side loop bound read with `.item()` (the interpreter converts one-element arrays
with `int()`, which NumPy 2 refuses).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from .test_experts_own_gemms_cuda import OFFSET_CASES, check_down_swiglu_backward

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)",
)


@pytest.fixture
def interpreted(monkeypatch) -> None:
    """On the CPU: the kernel taken for the operands (TMA is a CUDA property), on 3 programs, with the interpreter's
    scalar conversion that NumPy 2 accepts. On CUDA: nothing changed (skips below sm90)."""
    if CUDA:
        if torch.cuda.get_device_capability()[0] < 9:
            pytest.skip("needs a GPU with TMA (sm90+)")
        return
    from triton.runtime import interpreter

    from hf_moe.moe.kernels import grouped_gemm

    patch_tensor = interpreter._patch_lang_tensor

    def patch_with_item(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_with_item)
    monkeypatch.setattr(grouped_gemm, "supports", lambda a, b: True)
    monkeypatch.setattr(grouped_gemm, "_num_sms", lambda device_index: 3)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("counts", OFFSET_CASES)
def test_down_swiglu_backward_matches_float64_loop_and_the_unfused_kernels(interpreted, counts, in_place):
    check_down_swiglu_backward(counts, in_place, "cuda" if CUDA else "cpu", torch.bfloat16 if CUDA else torch.float16)
