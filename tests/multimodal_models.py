"""Tiny random image-text models and inputs with an image, for the multimodal invariant tests and sweep.

No processor is involved: the inputs follow each family's own processor-free convention, `input_ids` holding the
config's image token once per image feature the vision path produces, beside `pixel_values` of the shape its vision
tower reads (and the family's extra tensors: Qwen's `image_grid_thw`, Mistral 3's `image_sizes`, Gemma 4's patch
positions). Every size is shrunk: text decoder, vision tower (image size, patch size, layers, widths).
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig

VOCAB = 128
IMAGE_TOKEN, VISION_START, VISION_END, BEGIN_IMAGE, END_IMAGE = 100, 101, 102, 103, 104
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=4, patch_size=8, temporal_patch_size=2,
                   spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=16)
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}


class ImageInputs(dict):
    """The keyword arguments of one forward with an image: `input_ids` (text, image tokens, text) and the pixels."""


def _text_around(image_tokens: list[int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    before, after = torch.randint(3, 90, (batch, 3), generator=generator), torch.randint(3, 90, (batch, 4), generator=generator)
    return torch.cat([before, torch.tensor([image_tokens] * batch), after], dim=1)


def _gemma3() -> tuple[PretrainedConfig, Callable[[PretrainedConfig], ImageInputs]]:
    config = AutoConfig.for_model(
        "gemma3", text_config={"model_type": "gemma3_text", **TEXT, "sliding_window": 4,
                               "layer_types": ["sliding_attention", "full_attention"]},
        vision_config={"model_type": "siglip_vision_model", **VISION, "image_size": 32, "patch_size": 8},
        mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=BEGIN_IMAGE, eoi_token_index=END_IMAGE)

    def inputs(config) -> ImageInputs:
        ids = _text_around([BEGIN_IMAGE] + [IMAGE_TOKEN] * 4 + [END_IMAGE])
        return ImageInputs(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32),
                           token_type_ids=(ids == IMAGE_TOKEN).long())
    return config, inputs


def _llava() -> tuple[PretrainedConfig, Callable]:
    config = AutoConfig.for_model(
        "llava", text_config={"model_type": "llama", **TEXT},
        vision_config={"model_type": "clip_vision_model", **VISION, "image_size": 32, "patch_size": 8,
                       "projection_dim": 32},
        image_token_index=IMAGE_TOKEN, image_seq_length=16)
    return config, lambda c: ImageInputs(input_ids=_text_around([IMAGE_TOKEN] * 16),
                                         pixel_values=torch.randn(1, 3, 32, 32))


def _mistral3() -> tuple[PretrainedConfig, Callable]:
    config = AutoConfig.for_model(
        "mistral3", text_config={"model_type": "mistral", **TEXT, "sliding_window": None},
        vision_config={"model_type": "pixtral", **VISION, "image_size": 32, "patch_size": 8, "head_dim": 8},
        image_token_index=IMAGE_TOKEN, spatial_merge_size=2)
    # Pixtral: (32/8)^2 patches merged 2x2 into 4 image features
    return config, lambda c: ImageInputs(input_ids=_text_around([IMAGE_TOKEN] * 4),
                                         pixel_values=torch.randn(1, 3, 32, 32), image_sizes=torch.tensor([[32, 32]]))


def _qwen_inputs(config) -> ImageInputs:
    """Qwen-VL: one image of a 4x4 grid of 8x8 patches (2 frames each), merged 2x2 into 4 image features."""
    grid = torch.tensor([[1, 4, 4]])
    patches = torch.randn(16, 3 * 2 * 8 * 8)
    ids = _text_around([VISION_START] + [IMAGE_TOKEN] * 4 + [VISION_END])
    extra = {"mm_token_type_ids": (ids == IMAGE_TOKEN).long()} if config.model_type != "qwen2_5_vl" else {}
    return ImageInputs(input_ids=ids, pixel_values=patches, image_grid_thw=grid, **extra)


QWEN_TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=105, vision_start_token_id=VISION_START,
                   vision_end_token_id=VISION_END)


def _qwen3_vl() -> tuple[PretrainedConfig, Callable]:
    config = AutoConfig.for_model(
        "qwen3_vl", text_config={"model_type": "qwen3_vl_text", **TEXT, "rope_parameters": MROPE},
        vision_config={"model_type": "qwen3_vl", **QWEN_VISION, "deepstack_visual_indexes": [0]}, **QWEN_TOKENS)
    return config, _qwen_inputs


def _qwen2_5_vl() -> tuple[PretrainedConfig, Callable]:
    config = AutoConfig.for_model(
        "qwen2_5_vl", text_config={"model_type": "qwen2_5_vl_text", **TEXT, "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}},
        vision_config={"model_type": "qwen2_5_vl", **QWEN_VISION, "window_size": 16, "fullatt_block_indexes": [0]},
        **QWEN_TOKENS)
    return config, _qwen_inputs


def _qwen3_5() -> tuple[PretrainedConfig, Callable]:
    text = {**TEXT, "head_dim": 16, "layer_types": ["linear_attention", "full_attention"],
            "linear_conv_kernel_dim": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "rope_parameters": {**MROPE, "partial_rotary_factor": 0.5}}
    config = AutoConfig.for_model(
        "qwen3_5", text_config={"model_type": "qwen3_5_text", **text},
        vision_config={"model_type": "qwen3_5", **QWEN_VISION}, **QWEN_TOKENS)
    return config, _qwen_inputs


def _gemma4() -> tuple[PretrainedConfig, Callable]:
    config = AutoConfig.for_model(
        "gemma4", text_config={"model_type": "gemma4_text", **TEXT, "sliding_window": 4,
                               "layer_types": ["sliding_attention", "full_attention"],
                               "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,
                               "global_head_dim": 8},
        vision_config={"model_type": "gemma4_vision", **VISION, "num_key_value_heads": 4, "head_dim": 8,
                       "patch_size": 8, "pooling_kernel_size": 3, "position_embedding_size": 64},
        audio_config=None, image_token_id=IMAGE_TOKEN, boi_token_id=BEGIN_IMAGE, eoi_token_id=END_IMAGE,
        video_token_id=105, boa_token_id=106, eoa_token_index=107, audio_token_id=108)

    def inputs(config) -> ImageInputs:
        # a 6x6 grid of 8x8 patches, pooled 3x3 into 4 image features
        positions = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="xy"), -1).reshape(1, 36, 2)
        return ImageInputs(input_ids=_text_around([BEGIN_IMAGE] + [IMAGE_TOKEN] * 4 + [END_IMAGE]),
                           pixel_values=torch.rand(1, 36, 3 * 8 * 8), image_position_ids=positions)
    return config, inputs


def _idefics3(model_type: str) -> Callable[[], tuple[PretrainedConfig, Callable]]:
    def build():
        config = AutoConfig.for_model(
            model_type, text_config={"model_type": "llama", **TEXT},
            vision_config={**VISION, "image_size": 32, "patch_size": 8}, image_token_id=IMAGE_TOKEN,
            scale_factor=2)
        # (32/8)^2 = 16 patches, pixel-shuffled by 2 into 4 image features; pixel_values [batch, images, 3, H, W]
        return config, lambda c: ImageInputs(input_ids=_text_around([IMAGE_TOKEN] * 4),
                                             pixel_values=torch.randn(1, 1, 3, 32, 32))
    return build


FAMILIES: dict[str, Callable[[], tuple[PretrainedConfig, Callable[[PretrainedConfig], ImageInputs]]]] = {
    "gemma3": _gemma3, "gemma4": _gemma4, "llava": _llava, "mistral3": _mistral3, "qwen3_vl": _qwen3_vl,
    "qwen2_5_vl": _qwen2_5_vl, "qwen3_5": _qwen3_5, "idefics3": _idefics3("idefics3"),
    "smolvlm": _idefics3("smolvlm"),
}


def make_image_text_model(config: PretrainedConfig, seed: int) -> torch.nn.Module:
    """A dense image-text model with every weight drawn from `seed` (norms too, so experts really differ)."""
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter) if "weight" in name
                                else 0.1 * torch.randn_like(parameter))
            else:
                parameter.normal_(0, 0.2)
    return model


def image_inputs(model_type: str, config: PretrainedConfig, seed: int = 0) -> ImageInputs:
    torch.manual_seed(seed)
    build = FAMILIES.get(model_type) or (lambda: generic_family(model_type))
    return build()[1](config)


def tiny_llava_processor():
    """A LLaVA processor built offline: a word-level tokenizer over the tiny vocabulary (`w3`, `w4`, ..., `<image>` at
    `IMAGE_TOKEN`), CLIP's image processor at the tiny vision tower's 32x32 pixels, and a chat template; it expands
    `<image>` into the 16 image tokens `_llava`'s tower gives."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB) if i != IMAGE_TOKEN},
             "<image>": IMAGE_TOKEN}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="[PAD]", unk_token="[PAD]",
                                        extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}")
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=template)


