"""Vision-language checkpoints whose language model is a family's (`hf_moe.interop.WRAPPERS`), against transformers'
own wrapper classes: tiny models (a tiny vision tower each) built, randomised and saved by transformers; for text-only
input the imported language model computes the wrapper's logits and cached greedy generations, left padding included;
the layouts releases store load the same; the vision tower is left out and named; conversion to the family, the
expert-parallel load and the refusals."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from conversions import convert
from hf_moe import HfMoeForCausalLM
from hf_moe.attention import HfMoeRotaryEmbedding
from hf_moe.interop import WRAPPERS, InteropError, to_hf_moe_config

from .conftest import assert_cached_greedy_equals_full_forward, assert_rel_close
from .interop_cases import BASE, batch, edit_config, load_foreign, logits, randomize, tensors
from .test_interop_fp8 import is_linear_weight, quantize
from .test_interop_real_configs import shrink, write

WORKER = os.path.join(os.path.dirname(__file__), "interop_worker.py")
TEXT = {k: v for k, v in BASE.items() if k != "intermediate_size"} | {"intermediate_size": 40}
CASES = {  # wrapper model_type → its config's text_config and vision_config, tiny
    "qwen3_vl_moe": dict(
        text_config=dict(**{**TEXT, "num_hidden_layers": 3}, mlp_only_layers=[1], num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=8, head_dim=16, attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32,
                           deepstack_visual_indexes=[0], num_position_embeddings=16, patch_size=4)),
    "glm4v_moe": dict(
        text_config=dict(**TEXT, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1,
                         first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1],
                                          "partial_rotary_factor": 0.5}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32,
                           patch_size=4, image_size=16)),
    "glm46v": dict(  # GLM-4.6V's wrapper around GLM-4.5V's MoE text model
        text_config=dict(model_type="glm4v_moe_text", **TEXT, n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=8, n_shared_experts=2, first_k_dense_replace=0, head_dim=16,
                         attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2],
                                          "partial_rotary_factor": 0.5}),
        vision_config=dict(model_type="glm4v_moe_vision", depth=1, hidden_size=16, num_heads=2, intermediate_size=16,
                           out_hidden_size=32, patch_size=4, image_size=16)),
    "mistral3": dict(
        tie_word_embeddings=False,
        text_config=dict(model_type="mistral4", **{**TEXT, "num_key_value_heads": 4}, n_routed_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1, first_k_dense_replace=1,
                         n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=True, q_lora_rank=12,
                         kv_lora_rank=10, qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=6,
                         rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4,
                                          "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 1e4,
                                          "llama_4_scaling_beta": 0.1}),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=32, patch_size=8)),
    "kimi_k25": dict(  # the wrapper ties the head (its default): none is stored
        text_config=dict(model_type="deepseek_v3", **{**TEXT, "num_key_value_heads": 4}, n_routed_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1, first_k_dense_replace=1,
                         n_group=4, topk_group=2, routed_scaling_factor=2.5, q_lora_rank=12, kv_lora_rank=10,
                         qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
        vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           patch_size=4, pos_emb_height=4, pos_emb_width=4),
        projection_hidden_size=16),
    "ernie4_5_vl_moe": dict(  # text and vision experts of other widths; MoE layers 1 and 3
        tie_word_embeddings=False,
        text_config=dict(**{**TEXT, "num_hidden_layers": 4}, mlp_layer_types=["dense", "sparse", "dense", "sparse"],
                         moe_num_experts=4, moe_k=2, moe_intermediate_size=[8, 4], moe_num_shared_experts=1,
                         head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                       "mrope_section": [3, 3, 2]}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, patch_size=4)),
}
FAMILY = {"qwen3_vl_moe": "qwen3_moe", "glm4v_moe": "glm4_moe", "glm46v": "glm4_moe", "mistral3": "mistral4",
          "kimi_k25": "deepseek_v3", "ernie4_5_vl_moe": "ernie4_5_moe"}
VISION_PARTS = ("visual", "vision", "projector", "resampler", "weight_1")
RELEASED = Path(__file__).parent / "data" / "configs" / "vlm"  # sources in ../SOURCES.md


def wrapper_class(model_type: str):
    return getattr(transformers, WRAPPERS[model_type].architecture)


def build_wrapper(model_type: str, folder, **config) -> torch.nn.Module:
    """transformers' tiny random wrapper model of `config` saved into `folder`; returns it in evaluation mode."""
    model = wrapper_class(model_type)(AutoConfig.for_model(model_type, **config))
    randomize(model)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """wrapper model_type → (folder, transformers' wrapper model), built once for the module."""
    root = tmp_path_factory.mktemp("vlm")
    return {name: (root / name, build_wrapper(name, root / name, **CASES[name])) for name in CASES}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("model_type", CASES)
