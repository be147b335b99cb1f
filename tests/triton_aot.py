"""Compile every Triton kernel specialization the interpreter tests launch for a Hopper GPU, without one.

Triton's interpreter (`TRITON_INTERPRET=1`) checks what a kernel computes but never compiles it: a kernel can pass every
interpreter test and still fail to compile, spill registers or need more shared memory than an SM has. Two steps:

    HF_MOE_TRITON_RECORD=launches.jsonl TRITON_INTERPRET=1 python -m pytest tests/test_product_key_kernels.py ...
    python tests/triton_aot.py launches.jsonl        # each distinct launch compiled for sm_90 (ptxas included)

The first records each launch (kernel, argument types, constexpr values, warps; `tests/conftest.py` installs the
recorder when the variable is set); the second imports the kernels without the interpreter, compiles each recorded
specialization with Triton's own compiler for `GPUTarget("cuda", 90, 32)`, and prints registers, spill (local) bytes
and shared memory per kernel from `cuobjdump -res-usage`. Exit status 1 if any failed to compile or spills.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_POINTER_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
                  "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _describe(value: object) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return ["pointer", str(value.dtype).removeprefix("torch.")]
    if isinstance(value, (bool, str)) or value is None:
        return ["value", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    if type(value).__module__.startswith("triton.language"):  # a tl.dtype passed as a constexpr
        return ["tl_dtype", str(value)]
    return ["unknown", repr(value)]


def record(path: str) -> None:
    """Append every interpreted launch of this process to `path` (JSON lines)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        values = dict(zip(self.arg_names, args)) | kwargs
        options = {k: values.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in values}
        entry = {"module": self.fn.__module__, "kernel": self.fn.__name__, "options": options,
                 "args": {name: _describe(value) for name, value in values.items()}}
        with open(path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def _jit_function(module: str, name: str):
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):  # autotuner / heuristics wrappers
        fn = fn.fn
    return fn


def _source(entry: dict) -> tuple[object, dict[str, object]]:
    import triton.language as tl
    from triton.compiler import ASTSource

    fn = _jit_function(entry["module"], entry["kernel"])
    signature, constexprs = {}, {}
    for i, param in enumerate(fn.params):
        kind, value = entry["args"].get(param.name, ["value", param.default])
        if kind == "tl_dtype":
            value = getattr(tl, value)
        if param.is_constexpr or kind in ("value", "tl_dtype"):
            signature[param.name], constexprs[(i,)] = "constexpr", value
        elif kind == "pointer":
            signature[param.name] = "*" + _POINTER_TYPES[value]
        elif kind == "int":
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif kind == "float":
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{entry['kernel']}: argument {param.name} of unknown kind {kind}: {value}")
    named = {fn.params[i].name: value for (i,), value in constexprs.items()}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs), named


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", text)}


def main(path: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    entries = [json.loads(line) for line in open(path) if line.strip()]
    seen, failed = set(), 0
    for entry in entries:
        try:
            source, constexprs = _source(entry)
        except Exception as error:
            failed += 1
            print(f"FAIL  {entry['kernel']}: {type(error).__name__}: {error}")
            continue
        key = (entry["module"], entry["kernel"], json.dumps(entry["options"], sort_keys=True),
               json.dumps(source.signature, sort_keys=True), repr(sorted(constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        label = f"{entry['kernel']} {entry['options'] or ''} " + " ".join(f"{k}={v}" for k, v in constexprs.items())
        try:
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=entry["options"])
            usage = _resource_usage(kernel.asm["cubin"])
        except Exception as error:  # report each failure and go on
            failed += 1
            print(f"FAIL  {label}: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
            continue
        spills = usage.get("LOCAL", 0) > 0
        failed += spills
        print(f"{'SPILL' if spills else 'ok   '} {label}: registers {usage.get('REG')}, local {usage.get('LOCAL')} B, "
              f"shared {usage.get('SHARED')} B")
    print(f"{len(seen)} distinct specializations of {len(entries)} recorded launches, {failed} failed or spilled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
