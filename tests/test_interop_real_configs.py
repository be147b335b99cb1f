"""The config.json files of released MoE checkpoints (`tests/data/configs/`, sources in its SOURCES.md) import: each
is read by transformers' own class and mapped to an `HfMoeConfig`, and a tiny model of the same config (every size
shrunk, every ratio and feature flag kept: groups, partial rotary, q/k norm, shared experts, dense first layers, MLA
ranks, YaRN, sparse attention) computes, loaded by hf-moe, the logits transformers' class computes from the same random
weights.

A `quantization_config` (DeepSeek-R1's FP8, GLM-4.7's NVFP4) is dropped here: these tests are about the
architecture; FP8 checkpoints and these configs' quantization are tested in `tests/test_interop_fp8.py`."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.hunyuan_v1_moe.modeling_hunyuan_v1_moe import HunYuanMoEV1RotaryEmbedding

from conversions import convert
from hf_moe import HfMoeForCausalLM
from hf_moe.attention import HfMoeRotaryEmbedding
from hf_moe.interop import FAMILIES, InteropError, to_hf_moe_config

from .conftest import assert_rel_close
from .interop_cases import batch, build, logits, randomize

CONFIGS = Path(__file__).parent / "data" / "configs"
NAMES = sorted(path.stem for path in CONFIGS.glob("*.json"))
VOCAB = 64

# field → its tiny value; ratios that matter are kept by `shrink` below.
_TINY = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
         "max_position_embeddings": 64, "q_lora_rank": 12, "kv_lora_rank": 10, "qk_nope_head_dim": 8,
         "qk_rope_head_dim": 4, "v_head_dim": 6, "index_topk": 4, "index_n_heads": 16, "index_head_dim": 8}
_EXPERT_COUNTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_k", "moe_topk")
_PER_LAYER = ("moe_topk", "moe_intermediate_size", "num_shared_expert")  # Hunyuan's lists, one entry per layer


def real_config(name: str) -> dict:
    """The checkpoint's config.json, less its quantization. Tencent's release of Hunyuan-A13B names the model type
    and the head width as its own code does (`hunyuan`, `attention_head_dim`); transformers' class reads them as
    `hunyuan_v1_moe` and `head_dim` (without `head_dim` it cannot build the model), so both are given here."""
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    config.pop("quantization_config", None)
    if config["model_type"] == "hunyuan":
        config.update(model_type="hunyuan_v1_moe", head_dim=config["attention_head_dim"])
    return config


def top_k(config: dict) -> int:
    """The number of experts a token is routed to, under whichever name the family's config.json gives it."""
    value = next(config[k] for k in _TOP_K if k in config)
    return value[0] if isinstance(value, list) else value