def test_language_model_computes_what_the_wrapper_computes_for_text(saved, model_type):
    folder, reference = saved[model_type]
    records = _Records()
    logging.getLogger("hf_moe.interop.wrappers").addHandler(records)
    try:
        model = HfMoeForCausalLM.from_pretrained(folder)
    finally:
        logging.getLogger("hf_moe.interop.wrappers").removeHandler(records)
    assert len(records.messages) == 1 and "vision tower" in records.messages[0], records.messages
    vision = [name for name in tensors(folder) if any(part in name for part in VISION_PARTS)
              or (model_type == "ernie4_5_vl_moe" and re.search(r"experts\.[4-7]\.", name))]  # its vision experts
    assert vision and f" {len(vision)} tensors" in records.messages[0], "the warning counts the vision tower's tensors"
    assert not any("visual" in n or "vision" in n or "projector" in n for n in model.state_dict())
    ids, mask = batch()
    assert_rel_close(logits(model, ids, mask), logits(reference, ids, mask), 1e-5, f"{model_type} logits")
    prompt, prompt_mask = ids[:2, :7], mask[:2, :7]  # the first row left-padded
    ours = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    theirs = reference.generate(prompt, attention_mask=prompt_mask, max_new_tokens=5, min_new_tokens=5,
                                do_sample=False)
    assert torch.equal(ours, theirs), f"{model_type}: greedy generation differs"
    assert_cached_greedy_equals_full_forward(model, ids[1:, :6], 5)


def test_released_layouts_load_as_transformers_loads_them(saved, tmp_path):
    """Qwen3-VL-MoE's release stores the fused experts transposed (`[E, H, 2I]`, `[E, I, H]`), and a state dict saved
    as transformers 5 holds it names Mistral 3's language model `model.language_model.*` (transformers saves the
    older `language_model.model.*`) and ERNIE-4.5-VL's text experts `text_moe` (transformers saves the release's
    layout: text and vision experts in one list, the router transposed): transformers' classes and hf-moe read each
    as the saved model."""
    ids, mask = batch()
    folder, reference = saved["qwen3_vl_moe"]
    shutil.copytree(folder, tmp_path / "qwen")
    stored = load_file(folder / "model.safetensors")
    for name in [n for n in stored if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        stored[name] = stored[name].transpose(1, 2).contiguous()
    save_file(stored, tmp_path / "qwen" / "model.safetensors")
    expected = logits(reference, ids, mask)
    assert_rel_close(logits(wrapper_class("qwen3_vl_moe").from_pretrained(tmp_path / "qwen"), ids, mask), expected)
    assert_rel_close(logits(HfMoeForCausalLM.from_pretrained(tmp_path / "qwen"), ids, mask), expected)

    folder, reference = saved["mistral3"]
    shutil.copytree(folder, tmp_path / "mistral")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, tmp_path / "mistral" / "model.safetensors")
    assert "model.language_model.norm.weight" in tensors(tmp_path / "mistral")
    expected = logits(reference, ids, mask)
    assert_rel_close(logits(wrapper_class("mistral3").from_pretrained(tmp_path / "mistral"), ids, mask), expected)
    assert_rel_close(logits(HfMoeForCausalLM.from_pretrained(tmp_path / "mistral"), ids, mask), expected)

    folder, reference = saved["ernie4_5_vl_moe"]  # `text_moe` / `vision_moe` modules, the router not transposed
    shutil.copytree(folder, tmp_path / "ernie")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, tmp_path / "ernie" / "model.safetensors")
    assert "model.language_model.layers.1.mlp.text_moe.gate.weight" in state
    expected = logits(reference, ids, mask)
    assert_rel_close(logits(wrapper_class("ernie4_5_vl_moe").from_pretrained(tmp_path / "ernie"), ids, mask), expected)
    assert_rel_close(logits(HfMoeForCausalLM.from_pretrained(tmp_path / "ernie"), ids, mask), expected)


