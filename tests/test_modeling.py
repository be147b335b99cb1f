"""The model: Auto round trip, cached generation, padding, experts implementations, checkpointing, training."""

import os

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_moe import (
    HfMoeForCausalLM,
    HfMoeForSequenceClassification,
    HfMoeModel,
    load_balancing_loss,
    record_routing,
)

from .conftest import assert_cached_greedy_equals_full_forward, assert_rel_close, tiny_config

IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm", "hf_moe_grouped"]


def make_model(**overrides) -> HfMoeForCausalLM:
    return HfMoeForCausalLM(tiny_config(**overrides)).eval()


def test_auto_classes_are_registered():
    kwargs = {k: v for k, v in tiny_config().to_diff_dict().items() if k != "model_type"}
    cfg = AutoConfig.for_model("hf_moe", **kwargs)
    assert isinstance(AutoModelForCausalLM.from_config(cfg), HfMoeForCausalLM)
    assert isinstance(AutoModel.from_config(cfg), HfMoeModel)
    assert isinstance(AutoModelForSequenceClassification.from_config(cfg), HfMoeForSequenceClassification)


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_reload_with_auto_gives_identical_logits(tmp_path, tie):
    model = make_model(tie_word_embeddings=tie, num_shared_experts=1, shared_expert_gate=True, first_k_dense=1,
                       num_hidden_layers=3)
    ids = torch.randint(0, 97, (2, 9))
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HfMoeForCausalLM
    with torch.no_grad():  # equal weights, but loaded ones need not be 64-byte aligned: BLAS may round otherwise
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# Granite's multipliers (its 1/head_dim attention scale) and FlexOlmo's norms after each sublayer
SCALED_POST_NORM = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.125,
                    "logits_scaling": 6.0, "norm_placement": "post"}


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 4}, {"qk_norm": True, "qkv_bias": True},
                                       {"qk_norm": True, "qk_norm_order": "after_rope"}, {"rope_interleave": True},
                                       SCALED_POST_NORM])
def test_greedy_generate_with_cache_equals_full_forward_without_cache(overrides):
    model = make_model(**overrides)
    ids = torch.randint(0, 97, (2, 5))
    assert_cached_greedy_equals_full_forward(model, ids, new_tokens=8)


def test_left_padding_leaves_real_tokens_unchanged_and_out_of_the_aux_loss():
    model = make_model()
    lengths = [7, 4]
    seqs = [torch.randint(1, 97, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
        ids[i, : width - len(s)] = torch.randint(1, 97, (width - len(s),))  # garbage under the mask
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, output_router_logits=True)
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            assert_rel_close(padded.logits[i, width - len(s):], alone, 1e-5, f"row {i}")
        # aux loss over the real tokens only equals the loss of the unpadded tokens, layer by layer
        for layer, logits in enumerate(padded.router_logits):
            real = logits[mask.reshape(-1).bool()]
            probs = real.softmax(-1)
            expected, _ = load_balancing_loss(probs, probs.topk(2, dim=-1).indices, 6)
            assert_rel_close(padded.router_outputs[layer].aux_loss, expected, 1e-6, f"aux layer {layer}")
        counts = padded.router_outputs[0].tokens_per_expert
        assert counts.sum().item() == sum(lengths) * 2


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS[1:])
def test_every_experts_implementation_matches_eager(impl):
    model = make_model(num_experts=8, num_experts_per_tok=3).train()
    ids = torch.randint(0, 97, (3, 11))
    model.set_experts_implementation("eager")
    ref_logits, ref_grads = _loss_and_grads(model, ids)
    model.set_experts_implementation(impl)
    assert model.config._experts_implementation == impl
    logits, grads = _loss_and_grads(model, ids)
    assert_rel_close(logits, ref_logits, 1e-5, "logits")
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        assert_rel_close(grads[name], ref_grads[name], 1e-5, name)


