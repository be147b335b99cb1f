"""Dense → MoE upcycling: function preservation against transformers' own dense models, init methods,
streaming output, bad input, atomicity, model card, CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from conversions import SourceError, UpcycleConfig, upcycle
from conversions import writer as writer_module
from hf_moe import HfMoeForCausalLM

from .conftest import assert_rel_close

COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
ARCHITECTURES = {
    "llama": lambda tie: LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True, tie_word_embeddings=tie,
                                                      rope_parameters={"rope_type": "default", "rope_theta": 5e4})),
    "mistral": lambda tie: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=5, tie_word_embeddings=tie)),
    "qwen2": lambda tie: Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=tie)),
    "qwen3": lambda tie: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=12, tie_word_embeddings=tie)),
}


def save_tokenizer(path) -> None:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["upcycling turns dense MLPs into experts"] * 10, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>"], show_progress=False)  # ≤ 300 ids
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(path)


def make_dense(path, arch="llama", tie=False, sharded=False, tokenizer=True):
    """A tiny transformers dense model with random norms and biases (not the identity / zero they start at)."""
    model = ARCHITECTURES[arch](tie).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, max_shard_size="20KB" if sharded else "5GB")
    if tokenizer:
        save_tokenizer(path)
    return model


def leftovers(parent) -> list[str]:
    return [f for f in os.listdir(parent) if ".tmp-" in f]


@pytest.mark.parametrize("arch,tie,sharded", [("llama", False, True), ("mistral", True, False),
                                              ("qwen2", False, False), ("qwen3", True, True)])
@pytest.mark.parametrize("variant", ["copy", "granular", "shared"])
def test_upcycled_model_computes_the_dense_function(tmp_path, arch, tie, sharded, variant):
    dense = make_dense(tmp_path / "dense", arch, tie, sharded)
    if sharded:
        assert (tmp_path / "dense" / "model.safetensors.index.json").exists()
    cfg = {"copy": UpcycleConfig(num_experts=4, top_k=2, max_shard_size="30KB"),
           "granular": UpcycleConfig(num_experts=8, top_k=4, granularity=2, moe_layers=[0, 2]),
           "shared": UpcycleConfig(num_experts=4, top_k=1, shared_experts=1, shared_expert_gate=(arch == "qwen3"))}[
        variant]
    cfg.verify = True
    report = upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), cfg)
    assert report.max_rel_diff <= 1e-5 and report.preserves_function
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert isinstance(moe, HfMoeForCausalLM)
    ids = torch.randint(0, 120, (2, 11))  # longer than Mistral's window of 5
    with torch.no_grad():
        assert_rel_close(moe(ids).logits, dense(ids).logits, 1e-5, f"{arch}/{variant}")
        moe.save_pretrained(tmp_path / "again")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
        assert torch.equal(again(ids).logits, moe(ids).logits)
    layers = [i for i, layer in enumerate(moe.model.layers) if hasattr(layer.mlp, "router")]
    assert layers == ([0, 2] if variant == "granular" else [0, 1, 2])
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tmp_path / "dense" / name).exists():
            assert (tmp_path / "moe" / name).read_bytes() == (tmp_path / "dense" / name).read_bytes(), name
    assert leftovers(tmp_path) == []


def test_granular_routers_are_tied_within_virtual_groups(tmp_path):
    make_dense(tmp_path / "dense")
    upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), UpcycleConfig(num_experts=6, top_k=3, granularity=3))
    moe = HfMoeForCausalLM.from_pretrained(tmp_path / "moe")
    router = moe.model.layers[1].mlp.router.weight
    for group in router.view(2, 3, -1):
        assert torch.equal(group[0], group[1]) and torch.equal(group[0], group[2])
    assert not torch.equal(router[0], router[3])


def test_drop_upcycling_reinitialises_the_requested_fraction_with_matched_statistics(tmp_path):
    dense = make_dense(tmp_path / "dense", tokenizer=False)
    upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), UpcycleConfig(num_experts=4, init="drop:0.5"))
    moe = HfMoeForCausalLM.from_pretrained(tmp_path / "moe")
    src = dense.model.layers[0].mlp
    experts = moe.model.layers[0].mlp.experts
    gate = experts.gate_up_proj[:, :48]
    changed = (gate != src.gate_proj.weight).any(dim=-1)  # [E, I] neurons whose gate row was redrawn
    assert changed.sum(dim=1).tolist() == [24] * 4, "exactly R·I neurons per expert"
    assert not all(torch.equal(changed[0], changed[e]) for e in range(1, 4)), "each expert drops its own neurons"
    for e in range(4):
        up = experts.gate_up_proj[e, 48:]
        down = experts.down_proj[e]
        keep = ~changed[e]
        assert torch.equal(up[keep], src.up_proj.weight[keep])
        assert torch.equal(down[:, keep], src.down_proj.weight[:, keep])
    redrawn = gate[changed]
    w = src.gate_proj.weight
    assert abs(redrawn.std().item() - w.std().item()) < 0.15 * w.std().item()
    assert abs(redrawn.mean().item() - w.mean().item()) < 0.15 * w.std().item()


def test_noise_has_the_requested_std(tmp_path):
    dense = make_dense(tmp_path / "dense", tokenizer=False)
    upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), UpcycleConfig(num_experts=8, init="noise:0.05"))
    moe = HfMoeForCausalLM.from_pretrained(tmp_path / "moe")
    src = dense.model.layers[2].mlp
    reference = torch.cat([src.gate_proj.weight, src.up_proj.weight])
    noise = moe.model.layers[2].mlp.experts.gate_up_proj - reference
    assert abs(noise.std().item() - 0.05) < 0.005 and abs(noise.mean().item()) < 0.005


def test_kmeans_router_init_uses_the_dense_hidden_states(tmp_path):
    dense = make_dense(tmp_path / "dense")
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(["upcycling turns dense MLPs into experts"] * 60))
    cfg = UpcycleConfig(num_experts=4, router_init="kmeans", calibration_file=str(text), calibration_tokens=256,
                        verify=True)
    report = upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), cfg)
    assert report.max_rel_diff <= 1e-5
    router = HfMoeForCausalLM.from_pretrained(tmp_path / "moe").model.layers[1].mlp.router.weight
    assert torch.allclose(router.norm(dim=1), torch.ones(4), atol=1e-5)
    # independent reference: the MLP inputs of transformers' dense model on the same tokens
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "dense")
    ids = torch.tensor(tokenizer(text.read_text())["input_ids"][:256])
    seen = []
    dense.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        dense(ids[: len(ids) // 64 * 64].view(-1, 64))
    points = torch.nn.functional.normalize(torch.cat(seen), dim=-1)
    assignment = (points @ router.T).argmax(dim=1)
    for c in assignment.unique():  # a k-means fixed point: each centroid is the direction of its points' mean
        mean = torch.nn.functional.normalize(points[assignment == c].sum(0), dim=0)
        assert torch.allclose(mean, router[c], atol=1e-3)


@pytest.mark.parametrize("case", ["architecture", "pickle", "missing_shard", "corrupt_shard", "granularity",
                                  "top_k", "nonempty_target", "mlp_bias"])
def test_bad_input_is_refused_clearly_and_nothing_is_written(tmp_path, case):
    src, out = tmp_path / "dense", tmp_path / "moe"
    cfg = {}
    if case == "architecture":
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(src)
        expected = "model_type='gpt2' is not supported"
    elif case == "pickle":
        make_dense(src, tokenizer=False)
        os.remove(src / "model.safetensors")
        (src / "pytorch_model.bin").write_bytes(b"not unpickled")
        expected = "never unpickles"
    elif case == "missing_shard":
        make_dense(src, sharded=True, tokenizer=False)
        os.remove(sorted(src.glob("model-*.safetensors"))[-1])
        expected = "shards listed in model.safetensors.index.json are missing"
    elif case == "corrupt_shard":
        make_dense(src, tokenizer=False)
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])
        expected = "model.safetensors"
    elif case == "granularity":
        make_dense(src, tokenizer=False)
        cfg = dict(num_experts=10, top_k=5, granularity=5)  # 48 is not divisible by 5
        expected = "divisor of the dense intermediate_size=48"
    elif case == "top_k":
        expected = "a multiple of granularity=2"
        with pytest.raises(ValueError, match=expected):
            UpcycleConfig(num_experts=8, top_k=3, granularity=2)
        return
    elif case == "nonempty_target":
        make_dense(src, tokenizer=False)
        out.mkdir()
        (out / "keep.txt").write_text("precious")
        expected = "not empty; pass overwrite=True"
    elif case == "mlp_bias":
        LlamaForCausalLM(LlamaConfig(**COMMON, mlp_bias=True)).save_pretrained(src)
        expected = "mlp_bias=True is not supported"
    with pytest.raises((SourceError, ValueError, FileExistsError), match=expected):
        upcycle(str(src), str(out), UpcycleConfig(**cfg))
    if case == "nonempty_target":
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    else:
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_and_an_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    make_dense(tmp_path / "dense", tokenizer=False)
    out = tmp_path / "moe"
    upcycle(str(tmp_path / "dense"), str(out), UpcycleConfig(num_experts=2, top_k=1))
    upcycle(str(tmp_path / "dense"), str(out), UpcycleConfig(num_experts=4, overwrite=True))
    assert json.loads((out / "config.json").read_text())["num_experts"] == 4

    calls = []

    def interrupted_flush(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self)

    original = writer_module.ShardWriter.flush
    monkeypatch.setattr(writer_module.ShardWriter, "flush", interrupted_flush)
    with pytest.raises(KeyboardInterrupt):
        upcycle(str(tmp_path / "dense"), str(tmp_path / "other"), UpcycleConfig(max_shard_size="10KB"))
    assert not (tmp_path / "other").exists() and leftovers(tmp_path) == []


def test_model_card_renders_and_states_the_conversion(tmp_path):
    make_dense(tmp_path / "dense")
    report = upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"),
                     UpcycleConfig(num_experts=6, top_k=2, verify=True, base_model="org/dense-tiny"))
    card = ModelCard.load(tmp_path / "moe" / "README.md")
    assert card.data.base_model == "org/dense-tiny" and card.data.library_name == "transformers"
    assert {"moe", "upcycled"} <= set(card.data.tags)
    assert "| `num_experts` | `6` |" in card.text and f"{report.total_params:,}" in card.text
    assert f"{report.active_params:,}" in card.text and "preserve the dense model's function" in card.text
    assert report.active_params < report.total_params


def test_cli_upcycles_verifies_and_reports_errors(tmp_path):
    make_dense(tmp_path / "dense", arch="qwen3")
    cmd = [sys.executable, "-m", "conversions", "upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"),
           "--num-experts", "4", "--top-k", "2", "--moe-layers", "0,2", "--init", "drop:0.25", "--verify"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "change the function by design" in result.stdout
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["moe_layers"] == [0, 2]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "not empty" in again.stderr
    bad = subprocess.run(cmd[:6] + ["--init", "sprinkle"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'copy', 'noise:STD'" in bad.stderr
