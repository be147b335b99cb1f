"""Every example runs as a user would run it (subprocess, tiny settings) and does what it says."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from hf_moe import HfMoeForCausalLM

from .conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True,
                            text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    """A tiny hf-moe model saved with a byte-level BPE tokenizer trained on a few lines of text."""
    path = tmp_path_factory.mktemp("tiny_moe")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    HfMoeForCausalLM(tiny_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
    return path


def test_generate_streams_tokens(tiny_moe_dir):
    out = run_example("generate.py", str(tiny_moe_dir), "--prompt", "def ", "--max-new-tokens", "8")
    assert out.strip().startswith("def ") or "def " in out
    graphs = run_example("generate.py", str(tiny_moe_dir), "--prompt", "def ", "--max-new-tokens", "8", "--cuda-graphs")
    streamed = lambda text: text[text.index("def "):].split("Loading")[0].split("[transformers]")[0]  # noqa: E731
    assert streamed(graphs) == streamed(out)  # greedy: the same text with the static cache


def test_trainer_lora_trains_and_saves_an_adapter(tiny_moe_dir, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 200)
    out = run_example("trainer_lora.py", str(tiny_moe_dir), "--output-dir", str(tmp_path / "lora"),
                      "--train-file", str(text), "--max-steps", "6", "--batch-size", "2", "--block-size", "16",
                      "--lora-router")
    assert "moe/max_load" in out, "router metrics must appear in the Trainer's logs"
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert "mlp.experts.gate_up_proj" in config["target_parameters"]
    assert "mlp.router.weight" in config["target_parameters"]
    from peft import PeftModel

    base = HfMoeForCausalLM.from_pretrained(tiny_moe_dir)
    ids = torch.randint(0, base.config.vocab_size, (1, 8))
    before = base(ids).logits
    adapted = PeftModel.from_pretrained(base, tmp_path / "lora")
    assert not torch.allclose(adapted(ids).logits, before), "the trained adapter must change the model"


def test_quickstart_runs_the_upcycling_journey_on_tiny_settings(tmp_path):
    out = run_example("quickstart.py", "--output-dir", str(tmp_path), "--corpus-bytes", "200000", "--vocab-size",
                      "400", "--block-size", "32", "--hidden-size", "32", "--layers", "2", "--pretrain-steps", "8",
                      "--finetune-steps", "6", "--batch-size", "4")
    assert "MoE (upcycled), fine-tuned" in out and "moe/max_load" in out
    assert "PASS: this configuration preserves the dense model's function" in out
    for line in out.splitlines():
        if "verify:" in line:
            assert float(line.split("max rel = ")[1]) <= 1e-5, line
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == "hf_moe" and config["num_experts"] == 4
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "greedy sample" in out


def record_finetune_ep(tmp_path, log_name: str, *args: str) -> list:
    """Run examples/finetune_ep.py under plain `python` (one process); return the batches it trained on."""
    log = tmp_path / log_name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "tests", "record_batches.py"), str(log),
           os.path.join(ROOT, "examples", "finetune_ep.py"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_finetune_ep_runs_under_plain_python_with_expert_parallel_size_1(tiny_moe_dir, tmp_path):
    batches = record_finetune_ep(tmp_path, "batches.jsonl", str(tiny_moe_dir), "--expert-parallel-size", "1",
                                 "--output-dir", str(tmp_path / "ep"), "--batch-size", "2", "--block-size", "16",
                                 "--max-bytes", "4000", "--grad-accum", "2", "--steps", "2")
    assert len(batches) == 4
    saved = tmp_path / "ep" / "last"
    assert (saved / "step.txt").read_text() == "2" and (saved / "batches.txt").read_text() == "4"
    trained = HfMoeForCausalLM.from_pretrained(saved)
    assert not torch.equal(trained.model.layers[0].mlp.experts.down_proj,
                           HfMoeForCausalLM.from_pretrained(tiny_moe_dir).model.layers[0].mlp.experts.down_proj)


def test_finetune_ep_resume_sees_the_batches_and_reaches_the_weights_of_an_uninterrupted_run(tiny_moe_dir, tmp_path):
    # 7 batches per epoch with 2 per step: each epoch ends on a short step, and the run is interrupted mid-epoch
    text = tmp_path / "train.txt"
    text.write_text("".join(f"line {i}: def add(a, b): return a + b\n" for i in range(12)))
    common = [str(tiny_moe_dir), "--train-file", str(text), "--batch-size", "2", "--block-size", "16",
              "--grad-accum", "2", "--log-every", "1"]
    whole = record_finetune_ep(tmp_path, "whole.jsonl", *common, "--steps", "10", "--output-dir",
                               str(tmp_path / "whole"))
    first = record_finetune_ep(tmp_path, "first.jsonl", *common, "--steps", "5", "--output-dir",
                               str(tmp_path / "part"))
    checkpoint = tmp_path / "part" / "last"
    assert int((checkpoint / "batches.txt").read_text()) == len(first)
    before = (checkpoint / "model.safetensors").read_bytes()
    rest = record_finetune_ep(tmp_path, "rest.jsonl", *common, "--steps", "10", "--resume", str(checkpoint))
    rows = [tuple(row) for batch in whole for row in batch]
    assert len(set(rows)) < len(rows), "the run must span more than one epoch"
    assert first + rest == whole
    assert (checkpoint / "model.safetensors").read_bytes() == before, "resuming must not overwrite its checkpoint"
    resumed = HfMoeForCausalLM.from_pretrained(tmp_path / "part" / "last-resumed" / "last")
    uninterrupted = HfMoeForCausalLM.from_pretrained(tmp_path / "whole" / "last")
    for (name, a), b in zip(resumed.named_parameters(), uninterrupted.parameters()):
        assert torch.equal(a, b), name


def test_finetune_ep_refuses_to_overwrite_the_checkpoint_it_resumes(tiny_moe_dir, tmp_path):
    args = [str(tiny_moe_dir), "--batch-size", "2", "--block-size", "16", "--max-bytes", "4000", "--steps", "1",
            "--output-dir", str(tmp_path / "ep")]
    record_finetune_ep(tmp_path, "first.jsonl", *args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    again = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "finetune_ep.py"), *args, "--steps", "2",
                            "--resume", str(tmp_path / "ep" / "last")], capture_output=True, text=True, timeout=300,
                           env=env)
    assert again.returncode != 0 and "--overwrite-resumed" in again.stderr, again.stderr[-2000:]


def test_finetune_ep_under_accelerate_launch_saves_and_resumes(tiny_moe_dir, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4",
              os.path.join(ROOT, "examples", "finetune_ep.py"), str(tiny_moe_dir), "--expert-parallel-size", "2",
              "--output-dir", str(tmp_path / "ep"), "--batch-size", "2", "--block-size", "16", "--max-bytes", "20000",
              "--log-every", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(launch + ["--steps", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "max/mean expert load" in first.stdout
    saved = tmp_path / "ep" / "last"
    assert (saved / "step.txt").read_text() == "2"
    after_two = HfMoeForCausalLM.from_pretrained(saved)  # one process loads the gathered checkpoint
    assert after_two.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6
    resumed = subprocess.run(launch + ["--steps", "4", "--resume", str(saved), "--padded-dispatch",
                                       "--overwrite-resumed"],
                             capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert (saved / "step.txt").read_text() == "4" and "step 4:" in resumed.stdout and "step 2:" not in resumed.stdout
    two_processes = [*launch[:5], "2", *launch[6:]]
    graphs = subprocess.run(two_processes + ["--steps", "1", "--bf16", "--cuda-graphs"], capture_output=True,
                            text=True, timeout=300, env=env)
    if not torch.cuda.is_available():  # the flag reaches capture_moe_cuda_graphs, which refuses CPUs clearly
        assert graphs.returncode != 0 and "needs the model on a CUDA device" in graphs.stderr, graphs.stderr[-2000:]
    after_four = HfMoeForCausalLM.from_pretrained(saved)
    experts_before, experts_after = after_two.model.layers[0].mlp.experts, after_four.model.layers[0].mlp.experts
    assert not torch.equal(experts_after.down_proj, experts_before.down_proj)


def test_trainer_lora_fine_tunes_a_foreign_checkpoint_and_exports_it_back(tiny_moe_dir, tmp_path):
    """A Qwen3-MoE checkpoint saved by transformers goes in, is LoRA-trained on its experts, merged, and comes out as
    Qwen3-MoE again: transformers' own class loads the export and computes the merged model's logits."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_moe_dir)
    config = AutoConfig.for_model("qwen3_moe", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                  moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, norm_topk_prob=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "qwen3")
    tokenizer.save_pretrained(tmp_path / "qwen3")
    text = tmp_path / "train.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 200)
    out = run_example("trainer_lora.py", str(tmp_path / "qwen3"), "--output-dir", str(tmp_path / "lora"),
                      "--train-file", str(text), "--max-steps", "4", "--batch-size", "2", "--block-size", "16",
                      "--lr", "1e-2", "--export-to", "auto")
    line = next(line for line in out.splitlines() if line.startswith("merged model written as"))
    assert "qwen3_moe" in line and "Qwen3MoeForCausalLM" in line, line
    assert float(line.rsplit("rel err ", 1)[1]) <= 1e-5, line
    exported = json.loads((tmp_path / "lora" / "merged-qwen3_moe" / "config.json").read_text())
    assert exported["architectures"] == ["Qwen3MoeForCausalLM"]
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3")
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged-qwen3_moe")
    ids = torch.randint(0, len(tokenizer), (1, 8))
    with torch.no_grad():
        assert not torch.allclose(served(ids).logits, original(ids).logits), "the merged adapter must change it"


def test_product_key_memory_trains_reloads_and_generates(tmp_path):
    out = run_example("product_key_memory.py", "--output-dir", str(tmp_path), "--corpus-bytes", "200000",
                      "--vocab-size", "400", "--block-size", "32", "--hidden-size", "32", "--layers", "2", "--keys",
                      "8", "--heads", "2", "--top-k", "2", "--shared", "32", "--steps", "6", "--batch-size", "4",
                      "--optimizer", "row-sparse", "--query-norm", "running_norm")
    assert "moe/max_load" in out, "router metrics must appear in the Trainer's logs"
    assert "(identical)" in out and "greedy sample" in out
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["router_type"] == "product_key" and config["num_experts"] == 64
    assert config["product_key_heads"] == 2 and config["gated_experts"] is False
    assert config["product_key_query_norm"] == "running_norm"  # its running statistics reload: "(identical)" above
    share = float(out.split("table rows read by the held-out text: layer 0 ")[1].split("%")[0])
    assert 0 < share <= 100