def test_a_stored_head_is_read_even_where_the_wrapper_config_ties_it(saved, tmp_path):
    """transformers 5 ties the head to the embeddings only when the checkpoint stores no other head: a Mistral 3
    checkpoint with its own head under `tie_word_embeddings=True` computes with that head, in both libraries."""
    folder, reference = saved["mistral3"]
    edit_config(folder, tmp_path / "tied", tie_word_embeddings=True)
    ids, mask = batch()
    theirs = logits(wrapper_class("mistral3").from_pretrained(tmp_path / "tied"), ids, mask)
    assert_rel_close(theirs, logits(reference, ids, mask))
    model = HfMoeForCausalLM.from_pretrained(tmp_path / "tied")
    assert not model.config.tie_word_embeddings
    assert_rel_close(logits(model, ids, mask), theirs)


@pytest.mark.parametrize("model_type", CASES)
def test_convert_takes_the_language_model_out_exactly(saved, tmp_path, model_type):
    """wrapper → hf_moe (streamed into shards) → the family by `auto`: transformers' family class computes the
    wrapper's logits from the export; writing back into the wrapper is refused."""
    folder, reference = saved[model_type]
    ids, mask = batch()
    expected = logits(reference, ids, mask)
    convert(folder, tmp_path / "hf", progress=False, max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    assert_rel_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids, mask), expected)
    result = convert(folder, tmp_path / "family", to="auto", progress=False)
    assert result.target_type == FAMILY[model_type]
    exported = load_foreign(tmp_path / "family")
    assert exported.config.model_type == FAMILY[model_type]
    assert_rel_close(logits(exported, ids, mask), expected, 1e-5, f"{model_type} as {FAMILY[model_type]}")
    with pytest.raises(InteropError, match=rf"to='{model_type}'.*vision tower.*{FAMILY[model_type]}"):
        convert(tmp_path / "hf", tmp_path / "back", to=model_type, progress=False)
    assert not (tmp_path / "back").exists()