def test_experts_with_no_tokens_and_all_tokens_on_one_expert():
    """Skewed routing: a router that sends every token to experts 0 and 1 leaves the rest empty."""
    model = make_model(num_hidden_layers=1)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[0] = 5.0
        block.router.weight[1] = 4.0
    x = torch.randn(1, 13, 32).abs()
    outs = {}
    for impl in IMPLEMENTATIONS:
        model.set_experts_implementation(impl)
        with record_routing(block) as routings:
            outs[impl] = block(x)
        routing = routings[0]
    assert set(routing.top_k_index.unique().tolist()) == {0, 1}
    for impl in IMPLEMENTATIONS[1:]:
        assert_rel_close(outs[impl], outs["eager"], 1e-5, impl)


@pytest.mark.parametrize("overrides", [{}, SCALED_POST_NORM])
def test_gradient_checkpointing_gives_the_same_gradients(overrides):
    model = make_model(num_shared_experts=1, **overrides).train()
    ids = torch.randint(0, 97, (2, 10))
    _, ref = _loss_and_grads(model, ids)
    model.gradient_checkpointing_enable()
    _, grads = _loss_and_grads(model, ids)
    for name in ref:
        assert_rel_close(grads[name], ref[name], 1e-5, name)
    assert any("router" in n for n in grads), "router must receive gradient through the aux loss and combine"


def test_reentrant_gradient_checkpointing_that_would_drop_the_router_losses_is_refused():
    """Reentrant checkpointing runs each layer without gradient and recomputes it in backward, where its router outputs
    are not collected: the router losses would add to the loss and train nothing. Refused with the fix named; without
    router losses (both coefficients 0) it trains as without checkpointing."""
    ids = torch.randint(0, 97, (2, 10))
    model = make_model().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        model(ids, labels=ids)
    model = make_model(router_aux_loss_coef=0.0, router_z_loss_coef=0.0).train()
    _, ref = _loss_and_grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    _, grads = _loss_and_grads(model, ids)
    for name in ref:
        assert_rel_close(grads[name], ref[name], 1e-5, name)


def test_a_few_optimizer_steps_reduce_the_loss():
    model = make_model().train()
    ids = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_aux_terms_join_the_loss_only_with_labels():
    model = make_model(router_aux_loss_coef=0.25, router_z_loss_coef=0.125)
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert_rel_close(out.loss, lm + 0.25 * out.aux_loss + 0.125 * out.z_loss, 1e-6, "loss")
    no_labels = model(ids)
    assert no_labels.loss is None and no_labels.router_logits is None
    assert model(ids, output_router_logits=True).router_logits[0].shape == (16, 6)


def test_dense_layers_and_shared_experts_are_built_where_configured():
    model = make_model(num_hidden_layers=4, first_k_dense=1, moe_layer_freq=2, num_shared_experts=2)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["HfMoeMLP", "HfMoeSparseMoeBlock", "HfMoeMLP", "HfMoeSparseMoeBlock"]
    assert model.model.layers[1].mlp.shared_experts.gate_proj.out_features == 48


def test_sequence_classification_runs_and_uses_the_last_real_token():
    model = HfMoeForSequenceClassification(tiny_config(pad_token_id=0, num_labels=3)).eval()
    ids = torch.randint(1, 97, (2, 6))
    ids[1, 4:] = 0
    out = model(ids)
    assert out.logits.shape == (2, 3)
    alone = model(ids[1:, :4]).logits
    assert_rel_close(out.logits[1:], alone, 1e-5)


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("router_logits", [False, True])
def test_output_tuples_line_up_with_transformers_moe_models(labels, router_logits):
    """`outputs[0]` is the loss with labels, the logits without (unless router logits are asked for). Without labels
    the logits sit where Mixtral's tuple has them (the peer's own class, same flags): the aux loss comes first only
    with router logits. (With labels hf-moe also reports the aux loss it added to the loss, which Mixtral adds only
    with router logits.)"""
    from transformers import MixtralConfig, MixtralForCausalLM

    ours = make_model(num_hidden_layers=2)
    peer = MixtralForCausalLM(MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)).eval()
    ids = torch.randint(0, 97, (2, 8))
    kwargs = dict(labels=ids if labels else None, output_router_logits=router_logits, use_cache=False,
                  return_dict=False)
    with torch.no_grad():
        mine, theirs = ours(ids, **kwargs), peer(ids, **kwargs)
        mine_dict = ours(ids, **{**kwargs, "return_dict": True})
    logits_at = [next(i for i, t in enumerate(out) if torch.is_tensor(t) and t.dim() == 3) for out in (mine, theirs)]
    if not labels or router_logits:
        assert logits_at[0] == logits_at[1]
    first = mine_dict.loss if labels else mine_dict.aux_loss if router_logits else mine_dict.logits
    assert torch.equal(mine[0], first)
    assert (mine_dict.aux_loss is not None) == (labels or router_logits)
    assert (mine_dict.router_logits is not None) == router_logits


