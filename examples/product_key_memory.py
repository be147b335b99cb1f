"""A small language model with product-key memory layers (PEER / FlashMoE), trained with the `Trainer`.

1. Build a corpus from the standard library's Python sources and train a byte-level BPE tokenizer on it.
2. Configure a decoder whose MLP on every other layer is a product-key memory layer: N² singleton experts (two
   `[N², H]` tables: `y += w · act(up[e]·x) · down[e]`), routed by multi-head product keys (PEER: each head picks its
   k best of the N² experts from two halves of N keys), next to a shared SwiGLU branch.
3. Train it with the `Trainer` and `MoETrainerCallback` (router metrics over the N² experts in the logs);
   `--optimizer row-sparse` steps the tables with `hf_moe.RowSparseAdamW` (only the rows a step's batch reached).
   `--query-norm running_norm` standardises the router query with running statistics, per token.
4. Report the held-out loss and how many table rows the held-out text reads; save, reload with
   `AutoModelForCausalLM` and generate.

On a GPU the selection and the experts run as Triton kernels; on a CPU (a few minutes with the defaults) as torch
gathers. `python examples/product_key_memory.py --help` for the knobs.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from stdlib_corpus import build_corpus, to_blocks, train_tokenizer  # examples/stdlib_corpus.py
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

import hf_moe
from hf_moe.integrations import MoETrainerCallback


def memory_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> hf_moe.HfMoeConfig:
    return hf_moe.HfMoeConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2 * args.block_size, tie_word_embeddings=True,  # room for the sample below
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        moe_layer_freq=2,  # layers 0, 2, ...: product-key memory; the others keep their dense MLP
        router_type="product_key", num_experts=args.keys**2, num_experts_per_tok=args.top_k,
        product_key_heads=args.heads, norm_topk_prob=True,  # PEER: a softmax over each head's k key scores
        product_key_query_norm=args.query_norm,
        gated_experts=False, moe_intermediate_size=1, hidden_act="silu",  # singleton experts
        num_shared_experts=1, shared_expert_intermediate_size=args.shared,  # the dense branch beside the memory
    )


@torch.no_grad()
def heldout(model, blocks: torch.Tensor, batch_size: int) -> tuple[float, list[float]]:
    """Mean held-out loss, and per memory layer the share of its N² table rows the held-out text reads."""
    model.eval()
    losses, used = [], None
    with hf_moe.record_routing(model) as routings:
        for batch in blocks.split(batch_size):
            losses.append(model(input_ids=batch.to(model.device), labels=batch.to(model.device)).loss.item())
            layers = [torch.bincount(r.top_k_index.flatten().cpu(), minlength=model.config.num_experts) > 0
                      for r in routings]
            used = layers if used is None else [u | layer for u, layer in zip(used, layers)]
            routings.clear()
    model.train()
    return sum(losses) / len(losses), [u.float().mean().item() for u in used]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="out/product_key_memory")
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--keys", type=int, default=32, help="N: N² experts (table rows) per memory layer")
    parser.add_argument("--heads", type=int, default=4, help="product-key heads (PEER)")
    parser.add_argument("--top-k", type=int, default=8, help="experts each head picks")
    parser.add_argument("--shared", type=int, default=256, help="intermediate size of the shared SwiGLU branch")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--query-norm", choices=("layer_norm", "running_norm", "batch_norm", "none"),
                        default="layer_norm", help="what normalises the router's query (docs/product_key.md)")
    parser.add_argument("--optimizer", choices=("adamw", "row-sparse"), default="adamw",
                        help="row-sparse: hf_moe.RowSparseAdamW steps only the table rows a step's batch reached "
                             "(pays when batch tokens × k is not many times the experts)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    model_dir = os.path.join(args.output_dir, "model")

    print("1/4 corpus and tokenizer")
    train_texts, heldout_texts = build_corpus(args.corpus_bytes)
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_blocks = to_blocks(tokenizer, train_texts, args.block_size)
    heldout_blocks = to_blocks(tokenizer, heldout_texts, args.block_size)[:64]

    print("2/4 a decoder with product-key memory layers")
    model = hf_moe.HfMoeForCausalLM(memory_config(args, tokenizer))
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    tables = sum(block.experts.up_proj.numel() + block.experts.down_proj.numel() for block in hf_moe.moe_blocks(model))
    active_rows = 2 * config.hidden_size * config.num_experts_per_tok * config.product_key_heads
    print(f"    layers {config.moe_layer_indices} are memory layers of {config.num_experts:,} experts "
          f"({config.product_key_heads} heads × top-{config.num_experts_per_tok}); parameters {total / 1e6:.2f}M, "
          f"of which tables {tables / 1e6:.2f}M; a token reads {active_rows:,} table values per memory layer")

    print("3/4 train with the Trainer")
    steps_blocks = train_blocks[: args.steps * args.batch_size]
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "runs"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, logging_steps=max(1, args.steps // 10), report_to=[], save_strategy="no",
        use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True, seed=args.seed,
    )
    data = [{"input_ids": b, "labels": b} for b in steps_blocks]
    optimizer = None  # the Trainer's AdamW
    if args.optimizer == "row-sparse":
        optimizer = (hf_moe.RowSparseAdamW, {"lr": args.lr, "row_sparse": hf_moe.row_sparse_parameters(model)})
    Trainer(model=model, args=training_args, train_dataset=data, callbacks=[MoETrainerCallback()],
            optimizer_cls_and_kwargs=optimizer).train()

    print("4/4 held-out loss, table use, save, reload, generate")
    loss, used = heldout(model, heldout_blocks, args.batch_size)
    print(f"    held-out loss {loss:.4f}; table rows read by the held-out text: "
          + ", ".join(f"layer {i} {share:.1%}" for i, share in zip(config.moe_layer_indices, used)))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).to(model.device)
    reloaded_loss, _ = heldout(reloaded, heldout_blocks, args.batch_size)
    print(f"    reloaded from {model_dir}: held-out loss {reloaded_loss:.4f} "
          f"({'identical' if reloaded_loss == loss else 'DIFFERENT'})")
    prompt = tokenizer("def ", return_tensors="pt").to(model.device)
    sample = reloaded.eval().generate(**prompt, max_new_tokens=32, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)
    print("    greedy sample: " + repr(tokenizer.decode(sample[0])))
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