def shrink(config: dict) -> dict:
    """A tiny config with the same features: sizes shrunk, while dense first layers, group-limited routing (fewer
    groups kept than exist), GQA versus MHA, shared experts' width relative to a routed expert, the rotated share of a
    head, YaRN's factor and a sparse attention indexer's selection (4 of the test batch's 11 keys; the rotated half of
    its head) are kept. The indexer keeps 16 heads, so that keys scoring exactly 0 (every head's ReLU at 0), which
    transformers' CPU top-k and hf-moe's tie rule may keep differently, are rare (docs/decisions/sparse-attention.md).
    """
    tiny = dict(config)
    tiny.update({k: v for k, v in _TINY.items() if tiny.get(k) is not None})
    dense = 1 if config.get("first_k_dense_replace") or config.get("moe_layer_start_index") else 0
    tiny["num_hidden_layers"] = layers = dense + 2
    if "first_k_dense_replace" in config:
        tiny["first_k_dense_replace"] = dense
    if "moe_layer_start_index" in config:  # ERNIE-4.5: MoE from this layer to moe_layer_end_index
        tiny["moe_layer_start_index"] = dense
        if config.get("moe_layer_end_index", -1) != -1:
            tiny["moe_layer_end_index"] = layers - 1
    if "attn_type_list" in config:
        tiny["attn_type_list"] = config["attn_type_list"][: tiny["num_hidden_layers"]]
    if "max_window_layers" in config:
        tiny["max_window_layers"] = min(config["max_window_layers"], tiny["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    tiny["num_attention_heads"] = 4
    tiny["num_key_value_heads"] = 4 if kv_heads == heads else 2
    if config.get("head_dim"):
        tiny["head_dim"] = 16
        if config.get("rotary_dim"):
            tiny["rotary_dim"] = 16 * config["rotary_dim"] // config["head_dim"]
        if "attention_head_dim" in config:
            tiny["attention_head_dim"] = 16
    if "expert_hidden_dim" in config:  # Hy3's second name for the routed experts' width
        tiny["expert_hidden_dim"] = tiny["moe_intermediate_size"]
    if "org_vocab_size" in config:
        tiny["org_vocab_size"] = VOCAB
    if config.get("shared_expert_intermediate_size"):
        ratio = config["shared_expert_intermediate_size"] // config["moe_intermediate_size"]
        tiny["shared_expert_intermediate_size"] = ratio * _TINY["moe_intermediate_size"]
    for key in _EXPERT_COUNTS:
        if key in config:
            tiny[key] = 8
    tiny[next((k for k in _TOP_K if k in config), "num_experts_per_tok")] = 2
    for key in _PER_LAYER:  # per-layer lists: one tiny entry per tiny layer, the routed experts' width kept
        if isinstance(config.get(key), list):
            value = {"moe_topk": 2, "num_shared_expert": config[key][0]}.get(key)
            if key == "moe_intermediate_size":
                same = config[key][0] == config["intermediate_size"]
                value = tiny["intermediate_size"] if same else _TINY["moe_intermediate_size"]
            tiny[key] = [value] * layers
    if (config.get("n_group") or 1) > 1:
        limited = config["topk_group"] < config["n_group"]
        tiny["n_group"], tiny["topk_group"] = 4, 2 if limited else 4
    rope = config.get("rope_scaling")
    if rope and "original_max_position_embeddings" in rope:  # YaRN: the same factor over a shorter context
        tiny["rope_scaling"] = {**rope, "original_max_position_embeddings": 16}
        tiny["max_position_embeddings"] = int(16 * rope["factor"])
    tiny.update(bos_token_id=1, eos_token_id=2)  # token ids inside the tiny vocabulary
    if config.get("pad_token_id") is not None:
        tiny["pad_token_id"] = 0
    return tiny


def write(config: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def reads_rotary_dim(config) -> bool:
    """Whether transformers' MiniMax-M2 class rotates `rotary_dim` dimensions (older versions ignore the field and
    rotate the whole head, which hf-moe refuses to import as either function)."""
    factor = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    return int(config.head_dim * factor) == config.rotary_dim


@pytest.mark.parametrize("name", NAMES)
def test_real_config_is_accepted(tmp_path, name):
    """The checkpoint's own config.json (full size) maps to an HfMoeConfig of the same shape."""
    raw = real_config(name)
    config = AutoConfig.from_pretrained(write(raw, tmp_path))
    family = FAMILIES[raw["model_type"]]
    if raw["model_type"] == "minimax_m2" and not reads_rotary_dim(config):
        with pytest.raises(InteropError, match="rotary_dim=64"):
            to_hf_moe_config(family, config)
        return
    ours = to_hf_moe_config(family, config)
    assert (ours.hidden_size, ours.num_hidden_layers, ours.vocab_size) == (
        raw["hidden_size"], raw["num_hidden_layers"], raw["vocab_size"])
    assert ours.num_experts == next(raw[k] for k in _EXPERT_COUNTS if k in raw)
    assert ours.num_experts_per_tok == top_k(raw)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_model_of_real_config_computes_what_transformers_computes(tmp_path, name):
    tiny = shrink(real_config(name))
    config = AutoConfig.from_pretrained(write(tiny, tmp_path / "config"))
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(reference)
    reference.save_pretrained(tmp_path / "model")
    if tiny["model_type"] == "minimax_m2" and not reads_rotary_dim(config):
        with pytest.raises(InteropError, match="rotary_dim"):
            HfMoeForCausalLM.from_pretrained(tmp_path / "model")
        return
    model = HfMoeForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    ids, mask = batch()
    assert_rel_close(logits(model, ids, mask), logits(reference.eval(), ids, mask), 1e-5, f"{name} logits")


@pytest.mark.parametrize("name,changes,named", [
    ("dots-llm1-inst", {"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ("glm-4.7-flash", {"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ("deepseek-r1", {"topk_method": "greedy"}, "topk_method='greedy'"),
    ("deepseek-v2.5", {"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ("minimax-m2.5", {"use_routing_bias": False}, "use_routing_bias=False"),
    ("ernie-4.5-21b-a3b", {"use_bias": True}, "use_bias=True"),
    ("hunyuan-a13b", {"use_cla": True}, "use_cla=True"),
    ("hunyuan-a13b", {"moe_drop_tokens": True}, "moe_drop_tokens=True"),
    ("hunyuan-a13b", {"attention_head_dim": 64}, "attention_head_dim=64"),
    ("deepseek-v3.2", {"indexer_rope_interleave": True}, "indexer_rope_interleave=True"),
    ("glm-5.1", {"rope_interleave": False}, "rope_interleave=False"),
    ("glm-5.1", {"index_topk_freq": 4, "index_skip_topk_offset": 3},
     "indexer_types=\\['full', 'full', 'full', 'shared'"),
    ("hy3", {"first_k_dense_replace": 3}, "first_k_dense_replace=3"),
    ("hy3", {"moe_router_use_sigmoid": False}, "moe_router_use_sigmoid=False"),
])
def test_real_config_saying_other_than_transformers_computes_is_refused(tmp_path, name, changes, named):
    """The checkpoint's own fields that transformers' class does not read are still checked against what it
    computes."""
    raw = {**real_config(name), **changes}
    with pytest.raises(InteropError, match=named):
        to_hf_moe_config(FAMILIES[raw["model_type"]], AutoConfig.from_pretrained(write(raw, tmp_path)))


def test_minimax_multi_token_prediction_modules_are_left_out_as_transformers_does(tmp_path):
    """MiniMax-M2's config.json names multi-token-prediction modules that transformers' class does not build; a
    checkpoint carrying them as layers after the last one loads the causal LM alone."""
    reference = build("minimax_m2", tmp_path)
    mtp = {k: v for k, v in real_config("minimax-m2.5").items() if "mtp" in k}
    assert mtp == {"use_mtp": True, "num_mtp_modules": 3, "mtp_transformer_layers": 1}
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **mtp}))
    tensors = load_file(tmp_path / "model.safetensors")
    last = reference.config.num_hidden_layers
    tensors[f"model.layers.{last}.self_attn.q_proj.weight"] = torch.randn(64, 32)
    save_file(tensors, tmp_path / "model.safetensors")
    ids, _ = batch()
    assert_rel_close(logits(HfMoeForCausalLM.from_pretrained(tmp_path), ids), logits(reference, ids), 1e-5)


def test_hunyuan_ntk_alpha_rope_is_plain_rope_over_the_stretched_base(tmp_path):
    """Hunyuan-A13B's RoPE (`"dynamic"` with `alpha=1000`) imports as plain RoPE over `rope_theta · alpha^(d/(d-2))`:
    hf-moe's rotary embedding gives the cos/sin of transformers' class at positions up to max_position_embeddings,
    and past it those of transformers 5.23, whose frequencies are fixed; transformers 5.17's class switches there to
    dynamic NTK scaling of the unstretched base, which hf-moe does not follow."""
    raw = real_config("hunyuan-a13b")
    config = AutoConfig.from_pretrained(write(raw, tmp_path))
    ours = HfMoeRotaryEmbedding(to_hf_moe_config(FAMILIES["hunyuan_v1_moe"], config))
    x, limit = torch.zeros(1), raw["max_position_embeddings"]
    for positions, within in ((torch.tensor([[0, 1, 4097, limit - 1]]), True),
                              (torch.tensor([[0, limit, 4 * limit]]), False)):
        reference = HunYuanMoEV1RotaryEmbedding(config)  # a fresh one: 5.17's keeps the frequencies it grew
        gap = max((e - g).abs().max().item() for e, g in zip(reference(x, positions), ours(x, positions), strict=True))
        fixed = within or reference.rope_type != "dynamic"  # 5.23 names it "ntk_alpha" and never recomputes it
        assert (gap < 1e-6) == fixed, f"positions {positions.tolist()}: cos/sin differ by {gap}"


def test_an_hf_moe_model_of_hy3_shape_exports_by_auto_to_dots1(tmp_path):
    """Hy3's release (one dense layer, then MoE; no attention bias) is also a dots.llm1 model: an hf-moe checkpoint of
    it goes to dots1 by `--to auto` (registered earlier), whose class computes the same logits, while the Hy3 folder
    itself keeps its family."""
    config = AutoConfig.from_pretrained(write(shrink(real_config("hy3")), tmp_path / "config"))
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(reference)
    reference.save_pretrained(tmp_path / "hy3")
    assert convert(tmp_path / "hy3", tmp_path / "same", to="auto", progress=False).target_type == "hy_v3"
    convert(tmp_path / "hy3", tmp_path / "hf", progress=False)
    assert convert(tmp_path / "hf", tmp_path / "dots1", to="auto", progress=False).target_type == "dots1"
    ids, mask = batch()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "dots1")
    assert_rel_close(logits(exported, ids, mask), logits(reference.eval(), ids, mask), 1e-5, "hy3 as dots1")
