"""Upcycle, then fine-tune: the Sparse Upcycling experiment in miniature, on a CPU, in about three minutes.

1. Build a corpus from real text every Python install has (the standard library's own `.py` sources) and train a
   byte-level BPE tokenizer on it.
2. Pretrain a small dense Llama.
3. Upcycle it into a mixture-of-experts model with hf-moe's converter (`--verify` proves it computes the same
   function as the dense model it came from).
4. Fine-tune the MoE with the `Trainer` and `MoETrainerCallback` (loss and expert load in the logs), and continue
   training the dense model on the same tokens.
5. Print held-out loss (dense vs MoE), save a plot of both loss curves and the per-expert load (if matplotlib is
   installed), reload the MoE with `AutoModelForCausalLM`, and generate a sample.

Run: `make demo`, or `python examples/quickstart.py --help` for the knobs.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from stdlib_corpus import build_corpus, to_blocks, train_tokenizer  # examples/stdlib_corpus.py
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import hf_moe  # noqa: F401  (registers model_type "hf_moe" with the Auto classes)
from conversions import UpcycleConfig, upcycle
from hf_moe.integrations import MoETrainerCallback


class LossCurve(TrainerCallback):
    """Keeps every logged training loss, and the MoE callback's per-layer loads when present."""

    def __init__(self) -> None:
        self.steps, self.losses, self.loads = [], [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.steps.append(state.global_step)
            self.losses.append(logs["loss"])
            self.loads.append({k: v for k, v in logs.items() if k.startswith("moe/")})


def train(model, blocks: torch.Tensor, steps: int, args: argparse.Namespace, out_dir: str, callbacks=()) -> LossCurve:
    curve = LossCurve()
    data = [{"input_ids": b, "labels": b} for b in blocks]
    training_args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=max(1, steps // 10),
        report_to=[], save_strategy="no", use_cpu=True, dataloader_drop_last=True, seed=args.seed,
    )
    Trainer(model=model, args=training_args, train_dataset=data, callbacks=[curve, *callbacks]).train()
    return curve


@torch.no_grad()
def heldout_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def expert_load(model, blocks: torch.Tensor) -> torch.Tensor:
    """`[layers, experts]` share of routed tokens each expert receives on `blocks`."""
    model.eval()
    routers = model(input_ids=blocks, output_router_logits=True).router_outputs
    model.train()
    counts = torch.stack([r.tokens_per_expert for r in routers])
    return counts / counts.sum(dim=1, keepdim=True)


def save_plot(dense: LossCurve, moe: LossCurve, load: torch.Tensor, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(dense.steps, dense.losses, label="dense (continued)")
    ax_loss.plot(moe.steps, moe.losses, label="MoE (upcycled)")
    ax_loss.set(xlabel="fine-tuning step", ylabel="training loss", title="Training loss")
    ax_loss.legend()
    layers, experts = load.shape
    width = 0.8 / layers
    for layer in range(layers):
        ax_load.bar([e + layer * width for e in range(experts)], load[layer].tolist(), width, label=f"layer {layer}")
    ax_load.set_xticks([e + 0.4 - width / 2 for e in range(experts)], [str(e) for e in range(experts)])
    ax_load.axhline(1 / experts, color="grey", linestyle=":", label="perfect balance")
    ax_load.set(xlabel="expert", ylabel="share of routed tokens", title="Expert load on held-out text")
    ax_load.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="out/quickstart")
    parser.add_argument("--corpus-bytes", type=int, default=3_000_000)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    dense_dir, moe_dir = os.path.join(args.output_dir, "dense"), os.path.join(args.output_dir, "moe")

    print("1/5 corpus and tokenizer")
    train_texts, heldout_texts = build_corpus(args.corpus_bytes)
    tokenizer = train_tokenizer(train_texts, args.vocab_size, dense_dir)
    train_blocks = to_blocks(tokenizer, train_texts, args.block_size)
    heldout_blocks = to_blocks(tokenizer, heldout_texts, args.block_size)[:64]
    print(f"    {len(train_texts)} train / {len(heldout_texts)} held-out files, {train_blocks.numel():,} train tokens")

    print("2/5 pretrain a dense Llama")
    dense = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.block_size, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    pretrain_tokens = args.pretrain_steps * args.batch_size
    train(dense, train_blocks[:pretrain_tokens], args.pretrain_steps, args, os.path.join(args.output_dir, "runs"))
    dense.save_pretrained(dense_dir)
    start_loss = heldout_loss(dense, heldout_blocks, args.batch_size)

    print("3/5 upcycle to a mixture of experts (verified against the dense model)")
    result = upcycle(dense_dir, moe_dir, UpcycleConfig(
        num_experts=args.num_experts, top_k=args.top_k, verify=True, overwrite=True))
    print("    " + result.summary().replace("\n", "\n    "))

    print("4/5 fine-tune the MoE and, for comparison, continue the dense model on the same tokens")
    finetune_blocks = train_blocks[pretrain_tokens:][: args.finetune_steps * args.batch_size]
    if len(finetune_blocks) < args.finetune_steps * args.batch_size:
        finetune_blocks = train_blocks[: args.finetune_steps * args.batch_size]
    moe = AutoModelForCausalLM.from_pretrained(moe_dir)
    moe_curve = train(moe, finetune_blocks, args.finetune_steps, args, os.path.join(args.output_dir, "runs"),
                      callbacks=[MoETrainerCallback()])
    dense_curve = train(dense, finetune_blocks, args.finetune_steps, args, os.path.join(args.output_dir, "runs"))
    moe.save_pretrained(moe_dir)
    results = {
        "dense, before fine-tuning": start_loss,
        "dense, continued": heldout_loss(dense, heldout_blocks, args.batch_size),
        "MoE (upcycled), fine-tuned": heldout_loss(moe, heldout_blocks, args.batch_size),
    }

    print("5/5 results")
    print(f"\n    {'model':<30} {'held-out loss':>13}")
    for name, value in results.items():
        print(f"    {name:<30} {value:>13.4f}")
    load = expert_load(moe, heldout_blocks[: args.batch_size])
    print(f"\n    max/mean expert load on held-out text, per layer: "
          f"{', '.join(f'{v:.2f}' for v in (load.max(dim=1).values * load.shape[1]).tolist())}")
    if save_plot(dense_curve, moe_curve, load, os.path.join(args.output_dir, "curves.png")):
        print(f"\n    plot: {os.path.join(args.output_dir, 'curves.png')}")
    else:
        print("\n    (install matplotlib for a plot: pip install 'hf-moe[plot]')")

    reloaded = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    prompt = tokenizer("def ", return_tensors="pt")
    sample = reloaded.generate(**prompt, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(f"\n    reloaded {type(reloaded).__name__} from {moe_dir}; greedy sample:\n")
    print("    " + tokenizer.decode(sample[0]).replace("\n", "\n    "))
    print(f"\ndone in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
