"""The examples' corpus: the standard library's own Python sources (every Python install has them), a byte-level
BPE tokenizer trained on them, and fixed-length blocks of token ids."""

from __future__ import annotations

import glob
import os
import sysconfig

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast


def build_corpus(max_bytes: int) -> tuple[list[str], list[str]]:
    """The standard library's modules as text, up to about `max_bytes`; every tenth file is held out."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    train, heldout, size = [], [], 0
    for i, path in enumerate(files):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        (heldout if i % 10 == 0 else train).append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocab_size` trained on `texts` (saved to `out_dir` when given)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def to_blocks(tokenizer: PreTrainedTokenizerFast, texts: list[str], block_size: int) -> torch.Tensor:
    """`texts` tokenized and joined (each ended by the EOS token), cut into `[n, block_size]` blocks."""
    ids = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size]).view(n, block_size)