def test_base_model_honours_return_dict_false_and_records_outputs_on_request():
    model = make_model(num_hidden_layers=3, first_k_dense=1)
    base = model.model
    ids = torch.randint(0, 97, (2, 9))
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out)) for layer in base.layers]
    with torch.no_grad():
        full = base(ids, output_hidden_states=True, output_router_logits=True, output_router_outputs=True)
        as_tuple = base(ids, return_dict=False)
    for hook in hooks:
        hook.remove()
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full.last_hidden_state)
    model.config.return_dict = False
    with torch.no_grad():
        assert torch.equal(base(ids)[0], full.last_hidden_state)
    # hidden states: the embeddings, every layer's output but the last, then the normed last one
    assert len(full.hidden_states) == 4
    assert torch.equal(full.hidden_states[0], base.embed_tokens(ids))
    for i in (1, 2):
        assert torch.equal(full.hidden_states[i], seen[i - 1][0])  # a layer returns (output, routing)
    assert torch.equal(full.hidden_states[3], full.last_hidden_state)
    # one router output per MoE layer (layer 0 is dense), and the logits are theirs
    assert len(full.router_outputs) == 2 and len(full.router_logits) == 2
    assert all(torch.equal(r.logits, logits) for r, logits in zip(full.router_outputs, full.router_logits))
    plain = base(ids, return_dict=True)
    assert plain.router_logits is None and plain.router_outputs is None


