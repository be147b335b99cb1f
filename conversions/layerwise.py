"""Run a checkpoint one decoder layer at a time, straight from its safetensors files, in float32.

Only one layer's weights (plus the embedding / LM head at the ends) are in memory at once, so the dense
model can be run for k-means calibration and dense and MoE models can be compared side by side on machines
that could not hold either model whole.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import nn

from hf_moe import HfMoeConfig
from hf_moe.attention import HfMoeRMSNorm, HfMoeRotaryEmbedding, causal_masks
from hf_moe.modeling_hf_moe import HfMoeDecoderLayer

from .safetensors_io import SafetensorsReader


class LayerwiseModel:
    """An `HfMoeForCausalLM` whose weights stay on disk until the layer that needs them runs.

    `weight_dtype` rounds every weight to that dtype before computing in float32 (so a dense source can be
    compared with an upcycled copy stored in lower precision on equal terms).
    """

    def __init__(self, config: HfMoeConfig, reader: SafetensorsReader, weight_dtype: torch.dtype | None = None):
        self.config = config
        self.config._attn_implementation = "sdpa"
        self.config._experts_implementation = "eager"  # the reference loop over experts
        self.reader = reader
        self.weight_dtype = weight_dtype
        self.rotary = HfMoeRotaryEmbedding(config=config)

    def _tensor(self, name: str) -> torch.Tensor:
        tensor = self.reader.get(name)
        if self.weight_dtype is not None:
            tensor = tensor.to(self.weight_dtype)
        return tensor.float()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = nn.functional.embedding(input_ids, self._tensor("model.embed_tokens.weight"))
        return embeddings * self.config.embedding_multiplier

    def layer(self, index: int) -> HfMoeDecoderLayer:
        """Decoder layer `index` with its weights loaded (float32)."""
        with torch.device("meta"):
            layer = HfMoeDecoderLayer(self.config, index)
        prefix = f"model.layers.{index}."
        state = {name: self._tensor(prefix + name) for name in layer.state_dict()}
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()

    def apply(self, layer: HfMoeDecoderLayer, hidden_states: torch.Tensor) -> torch.Tensor:
        """`layer` on an unpadded batch `[B, S, H]`: positions 0..S-1 and the causal mask of the layer's type."""
        position_ids = torch.arange(hidden_states.shape[1]).unsqueeze(0)
        masks = causal_masks(self.config, hidden_states, None, None, position_ids)
        output, _ = layer(hidden_states, attention_mask=masks[layer.attention_type], position_ids=position_ids,
                          position_embeddings=self.rotary(hidden_states, position_ids=position_ids))
        return output  # a layer returns (output, its MoE block's routing)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        norm = HfMoeRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = self._tensor("model.norm.weight")
        head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        return nn.functional.linear(norm(hidden_states), self._tensor(head)) / self.config.logits_scaling

    @torch.no_grad()
    def run_layers(self, hidden_states: torch.Tensor, stop: int, collect: Collection[int] = (),
                   on_mlp_inputs: Callable[[int, torch.Tensor], None] | None = None, sequences_per_step: int = 4,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Hidden states `[B, S, H]` after layers `[0, stop)`, `sequences_per_step` sequences at a time.

        For each layer in `collect`, `on_mlp_inputs(i, x [B·S, H])` receives its normalised MLP inputs.
        """
        for i in range(stop):
            layer = self.layer(i)
            inputs: list[torch.Tensor] = []
            hook = None
            if i in collect:
                hook = layer.mlp.register_forward_pre_hook(
                    lambda _m, args, inputs=inputs: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
            hidden_states = torch.cat([self.apply(layer, chunk) for chunk in hidden_states.split(sequences_per_step)])
            if hook is not None:
                hook.remove()
                on_mlp_inputs(i, torch.cat(inputs))
            if progress is not None:
                progress(i)
        return hidden_states
