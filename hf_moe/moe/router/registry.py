"""The router registry: `config.router_type` → router class.

Imports no router (the config validates `router_type` against it while the routers import the config); the
built-in routers register themselves when their modules are imported, which `import hf_moe` does.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers import PretrainedConfig

ROUTER_CLASSES: dict[str, type[nn.Module]] = {}
"""`config.router_type` → router class. Fill it with [`register_router`]."""


def register_router(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a router selectable with `HfMoeConfig(router_type=name)`.

    The class is built as `cls(config, layer_idx)` and its `forward(hidden_states [T, H], token_mask [T] | None,
    *, input_ids [T] | None, sequence_length: int)` returns a [`RouterOutput`]. Subclassing [`HfMoeRouter`] and
    overriding `select` is the short way (docs/routing.md). Register before building or loading a config that names
    it.

    ```python
    @hf_moe.register_router("my_router")
    class MyRouter(hf_moe.HfMoeRouter):
        def select(self, logits, scores, input_ids=None):  # -> (top_k_index [T, k], top_k_weights [T, k])
            ...
    ```
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_router(name={name!r}): expected a non-empty string.")

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in ROUTER_CLASSES and ROUTER_CLASSES[name] is not cls:
            raise ValueError(f"register_router: router_type {name!r} is already taken by {ROUTER_CLASSES[name]}.")
        ROUTER_CLASSES[name] = cls
        return cls

    return decorator


def build_router(config: PretrainedConfig, layer_idx: int | None = None) -> nn.Module:
    """The router `config.router_type` names (an `HfMoeConfig`), for MoE layer `layer_idx`."""
    return ROUTER_CLASSES[config.router_type](config, layer_idx)