# The generic harness: any other image-text family, shrunk as `family_sweep` shrinks configs, fed a llava-style image
# (`pixel_values` [1, channels, size, size]) and as many image tokens as its own mismatch error asks for.
GENERIC_TOKEN_BASE = 80  # image/special token ids are moved into the shrunk vocabulary (96), from here up
FEATURE_COUNT = re.compile(r"tokens:? (\d+), features:? (\d+)")
GENERIC_IMAGE_TOKENS: dict[str, int] = {}  # per family, as `find_image_token_count` found it


def generic_family(model_type: str) -> tuple[PretrainedConfig, Callable[[PretrainedConfig], ImageInputs]]:
    """A tiny config of any image-text family and its image inputs, or raise saying why the harness has none."""
    from family_sweep import tiny_config

    config = tiny_config(model_type)
    token_fields = sorted(k for k, v in config.to_dict().items()
                          if isinstance(v, int) and not isinstance(v, bool) and k.endswith(("_token_id", "_token_index"))
                          and k not in ("pad_token_id", "bos_token_id", "eos_token_id"))
    for offset, key in enumerate(token_fields):
        setattr(config, key, GENERIC_TOKEN_BASE + offset)
    image_token = next((getattr(config, k) for k in ("image_token_id", "image_token_index") if hasattr(config, k)), None)
    vision = getattr(config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    if image_token is None or not isinstance(size, int):
        raise LookupError("the generic harness needs an image_token_id and a square vision_config.image_size")
    channels = getattr(vision, "num_channels", 3)

    def inputs(config) -> ImageInputs:
        return ImageInputs(input_ids=_text_around([image_token] * GENERIC_IMAGE_TOKENS.get(model_type, 1)),
                           pixel_values=torch.randn(1, channels, size, size))
    return config, inputs


def find_image_token_count(model_type: str, model: torch.nn.Module) -> None:
    """Record how many image tokens the model's vision path produces, read from its own error for a wrong count
    ("Image features and image tokens do not match, tokens: 1, features: 16")."""
    try:
        with torch.no_grad():
            model(**image_inputs(model_type, model.config))
        return
    except ValueError as error:
        match = FEATURE_COUNT.search(str(error))
        if match is None:
            raise
    GENERIC_IMAGE_TOKENS[model_type] = int(match.group(2))
