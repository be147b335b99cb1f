"""Quickstart: build a small hf-moe model, train it briefly, save, reload with AutoModelForCausalLM, generate.

Run with `make demo` (or `python examples/quickstart.py --steps 30`). Needs no network and no GPU.
"""

import argparse
import tempfile

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

import hf_moe  # noqa: F401  (registers model_type "hf_moe" with the Auto classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output-dir", default=None, help="where to save the model (default: a temp folder)")
    args = parser.parse_args()
    torch.manual_seed(0)

    config = AutoConfig.for_model(
        "hf_moe", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{config.num_experts} experts, top-{config.num_experts_per_tok}")

    text = (b"Mixture-of-experts layers route each token to a few experts. " * 40)
    data = torch.tensor(list(text), dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    bar = tqdm(range(args.steps), desc="training")
    for _ in bar:
        starts = torch.randint(0, len(data) - 65, (8,))
        batch = torch.stack([data[s : s + 64] for s in starts])
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{out.loss.item():.3f}", aux=f"{out.aux_loss.item():.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.output_dir or tmp
        model.save_pretrained(path)
        reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
        prompt = torch.tensor([list(b"Mixture-of-experts layers")])
        generated = reloaded.generate(prompt, max_new_tokens=40, do_sample=False)
    print("sample:", bytes(generated[0].tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
