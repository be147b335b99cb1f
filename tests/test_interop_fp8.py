"""Fine-grained FP8 checkpoints (transformers' `quant_method: "fp8"`: float8 e4m3 weights beside float32
`*_scale_inv` block scales, as DeepSeek-V3/R1, Qwen3-*-FP8 and MiniMax-M2 ship) imported by dequantizing on read.

The tiny random checkpoints of `tests/interop_cases.py` are quantized here by a blockwise quantizer of the test's own
(per block: amax/448 scale, `torch.float8_e4m3fn`), in blocks of [7, 20] that leave partial blocks at the edges of
every matrix and straddle the experts of a fused tensor quantized as one matrix. The reference is transformers' own
class holding the float64-dequantized weights; hf-moe's direct load, expert-parallel load and conversions must compute
or write exactly that.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from conversions import convert
from conversions.sources import expected_shapes
from hf_moe import HfMoeForCausalLM
from hf_moe.interop import FAMILIES, ForeignCheckpoint, InteropError, to_hf_moe_config

from .conftest import assert_rel_close
from .interop_cases import BASE, batch, build, logits

WORKER = os.path.join(os.path.dirname(__file__), "interop_worker.py")
CONFIGS = Path(__file__).parent / "data" / "configs"  # released config.json files (tests/test_interop_real_configs.py)
BLOCK = (7, 20)
FP8_MAX = 448.0  # the largest float8 e4m3fn value
# (test case, expert layout): per-expert tensors as transformers saves them; fused `experts.gate_up_proj [E, 2I, H]`
# blocked per expert (transformers' FP8Experts) or as one [E·2I, H] matrix ("fused_flat", blocks across experts).
CASES = [("deepseek_v3", "per_expert"), ("qwen3_moe", "per_expert"), ("minimax_m2", "per_expert"),
         ("qwen3_moe", "fused"), ("minimax_m2", "fused_flat"), ("deepseek_v3", "fused_flat")]
# Left unquantized and named in the config's skip list (MiniMax-M2 calls it `ignored_layers`).
SKIPPED = {"qwen3_moe": ("modules_to_not_convert", ["model.layers.1.self_attn.q_proj", "lm_head"]),
           "minimax_m2": ("ignored_layers", ["model.layers.0.self_attn.o_proj", "gate", "lm_head"]),
           "deepseek_v3": ("modules_to_not_convert", None)}


def quantize_matrix(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP8 of a [R, C] matrix: per block the scale amax/448 (float32), the values w/scale in e4m3."""
    rows, cols = w.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scales = torch.empty(grid, dtype=torch.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            part = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            scales[i, j] = w[part].double().abs().max() / FP8_MAX
            q[part] = (w[part].double() / scales[i, j].double()).to(torch.float8_e4m3fn)
    return q, scales


def dequantize_matrix(q: torch.Tensor, scales: torch.Tensor, block) -> torch.Tensor:
    """The float64 values a blockwise FP8 matrix stands for, block by block."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            part = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            out[part] = q[part].double() * scales[i, j].double()
    return out


def quantize(w: torch.Tensor, flat: bool, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float8 values, scales, float64 dequantized values) of a 2-D tensor or a fused [E, R, C] one (blocked per
    expert, or as one [E·R, C] matrix when `flat`)."""
    if w.ndim == 2 or flat:
        q, s = quantize_matrix(w.reshape(-1, w.shape[-1]), block)
        return q.reshape(w.shape), s, dequantize_matrix(q, s, block).reshape(w.shape)
    parts = [quantize(e, False, block) for e in w]
    return tuple(torch.stack([p[k] for p in parts]) for k in range(3))


def is_linear_weight(name: str) -> bool:
    return name.endswith(("proj.weight", ".w1.weight", ".w2.weight", ".w3.weight", "experts.gate_up_proj",
                          "experts.down_proj")) and not name.startswith("lm_head")


def read_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def write(folder, tensors: dict[str, torch.Tensor], **config_changes) -> None:
    for file in folder.glob("*.safetensors*"):
        file.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def quantized_checkpoint(case: str, layout: str, root, block=BLOCK, skip: bool = True):
    """Builds test case `case` and saves it FP8-quantized in `layout` to `root/fp8`, its dequantized float32 twin to
    `root/ref`; returns (fp8 folder, transformers' model of the twin, {name: float64 dequantized tensor})."""
    model = build(case, root / "float")
    state = read_all(root / "float") if layout == "per_expert" else model.state_dict()
    key, skipped = SKIPPED[case] if skip else ("modules_to_not_convert", None)
    quantized, exact, dequantized = {}, {}, {}
    for name, tensor in state.items():
        if not is_linear_weight(name) or any(name.startswith(m + ".") for m in skipped or ()):
            quantized[name] = exact[name] = tensor
            continue
        q, s, d = quantize(tensor, layout == "fused_flat", block)
        quantized[name], quantized[name + "_scale_inv"], dequantized[name] = q, s, d
        exact[name] = d.float()
    assert sum(name.endswith("_scale_inv") for name in quantized) >= 6
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(block)}
    if skipped:
        qc[key] = skipped
    for name, tensors, changes in (("fp8", quantized, {"quantization_config": qc}), ("ref", exact, {})):
        shutil.copytree(root / "float", root / name)
        write(root / name, tensors, **changes)
    if layout == "per_expert":
        reference = AutoModelForCausalLM.from_pretrained(root / "ref")
    else:  # fused tensors carry the names transformers' model holds in memory
        reference = model
        reference.load_state_dict(exact)
    return root / "fp8", reference.eval(), dequantized


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(case, layout) → (FP8 folder, transformers' model of the dequantized weights, dequantized tensors)."""
    root = tmp_path_factory.mktemp("fp8")
    return {(case, layout): quantized_checkpoint(case, layout, root / f"{case}-{layout}") for case, layout in CASES}


@pytest.mark.parametrize("case,layout", CASES)
def test_direct_load_computes_the_dequantized_model(saved, case, layout):
    folder, reference, _ = saved[case, layout]
    model = HfMoeForCausalLM.from_pretrained(folder)
    assert {p.dtype for p in model.parameters()} == {torch.float32}, "dtype auto: the checkpoint's, not float8"
    assert "quantization_config" not in model.config.to_dict()
    ids, mask = batch()
    assert_rel_close(logits(model, ids, mask), logits(reference, ids, mask), 1e-5, f"{case} {layout}")


@pytest.mark.parametrize("case,layout", [("qwen3_moe", "fused"), ("minimax_m2", "fused_flat")])
def test_every_expert_range_reads_the_dequantized_rows(saved, case, layout):
    """What one rank of any expert-parallel split reads: the experts' rows of the fused tensor, dequantized with the
    scale rows they need, even where a block starts in the previous expert."""
    folder, _, dequantized = saved[case, layout]
    checkpoint = ForeignCheckpoint.open(folder)
    config = checkpoint.hf_moe_config()
    plans = [p for p in checkpoint.plans(expected_shapes(config), config) if p.experts]
    assert plans and all(name in checkpoint.scales for p in plans for name in p.foreign_names)
    for plan in plans:
        full = dequantized[plan.sources[0][0]]
        for start in range(plan.shape[0]):
            for end in range(start + 1, plan.shape[0] + 1):
                assert torch.equal(checkpoint.read(plan, start, end), full[start:end].float()), (plan.name, start, end)


def test_expert_parallel_load_equals_one_process(saved, tmp_path):
    """Two gloo ranks, each reading and dequantizing its half of the experts (per-expert tensors, fused ones blocked
    per expert and as one matrix whose blocks straddle the ranks' boundary), compute the dequantized model."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("2 processes need 2 GPUs under NCCL; this machine has fewer")
    (tmp_path / "checkpoints").mkdir()
    for (case, layout), (folder, _, _) in saved.items():
        shutil.copytree(folder, tmp_path / "checkpoints" / f"{case}-{layout}")
    ids = torch.randint(3, BASE["vocab_size"], (4, 9))
    torch.save(ids, tmp_path / "batch.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
           str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"ep{r}.pt") for r in range(2)]
    for (case, layout), (_, reference, _) in saved.items():
        expected = logits(reference, ids)
        num_experts = getattr(reference.config, "num_experts", None) or reference.config.num_local_experts
        for r, result in enumerate(ranks):
            name = f"{case}-{layout}"
            assert_rel_close(result["logits"][name], expected[2 * r : 2 * r + 2], 1e-5, f"{name} rank {r}")
            assert set(result["experts"][name].values()) == {num_experts // 2}


@pytest.mark.parametrize("case,layout", [("deepseek_v3", "per_expert"), ("minimax_m2", "fused_flat")])
def test_convert_writes_the_dequantized_tensors_both_ways(saved, tmp_path, case, layout):
    """FP8 family → hf_moe → family: unquantized tensors equal to the dequantized ones (no scales, no
    quantization_config), and transformers' class loads the export with the dequantized model's logits."""
    folder, reference, dequantized = saved[case, layout]
    convert(folder, tmp_path / "hf", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    convert(tmp_path / "hf", tmp_path / "back", to=case, progress=False)
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
    back = read_all(tmp_path / "back")
    assert {t.dtype for t in back.values()} == {torch.float32}
    assert not any(name.endswith("_scale_inv") for name in back)
    if layout == "per_expert":
        assert sorted(back) == sorted(read_all(folder.parent / "float"))
        assert all(torch.equal(back[name], d.float()) for name, d in dequantized.items()), "the dequantized values"
    ids, mask = batch()
    for out in ("hf", "back"):
        assert_rel_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / out), ids, mask),
                         logits(reference, ids, mask), 1e-5, f"{case} {layout} → {out}")


def test_auto_dtype_is_the_checkpoints_compute_dtype_never_float8(saved, tmp_path):
    """A checkpoint saying `torch_dtype: bfloat16` (as FP8 releases do) loads in bfloat16 and converts its FP8
    tensors to bfloat16 (the others keep their stored dtype, as in every conversion); one saying nothing too, in
    bfloat16, the dtype transformers dequantizes to."""
    folder, reference, _ = saved["qwen3_moe", "per_expert"]
    for name, dtype in (("bf16", "bfloat16"), ("unset", None)):
        shutil.copytree(folder, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config.pop("dtype", None)
        if dtype:
            config["torch_dtype"] = dtype
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        model = HfMoeForCausalLM.from_pretrained(tmp_path / name)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, name
        convert(tmp_path / name, tmp_path / f"{name}-hf", progress=False)
        written = read_all(tmp_path / f"{name}-hf")
        quantized = ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.self_attn.k_proj.weight")
        assert [written[n].dtype for n in quantized] == [torch.bfloat16] * 2, name
        assert written["model.norm.weight"].dtype == torch.float32, "stored float32, written as stored"
        assert json.loads((tmp_path / f"{name}-hf" / "config.json").read_text())["dtype"] == "bfloat16"
    # the reference with every weight rounded to bfloat16 as torch rounds it: the same function, whatever the seed
    # (against the unrounded weights a near-tie in the router can flip with the rounding and move the logits by 3%)
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16))
    ids, mask = batch()
    assert_rel_close(logits(model.float(), ids, mask), logits(rounded, ids, mask), 1e-4, "bfloat16 weights")


@pytest.mark.parametrize("case", ["qwen3_moe", "minimax_m2"])
def test_transformers_own_fp8_dequantization_agrees(tmp_path, case):
    """Second reference: transformers loading the FP8 checkpoint itself with `FineGrainedFP8Config(dequantize=True)`
    on CPU. Its dequantization derives the block size from the scale grid (rows // scale rows), which is the block
    only when every dimension is a multiple of it, so this check uses [8, 16] blocks, which divide every tensor here."""
    from transformers import FineGrainedFP8Config

    folder, _, _ = quantized_checkpoint(case, "per_expert", tmp_path, block=(8, 16))
    theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=FineGrainedFP8Config(dequantize=True),
                                                  dtype=torch.float32)
    ids, mask = batch()
    assert_rel_close(logits(HfMoeForCausalLM.from_pretrained(folder), ids, mask), logits(theirs, ids, mask), 1e-5)


def edited(folder, dest, config_changes=None, tensors=None) -> None:
    shutil.copytree(folder, dest)
    if tensors is not None:
        write(dest, tensors(read_all(folder)))
    if config_changes:
        config = json.loads((dest / "config.json").read_text())
        config["quantization_config"] = {**config["quantization_config"], **config_changes}
        (dest / "config.json").write_text(json.dumps(config))


Q = "model.layers.0.self_attn.q_proj.weight"
REFUSALS = [
    ({"quant_method": "gptq"}, None, "quant_method='gptq'"),
    ({"activation_scheme": "static"}, None, "activation_scheme='static'"),
    ({"weight_block_size": [128]}, None, r"weight_block_size=\[128\]"),
    ({"weight_block_size": None}, None, "weight_block_size=None"),
    ({"fmt": "e5m2"}, None, "fmt='e5m2'"),
    ({"scale_fmt": "ue8m0"}, None, "scale_fmt='ue8m0'"),
    ({"modules_to_convert": ["model.embed_tokens"]}, None, "modules_to_convert"),
    ({"kv_cache_scheme": "fp8"}, None, r"\['kv_cache_scheme'\]"),
    (None, lambda t: {k: v for k, v in t.items() if k != Q + "_scale_inv"}, "without their block scales"),
    (None, lambda t: {**t, Q + "_scale_inv": torch.ones(3, 2)}, r"has shape \[3, 2\].*\[10, 2\]"),
    (None, lambda t: {**t, Q + "_scale_inv": t[Q + "_scale_inv"].to(torch.uint8)}, "float scales only"),
    (None, lambda t: {**t, "model.layers.0.self_attn.x_proj.weight_scale_inv": torch.ones(1, 1)},
     "without the tensor they scale"),
    (None, lambda t: {**t, "model.norm.weight_scale_inv": torch.ones(1, 1)}, "beside an unquantized tensor"),
    (None, lambda t: {**t, Q: t[Q].to(torch.float8_e5m2)}, "e4m3"),
]


@pytest.mark.parametrize("config_changes,tensors,named", REFUSALS)
def test_what_cannot_be_read_exactly_is_refused(saved, tmp_path, config_changes, tensors, named):
    edited(saved["qwen3_moe", "per_expert"][0], tmp_path / "bad", config_changes, tensors)
    with pytest.raises(InteropError, match=named):
        HfMoeForCausalLM.from_pretrained(tmp_path / "bad")
    with pytest.raises(InteropError, match=named):
        convert(tmp_path / "bad", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_float8_tensors_without_quantization_config_are_refused(saved, tmp_path):
    folder = saved["qwen3_moe", "per_expert"][0]
    shutil.copytree(folder, tmp_path / "bare")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "bare" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InteropError, match="quant_method 'fp8'"):
        HfMoeForCausalLM.from_pretrained(tmp_path / "bare")


@pytest.mark.parametrize("name,refused", [("deepseek-v3", None), ("deepseek-r1", None),
                                          ("glm-4.7", "quant_method='modelopt'"),
                                          ("deepseek-v3.2", "scale_fmt='ue8m0'")])
def test_released_quantization_configs(tmp_path, name, refused):
    """DeepSeek-V3's and R1's own config.json, FP8 `quantization_config` included, map to an unquantized
    bfloat16 HfMoeConfig; GLM-4.7's NVFP4 (modelopt) release is refused naming its method, DeepSeek-V3.2's FP8 one
    naming its `scale_fmt`."""
    (tmp_path / "config.json").write_text((CONFIGS / f"{name}.json").read_text())
    config = AutoConfig.from_pretrained(tmp_path)
    family = FAMILIES[config.model_type]
    if refused:
        with pytest.raises(InteropError, match=refused):
            to_hf_moe_config(family, config)
        return
    assert config.quantization_config["quant_method"] == "fp8"
    ours = to_hf_moe_config(family, config)
    assert ours.dtype == torch.bfloat16 and "quantization_config" not in ours.to_dict()
