"""The foreign families' test cases, shared by `test_interop.py`: a tiny transformers config per case, the builder
that saves a randomised model of it, and the helpers that compare checkpoints and logits."""

import json
import shutil

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_moe.interop import FAMILIES as REGISTERED

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None)
# 16 indexer heads: a key seldom scores exactly 0, a tie transformers' CPU top-k breaks otherwise than hf-moe
DSA = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
           routed_scaling_factor=2.5, num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=6, index_n_heads=16, index_head_dim=8)
FAMILIES = {  # test case → its transformers config (of `model_type` where the case is not named after one)
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, num_hidden_layers=3,
                      shared_expert_intermediate_size=24, mlp_only_layers=[1], norm_topk_prob=False),
    "qwen2_moe_mixed": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                            num_hidden_layers=3, shared_expert_intermediate_size=24, use_sliding_window=True,
                            sliding_window=4, max_window_layers=3),  # even layers slide (transformers 5's rule)
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16,
                      decoder_sparse_step=2, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, attention_bias=True, tie_word_embeddings=True),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
                     first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, use_qk_norm=True,
                     attention_bias=True, head_dim=16,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=4,
                        v_head_dim=6, rope_interleave=True, num_nextn_predict_layers=0,
                        rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                                         "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}),
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
                  first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                  head_dim=16, attention_bias=True, sliding_window=6, max_window_layers=0),
    "dots1_mixed": dict(model_type="dots1", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, head_dim=16,
                        sliding_window=4, max_window_layers=1),  # full attention, then a sliding layer
    "solar_open": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                       n_group=2, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False, attention_bias=True,
                       head_dim=16),
    "glm4_moe_lite": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                          n_group=2, topk_group=1, routed_scaling_factor=1.8, num_hidden_layers=3,
                          mlp_layer_types=["sparse", "dense", "sparse"], num_key_value_heads=4, q_lora_rank=None,
                          kv_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, rope_interleave=False,
                          attention_bias=True),
    "minimax_m2": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16, rotary_dim=8,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=2,
                        first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=10,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, attention_bias=True,
                        rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                                         "mscale": 0.9, "mscale_all_dim": 1.0, "rope_theta": 10000.0}),
    "deepseek_v2_lite": dict(model_type="deepseek_v2", n_routed_experts=6, num_experts_per_tok=3,
                             moe_intermediate_size=16, n_shared_experts=1, topk_method="greedy", n_group=2,
                             topk_group=1, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=10,
                             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),  # greedy ignores the groups
    "ernie4_5_moe": dict(moe_num_experts=6, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=2,
                         num_hidden_layers=4, moe_layer_start_index=1, moe_layer_interval=2),  # MoE layers 1, 3
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, head_dim=16, attention_bias=True, tie_word_embeddings=True),
    # DeepSeek sparse attention: each query keeps its index_topk best keys of the test sequences' 11, or all of them
    "deepseek_v32": dict(DSA, index_topk=4, first_k_dense_replace=1, n_group=4, topk_group=2,
                         rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                                          "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}),
    "deepseek_v32_keeps_all": dict(DSA, model_type="deepseek_v32", index_topk=16, first_k_dense_replace=0, n_group=1,
                                   topk_group=1),
    "glm_moe_dsa": dict(DSA, index_topk=5, index_head_dim=12, num_hidden_layers=3, first_k_dense_replace=1,
                        mlp_layer_types=["dense", "sparse", "sparse"], n_group=2, topk_group=1, attention_bias=True),
    "hy_v3": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, num_shared_experts=2, head_dim=16,
                  num_hidden_layers=3, mlp_layer_types=["sparse", "dense", "sparse"], router_scaling_factor=2.5,
                  attention_bias=True),
    "mistral4": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=True,
                     num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=12, qk_rope_head_dim=4,
                     v_head_dim=6, attention_bias=True,
                     rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4,
                                      "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0,
                                      "llama_4_scaling_beta": 0.1}),  # queries scaled past position 4
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                       attention_multiplier=0.125, logits_scaling=6.0, attention_bias=True),
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=6.0,
                             residual_multiplier=0.5, attention_multiplier=0.0625, logits_scaling=3.0,
                             shared_intermediate_size=24, tie_word_embeddings=True),
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2, head_dim=16, norm_topk_prob=True),
}


def randomize(model: torch.nn.Module) -> None:
    """Every parameter and persistent buffer random (norm weights around 1), so each one changes the logits."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name:
                tensor.copy_(1 + 0.2 * noise)
            elif "gate.weight" in name and "experts" not in name:
                tensor.copy_(0.5 * noise)  # routers: varied routing
            else:
                tensor.copy_(0.1 * noise)


def causal_lm_class(model_type: str):
    """transformers' causal-LM class for `model_type`: `AutoModelForCausalLM`, or the family's `architectures` class
    where transformers registers no causal LM for the type (Mistral 4)."""
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return getattr(transformers, REGISTERED[model_type].architecture)


def load_foreign(folder) -> torch.nn.Module:
    """A family's checkpoint folder loaded by transformers' own class."""
    return causal_lm_class(AutoConfig.from_pretrained(folder).model_type).from_pretrained(folder)


def build(case: str, folder) -> torch.nn.Module:
    """The tiny random model of test case `case` saved by transformers into `folder`; returns it in evaluation mode."""
    kwargs = {**BASE, **FAMILIES[case]}
    config = AutoConfig.for_model(kwargs.pop("model_type", case), **kwargs)
    cls = causal_lm_class(config.model_type)
    model = cls.from_config(config) if cls is AutoModelForCausalLM else cls(config)
    randomize(model)
    model.save_pretrained(folder)
    return model.eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a left-padded attention mask (padding must not change routing or attention)."""
    ids = torch.randint(3, BASE["vocab_size"], (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def edit_config(folder, dest, **changes) -> None:
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))


def tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (single file or shards)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out
