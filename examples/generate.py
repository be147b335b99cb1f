"""Load an hf-moe model and generate, streaming tokens as they come.

    python examples/generate.py out/quickstart/moe --prompt "def " --max-new-tokens 60
    python examples/generate.py out/quickstart/moe --cuda-graphs   # GPU: decode steps replayed from CUDA graphs
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import hf_moe  # registers model_type "hf_moe" with the Auto classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="folder (or hub id) of an hf-moe model with its tokenizer")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="static cache, each decode step replayed from a CUDA graph (no compile; GPU only)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype).to(device).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    if args.cuda_graphs:
        sampling.update(cache_implementation="static", compile_config=hf_moe.CUDAGraphConfig())
    model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=TextStreamer(tokenizer),
                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)


if __name__ == "__main__":
    main()
