"""The base model as transformers builds it from its own config: the class to build and the dtype it expects."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from ...errors import UnsupportedArchitectureError
from .architecture import is_multimodal

def with_torch_dtype(config):
    """The config, its `dtype` a torch dtype: some families build tensors with it (Apertus' xIELU), and a config read
    back from a composed checkpoint's JSON holds the name."""
    if isinstance(getattr(config, "dtype", None), str) and isinstance(getattr(torch, config.dtype, None), torch.dtype):
        config.dtype = getattr(torch, config.dtype)
    return config


def dense_model_class(text_config) -> type[PreTrainedModel]:
    """transformers' class for the base: its image-text model for a multimodal wrapper (LLaVA has no causal-LM
    class; Gemma 3's is the same class) or for an image-text model with one flat config and no causal-LM class
    (Chameleon: its VQ image tokenizer beside the decoder), else its causal LM."""
    image_text = type(text_config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    if image_text and (is_multimodal(text_config) or type(text_config) not in MODEL_FOR_CAUSAL_LM_MAPPING):
        model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(text_config)]
        if getattr(text_config, "is_encoder_decoder", False):
            raise UnsupportedArchitectureError(
                f"'{text_config.model_type}' is an encoder-decoder model ({model_class.__name__}: its decoder "
                "cross-attends to what its encoder makes of the image), and MixtureKit composes decoder-only language "
                "models, with or without a vision tower")
        return model_class
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"'{text_config.model_type}' has no causal-LM or image-text-to-text class in transformers; MixtureKit "
            "composes models that AutoModelForCausalLM or AutoModelForImageTextToText can build"
        ) from None


def share_own_tensors(owner: nn.Module, dense: nn.Module) -> None:
    """The dense model's own parameters and buffers, outside any child (BLIP-2's `query_tokens`), become `owner`'s
    (the composed model's) under the same names, and the dense model reads them from its tables: loading replaces a
    parameter where it is registered, so a copy of the table would leave the dense forward reading the unloaded one."""
    for name, parameter in dense._parameters.items():
        owner.register_parameter(name, parameter)
    for name, buffer in dense._buffers.items():
        owner.register_buffer(name, buffer, persistent=name not in dense._non_persistent_buffers_set)
    object.__setattr__(dense, "_parameters", owner._parameters)
    object.__setattr__(dense, "_buffers", owner._buffers)
    object.__setattr__(dense, "_non_persistent_buffers_set", owner._non_persistent_buffers_set)
