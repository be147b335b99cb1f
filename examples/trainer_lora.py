"""LoRA fine-tuning of an MoE model with the transformers Trainer; saves the adapter, and optionally the merged model
in a foreign family's layout for serving.

The model is an hf-moe checkpoint (e.g. an upcycled model) or a foreign MoE checkpoint folder that hf-moe imports
(Qwen3-MoE, Mixtral, DeepSeek-V3, ...: `hf_moe.interop`). LoRA goes on attention and on every routed expert (PEFT
`target_parameters` on the 3D expert weights), and optionally on the router. `MoETrainerCallback` puts router
metrics in the logs. With `--export-to FAMILY` (or `auto`: the source's own family) the adapter is merged into the
weights and the model converted to that family, which transformers' own class (and serving engines) load; the
script checks that class's logits against the merged model's.

    python examples/trainer_lora.py out/quickstart/moe --output-dir out/lora --max-steps 100
    python examples/trainer_lora.py MODEL --train-file my_text.txt --lora-router
    python examples/trainer_lora.py ./Qwen3-30B-A3B --export-to auto    # fine-tune, merge, write Qwen3-MoE again
"""

import argparse
import glob
import json
import os
import sysconfig

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from conversions import convert
from hf_moe import HfMoeForCausalLM
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
    parser.add_argument("--export-to", default=None, metavar="FAMILY",
                        help="merge the adapter and write the model in this family's layout (e.g. qwen3_moe; auto: "
                             "the source's own family) to OUTPUT_DIR/merged-FAMILY")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = HfMoeForCausalLM.from_pretrained(args.model)  # an hf-moe checkpoint, or a foreign one imported
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
    if args.export_to:
        export(model.merge_and_unload(), tokenizer, args.model, args.output_dir, args.export_to)


def export(merged: HfMoeForCausalLM, tokenizer, source: str, output_dir: str, family: str) -> None:
    """Save the merged model, convert it to `family` and check that transformers' class computes its logits."""
    hf_moe_dir = os.path.join(output_dir, "merged")
    merged.save_pretrained(hf_moe_dir)
    tokenizer.save_pretrained(hf_moe_dir)
    if family == "auto":  # the family the model came from, else the first that expresses it
        with open(os.path.join(source, "config.json")) as f:
            source_type = json.load(f)["model_type"]
        family = "auto" if source_type == "hf_moe" else source_type
    out = os.path.join(output_dir, f"merged-{family}")
    result = convert(hf_moe_dir, out, to=family, overwrite=True)
    served = AutoModelForCausalLM.from_pretrained(out, dtype=merged.dtype).eval()
    ids = torch.tensor(tokenizer("def main():\n    return 0\n")["input_ids"])[None]
    with torch.no_grad():
        ours, theirs = merged.eval()(ids).logits.double(), served(ids).logits.double()
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"merged model written as {result.target_type} to {out} ({type(served).__name__}); logits vs the merged "
          f"model: rel err {rel:.1e}")


if __name__ == "__main__":
    main()
