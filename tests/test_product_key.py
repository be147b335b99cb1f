"""Product-key routing and layers (FlashMoE / PEER) against float64 maths written here: the exact k² selection
equals brute force over all N² pairs (ties included), the layer equals a float64 loop, FlashMoE's weights give
FlashMoE's function, and the layer works in a model (generate, metrics, save/load, checkpointing, compile, bf16)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conversions import flash_moe_block_state_dict, flash_moe_config_fields
from hf_moe import HfMoeConfig, HfMoeForCausalLM, HfMoeSparseMoeBlock, product_key_top_k, router_metrics
from hf_moe.moe.router.product_key import _pairs_torch

from .conftest import tiny_config


def brute_force(log_probs: torch.Tensor, k: int, sum_dtype: torch.dtype = torch.float64
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """All N² sums of one head `[2, N]` (formed in `sum_dtype`; float64: exact for float32 halves), ranked by
    (score desc, expert asc), the first k."""
    n, log_probs = log_probs.shape[-1], log_probs.detach().to(sum_dtype)
    pairs = sorted(((float(log_probs[0, i] + log_probs[1, j]), i * n + j) for i in range(n) for j in range(n)),
                   key=lambda p: (-p[0], p[1]))[:k]
    return torch.tensor([e for _, e in pairs]), torch.tensor([s for s, _ in pairs], dtype=torch.float64)


def near_tie_log_probs(rows: int, heads: int, n: int) -> torch.Tensor:
    """float32 `[rows, heads, 2, N]` whose k best pairs differ when ranked by float32 sums: half 1's two best keys
    are one float32 ulp apart (the worse one at the lower index, both near −0.5), half 2's keys are near −20, where
    a float32 sum's ulp is 32 times larger, so rounding ties pairs that differ and the lower expert wins the tie."""
    half_1 = -1 - torch.rand(rows, heads, n)
    half_1[..., 0] = torch.nextafter(torch.tensor(-0.5), torch.tensor(-1.0))
    half_1[..., 1] = -0.5
    half_2 = -20 - torch.rand(rows, heads, n)
    return torch.stack([half_1, half_2], dim=2)


@pytest.mark.parametrize("n,k,levels", [(5, 3, 3), (6, 8, 2), (4, 16, 2), (7, 4, 1000)],
                         ids=["ties", "k>N-ties", "k=N²", "distinct"])
def test_selection_equals_brute_force_over_all_pairs(n, k, levels):
    torch.manual_seed(0)
    logits = torch.randint(0, levels, (9, 3, 2, n)).double()  # few levels: many exactly tied sums
    log_probs = logits.log_softmax(dim=-1)
    index, score = product_key_top_k(log_probs, k)
    for t in range(9):
        for h in range(3):
            want_index, want_score = brute_force(log_probs[t, h], k)
            assert torch.equal(index[t, h], want_index), (t, h, index[t, h], want_index)
            assert torch.equal(score[t, h], want_score)
    experts, keys = _pairs_torch(log_probs, k)
    assert torch.equal(experts, index) and torch.equal(keys[..., 0, :] * n + keys[..., 1, :] - n, index)


@pytest.mark.parametrize("n,k", [(2, 3), (7, 13), (12, 64), (100, 64), (512, 64)],
                         ids=["k>N", "k>N-odd", "k>N-12", "N=100", "N=512"])
def test_float32_selection_ranks_by_exact_sums(n, k):
    """float32 halves: the order is that of the exact (float64) sums, ties to the lower expert, also where float32
    sums would merge two different sums (the first token of each head) and with several heads."""
    torch.manual_seed(n)
    rows, heads = (1, 2) if n >= 100 else (3, 3)
    log_probs = torch.randn(rows, heads, 2, n).log_softmax(-1)
    log_probs[0] = near_tie_log_probs(1, heads, n)[0]
    index, score = product_key_top_k(log_probs, k)
    assert score.dtype == torch.float32
    for t in range(rows):
        for h in range(heads):
            want_index, _ = brute_force(log_probs[t, h], k)
            assert torch.equal(index[t, h], want_index), (t, h)
            want_score = log_probs[t, h, 0, want_index // n] + log_probs[t, h, 1, want_index % n]
            assert torch.equal(score[t, h], want_score), (t, h)  # the float32 sum, gathered
    if k > 1:  # the near-tie rows do tell the exact order from the float32 one
        assert not torch.equal(brute_force(log_probs[0, 0], k, torch.float32)[0], index[0, 0])


def _config(**overrides) -> HfMoeConfig:
    fields = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=32,
                  router_type="product_key", num_experts=36, num_experts_per_tok=4, moe_intermediate_size=1,
                  gated_experts=False, num_shared_experts=1, shared_expert_intermediate_size=20,
                  router_aux_loss_coef=0.01)
    fields.update(overrides)
    return HfMoeConfig(**fields)


