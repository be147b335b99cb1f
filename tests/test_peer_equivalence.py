"""Peer equivalence: transformers' own Qwen3-MoE and Mixtral weights load into HfMoeForCausalLM unchanged in
function, and our load-balancing loss equals transformers' `load_balancing_loss_func`."""

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from hf_moe import HfMoeConfig, HfMoeForCausalLM

from .conftest import assert_rel_close

COMMON = dict(vocab_size=89, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)


def qwen3_moe(layers: int):
    cfg = Qwen3MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=layers,
                         num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, head_dim=12,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e5}, router_aux_loss_coef=0.02)
    ours = HfMoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=layers,
                       num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, head_dim=12, qk_norm=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 5e5}, router_aux_loss_coef=0.02)
    return Qwen3MoeForCausalLM(cfg), ours


def mixtral(layers: int):
    cfg = MixtralConfig(**COMMON, intermediate_size=24, num_hidden_layers=layers, num_local_experts=4,
                        num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                        router_aux_loss_coef=0.02)
    ours = HfMoeConfig(**COMMON, intermediate_size=24, num_hidden_layers=layers, num_experts=4,
                       num_experts_per_tok=2, norm_topk_prob=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}, router_aux_loss_coef=0.02)
    return MixtralForCausalLM(cfg), ours


def port(peer, our_config) -> HfMoeForCausalLM:
    """Peer weights under our names: the router is `mlp.router` where transformers says `mlp.gate`."""
    state = {k.replace(".mlp.gate.", ".mlp.router."): v for k, v in peer.state_dict().items()}
    ours = HfMoeForCausalLM(our_config)
    missing, unexpected = ours.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return ours


@pytest.mark.parametrize("build", [qwen3_moe, mixtral], ids=["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("layers", [1, 3])
def test_logits_and_aux_loss_equal_the_peer(build, layers):
    peer, our_config = build(layers)
    with torch.no_grad():  # random, non-trivial router and norms (peers start some of them at zero / one)
        for name, p in peer.named_parameters():
            if "gate" in name or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.3)
    ours = port(peer.eval(), our_config).eval()
    ids = torch.randint(0, 89, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        theirs = peer(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        mine = ours(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    real = mask[:, :, None].bool()
    assert_rel_close(mine.logits.masked_select(real), theirs.logits.masked_select(real), 1e-5, "logits")
    for a, b in zip(mine.router_logits, theirs.router_logits):
        assert_rel_close(a, b.float(), 1e-5, "router logits")
    # transformers pools every layer's statistics before multiplying; hf-moe averages per-layer losses.
    # Layer by layer the two agree exactly, and for one MoE layer so does the whole.
    top_k = our_config.num_experts_per_tok
    per_layer = [load_balancing_loss_func((logits,), our_config.num_experts, top_k, mask)
                 for logits in theirs.router_logits]
    for layer, expected in enumerate(per_layer):
        assert_rel_close(mine.router_outputs[layer].aux_loss, expected, 1e-5, f"aux layer {layer}")
    assert_rel_close(mine.aux_loss, torch.stack(per_layer).mean(), 1e-5, "aux mean")
    if layers == 1:
        assert_rel_close(mine.aux_loss, theirs.aux_loss, 1e-5, "aux loss")
        lm_and_aux = mine.loss - our_config.router_z_loss_coef * mine.z_loss
        assert_rel_close(lm_and_aux, theirs.loss, 1e-5, "loss")
