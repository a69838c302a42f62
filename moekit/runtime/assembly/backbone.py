"""`MixtureKitModel`: the composed decoder without its LM head, as `AutoModel` builds it.

Serving engines that bring their own LM head, attention and fused MoE kernels around a transformers model (vLLM's
Transformers backend) build the backbone with `AutoModel.from_config` and read hidden states from it. The routed
modules are the same as `MixtureKitForCausalLM`'s, and so are the tensor names (`model.layers.0.mlp.experts...`).
bts is refused: its expert streams are decoders of their own beside the hub, with their own attention layers, which
such an engine cannot give a KV cache; serve a bts model with transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from ...errors import UnsupportedArchitectureError
from .config import MixtureKitConfig
from .conversion import convert_dense_to_moe
from ..base_model.dense_model import with_torch_dtype
from .modeling import MixtureKitForCausalLM
from ..routed.routing import RouterLogitsRecorder

BACKBONE_METHODS = ("traditional", "btx")


def refuse_unservable(config: MixtureKitConfig) -> None:
    """Raise, before any weight is read, for a composition that cannot run as a backbone (bts)."""
    if config.method not in BACKBONE_METHODS:
        raise UnsupportedArchitectureError(
            f"a {config.method} composition cannot run as a decoder backbone (AutoModel, vLLM): its "
            f"{config.num_experts} expert streams are whole decoders beside the hub, with attention layers of their "
            "own that an engine serving one decoder gives no KV cache; serve it with transformers "
            "(AutoModelForCausalLM after `import moekit`), or compose with method: traditional, which serves in vLLM "
            "and exports to native MoE checkpoints (moekit export)")


class MixtureKitModel(PreTrainedModel):
    """The base architecture's backbone (`AutoModel` of `text_config`) with routed modules swapped in."""

    config_class = MixtureKitConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_missing = [r"\.expert_bias$"]

    def __init__(self, config: MixtureKitConfig):
        refuse_unservable(config)
        super().__init__(config)
        text_config = config.text_config
        if type(text_config) not in MODEL_MAPPING:
            raise UnsupportedArchitectureError(f"'{text_config.model_type}' has no backbone class (AutoModel) in "
                                               "transformers")
        dense = MODEL_MAPPING[type(text_config)](with_torch_dtype(text_config))
        self.router_recorder = RouterLogitsRecorder()
        convert_dense_to_moe(dense, config, self.router_recorder)
        for name, child in dense.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_dense", dense)  # shares its children with us, as in MixtureKitForCausalLM
        self.post_init()
        MixtureKitForCausalLM.set_balance(self, getattr(config, "balance", "loss"))

    def __setattr__(self, name: str, value: Any) -> None:
        """A child replaced here is replaced in the dense model too, whose forward runs: engines swap their own layers
        in for a backbone's children (vLLM's embedding, norms), and the forward must use them."""
        super().__setattr__(name, value)
        dense = self.__dict__.get("_dense")
        if dense is not None and isinstance(value, nn.Module) and name in dense._modules:
            setattr(dense, name, value)

    routers = MixtureKitForCausalLM.routers
    _init_weights = MixtureKitForCausalLM._init_weights

    def get_input_embeddings(self) -> nn.Module:
        return self._dense.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self._dense.set_input_embeddings(value)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.FloatTensor | None = None,
                **kwargs: Any) -> Any:
        """The backbone's own forward (hidden states, no logits); the inputs named for engines that read them."""
        return self._dense(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           inputs_embeds=inputs_embeds, **kwargs)