def _block(config: HfMoeConfig, impl: str = "hf_moe_gathered") -> HfMoeSparseMoeBlock:
    config._experts_implementation = impl
    block = HfMoeSparseMoeBlock(config).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.4)
    return block


def layer_loop(block: HfMoeSparseMoeBlock, x: torch.Tensor, config: HfMoeConfig) -> torch.Tensor:
    """The product-key layer token by token in float64: normalise, two halves per head, brute-force top-k,
    weights p₁p₂ (renormalised), `Σ w · down[e]·act(up[e]·x)`, plus the shared SwiGLU MLP."""
    act = {"relu2": lambda h: torch.relu(h) ** 2, "silu": F.silu}[config.hidden_act]
    n, heads, k = int(config.num_experts**0.5), config.product_key_heads, config.num_experts_per_tok
    experts, shared = block.experts, block.shared_experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        q = x[t]
        if config.product_key_query_norm == "layer_norm":
            q = (q - q.mean()) / torch.sqrt(q.var(unbiased=False) + 1e-5)
        logits = (block.router.weight @ q).view(heads, 2, n)
        for h in range(heads):
            index, score = brute_force(logits[h].log_softmax(-1), k)
            weight = score.exp()
            if config.norm_topk_prob:
                weight = weight / weight.sum()
            for e, w in zip(index.tolist(), weight):
                out[t] += w * (experts.down_proj[e] @ act(experts.up_proj[e] @ x[t]))
        out[t] += shared.down_proj.weight @ (act(shared.gate_proj.weight @ x[t]) * (shared.up_proj.weight @ x[t]))
    return out


@pytest.mark.parametrize("impl", ["hf_moe_gathered", "hf_moe_grouped", "eager"])
@pytest.mark.parametrize("overrides", [
    {"hidden_act": "relu2"},
    {"hidden_act": "silu", "moe_intermediate_size": 3, "norm_topk_prob": False},
    {"hidden_act": "silu", "product_key_heads": 2, "product_key_query_norm": "none"},
], ids=["singletons-relu2", "3-neurons-silu", "peer-2-heads"])
def test_layer_equals_float64_loop_with_gradients(impl, overrides):
    torch.manual_seed(0)
    config = _config(**overrides)
    block = _block(config, impl)
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    out = block(x)
    want = layer_loop(block, x.detach(), config)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    # gradients: the same function through a differently built graph (the loop) must agree
    grad = torch.randn_like(out)
    params = [p for p in block.parameters()]
    got = torch.autograd.grad(out, [x, *params], grad)
    x_ref = x.detach().clone().requires_grad_()
    want = torch.autograd.grad(layer_loop_differentiable(block, x_ref, config), [x_ref, *params], grad)
    for g, w, name in zip(got, want, ["x", *(n for n, _ in block.named_parameters())]):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


