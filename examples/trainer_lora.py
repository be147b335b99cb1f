"""LoRA fine-tuning of an upcycled hf-moe model with the transformers Trainer; saves the adapter.

LoRA goes on attention and on every routed expert (PEFT `target_parameters` on the 3D expert weights), and
optionally on the router. `MoETrainerCallback` puts router metrics in the logs.

    python examples/trainer_lora.py out/quickstart/moe --output-dir out/lora --max-steps 100
    python examples/trainer_lora.py MODEL --train-file my_text.txt --lora-router
"""

import argparse
import glob
import os
import sysconfig

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_moe  # noqa: F401  (registers model_type "hf_moe" with the Auto classes)
from hf_moe.integrations import MoETrainerCallback, lora_config


def load_text(train_file: str | None, max_bytes: int) -> str:
    """The given text file, or else the standard library's own sources (text every Python install has)."""
    if train_file:
        with open(train_file, encoding="utf-8") as f:
            return f.read()[:max_bytes]
    text = ""
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text += f.read()
        if len(text) >= max_bytes:
            break
    return text[:max_bytes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="folder of an hf-moe model with its tokenizer (e.g. an upcycled model)")
    parser.add_argument("--output-dir", default="out/lora")
    parser.add_argument("--train-file", default=None, help="plain-text training file (default: stdlib sources)")
    parser.add_argument("--max-bytes", type=int, default=1_000_000)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-router", action="store_true", help="also adapt the router")
    parser.add_argument("--no-lora-experts", action="store_true", help="adapt attention only")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    model = get_peft_model(model, lora_config(r=args.rank, lora_alpha=2 * args.rank,
                                              experts=not args.no_lora_experts, router=args.lora_router))
    model.print_trainable_parameters()

    ids = torch.tensor(tokenizer(load_text(args.train_file, args.max_bytes))["input_ids"])
    blocks = ids[: len(ids) // args.block_size * args.block_size].view(-1, args.block_size)
    data = [{"input_ids": b, "labels": b} for b in blocks]
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=max(1, args.max_steps // 10), save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    Trainer(model=model, args=training_args, train_dataset=data, callbacks=[MoETrainerCallback()]).train()
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"adapter saved to {args.output_dir}; load it with PeftModel.from_pretrained(base, '{args.output_dir}')")


if __name__ == "__main__":
    main()
