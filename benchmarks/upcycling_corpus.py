"""The corpus of `upcycling-quality`: the Python sources and docs of installed packages, offline and deterministic.

Files are read from a fixed list of packages in a fixed order (missing packages are skipped and recorded), exact
duplicates are dropped, and each file goes to train or held-out by a hash of its content (so the split of a file
does not depend on which other packages are installed). A byte-level BPE tokenizer (the `tokenizers` library) is
trained on the train split only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import sysconfig
from dataclasses import dataclass, field

import numpy as np

# Packages likely installed next to torch on a GPU machine; the standard library comes first and is always there.
PACKAGES = ("stdlib", "torch", "transformers", "triton", "numpy", "sympy", "networkx", "accelerate", "peft",
            "safetensors", "huggingface_hub", "tokenizers", "jinja2", "pip", "setuptools", "scipy", "pandas",
            "matplotlib", "datasets", "pytest")
EXTENSIONS = (".py", ".pyi", ".md", ".rst", ".txt")
EOS = "<|endoftext|>"


@dataclass
class Corpus:
    """Token streams of the train and held-out files, the tokenizer, and what went into them."""

    train: np.ndarray
    heldout: np.ndarray
    tokenizer: object
    info: dict = field(default_factory=dict)


def package_root(name: str) -> tuple[str, str] | None:
    """`(folder, version)` of an installed package (the standard library for "stdlib"), or None when missing."""
    if name == "stdlib":
        return sysconfig.get_paths()["stdlib"], "python-" + sysconfig.get_python_version()
    try:
        spec = importlib.util.find_spec(name)  # locates the package without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return sorted(spec.submodule_search_locations)[0], version


def _files(root: str, skip_site_packages: bool) -> list[str]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not (skip_site_packages and d == "site-packages"))
        found += [os.path.join(folder, n) for n in sorted(names) if n.endswith(EXTENSIONS)]
    return found


def collect(packages: tuple[str, ...], max_bytes: int, max_file_bytes: int, heldout_every: int) -> tuple[
        list[str], list[str], dict]:
    """Train and held-out texts of `packages` (in that order, at most `max_bytes` in all), and what was read."""
    seen: set[str] = set()
    train, heldout, read = [], [], []
    total = 0
    for name in packages:
        located = package_root(name)
        if located is None:
            read.append({"package": name, "missing": True})
            continue
        root, version = located
        files = chars = duplicates = 0
        for path in _files(root, skip_site_packages=name == "stdlib"):
            if total >= max_bytes:
                break
            try:
                if os.path.getsize(path) > max_file_bytes:
                    continue
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            digest = hashlib.sha1(text.encode("utf-8", errors="replace")).hexdigest()
            if not text.strip() or digest in seen:
                duplicates += bool(text.strip())
                continue
            seen.add(digest)
            (heldout if int(digest, 16) % heldout_every == 0 else train).append(text)
            files, chars, total = files + 1, chars + len(text), total + len(text)
        read.append({"package": name, "version": version, "files": files, "chars": chars,
                     "duplicates_dropped": duplicates})
    return train, heldout, {"packages": read, "train_files": len(train), "heldout_files": len(heldout),
                            "chars": total}


def train_tokenizer(texts: list[str], vocab_size: int, max_chars: int):
    """A byte-level BPE tokenizer trained on an evenly spaced subset of `texts` of about `max_chars` characters."""
    from tokenizers import ByteLevelBPETokenizer

    total = sum(map(len, texts))
    step = max(1, round(total / max(1, max_chars)))
    subset = texts[::step]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(subset, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    return bpe


def encode(tokenizer, texts: list[str]) -> np.ndarray:
    """One stream of token ids: every text followed by the end-of-text token."""
    eos = tokenizer.token_to_id(EOS)
    parts = []
    for start in range(0, len(texts), 1024):
        for enc in tokenizer.encode_batch(texts[start:start + 1024]):
            parts.append(np.asarray(enc.ids + [eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def build(packages: tuple[str, ...], max_bytes: int, vocab_size: int, tokenizer_chars: int,
          max_file_bytes: int = 512_000, heldout_every: int = 20) -> Corpus:
    """Read, split, train the tokenizer on train and encode both splits."""
    train_texts, heldout_texts, info = collect(packages, max_bytes, max_file_bytes, heldout_every)
    if not heldout_texts or not train_texts:
        raise RuntimeError(f"the corpus has {len(train_texts)} train and {len(heldout_texts)} held-out files; "
                           f"expected both > 0 (packages read: {info['packages']}).")
    tokenizer = train_tokenizer(train_texts, vocab_size, tokenizer_chars)
    train, heldout = encode(tokenizer, train_texts), encode(tokenizer, heldout_texts)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    info.update(train_tokens=int(train.size), heldout_tokens=int(heldout.size), vocab_size=tokenizer.get_vocab_size(),
                tokenizer_sha1=hashlib.sha1(repr(vocab).encode()).hexdigest()[:12],
                train_sha1=hashlib.sha1(train.tobytes()).hexdigest()[:12])
    return Corpus(train, heldout, tokenizer, info)