def layer_loop_differentiable(block, x, config):
    """[`layer_loop`] with the selection taken from brute force but the arithmetic kept in autograd."""
    act = {"relu2": lambda h: torch.relu(h) ** 2, "silu": F.silu}[config.hidden_act]
    n, heads, k = int(config.num_experts**0.5), config.product_key_heads, config.num_experts_per_tok
    experts, shared = block.experts, block.shared_experts
    rows = []
    for t in range(x.shape[0]):
        q = x[t]
        if config.product_key_query_norm == "layer_norm":
            q = (q - q.mean()) / torch.sqrt(q.var(unbiased=False) + 1e-5)
        log_probs = (block.router.weight @ q).view(heads, 2, n).log_softmax(-1)
        row = shared.down_proj.weight @ (act(shared.gate_proj.weight @ x[t]) * (shared.up_proj.weight @ x[t]))
        for h in range(heads):
            index, _ = brute_force(log_probs[h].detach(), k)
            weight = torch.stack([(log_probs[h, 0, e // n] + log_probs[h, 1, e % n]).exp() for e in index.tolist()])
            if config.norm_topk_prob:
                weight = weight / weight.sum()
            for e, w in zip(index.tolist(), weight):
                row = row + w * (experts.down_proj[e] @ act(experts.up_proj[e] @ x[t]))
        rows.append(row)
    return torch.stack(rows)


def test_flash_moe_weights_give_flash_moe_outputs():
    """FlashMoE's module, written out from its reference forward: BatchNorm1d(affine=False) (running statistics in
    eval, batch statistics in training), log-softmax halves, exact top-k, `act(down_embed·x)·w·up_embed` plus the
    SwiGLU MLP. Its state dict, converted, must give the same outputs in eval and in training."""
    torch.manual_seed(0)
    n, hidden, inter, k = 6, 16, 20, 5
    flash = {
        "gate_proj.weight": torch.randn(inter, hidden, dtype=torch.float64) * 0.3,
        "up_proj.weight": torch.randn(inter, hidden, dtype=torch.float64) * 0.3,
        "down_proj.weight": torch.randn(hidden, inter, dtype=torch.float64) * 0.3,
        "router_gate.weight": torch.randn(2 * n, hidden, dtype=torch.float64),
        "router_norm.running_mean": torch.randn(hidden, dtype=torch.float64),
        "router_norm.running_var": torch.rand(hidden, dtype=torch.float64) + 0.5,
        "router_norm.num_batches_tracked": torch.tensor(3),
        "down_embed.weight": torch.randn(n * n, hidden, dtype=torch.float64),
        "up_embed.weight": torch.randn(n * n, hidden, dtype=torch.float64),
    }
    config = HfMoeConfig(num_hidden_layers=1, num_attention_heads=2, vocab_size=32, intermediate_size=24,
                         **flash_moe_config_fields(hidden, inter, "silu", n * n, k, norm_topk_prob=False))
    config._experts_implementation = "hf_moe_gathered"
    block = HfMoeSparseMoeBlock(config).double()
    block.load_state_dict(flash_moe_block_state_dict(flash))
    x = torch.randn(2, 5, hidden, dtype=torch.float64)

    def flash_forward(training: bool) -> torch.Tensor:
        flat = x.reshape(-1, hidden)
        if training:
            mean, var = flat.mean(0), flat.var(0, unbiased=False)
        else:
            mean, var = flash["router_norm.running_mean"], flash["router_norm.running_var"]
        logits = ((flat - mean) / torch.sqrt(var + 1e-5)) @ flash["router_gate.weight"].T
        out = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            index, score = brute_force(logits[t].view(2, n).log_softmax(-1), k)
            h = F.silu(flash["down_embed.weight"][index] @ flat[t]) * score.exp()
            out[t] = h @ flash["up_embed.weight"][index]
        mlp = F.silu(flat @ flash["gate_proj.weight"].T) * (flat @ flash["up_proj.weight"].T)
        return (out + mlp @ flash["down_proj.weight"].T).view_as(x)

    with torch.no_grad():
        torch.testing.assert_close(block.eval()(x), flash_forward(False), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(block.train()(x), flash_forward(True), rtol=1e-10, atol=1e-10)
    assert not block.train().router.is_causal and block.eval().router.is_causal


def test_running_norm_routes_each_token_alone_and_updates_batchnorm_statistics():
    """`running_norm`: in training each batch is standardised with the running statistics from before it (a token's
    output does not depend on its batch) and then updates them as BatchNorm's momentum rule, in float64 here; in
    eval it is torch's BatchNorm in eval mode (the same buffers load into a `batch_norm` block)."""
    torch.manual_seed(0)
    block = _block(_config(product_key_query_norm="running_norm")).train()
    assert block.router.is_causal
    x = torch.randn(6, 16, dtype=torch.float64)
    stats = {k: v.clone() for k, v in block.router.norm.state_dict().items()}
    whole = block(x)
    updated = {k: v.clone() for k, v in block.router.norm.state_dict().items()}
    block.router.norm.load_state_dict(stats)
    torch.testing.assert_close(whole[:2], block(x[:2]), rtol=1e-12, atol=1e-12)
    m = block.router.norm.momentum
    torch.testing.assert_close(updated["running_mean"], (1 - m) * stats["running_mean"] + m * x.mean(0))
    torch.testing.assert_close(updated["running_var"], (1 - m) * stats["running_var"] + m * x.var(0, correction=1))
    assert updated["num_batches_tracked"] == stats["num_batches_tracked"] + 1
    reference = _block(_config(product_key_query_norm="batch_norm"))
    reference.load_state_dict(block.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(block.eval()(x), reference.eval()(x), rtol=1e-12, atol=1e-12)
        before = block.router.norm.running_var.clone()
        block.train()(x[:1])  # one token: no variance to take, the statistics stay
    assert torch.equal(block.router.norm.running_var, before)


@pytest.mark.parametrize("reentrant", [False, True])
def test_running_norm_under_gradient_checkpointing_routes_as_the_forward_did(reentrant):
    """A checkpoint recomputes the router in backward, after the batch moved the running statistics: the recompute
    must standardise as the forward did (gradients equal a run without checkpointing, where routing would otherwise
    change) and the statistics move once. A second, different batch still updates them."""
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(
        router_type="product_key", num_experts=49, num_experts_per_tok=5, moe_intermediate_size=1,
        gated_experts=False, hidden_act="relu2", moe_layers=[1], product_key_query_norm="running_norm"))
    with torch.no_grad():
        model.model.layers[1].mlp.router.weight.normal_()
        model.model.layers[1].mlp.router.norm.running_var.uniform_(0.2, 3.0)  # far from the batches' statistics
    checkpointed, plain = copy.deepcopy(model).train(), model.train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for ids in torch.randint(1, 97, (2, 2, 12)):
        for m in (checkpointed, plain):  # the language-model loss alone (reentrant checkpoints drop side outputs)
            F.cross_entropy(m(ids).logits.flatten(0, 1), ids.flatten()).backward()
    for (name, a), b in zip(checkpointed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    norms = [m.model.layers[1].mlp.router.norm for m in (checkpointed, plain)]
    assert norms[0].num_batches_tracked == norms[1].num_batches_tracked == 2
    torch.testing.assert_close(norms[0].running_var, norms[1].running_var, rtol=0, atol=0)


def test_routing_is_batch_independent_by_default():
    torch.manual_seed(0)
    block = _block(_config()).train()
    x = torch.randn(6, 16, dtype=torch.float64)
    torch.testing.assert_close(block(x)[:2], block(x[:2]), rtol=1e-12, atol=1e-12)


def test_statistics_never_build_all_pairs_and_match_dense_definitions():
    """The switch loss, z-loss and entropy from the halves equal the definitions over the `[T, N²]` distribution."""
    torch.manual_seed(0)
    config = _config(product_key_heads=2, router_z_loss_coef=0.01)
    block = _block(config)
    x = torch.randn(8, 16, dtype=torch.float64)
    mask = torch.tensor([True] * 6 + [False] * 2)
    routing = block.router(x, mask)
    n, heads = 6, 2
    lp = routing.logits.view(8, heads, 2, n).log_softmax(-1)
    full = (lp[:, :, 0, :, None] + lp[:, :, 1, None, :]).reshape(8, heads, n * n).exp()  # [T, heads, N²]
    real = full[mask]
    counts = torch.zeros(n * n, dtype=torch.float64).index_add_(
        0, routing.top_k_index[mask].reshape(-1), torch.ones(6 * heads * 4, dtype=torch.float64))
    want_aux = n * n * (counts / 6 * real.mean(1).mean(0)).sum()
    torch.testing.assert_close(routing.aux_loss, want_aux)
    entropy = -(full * full.log()).sum(-1).mean(-1)
    torch.testing.assert_close(routing.token_entropy, entropy)
    z = torch.logsumexp(routing.logits.view(8, 2 * heads, n), -1).square()[mask].mean()
    torch.testing.assert_close(routing.z_loss, z)
    torch.testing.assert_close(routing.tokens_per_expert.double(), counts)


def test_model_generate_metrics_save_load_checkpointing(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(router_type="product_key", num_experts=49, num_experts_per_tok=5, moe_intermediate_size=1,
                         gated_experts=False, hidden_act="relu2", num_shared_experts=1,
                         shared_expert_intermediate_size=32, moe_layers=[1])
    model = HfMoeForCausalLM(config).eval()
    assert model.config._experts_implementation == "hf_moe_gathered"
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
        full = model(generated).logits
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    assert torch.equal(cached.sequences, generated)
    for step, logits in enumerate(cached.logits):  # each cached step's logits are the full forward's
        torch.testing.assert_close(logits, full[:, ids.shape[1] - 1 + step], rtol=1e-4, atol=1e-5)

    out = model.train()(generated, labels=generated, output_router_metrics=True)
    metrics = router_metrics(out)
    assert len(metrics) == 1 and len(metrics[0]["tokens_per_expert"]) == 49
    assert 0 < metrics[0]["routing_entropy"] <= torch.log(torch.tensor(49.0)).item() + 1e-6

    model.gradient_checkpointing_enable()
    model(generated, labels=generated).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_disable()
    model(generated, labels=generated).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    touched = model.model.layers[1].mlp.experts.up_proj.grad.flatten(1).abs().sum(1) > 0
    assert 0 < touched.sum() < 49  # only the rows of experts that received tokens

    model.save_pretrained(tmp_path)
    loaded = HfMoeForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(generated).logits, model.eval()(generated).logits)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(bf16(generated).logits.float(), full, rtol=0.1, atol=0.1)


def test_block_compiles_fullgraph_and_equals_eager():
    torch.manual_seed(0)
    block = _block(_config(hidden_act="silu")).float().train()
    x = torch.randn(2, 5, 16)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    compiled = torch.compile(copy.deepcopy(block), fullgraph=True)
    got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = compiled(got_x), block(want_x)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_x.grad, want_x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("num_experts", 50, "perfect square"), ("scoring_func", "sigmoid", "softmax"),
    ("router_aux_loss_type", "sequence", "switch"), ("drop_tokens", True, "False"),
    ("product_key_heads", 0, "positive"), ("product_key_query_norm", "rms", "layer_norm"),
])
def test_config_refuses_what_product_keys_cannot_do(field, value, match):
    with pytest.raises(ValueError, match=match):
        _config(**{field: value})
    with pytest.raises(ValueError, match="product_key_heads"):
        HfMoeConfig(product_key_heads=2)


def test_trainer_logs_router_metrics_over_all_pairs(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_moe.integrations import MoETrainerCallback

    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(router_type="product_key", num_experts=64, num_experts_per_tok=4,
                                         moe_intermediate_size=1, gated_experts=False, num_hidden_layers=1,
                                         router_aux_loss_coef=0.01))
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 97, (8, 10))]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(MoETrainerCallback())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:  # entropy of the product distribution: at most log 64, close to it at initialisation
        assert 0.9 * torch.log(torch.tensor(64.0)).item() < entry["moe/routing_entropy"] <= 4.16
        assert 0 < entry["moe/experts_used"] <= 1 and entry["moe/aux_loss"] > 0


def test_z_loss_computed_on_read_survives_flattening():
    """The per-half z-loss is computed only when read, and flattening (export, compile) carries it: the unflattened
    output, which has no statistics, must not recompute it as one softmax over all `heads·2N` logits."""
    import torch.utils._pytree as pytree

    torch.manual_seed(0)
    block = _block(_config(product_key_heads=2))
    x = torch.randn(5, 16, dtype=torch.float64)
    routing = block.router(x)
    assert routing.given("z_loss") is None
    values, spec = pytree.tree_flatten(routing)
    rebuilt = pytree.tree_unflatten(values, spec)
    want = torch.logsumexp(routing.logits.view(5, 4, 6), -1).square().mean()
    torch.testing.assert_close(rebuilt.z_loss, want)
    torch.testing.assert_close(routing.z_loss, want)
