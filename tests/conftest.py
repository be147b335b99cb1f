"""Shared helpers: tiny configs and a relative-error assertion. Tests never reach a hub."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import hf_moe  # noqa: E402,F401  (registers the Auto classes)
from hf_moe import HfMoeConfig  # noqa: E402


def tiny_config(**overrides) -> HfMoeConfig:
    """A model small enough for CPU tests, with every MoE code path active."""
    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        router_z_loss_coef=0.001,
    )
    kwargs.update(overrides)
    return HfMoeConfig(**kwargs)


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") and not torch.cuda.is_available():
    import triton.runtime.interpreter as _interpreter

    _patch = _interpreter._patch_lang_tensor

    def _patched(tensor, scope):  # numpy >= 2.3 refuses int() of a 1-element array, which the interpreter does
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interpreter._patch_lang_tensor = _patched
    if os.environ.get("HF_MOE_TRITON_RECORD"):  # tests/triton_aot.py: compile what the interpreter ran, for sm_90
        from .triton_aot import record

        record(os.environ["HF_MOE_TRITON_RECORD"])

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def count_calls(monkeypatch, module, name: str) -> list[int]:
    """Wraps `module.name` so that each call appends to the returned list (which path ran, not what it computed)."""
    calls: list[int] = []
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls

FLOAT64_TOL = 1e-10
"""Relative tolerance of a float64 multi-process run against one process: only the order of sums differs."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b|: one number that is small only when the tensors agree everywhere."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def assert_cached_greedy_equals_full_forward(model, ids: torch.Tensor, new_tokens: int) -> None:
    """Greedy generation with the KV cache against forwards over the whole sequence without it: every step's
    logits agree to float32 rounding, and every chosen token is the full forward's argmax up to that rounding (a
    near-tie, seen at a gap of 7e-8, may rightly go either way)."""
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    assert_rel_close(torch.stack(out.logits, dim=1), full, 1e-5, "cached vs full-forward logits")
    chosen = full.gather(-1, out.sequences[:, ids.shape[1] :, None]).squeeze(-1)
    shortfall = (full.max(-1).values - chosen).max().item()
    assert shortfall <= 1e-5 * full.abs().max().item(), f"a generated token is {shortfall:.2e} below the argmax"


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs on every run; the seed is printed (shown on failure) so a failure can be replayed
    with HF_MOE_TEST_SEED=<seed>."""
    seed = int(os.environ.get("HF_MOE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"HF_MOE_TEST_SEED={seed}")
    yield


def aot_graph_backend() -> tuple[object, dict[str, list]]:
    """A torch.compile backend that runs AOT autograd's forward and backward graphs as they are and keeps them:
    `graphs["forward"]` and `graphs["backward"]`, one `torch.fx.Graph` per compiled graph."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs: dict[str, list] = {"forward": [], "backward": []}

    def keep(kind: str):
        def compiler(graph_module, _inputs):
            graphs[kind].append(graph_module.graph)
            return make_boxed_func(graph_module.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), graphs