@pytest.mark.parametrize("damage", ["missing expert", "missing router", "renamed experts", "extra expert"])
def test_loading_refuses_a_checkpoint_whose_moe_tensors_do_not_match(tmp_path, damage):
    """Missing or foreign-named router / expert tensors would be initialised randomly: refused, naming them."""
    from safetensors.torch import load_file, save_file

    model = make_model()
    model.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    name = {"missing expert": "model.layers.1.mlp.experts.down_proj",
            "missing router": "model.layers.0.mlp.router.weight",
            "renamed experts": "model.layers.1.mlp.experts.gate_up_proj",
            "extra expert": None}[damage]
    if damage == "renamed experts":
        state["model.layers.1.mlp.experts.0.w1.weight"] = state.pop(name)[0]
    elif damage == "extra expert":
        name = "model.layers.0.mlp.experts.6.w2.weight"
        state[name] = torch.zeros(32, 24)
    else:
        del state[name]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match this model's MoE layers") as error:
        HfMoeForCausalLM.from_pretrained(tmp_path)
    assert name in str(error.value) or "w1" in str(error.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rms_norm_equals_float64_maths_and_transformers_in_float32(dtype):
    """The decoder's RMSNorm (torch's `rms_norm`) against the float64 formula: in bf16 within one rounding of the
    output (Llama's rounds twice), in float32 within a few (the reduction), in float64 to float64's precision (Llama's
    computes float64 in float32); bit for bit transformers' `LlamaRMSNorm` in float32. A weight in another dtype
    promotes as Llama's does."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from hf_moe.attention import HfMoeRMSNorm

    generator = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 5, 96, generator=generator)).to(dtype)[..., :64]  # rows not contiguous
    weight = (1 + 0.2 * torch.randn(64, generator=generator)).to(dtype)
    ours, llama = HfMoeRMSNorm(64, eps=1e-5).to(dtype), LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(weight)
        llama.weight.copy_(weight)
    x64, w64 = x.double(), weight.double()
    expected = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    out = ours(x)
    assert out.dtype == dtype
    roundings = 1 if dtype == torch.bfloat16 else 4
    ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((out.double() - expected).abs() <= roundings * ulp).all()
    if dtype == torch.float32:
        assert torch.equal(out, llama(x))
    with torch.no_grad():
        mixed = ours.float()(x.to(torch.bfloat16))
    assert mixed.dtype == torch.float32


def test_rope_on_adjacent_pairs_of_a_partial_rotary_head_equals_ernies_rotation():
    """`rope_interleave` on the rotated part of a head (`partial_rotary_factor` < 1, a combination no imported family
    has): the q·k products of ERNIE-4.5's own RoPE on adjacent pairs over those dimensions, the others unrotated."""
    from transformers.models.ernie4_5.modeling_ernie4_5 import apply_rotary_pos_emb as ernie_rope

    from hf_moe.attention import HfMoeRotaryEmbedding, apply_partial_rotary_pos_emb

    config = tiny_config(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 100.0,
                                                       "partial_rotary_factor": 0.5}, rope_interleave=True)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 16, generator=generator), torch.randn(2, 2, 7, 16, generator=generator)
    cos, sin = HfMoeRotaryEmbedding(config)(q, torch.arange(7)[None].expand(2, -1))
    ours_q, ours_k = apply_partial_rotary_pos_emb(q, k, cos, sin, interleave=True)
    rot_q, rot_k = ernie_rope(q[..., :8], k[..., :8], cos, sin)
    theirs_q, theirs_k = torch.cat([rot_q, q[..., 8:]], -1), torch.cat([rot_k, k[..., 8:]], -1)
    scores = ours_q @ ours_k.repeat_interleave(2, dim=1).transpose(-1, -2)
    expected = theirs_q @ theirs_k.repeat_interleave(2, dim=1).transpose(-1, -2)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours_q[..., 8:], q[..., 8:]), "the dimensions past the rotary ones pass through"


@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "default", "partial_rotary_factor": 0.5},
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cos_sin_equal_llamas(rope, dtype):
    """hf-moe's RoPE (one custom op) gives exactly the cosines and sines of transformers' `LlamaRotaryEmbedding` on
    the same module, for each RoPE type (a dynamic one past its original length too, where it updates its
    frequencies first) and dtype."""
    import copy

    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from hf_moe.attention import HfMoeRotaryEmbedding

    config = tiny_config(head_dim=16, max_position_embeddings=64,
                         rope_parameters={"rope_theta": 1000.0, **rope})
    ours = HfMoeRotaryEmbedding(config)
    theirs = copy.deepcopy(ours)
    x = torch.zeros(1, dtype=dtype)
    for positions in (torch.arange(7)[None].expand(2, -1), torch.arange(200)[None] * 3):
        got = ours(x, positions)
        want = LlamaRotaryEmbedding.forward(theirs, x, positions)
        assert torch.equal(ours.inv_freq, theirs.inv_freq)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype == dtype and torch.equal(a, b)


@pytest.mark.parametrize("model_type", ["llama", "cohere2_moe"])
def test_loading_a_model_type_hf_moe_does_not_import_is_refused_by_name(tmp_path, model_type):
    """A dense checkpoint, or an MoE one of a family hf-moe does not import, is refused naming its model_type and
    what to do instead (before, transformers loaded it into an HfMoeConfig it does not describe and failed later)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_moe.interop import InteropError

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(InteropError, match=rf"model_type='{model_type}'.*hf-moe upcycle.*AutoModelForCausalLM"):
        HfMoeForCausalLM.from_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)).__name__.lower().startswith(model_type.split("_")[0])
