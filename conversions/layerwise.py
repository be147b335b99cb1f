"""Run a causal LM one decoder layer at a time, loading each layer's weights just before it runs.

Memory is one layer's weights plus the activations of the batch, whatever the model's size. Used to verify an
upcycled model against its dense source and to collect the hidden states that k-means router init clusters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


class LayerwiseModel:
    """A `model_class(config)` skeleton on the meta device whose parts are materialised on demand.

    Args:
        config: the model's config.
        model_class: a transformers causal-LM class (`LlamaForCausalLM`, `HfMoeForCausalLM`, ...).
        get_tensor: loads one tensor by its checkpoint name.
    """

    def __init__(self, config: PretrainedConfig, model_class: type, get_tensor: Callable[[str], torch.Tensor]):
        self.config = config
        self.get_tensor = get_tensor
        with torch.device("meta"):
            self.skeleton = model_class(config)
        self.skeleton.config._attn_implementation = "eager"
        self.backbone = self.skeleton.model
        self.rotary = type(self.backbone.rotary_emb)(config=config)

    def _load(self, module: nn.Module, prefix: str) -> nn.Module:
        """A materialised copy of a skeleton part (the skeleton stays on meta, so memory is freed after use)."""
        module = copy.deepcopy(module).to_empty(device="cpu")
        state = {name: self.get_tensor(prefix + name).float() for name in module.state_dict()}
        module.load_state_dict(state, strict=True)
        return module.float()

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, on_mlp_input: Callable[[int, torch.Tensor], None] | None = None):
        """fp32 logits of `input_ids`; `on_mlp_input(layer, x)` sees every layer's MLP input."""
        embed = self._load(self.backbone.embed_tokens, "model.embed_tokens.")
        hidden = embed(input_ids)
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        position_embeddings = self.rotary(hidden, positions)
        sliding = getattr(self.config, "sliding_window", None)
        make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
        mask = make_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                         position_ids=positions)
        for i, skeleton_layer in enumerate(self.backbone.layers):
            layer = self._load(skeleton_layer, f"model.layers.{i}.")
            hook = None
            if on_mlp_input is not None:
                hook = layer.mlp.register_forward_pre_hook(lambda m, args, i=i: on_mlp_input(i, args[0]))
            out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=position_embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
            if hook is not None:
                hook.remove()
            del layer
        hidden = self._load(self.backbone.norm, "model.norm.")(hidden)
        if self.config.tie_word_embeddings:
            return hidden @ embed.weight.T
        return self._load(self.skeleton.lm_head, "lm_head.")(hidden)
