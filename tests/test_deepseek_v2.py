"""DeepSeek-V2's MoE block in hf-moe against transformers' own `DeepseekV2Moe`: softmax scores taken as they are times
`routed_scaling_factor`, greedy top-k (which ignores the groups a config names) and group-limited greedy (groups
ranked by their best expert, `group_score="max"`), shared experts. Whole models, imports and exports are in
`test_interop.py`."""

import pytest
import torch
from transformers import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

from hf_moe import record_routing
from hf_moe.interop import FAMILIES, to_hf_moe_config
from hf_moe.moe.block import HfMoeSparseMoeBlock

from .conftest import assert_rel_close


@pytest.mark.parametrize("topk_method,groups", [
    ("group_limited_greedy", (4, 1)), ("group_limited_greedy", (8, 2)), ("greedy", (4, 1)), ("greedy", (None, None)),
])
def test_moe_block_routes_and_computes_as_deepseek_v2(topk_method, groups):
    config = DeepseekV2Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=3,
                              n_shared_experts=2, routed_scaling_factor=16.0, topk_method=topk_method,
                              n_group=groups[0], topk_group=groups[1], num_attention_heads=4, kv_lora_rank=8,
                              q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    reference = DeepseekV2Moe(config)
    with torch.no_grad():
        for tensor in reference.parameters():
            tensor.normal_(0.0, 0.3 if tensor is reference.gate.weight else 0.1)
    block = HfMoeSparseMoeBlock(to_hf_moe_config(FAMILIES["deepseek_v2"], config), layer_idx=1).eval()
    state = {name.replace("gate.weight", "router.weight"): t for name, t in reference.state_dict().items()}
    assert block.load_state_dict(state, strict=True)
    x = torch.randn(4, 25, config.hidden_size)

    with torch.no_grad():
        _, want_weights, want_index = reference.gate(x)
        with record_routing(block) as routings:
            got = block(x)
        want = reference(x)
    order, got_order = want_index.sort(dim=-1), routings[0].top_k_index.sort(dim=-1)
    assert torch.equal(got_order.values, order.values), "selected experts differ"
    assert_rel_close(routings[0].top_k_weights.gather(1, got_order.indices),
                     want_weights.gather(1, order.indices), 1e-6, "combine weights")
    assert_rel_close(got, want, 1e-5, "block output")
    if topk_method == "group_limited_greedy":  # the group limit changes some tokens' experts
        plain = (x.view(-1, config.hidden_size) @ reference.gate.weight.T).topk(3).indices.sort(dim=-1).values
        assert not torch.equal(plain, order.values)