def test_expert_parallel_load_of_wrapped_language_models_equals_one_process(saved, tmp_path):
    """Two gloo ranks, each reading its half of the experts (per-expert, fused and transposed-fused tensors under the
    wrappers' names), compute the wrappers' logits."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("2 processes need 2 GPUs under NCCL; this machine has fewer")
    (tmp_path / "checkpoints").mkdir()
    for name, (folder, _) in saved.items():
        shutil.copytree(folder, tmp_path / "checkpoints" / name)
    stored = load_file(tmp_path / "checkpoints" / "qwen3_vl_moe" / "model.safetensors")
    stored = {k: v.transpose(1, 2).contiguous() if "experts" in k else v for k, v in stored.items()}
    save_file(stored, tmp_path / "checkpoints" / "qwen3_vl_moe" / "model.safetensors")
    ids = torch.randint(3, BASE["vocab_size"], (4, 9))
    torch.save(ids, tmp_path / "batch.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
           str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"ep{r}.pt") for r in range(2)]
    for name, (_, reference) in saved.items():
        expected = logits(reference, ids)
        for r, result in enumerate(ranks):
            assert_rel_close(result["logits"][name], expected[2 * r : 2 * r + 2], 1e-5, f"{name} rank {r}")
            text = reference.config.text_config
            num_experts = getattr(text, "num_experts", None) or text.n_routed_experts
            assert set(result["experts"][name].values()) == {num_experts // 2}, "each rank holds half the experts"


@pytest.mark.parametrize("model_type,edit,named", [
    ("mistral3", {"text_config": {"model_type": "mistral"}}, "text_config.model_type='mistral'"),
    ("glm46v", {"text_config": {"model_type": "glm4v_text"}}, "text_config.model_type='glm4v_text'"),
    ("qwen3_vl_moe", {"norm_topk_prob": False}, "norm_topk_prob=False"),
    ("glm4v_moe", {"use_qk_norm": True}, "use_qk_norm=True"),
    ("glm4v_moe", {"a_field_from_the_future": 3}, "a_field_from_the_future"),
    ("ernie4_5_vl_moe", {"mlp_layer_types": ["sparse", "dense", "sparse", "sparse"]}, "mlp_layer_types=['sparse'"),
    ("ernie4_5_vl_moe", {"moe_layer_start_index": 0}, "moe_layer_start_index=0"),
])
def test_text_configs_hf_moe_cannot_express_are_refused(saved, tmp_path, model_type, edit, named):
    folder, _ = saved[model_type]
    text = json.loads((folder / "config.json").read_text())["text_config"]
    edit_config(folder, tmp_path / "edited", text_config={**text, **edit.get("text_config", edit)})
    with pytest.raises(InteropError, match=named.replace("(", r"\(").replace("[", r"\[")):
        HfMoeForCausalLM.from_pretrained(tmp_path / "edited")


def test_tensors_of_neither_the_language_model_nor_the_vision_tower_are_refused(saved, tmp_path):
    folder, _ = saved["glm4v_moe"]
    shutil.copytree(folder, tmp_path / "extra")
    stored = load_file(folder / "model.safetensors")
    stored["model.audio_tower.proj.weight"] = torch.zeros(2, 2)
    save_file(stored, tmp_path / "extra" / "model.safetensors")
    with pytest.raises(InteropError, match=r"model\.audio_tower\.proj\.weight"):
        HfMoeForCausalLM.from_pretrained(tmp_path / "extra")


@pytest.mark.parametrize("model_type,rotary", [
    ("qwen3_vl_moe", "Qwen3VLMoeTextRotaryEmbedding"),
    ("glm4v_moe", "Glm4vMoeTextRotaryEmbedding"),
])
def test_multimodal_rope_with_one_text_position_is_plain_rope_bit_for_bit(saved, model_type, rotary):
    """The wrappers' mRoPE given the same temporal, height and width position (text) and hf-moe's plain RoPE of the
    imported config give the same cos and sin, bit for bit."""
    folder, reference = saved[model_type]
    module = sys.modules[type(reference).__module__]
    theirs = getattr(module, rotary)(reference.config.text_config)
    ours = HfMoeRotaryEmbedding(HfMoeForCausalLM.from_pretrained(folder).config)
    positions = torch.tensor([[0, 1, 2, 7, 100, 4095], [5, 3, 0, 1, 1, 9]])
    x = torch.zeros(1, dtype=torch.float32)
    for expected, got in zip(theirs(x, positions[None].expand(3, -1, -1)), ours(x, positions), strict=True):
        assert torch.equal(expected, got)


@pytest.mark.parametrize("name", sorted(path.stem for path in RELEASED.glob("*.json")))
def test_released_configs_import_and_their_tiny_models_compute_what_the_wrapper_computes(tmp_path, name):
    """A release's own config.json (full size) maps to the language model's HfMoeConfig; a tiny model of it (the text
    model shrunk as `test_interop_real_configs` shrinks a family's, the mRoPE sections to the tiny heads, a one-block
    vision tower) computes, imported, the wrapper's logits."""
    raw = json.loads((RELEASED / f"{name}.json").read_text())
    config = AutoConfig.from_pretrained(write(raw, tmp_path / "full"))
    ours = to_hf_moe_config(*WRAPPERS[raw["model_type"]].family_config(config, head_stored=True))
    text = raw["text_config"]
    assert (ours.hidden_size, ours.num_hidden_layers, ours.head_dim, ours.tie_word_embeddings) == (
        text["hidden_size"], text["num_hidden_layers"], text["head_dim"], False)
    assert (ours.num_experts, ours.num_experts_per_tok, ours.norm_topk_prob) == (
        text.get("num_experts") or text["n_routed_experts"], text["num_experts_per_tok"], True)
    assert "mrope_section" not in ours.rope_parameters

    tiny_text = shrink(text)
    for key in ("rope_scaling", "rope_parameters"):
        if key in tiny_text:  # the sections cover the tiny heads' rotated frequencies (8 of 16, 4 of 8 for GLM)
            rotated = int(16 * tiny_text[key].get("partial_rotary_factor", 1.0)) // 2
            tiny_text[key] = {**tiny_text[key], "mrope_section": [rotated - 2 * (rotated // 3)] + [rotated // 3] * 2}
    vision = {**raw["vision_config"], "depth": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 16,
              "out_hidden_size": tiny_text["hidden_size"], "deepstack_visual_indexes": [0], "patch_size": 4}
    tiny = {**raw, "text_config": tiny_text, "vision_config": vision}
    reference = wrapper_class(raw["model_type"])(AutoConfig.from_pretrained(write(tiny, tmp_path / "tiny")))
    randomize(reference)
    reference.to(torch.float32).save_pretrained(tmp_path / "model")
    ids, mask = batch()
    model = HfMoeForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert_rel_close(logits(model, ids, mask), logits(reference.eval(), ids, mask), 1e-5, f"{name} logits")


def test_fp8_language_model_reads_dequantized_and_transposed_fp8_experts_are_refused(saved, tmp_path):
    """A GLM-4.5V checkpoint in transformers' fine-grained FP8 (the language model's and the vision tower's
    projections, per expert) imports as the wrapper with the dequantized language model computes; FP8 experts stored
    transposed (Qwen3-VL-MoE's layout) are refused, naming them."""
    folder, _ = saved["glm4v_moe"]
    stored = load_file(folder / "model.safetensors")
    quantized, exact = dict(stored), dict(stored)
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [7, 20]}
    for name in [n for n in stored if is_linear_weight(n) and stored[n].ndim == 2]:
        quantized[name], quantized[name + "_scale_inv"], dequantized = quantize(stored[name], False, (7, 20))
        exact[name] = dequantized.float()
    assert "model.visual.blocks.0.attn.proj.weight_scale_inv" in quantized
    assert "model.language_model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in quantized
    for name, state in (("fp8", quantized), ("twin", exact)):
        shutil.copytree(folder, tmp_path / name)
        save_file(state, tmp_path / name / "model.safetensors")
    edit_config(tmp_path / "fp8", tmp_path / "fp8-config", quantization_config=qc)
    twin = wrapper_class("glm4v_moe").from_pretrained(tmp_path / "twin")  # the dequantized weights
    ids, mask = batch()
    model = HfMoeForCausalLM.from_pretrained(tmp_path / "fp8-config", dtype=torch.float32)
    assert_rel_close(logits(model, ids, mask), logits(twin.eval(), ids, mask), 1e-5, "FP8 GLM-4.5V")

    folder, _ = saved["qwen3_vl_moe"]
    stored = load_file(folder / "model.safetensors")
    name = "model.language_model.layers.0.mlp.experts.down_proj"
    stored[name], stored[name + "_scale_inv"], _ = quantize(stored[name].transpose(1, 2).contiguous(), False, (7, 20))
    shutil.copytree(folder, tmp_path / "qwen")
    save_file(stored, tmp_path / "qwen" / "model.safetensors")
    edit_config(tmp_path / "qwen", tmp_path / "qwen-fp8", quantization_config=qc)
    with pytest.raises(InteropError, match=rf"FP8 tensors stored in another layout.*{name}"):
        HfMoeForCausalLM.from_pretrained(tmp_path / "qwen-fp8")

