"""Tiny random image-text models and inputs with an image, for the multimodal invariant tests and sweep.

No processor is involved: the inputs follow each family's own processor-free convention, `input_ids` holding the
config's image token once per image feature the vision path produces, beside `pixel_values` of the shape its vision
tower reads (and the family's extra tensors: Qwen's `image_grid_thw`, Mistral 3's `image_sizes`, Gemma 4's patch
positions). Every size is shrunk: text decoder, vision tower (image size, patch size, layers, widths). Any other
image-text family goes through `generic_family`, which shrinks its config and feeds the image as its forward asks.
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


def _text_around(image_tokens: list[int], batch: int = 1, seed: int = 0, high: int = 90) -> torch.Tensor:
    """Text tokens (ids 3 to `high`, below every special token) around the image's tokens."""
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(3, high, (batch, 3), generator=generator)
    after = torch.randint(3, high, (batch, 4), generator=generator)
    return torch.cat([before, torch.tensor([image_tokens] * batch, dtype=torch.long), after], dim=1)


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
    inputs = build()[1](config)
    canvas = getattr(config, "canvas_length", None)
    if isinstance(canvas, int) and "decoder_input_ids" in _forward_parameters(model_type):
        # A block-diffusion model (DiffusionGemma) samples its decoder's canvas at random when none is given: a
        # fixed one makes its logits a function of the inputs, comparable between models.
        text = getattr(config, "text_config", None) or config
        inputs["decoder_input_ids"] = torch.randint(0, min(text.vocab_size, 90), (inputs["input_ids"].shape[0], canvas))
    return inputs


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


# The generic harness: any other image-text family, shrunk as `family_sweep` shrinks configs and then its vision
# side too (image and patch sizes, widths, depths, output widths), fed an image the way its forward's signature asks
# (llava-style `pixel_values` [1, channels, H, W], tiles [1, tiles, channels, H, W] where the family takes
# `image_sizes` and grid pinpoints, Qwen-style flattened patches with `image_grid_thw`), and as many image tokens as
# its own mismatch error asks for.
GENERIC_TOKEN_BASE = 80  # image/special token ids are moved into the shrunk vocabulary (96), from here up
FEATURE_COUNT = re.compile(r"tokens:? (?P<tokens>\d+),? (?:image )?features:? (?P<features>\d+)"
                           r"|Got (?P<features2>\d+) feature vectors for (?P<tokens2>\d+) placeholder tokens")  # Nemotron
GENERIC_IMAGE_TOKENS: dict[str, int] = {}  # per family, as `find_image_token_count` found it
GENERIC_IMAGE, GENERIC_PATCH = 32, 8
# Vision-side sizes the text shrinking leaves (`None`: the text decoder's width, which the vision output feeds).
VISION_SIZES = dict(adapter_in_dim=32, adapter_out_dim=None, embed_dim=32, depth=1, num_hidden_layers=1, out_hidden_size=None, projector_input_dim=None,
                    projector_output_dim=None, vision_output_dim=32, num_position_embeddings=16,
                    intermediate_size=48, num_heads=4, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                    text_hidden_size=None, position_embedding_size=64)
# Projector and text widths the shrinking leaves, on the wrapper and its text config (`None`: the text width).
PROJECTOR_SIZES = dict(projection_dim=None, projection_hidden_size=VISION_SIZES["embed_dim"], projector_hidden_size=48, alignment_intermediate_size=48,
                       intermediate_size_mlp=48, mm_tokens_per_image=4)
# A VQ image tokenizer's sizes (Chameleon, Janus): an 8-code book, 32 channels (its group norms' groups), 8x downsampling (a 32x32 image is 16
# codes), widths into the decoder at the text width (`None`).
VQ_SIZES = dict(num_embeddings=8, embed_dim=8, latent_channels=32, base_channels=32, num_res_blocks=1, resolution=32,
                num_patches=4, projection_dim=None, image_token_embed_dim=None, num_hidden_layers=1)
# Text-side sizes `family_sweep`'s SIZES leaves (multi-head latent attention's ranks and head parts, DeepSeek sparse
# attention's indexer, linear-attention heads, shared experts): a decoder of text width 32, heads of 8.
# The rotary part of a latent-attention head is the config's `head_dim` (8), as their configs derive it.
TEXT_EXTRA_SIZES = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        qk_head_dim=16, index_head_dim=8, index_n_heads=2, index_topk=64, linear_head_dim=8,
                        linear_num_heads=4, shared_experts_intermediate_size=16, moe_intermediate_size=16,
                        moe_hidden_size=16, swa_head_dim=8, unpadded_vocab_size=VOCAB - 32)
# The other towers' sizes (audio encoders, SAM-style high-resolution encoders, towers nested in the vision config):
# one layer or stage, widths of 32 (`None`: the text width, which their output feeds).
TOWER_SIZES = dict(output_channels=32, mlp_dim=48, num_pos_feats=16, downsample_hidden_size=32, output_dim=None,
                   d_model=32, encoder_ffn_dim=48, encoder_layers=1, encoder_attention_heads=4, num_mel_bins=16,
                   projection_hidden_dim=48, projection_intermediate_size=48, projection_hidden_size=48,
                   adapter_in_dim=32, adapter_out_dim=None, adapter_input_size=32, conv_output_size=None,
                   encoder_hidden_size=32)  # a Q-Former's: the vision tower's width
# Fields a family's config class leaves `None` although its model reads them (its checkpoints' configs write them):
# tiny values, on the text config. DeepSeek-OCR 2: which layers are MoE (DeepSeek's first dense, then sparse);
# DiffusionGemma: its routed experts (DeepSeek-OCR 2 the routing too); HunYuan-VL: `head_dim`; Qwen4-Exp: its QSA indexer (one kv head, a budget of
# whole compressed blocks); Step 3.7: its window (its model builds the sliding-window mask whatever its layers are).
UNSET_TEXT_FIELDS: dict[str, dict] = {
    "deepseek_ocr2": dict(mlp_layer_types=["dense", "sparse"], num_experts_per_tok=2, n_group=1, topk_group=1),
    "diffusion_gemma": dict(num_experts=4, top_k_experts=2, moe_intermediate_size=16),
    "hunyuan_vl": dict(head_dim=8),
    "step3p7": dict(sliding_window=4),
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=16,
                      indexer_compress_ratio=4),
}
# The same on the wrapper. Granite 4 Vision: which vision layers feed which decoder layers (a deepstack pair, and the
# four spatial offset groups into the two tiny layers), and its Q-Former's window downsampling.
UNSET_WRAPPER_FIELDS: dict[str, dict] = {
    "granite4_vision": dict(deepstack_layer_map=[[0, 0]], spatial_target_layers=[0, 1, 0, 1], downsample_rate="1/2"),
}
# And on the vision config: Granite 4 Vision's config derives its Q-Former's heads as the vision width / 64.
# Vision-side sizes the generic shrinking does not know, per family: PP-FormulaNet's SAM-style encoder names its MLP
# width, global-attention layers, the convolutions of its neck and projector and the width it hands its decoder in
# fields of its own.
VISION_FIELDS: dict[str, dict] = {
    "granite4_vision": dict(hidden_size=64),
    "pp_formulanet": dict(mlp_dim=48, output_channels=32, post_conv_in_channels=32, post_conv_mid_channels=32,
                          post_conv_out_channels=32, global_attn_indexes=[0], window_size=4, decoder_hidden_size=32),
}
OMNI_THINKERS = ("qwen2_5_omni_thinker", "qwen3_omni_moe_thinker")
ACTION_EXPERTS = {"pi0": ("dit_config",), "pi05": ("dit_config",)}  # a second decoder beside the VLM's
IMAGE_TOKEN_FIELDS = ("image_token_id", "image_token_index", "image_token")


# Image-text families whose auto class is a text-only causal LM, with the fields their tiny config needs. Mistral 4's
# multi-head latent attention: its latent widths as the generic shrinking gives them (nope 8 + rope 8), and a head_dim
# of 16, which its partial rotary factor (0.5) turns into the 8 rotated channels its rope part has.
TEXT_ONLY_FIELDS: dict[str, dict] = {
    "mistral4": dict(qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=8, kv_lora_rank=16,
                     q_lora_rank=16, head_dim=16),
}


def _keep_per_layer_config(model_type: str, config) -> None:
    """Gemma 4 Unified's text config keeps per-layer overrides by layer index (`per_layer_config`, the full-attention
    layers' head_dim) and refuses indices past its layer count: the kept layers' entries, renumbered as the shrinking
    keeps layers (`family_sweep._kept_layers`)."""
    from family_sweep import _kept_layers, _layer_count

    text = getattr(config, "text_config", None)
    overrides = text.to_dict().get("per_layer_config") if hasattr(text, "to_dict") else None
    if not isinstance(overrides, dict) or not overrides:
        return
    defaults = AutoConfig.for_model(model_type).text_config
    keep = _kept_layers(defaults, _layer_count(defaults))
    kept = {keep.index(int(k)): v for k, v in overrides.items() if int(k) in keep}
    if not kept:  # no full-attention layer kept, which its config makes the last layer on reload: one, as Gemma 4's
        text.layer_types = text.layer_types[:-1] + ["full_attention"]  # tiny model has, at a tiny head width
        kept = {len(text.layer_types) - 1: {"head_dim": 16}}
    text.per_layer_config = kept  # the setter checks the indices against the (shrunk) layer count
    text.head_dim = 8


class HarnessGap(LookupError):
    """The generic harness cannot build or feed this family (not transformers' or moekit's limit)."""


def _text_width(config) -> int:
    text = getattr(config, "text_config", None) or config
    return getattr(text, "hidden_size", None) or 32


def _shrink_vision(config, vision, width: int) -> None:
    """Shrink a vision sub-config in place: one layer, narrow widths, a 32x32 image of 8x8 patches."""
    for key, value in VISION_SIZES.items():
        current = getattr(vision, key, None)
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(vision, key, width if value is None else value)
    layers = getattr(vision, "num_hidden_layers", None)
    if isinstance(layers, int) and isinstance(getattr(vision, "layer_types", None), list):  # Ovis 2.5: one kind per
        vision.layer_types = vision.layer_types[:layers]  # layer, as many as the tower keeps
    ratio = getattr(vision, "pixel_shuffle_ratio", None)
    if isinstance(ratio, float):  # Llama 4: the projector reads the pixel-shuffled width
        vision.intermediate_size = int(vision.hidden_size / ratio ** 2)
    if isinstance(getattr(vision, "intermediate_layers_indices", None), list):  # Mllama: the output concatenates
        vision.intermediate_layers_indices = [0]  # the last layer's and these layers' states
        vision.vision_output_dim = 2 * vision.hidden_size
        vision.num_global_layers, vision.max_num_tiles, vision.supported_aspect_ratios = 1, 1, [[1, 1]]
    if isinstance(getattr(vision, "projection_dim", None), int):
        vision.projection_dim = width
    for key in ("deepstack_visual_indexes", "fullatt_block_indexes"):
        if isinstance(getattr(vision, key, None), list):
            setattr(vision, key, [0])
    for key in ("window_size",):
        if isinstance(getattr(vision, key, None), int):
            setattr(vision, key, 2 * GENERIC_PATCH * 2)
    size = getattr(vision, "image_size", None)
    if isinstance(size, int):
        vision.image_size = GENERIC_IMAGE
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        vision.image_size = type(size)([GENERIC_IMAGE, GENERIC_IMAGE])
    elif isinstance(size, dict):
        vision.image_size = {k: GENERIC_IMAGE for k in size}
    patch = getattr(vision, "patch_size", None)
    if isinstance(patch, int):
        vision.patch_size = GENERIC_PATCH
    elif isinstance(patch, (list, tuple)) and len(patch) == 2:
        vision.patch_size = type(patch)([GENERIC_PATCH, GENERIC_PATCH])
    merge = getattr(vision, "merge_size", None)
    if isinstance(getattr(config, "out_hidden_size", None), int) and isinstance(merge, int):  # Muse: the merged
        config.out_hidden_size = vision.hidden_size * merge ** 2  # patches' width, into the projector
    _shrink_stages(vision)
    if isinstance(getattr(config, "projector_patch_to_query_dict", None), dict):  # Aria: its projector's queries
        config.projector_patch_to_query_dict = {(GENERIC_IMAGE // GENERIC_PATCH) ** 2: 4}  # per patch count
        config.max_value_projector_patch_to_query_dict = 4
    if isinstance(getattr(config, "image_grid_pinpoints", None), list):  # LLaVA-NeXT: one tile grid, the image size
        config.image_grid_pinpoints = [[GENERIC_IMAGE, GENERIC_IMAGE]]


# Per-stage lists of a multi-stage vision tower (Florence 2's DaViT): every stage one block of width 32, 4 heads.
STAGE_SIZES = dict(depths=1, embed_dim=32, num_heads=4, num_groups=4)


def _shrink_stages(vision) -> None:
    for key, value in STAGE_SIZES.items():
        stages = getattr(vision, key, None)
        if isinstance(stages, (list, tuple)) and stages and all(isinstance(v, int) for v in stages):
            setattr(vision, key, [value] * len(stages))


def _chameleon_vocabulary(codes: int) -> dict[str, int]:
    """Chameleon's map from image-code token names to ids: `<image>` and one `IMGIMG...Z` token per VQ code (its
    digits written A-J), above the text tokens the harness draws."""
    letters = {str(digit): chr(ord("A") + digit) for digit in range(10)}
    names = {"IMGIMG" + "".join(letters[c] for c in str(code)) + "Z": GENERIC_TOKEN_BASE + 1 + code
             for code in range(codes)}
    return {"<image>": GENERIC_TOKEN_BASE, **names}


def _emu3_vocabulary(codes: int) -> dict[str, int]:
    """Emu3's map from image-code token names to ids: `<image>`, the end-of-row token `<|extra_200|>` and one
    `<|visual tokenNNNNNN|>` per VQ code, above the text tokens the harness draws."""
    names = {f"<|visual token{code:06d}|>": GENERIC_TOKEN_BASE + 2 + code for code in range(codes)}
    return {"<image>": GENERIC_TOKEN_BASE, "<|extra_200|>": GENERIC_TOKEN_BASE + 1, **names}


def _fit_rope_sections(text) -> None:
    """Multimodal RoPE splits each head's rotary half into (time, height, width) sections: rescaled to the tiny
    head."""
    rope = getattr(text, "rope_parameters", None)
    if not isinstance(rope, dict) or not ("mrope_section" in rope or "rope_type" in rope):
        return
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    half = int(head * rope.get("partial_rotary_factor", 1.0)) // 2
    sections = [half - 2 * (half // 4), half // 4, half // 4]
    text.rope_parameters = {**rope, "mrope_section": sections[:len(rope.get("mrope_section", sections))]}


def _rope_per_layer_kind(text) -> None:
    """A text config whose class leaves `rope_parameters` empty while its model reads them per layer kind (Cohere
    Compass: its checkpoints write one entry per kind) gets default RoPE for each kind, its multimodal sections fitted
    to the tiny head."""
    kinds = getattr(text, "layer_types", None)
    if getattr(text, "rope_parameters", None) != {} or not isinstance(kinds, list):
        return
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    half = head // 2
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]}
    text.rope_parameters = {kind: dict(rope) for kind in dict.fromkeys(kinds)}


def _image_token(config) -> int | None:
    for part in (config, *_nested_parts(config)):
        for key in IMAGE_TOKEN_FIELDS:
            value = getattr(part, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _drop_dropped_layers_overrides(part) -> None:
    """A heterogeneous config (per-layer overrides in `per_layer_config`) keeps only the overrides of the layers the
    tiny model keeps, shrunk, and the sizes `family_sweep` skipped while they were per layer (read only per layer
    then)."""
    from family_sweep import FAMILY_FIELDS, SIZES, _field

    if not getattr(part, "is_heterogeneous", False):
        return
    layers = _field(part, "num_hidden_layers") or 0
    # a family `family_sweep` sizes by its own fields keeps its per-layer sizes (dots3 Note's sliding layers' head
    # size must stay their nope + rope sizes)
    sizes = {} if getattr(part, "model_type", "") in FAMILY_FIELDS else {**SIZES, **TEXT_EXTRA_SIZES}
    overrides = {k: {f: sizes[f] if f in sizes and isinstance(v, int) and v else v for f, v in layer.items()}
                 for k, layer in (part.to_dict().get("per_layer_config") or {}).items() if int(k) < layers}
    part.per_layer_config = overrides or None
    for key, value in SIZES.items():
        current = _field(part, key)
        if isinstance(current, int) and not isinstance(current, bool) and key not in ("num_hidden_layers",):
            setattr(part, key, value)


def _shrink_text_extras(text) -> None:
    """The text decoder's sizes `family_sweep` does not know (`TEXT_EXTRA_SIZES`), where the config has them."""
    from family_sweep import _field

    for key, value in TEXT_EXTRA_SIZES.items():
        current = _field(text, key)
        if isinstance(current, int) and not isinstance(current, bool) and current:  # 0: none (GLM-5's NoPE)
            setattr(text, key, value)
    if isinstance(_field(text, "qk_head_dim"), int):  # a latent-attention head: its unrotated and rotary parts
        text.qk_head_dim = text.qk_nope_head_dim + (_field(text, "qk_rope_head_dim") or 0)
    if isinstance(_field(text, "kv_lora_rank"), int) and isinstance(_field(text, "num_key_value_heads"), int):
        text.num_key_value_heads = text.num_attention_heads  # latent attention expands its one latent to every head


def _towers(config, skip=("text_config",)):
    """Every sub-config below the wrapper but the text decoder's, nested ones too (a SAM encoder in the vision
    config), as (name, config)."""
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if key not in skip and hasattr(sub, "to_dict"):
            yield key, sub
            yield from _towers(sub, skip)


def _shrink_tower(tower, width: int) -> None:
    """An audio or high-resolution tower: `TOWER_SIZES` and `VISION_SIZES` where it has them, one stage of each
    per-stage list, global attention in its one layer."""
    layers = getattr(tower, "num_hidden_layers", None)
    for key in ("patch_sizes", "hidden_sizes", "depths"):  # one entry per stage (Muse Spark's audio tower): one
        if isinstance(layers, int) and isinstance(getattr(tower, key, None), (list, tuple)):  # stage, 1 layer, 32 wide
            setattr(tower, key, [{"hidden_sizes": 32, "depths": 1}.get(key, getattr(tower, key)[0])])
    for key, value in {**VISION_SIZES, **TOWER_SIZES}.items():
        current = getattr(tower, key, None)
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(tower, key, width if value is None else value)
    layers = getattr(tower, "num_hidden_layers", None)
    if isinstance(layers, int) and isinstance(getattr(tower, "layer_types", None), list):  # one kind per layer
        tower.layer_types = tower.layer_types[:layers]
    if isinstance(getattr(tower, "codebook_dim", None), int):  # WavTokenizer: no projection around its quantizer
        tower.hidden_size = tower.codebook_dim = 32  # its encoder's width: num_filters doubled per downsampling
        tower.num_filters = 32 // 2 ** len(tower.upsampling_ratios)
        tower.codebook_size = 8
    if isinstance(getattr(tower, "global_attn_indexes", None), (list, tuple)):  # SAM: which layers attend globally
        tower.global_attn_indexes = [0]
    if isinstance(getattr(tower, "downsample_channels", None), (list, tuple)):  # SAM's neck into the next encoder
        tower.downsample_channels = [32] * len(tower.downsample_channels)  # (of width 32)


# Special-token fields that a class leaves None by default, for its processor's tokenizer to fill (BLIP-2's and
# InstructBLIP's `image_token_index`: without it their query outputs are prepended the legacy way; MiniCPM-V's, Nemotron
# Omni's `image_token_id`): the tiny config gives them ids in its vocabulary, as a real checkpoint's config holds them.
MODALITY_WORDS = ("image", "video", "audio", "vision", "boi", "eoi", "boa", "eoa", "slice", "newline")


def _nested_parts(config) -> list:
    """The sub-configs a wrapper nests its parts in (T5Gemma 2's `encoder`, PI0's `vlm_config`), one level down."""
    return [value for key, value in vars(config).items() if hasattr(value, "to_dict") and key != "text_config"]


def _token_fields(config) -> list[tuple[object, str]]:
    """The config's (and its nested parts') special-token id fields other than pad/bos/eos: the ones set to an id, and
    the modality ones a class leaves None (`MODALITY_WORDS`)."""
    fields = []
    for part in (config, *_nested_parts(config)):
        for key, value in sorted(part.to_dict().items()):
            if key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id") or isinstance(
                    value, bool):
                continue
            token_name = key.endswith(("_token_id", "_token_index", "image_patch_id"))
            unset_modality = value is None and key.startswith(MODALITY_WORDS) and (
                token_name or key.endswith(("_start_id", "_end_id")) or key == "newline_id")
            if (isinstance(value, int) and token_name) or unset_modality:
                fields.append((part, key))
    return fields


VISION_KEYS = ("vision_config", "vision_tower_config", "visual_config", "vq_config",
               "protein_encoder_config")  # Evolla: a protein encoder where others have a vision tower


def _vision_part(config):
    """The vision tower's config: on the wrapper, or one level down (T5Gemma 2's encoder, PI0's PaliGemma), or the
    encoder itself where that is an image encoder (VisionEncoderDecoder's ViT: it has an image size)."""
    for part in (config, *_nested_parts(config)):
        found = next((getattr(part, k) for k in VISION_KEYS if hasattr(getattr(part, k, None), "to_dict")), None)
        if found is not None:
            return found
    encoder = getattr(config, "encoder", None)
    return encoder if hasattr(encoder, "to_dict") and hasattr(encoder, "image_size") else None


def generic_family(model_type: str) -> tuple[PretrainedConfig, Callable[[PretrainedConfig], ImageInputs]]:
    """A tiny config of any image-text family and its image inputs, or raise saying why the harness has none."""
    from family_sweep import tiny_config

    config = tiny_config(model_type)
    config.update(TEXT_ONLY_FIELDS.get(model_type, {}))
    _keep_per_layer_config(model_type, config)
    width = _text_width(config)
    for key in ("vision_config", "vision_tower_config", "visual_config", "adapter_config"):  # Molmo 2's adapter
        if hasattr(getattr(config, key, None), "to_dict"):  # pools the vision tower's states into text width
            _shrink_vision(config, getattr(config, key), width)
    for part in [getattr(config, "text_config", None) or config] + [tower for _, tower in _towers(config)]:
        _drop_dropped_layers_overrides(part)
    vision_keys = ("vision_config", "vision_tower_config", "visual_config", "adapter_config", "vq_config")
    for key, tower in _towers(config):
        if key in vision_keys and any(tower is getattr(config, k, None) for k in vision_keys):
            continue  # the main vision tower, shrunk above (its nested towers are not)
        if "vision" in key or "sam" in key or "image" in key:  # a second or nested vision tower
            _shrink_vision(config, tower, width)
        _shrink_tower(tower, width)
    for key, value in VISION_FIELDS.get(model_type, {}).items():
        setattr(config.vision_config, key, value)
    for key, value in UNSET_WRAPPER_FIELDS.get(model_type, {}).items():
        setattr(config, key, value)
    for key, value in UNSET_TEXT_FIELDS.get(model_type, {}).items():
        setattr(getattr(config, "text_config", None) or config, key, value)
    _shrink_text_extras(getattr(config, "text_config", None) or config)
    _rope_per_layer_kind(getattr(config, "text_config", None) or config)
    for part in (config, getattr(config, "text_config", None)):
        for key, value in PROJECTOR_SIZES.items():
            if isinstance(getattr(part, key, None), int) and not isinstance(getattr(part, key), bool):
                setattr(part, key, width if value is None else value)
    text_rope = getattr(getattr(config, "text_config", None) or config, "rope_parameters", None)
    if (isinstance(getattr(getattr(config, "vision_config", None), "temporal_patch_size", None), int)
            or "mrope_section" in (text_rope or {})  # Qwen/GLM-style: multimodal RoPE (PaddleOCR-VL, ERNIE 4.5
            or model_type in ("paddleocr_vl", "ernie4_5_vl_moe")):  # VL: their sections only in their models'
        # defaults, for heads of 128)
        _fit_rope_sections(getattr(config, "text_config", None) or config)
    if model_type == "ernie4_5_vl_moe":  # its sections are (height, width, time), the first two interleaved: equal
        rope = config.text_config.rope_parameters
        half = sum(rope["mrope_section"])
        config.text_config.rope_parameters = {**rope, "mrope_section": [half // 4, half // 4, half - 2 * (half // 4)]}
    text = getattr(config, "text_config", None)
    if isinstance(getattr(text, "cross_attention_layers", None), list):  # Mllama: one self-, one cross-attention
        text.cross_attention_layers = [text.num_hidden_layers - 1]
    for part in (config, getattr(config, "adapter_config", None)):  # VipLLaVA, Molmo 2: a projector over several
        for key in ("vision_feature_layer", "vision_feature_layers"):  # of the vision tower's layers: it keeps one
            if isinstance(getattr(part, key, None), (list, tuple)):
                setattr(part, key, [-1 if i % 2 == 0 else 0 for i in range(len(getattr(part, key)))])
    vq = getattr(config, "vq_config", None)
    if hasattr(vq, "to_dict"):
        for key, value in VQ_SIZES.items():
            if isinstance(getattr(vq, key, None), int):
                setattr(vq, key, width if value is None else value)
        vq.channel_multiplier = [1, 1, 1, 1]
        if isinstance(getattr(vq, "attn_resolutions", None), list):
            vq.attn_resolutions = []
    image_tokenizer = getattr(config, "vision_config", None)
    if isinstance(getattr(image_tokenizer, "spatial_scale_factor", None), int):  # Apertus 1.5: a VQ image tokenizer
        for key, value in VQ_SIZES.items():  # as its vision config, downsampling 32x32 pixels 16x into 2x2 codes
            if isinstance(getattr(image_tokenizer, key, None), int):
                setattr(image_tokenizer, key, width if value is None else value)
        image_tokenizer.codebook_size, image_tokenizer.spatial_scale_factor = 8, 16
        image_tokenizer.channel_multiplier = [1] * len(image_tokenizer.channel_multiplier)
        image_tokenizer.attn_resolutions = []
        if isinstance(getattr(config, "audio_token_offset", None), int):  # its codes' ids: the image's, then the
            config.image_token_offset, config.audio_token_offset = 64, 72  # audio's, below the special tokens
    if isinstance(getattr(vq, "codebook_size", None), int):  # Emu3: its VQ-VAE's book, one frame (no temporal
        vq.codebook_size, vq.temporal_downsample_factor = 8, 1  # downsampling), attention width of its channels
        vq.hidden_size = vq.base_channels
        vq.attn_resolutions = list(vq.attn_resolutions or [])[:0]
    if "vocabulary_map" in vars(config) and isinstance(getattr(vq, "codebook_size", None), int):
        config.vocabulary_map = _emu3_vocabulary(vq.codebook_size)  # Emu3: <|visual token000000|>...
        config.image_token_id = config.vocabulary_map["<image>"]
    elif "vocabulary_map" in vars(config) and hasattr(vq, "to_dict"):  # Chameleon: the VQ codes' tokens, named
        config.vocabulary_map = _chameleon_vocabulary(vq.num_embeddings)  # IMGIMG<code in letters>Z
        config.image_token_id = config.vocabulary_map["<image>"]
    if config.model_type in OMNI_THINKERS and not hasattr(config, "vision_start_token_id"):
        config.vision_start_token_id = 0  # their 3D positions read it; real checkpoints' configs hold it, the class has
        # no default (moved into the vocabulary below like every other token id)
    token_ids: dict[str, int] = {}  # one id per field name: a nested part's copy (T5Gemma 2's encoder's) is the same
    for part, key in _token_fields(config):
        setattr(part, key, token_ids.setdefault(key, GENERIC_TOKEN_BASE + len(token_ids)))
    image_token = _image_token(config)
    video_only = image_token is None and _video_token(config) is not None  # InstructBLIP-Video: a video of one frame
    image_token = image_token if image_token is not None else _video_token(config)
    _add_optional_vision(config, width)
    vision = _vision_part(config)  # Chameleon: its VQ tokenizer reads pixels
    holder = next((part for part in (config, *_nested_parts(config))
                   if any(vision is getattr(part, k, None) for k in (*VISION_KEYS, "encoder"))), config)
    shrunk = [getattr(config, k, None) for k in ("vision_config", "vision_tower_config", "visual_config", "vq_config")]
    if vision is not None and not any(vision is part for part in shrunk):  # nested one level down (T5Gemma 2's
        _shrink_vision(holder, vision, width)  # encoder, PI0's PaliGemma), the encoder itself (VisionEncoderDecoder's
        for key, value in PROJECTOR_SIZES.items():  # ViT), Evolla's protein encoder: shrunk as the wrapper's own
            # would be, the projector sizes on its holder too
            if isinstance(getattr(holder, key, None), int) and not isinstance(getattr(holder, key), bool):
                setattr(holder, key, width if value is None else value)
    if vision is not None and isinstance(getattr(config, "vision_hidden_size", None), int):  # Nemotron Omni: the
        config.vision_hidden_size = vision.hidden_size  # wrapper repeats its tower's width for the projector
    if isinstance(getattr(vision, "max_img_size", None), int):  # RADIO: a position table for the largest image,
        vision.max_img_size = GENERIC_IMAGE  # and patch widths derived from the patch size when built
        vision.patch_dim = vision.num_channels * vision.patch_size ** 2
        vision.video_patch_dim = vision.patch_dim * vision.video_temporal_patch_size
    for part in (getattr(config, "text_config", None), *_nested_parts(config)):  # BLIP-2's Q-Former, BLIP's text
        if vision is not None and isinstance(getattr(part, "encoder_hidden_size", None), int):  # decoder cross-attend
            part.encoder_hidden_size = vision.hidden_size  # to the (shrunk) vision tower's states
        _fit_derived_widths(part)
    text_only = vision is None and not _takes_an_image(model_type)
    if isinstance(getattr(config, "patch_size", None), int) and vision is None:  # Fuyu, UDOP: patches straight into
        config.patch_size = GENERIC_PATCH  # the decoder (or encoder), no vision tower
        if isinstance(getattr(config, "image_size", None), int):
            config.image_size = GENERIC_IMAGE
        vision = config
    if text_only:  # Mistral 4: the image-text auto class gives its causal LM, which reads no image
        return config, lambda c: ImageInputs(input_ids=_text_around([], high=GENERIC_TOKEN_BASE))
    if vision is None:
        raise HarnessGap("the generic harness finds no vision_config")
    for key in ACTION_EXPERTS.get(model_type, ()):  # PI0: its action expert attends over the VLM's KV cache, layer
        expert, vlm = getattr(config, key), config.vlm_config.text_config  # by layer: the same layers and KV heads
        expert.num_hidden_layers, expert.num_key_value_heads = vlm.num_hidden_layers, vlm.num_key_value_heads
        expert.head_dim = vlm.head_dim
    config = type(config).from_dict(config.to_dict())  # what its saved form rebuilds (classes deriving sizes)
    return config, lambda c: _fit_inputs(
        model_type, c, _generic_inputs(model_type, c, image_token, vision, video_only), vision)


# Families whose processor hands the flattened patches of a Qwen-style grid as small images: their patch embedding
# is a Conv2d over each patch, [patches, channels, patch, patch] (Kimi K2.5, PaddleOCR-VL).
PATCHES_AS_IMAGES = {"kimi_k25": (-1,), "paddleocr_vl": (-1,)}
# Families whose processor hands one merge window of patches per image token, channels last, [image tokens,
# patch x merge, patch x merge, channels], with the grid counted in image tokens (Inkling 2).
PIXEL_ROWS = ("inkling2", "inkling2_loop")
# Families whose vision tower folds each patch, [time, patch, patch, channels] channels last, into one image token
# (Inkling): one patch per image token.
PATCH_VOLUMES = ("inkling_mm_model",)


def _forward_parameters(model_type: str) -> set[str]:
    import inspect
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return set(inspect.signature(getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type]).forward)
               .parameters)


def _fit_inputs(model_type: str, config, inputs: ImageInputs, vision) -> ImageInputs:
    """The generic inputs in the layout a family's own processor gives (`PATCHES_AS_IMAGES`; Gemma 4's vision tower
    elsewhere, as in DiffusionGemma: a 6x6 grid of flattened patches and their positions, pooled 3x3)."""
    if getattr(vision, "model_type", None) == "gemma4_vision":
        grid = 2 * vision.pooling_kernel_size
        positions = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="xy"), -1)
        inputs.update(pixel_values=torch.rand(1, grid * grid, 3 * vision.patch_size ** 2),
                      image_position_ids=positions.reshape(1, grid * grid, 2))
    high_res = getattr(getattr(config, "high_res_vision_config", None), "image_size", None)
    if high_res and inputs.get("pixel_values") is not None:  # DeepSeek-VL hybrid: the image again, for its
        inputs["high_res_pixel_values"] = torch.randn(1, 3, high_res, high_res)  # high-resolution (SAM) tower
    patch = getattr(vision, "patch_size", None)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    temporal = getattr(vision, "patch_temporal", None)  # Muse: the Qwen grid's temporal patch, named its own way
    if isinstance(temporal, int) and "image_grid_thw" in inputs:
        inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape[0], 3 * temporal * patch * patch)
    if model_type in PATCHES_AS_IMAGES and inputs.get("pixel_values") is not None:
        inputs["pixel_values"] = inputs["pixel_values"].reshape(*PATCHES_AS_IMAGES[model_type], 3, patch, patch)
    if model_type in PATCH_VOLUMES:
        inputs["pixel_values"] = torch.rand(GENERIC_IMAGE_TOKENS.get(model_type, 1), vision.temporal_patch_size,
                                            patch, patch, 3)
    if model_type in PIXEL_ROWS and "image_grid_thw" in inputs:
        merge = vision.spatial_merge_size
        grid = inputs["image_grid_thw"] // torch.tensor([1, merge, merge])
        inputs.update(image_grid_thw=grid, pixel_values=torch.rand(int(grid.prod()), patch * merge, patch * merge, 3))
    if "image_merge_sizes" in _forward_parameters(model_type) and "image_grid_thw" in inputs:  # VideoLLaMA 3:
        inputs["image_merge_sizes"] = torch.tensor([getattr(vision, "spatial_merge_size", 2) or 2])  # per image
    return inputs


def _video_token(config) -> int | None:
    value = getattr(config, "video_token_index", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _fit_derived_widths(part) -> None:
    """Widths a nested config derives from its hidden width when built, left at their defaults by the shrinking:
    OPT's embedding width (BLIP-2's language model), T5-style per-head widths (Pix2Struct's `d_kv`)."""
    hidden, heads = getattr(part, "hidden_size", None), getattr(part, "num_attention_heads", None) or getattr(
        part, "num_heads", None)
    if isinstance(getattr(part, "word_embed_proj_dim", None), int) and isinstance(hidden, int):
        part.word_embed_proj_dim = hidden
    if isinstance(getattr(part, "d_kv", None), int) and isinstance(hidden, int) and isinstance(heads, int):
        part.d_kv = hidden // heads


IMAGE_ARGUMENTS = ("pixel_values", "flattened_patches", "image_patches", "pixel_values_images", "protein_input_ids")


def _takes_an_image(model_type: str) -> bool:
    """Whether the family's image-text class reads an image (or Evolla's protein) at all."""
    import inspect
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model = getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])
    return bool(set(inspect.signature(model.forward).parameters) & set(IMAGE_ARGUMENTS))


# A vision tower the config class leaves out by default (`vision_config` optional, None: Gemma 4 Unified), which real
# checkpoints hold: the class's own vision config, at these tiny sizes (its patch embedding reads patch x pooling
# kernel pixels a side; `None`: the text width).
OPTIONAL_VISION_SIZES = dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=16,
                             output_proj_dims=None)


def _add_optional_vision(config, width: int) -> None:
    spec = (getattr(type(config), "sub_configs_defaults", None) or {}).get("vision_config")
    if getattr(config, "vision_config", False) is not None or spec is None:
        return
    vision = getattr(spec, "config_class", spec)()
    for key, value in OPTIONAL_VISION_SIZES.items():
        if isinstance(getattr(vision, key, None), int):
            setattr(vision, key, width if value is None else value)
    config.vision_config = vision


# Families that read a fixed number of query outputs into the text (BLIP-2's Q-Former, Kosmos-2's latent queries):
# that many image tokens, which their forward does not check.
QUERY_COUNT_FIELDS = ("num_query_tokens", "latent_query_num")


def _image_token_count(model_type: str, config, takes: set[str]) -> int:
    """How many image tokens the text holds: as `find_image_token_count` found it, else the config's query count,
    else one (four for Fuyu's patches)."""
    if model_type in GENERIC_IMAGE_TOKENS:
        return GENERIC_IMAGE_TOKENS[model_type]
    queries = next((getattr(config, k) for k in QUERY_COUNT_FIELDS if isinstance(getattr(config, k, None), int)), None)
    if queries is None and "timestep" in takes:  # PI0: one token per patch of its (PaliGemma) vision tower, unchecked
        vision = _vision_part(config)
        queries = (vision.image_size // vision.patch_size) ** 2
    return queries or (4 if "image_patches" in takes else 1)


def _generic_inputs(model_type: str, config, image_token: int | None, vision, video_only: bool = False) -> ImageInputs:
    """The image inputs of a generic family. `image_token` None: the family has no image token, the image goes beside
    the text (Git prepends its embeddings, Idefics and BLIP cross-attend to them, encoder-decoders encode it), or the
    text marks the image's positions in a mask of its own (Kosmos-2's `image_embeds_position_mask`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    import inspect
    import transformers

    forward = inspect.signature(getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type]).forward)
    takes = set(forward.parameters)
    channels = getattr(vision, "num_channels", None) or getattr(vision, "in_channels", None) or 3
    count = _image_token_count(model_type, config, takes)
    position_mask = "image_embeds_position_mask" in takes
    if image_token is None:
        image_token = GENERIC_TOKEN_BASE if position_mask else None  # Kosmos-2: any id; the mask says where
    start = next((getattr(config, k) for k in ("vision_start_token_id", "image_start_token_id", "boi_token_id",
                                                 "boi_token_index") if isinstance(getattr(config, k, None), int)), None)
    end = next((getattr(config, k) for k in ("vision_end_token_id", "image_end_token_id", "eoi_token_id",
                                               "eoi_token_index") if isinstance(getattr(config, k, None), int)), None)
    image = ([start] if start is not None else []) + [image_token] * count + ([end] if end is not None else [])
    ids = _text_around(image if image_token is not None else [], high=GENERIC_TOKEN_BASE)
    inputs = ImageInputs(input_ids=ids)
    if position_mask:
        inputs["image_embeds_position_mask"] = (ids == image_token).long()
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in takes:  # the text is the decoder's
        inputs["decoder_input_ids"] = _text_around([], seed=1, high=GENERIC_TOKEN_BASE)  # (an encoder-decoder's)
    if "input_ids" not in takes:  # Pix2Struct, VisionEncoderDecoder: the encoder reads the image alone
        del inputs["input_ids"]
    if "qformer_input_ids" in takes:  # InstructBLIP: the instruction, also read by the Q-Former
        inputs.update(qformer_input_ids=_text_around([], seed=2, high=GENERIC_TOKEN_BASE),
                      qformer_attention_mask=torch.ones(1, 7, dtype=torch.long))
    if "flattened_patches" in takes:  # Pix2Struct, Kosmos-2.5: [batch, patches, (row, column) + patch pixels]
        grid = GENERIC_IMAGE // GENERIC_PATCH
        width = getattr(vision, "patch_embed_hidden_size", None) or channels * GENERIC_PATCH ** 2
        rows, columns = torch.meshgrid(torch.arange(1, grid + 1), torch.arange(1, grid + 1), indexing="ij")
        positions = torch.stack([rows.flatten(), columns.flatten()], -1).float()
        inputs["flattened_patches"] = torch.cat([positions, torch.randn(grid * grid, width)], -1)[None]
        if "input_ids" not in takes:  # Pix2Struct: `attention_mask` is the encoder's, over the patches
            inputs["attention_mask"] = torch.ones(1, grid * grid)
        if "width" in takes:  # Kosmos-2.5: the image's size before resizing
            inputs.update(width=torch.tensor([GENERIC_IMAGE]), height=torch.tensor([GENERIC_IMAGE]))
    elif video_only:  # InstructBLIP-Video: [batch, frames, channels, H, W], one frame
        inputs["pixel_values"] = torch.randn(1, 1, channels, GENERIC_IMAGE, GENERIC_IMAGE)
    elif "protein_input_ids" in takes:  # Evolla: its other modality is a protein sequence (amino-acid tokens)
        size = getattr(vision, "vocab_size", 32)
        inputs.update(protein_input_ids=torch.randint(4, size, (1, 8)),
                      protein_attention_mask=torch.ones(1, 8, dtype=torch.long))
    elif "image_position_ids" in takes:  # Gemma 4 Unified: flattened patches and their (x, y) positions, 2x2
        patch = getattr(vision, "model_patch_size", None) or vision.patch_size
        positions = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(2), indexing="xy"), -1).reshape(1, 4, 2)
        inputs.update(pixel_values=torch.rand(1, 4, channels * patch * patch), image_position_ids=positions)
    elif "target_sizes" in takes:  # MiniCPM-V: patches laid side by side, [batch, channels, patch, patches x patch]
        grid = GENERIC_IMAGE // vision.patch_size
        inputs.update(pixel_values=torch.randn(1, channels, vision.patch_size, grid * grid * vision.patch_size),
                      target_sizes=torch.tensor([[grid, grid]], dtype=torch.int32))
    elif "image_grid_hw" in takes:  # Nemotron Omni: flattened patches and their (height, width) grid
        grid = GENERIC_IMAGE // vision.patch_size
        inputs.update(pixel_values=torch.randn(grid * grid, channels * vision.patch_size ** 2),
                      image_grid_hw=torch.tensor([[grid, grid]]))
    elif "image_attention_mask" in takes:  # Idefics: [batch, images, channels, H, W]; which text sees which image
        inputs.update(pixel_values=torch.randn(1, 1, channels, GENERIC_IMAGE, GENERIC_IMAGE),
                      image_attention_mask=torch.ones(1, ids.shape[1], 1, dtype=torch.long))
    elif "timestep" in takes:  # PI0, PI0.5 (vision-language-action): [batch, cameras, channels, H, W], which cameras
        # are real, and the flow-matching step's noisy actions at a fixed time (drawn at random when not given)
        inputs.update(pixel_values=torch.randn(1, 1, channels, GENERIC_IMAGE, GENERIC_IMAGE),
                      pixel_attention_mask=torch.ones(1, 1, dtype=torch.bool),
                      noise=torch.randn(1, config.chunk_size, config.max_action_dim), timestep=torch.tensor([0.5]))
        if "state" in takes:
            inputs["state"] = torch.randn(1, config.max_state_dim)
    elif "image_patches" in takes:  # Fuyu: [batch, patches, patch x patch x channels] (`pixel_values` since 5.24)
        patches = torch.randn(1, count, channels * vision.patch_size ** 2)
        inputs["pixel_values" if "pixel_values" in takes else "image_patches"] = patches
    elif "image_grid_thw" in takes:  # Qwen-style: the image's patches flattened, a grid of 4x4 patches
        temporal = getattr(vision, "temporal_patch_size", 1) or 1
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        grid = GENERIC_IMAGE // patch
        inputs.update(pixel_values=torch.randn(grid * grid, channels * temporal * patch * patch),
                      image_grid_thw=torch.tensor([[1, grid, grid]]))
    elif "image_token_pooling" in takes:  # Molmo 2: one crop of 4x4 patches; 5 tokens, each pooling 4 patches
        grid = GENERIC_IMAGE // vision.patch_size  # (a low-resolution 1x1 grid and a high-resolution 2x2 one)
        pooling = [[0, 5, 10, 15]] + [[r * grid + c, r * grid + c + 1, (r + 1) * grid + c, (r + 1) * grid + c + 1]
                                      for r in (0, 2) for c in (0, 2)]
        inputs.update(pixel_values=torch.randn(1, grid * grid, channels * vision.patch_size ** 2),
                      image_token_pooling=torch.tensor(pooling), image_grids=torch.tensor([[1, 1, 2, 2]]),
                      image_num_crops=torch.tensor([1]))
    elif "spatial_shapes" in takes:  # Siglip 2 (NaFlex): flattened patches, their grid and which are real
        patch = vision.patch_size
        grid = GENERIC_IMAGE // patch
        inputs.update(pixel_values=torch.randn(1, grid * grid, channels * patch * patch),
                      spatial_shapes=torch.tensor([[grid, grid]]),
                      pixel_attention_mask=torch.ones(1, grid * grid, dtype=torch.long))
    elif "aspect_ratio_ids" in takes:  # Mllama: [batch, images, tiles, channels, H, W], one tile of aspect 1:1
        inputs.update(pixel_values=torch.randn(1, 1, 1, channels, GENERIC_IMAGE, GENERIC_IMAGE),
                      aspect_ratio_ids=torch.tensor([[1]]), aspect_ratio_mask=torch.ones(1, 1, 1, dtype=torch.long),
                      cross_attention_mask=torch.ones(1, ids.shape[1], 1, 1, dtype=torch.long))
    elif getattr(config, "image_grid_pinpoints", None):  # LLaVA-NeXT: the base image and one tile
        inputs.update(pixel_values=torch.randn(1, 2, channels, GENERIC_IMAGE, GENERIC_IMAGE))
    elif "pixel_attention_mask" in takes:  # Idefics: [batch, images, channels, H, W]
        inputs.update(pixel_values=torch.randn(1, 1, channels, GENERIC_IMAGE, GENERIC_IMAGE))
        if _requires(model_type, "pixel_attention_mask"):  # Granite Docling: which tiles are real
            inputs["pixel_attention_mask"] = torch.ones(1, 1, dtype=torch.bool)
    else:
        name = "pixel_values_images" if "pixel_values_images" in takes else "pixel_values"
        inputs[name] = torch.randn(1, channels, GENERIC_IMAGE, GENERIC_IMAGE)
    if "image_sizes" in takes:
        inputs["image_sizes"] = torch.tensor([[GENERIC_IMAGE, GENERIC_IMAGE]])
    if "bbox" in takes:  # UDOP: each text token's box on the page (all at the page's origin)
        inputs["bbox"] = torch.zeros(1, ids.shape[1], 4, dtype=torch.long)
    if "mm_token_type_ids" in takes:
        inputs["mm_token_type_ids"] = (ids == image_token).long()
    if "token_type_ids" in takes:
        inputs["token_type_ids"] = (ids == image_token).long()
    return inputs


def _requires(model_type: str, argument: str) -> bool:
    """Whether the family's base model's `get_image_features` takes `argument` without a default."""
    import inspect
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    model = getattr(transformers, str(MODEL_MAPPING_NAMES.get(model_type)), None)
    method = getattr(model, "get_image_features", None)
    parameter = inspect.signature(method).parameters.get(argument) if method else None
    return parameter is not None and parameter.default is inspect.Parameter.empty


def find_image_token_count(model_type: str, model: torch.nn.Module) -> None:
    """Record how many image tokens the model's vision path produces, read from its own error for a wrong count
    ("Image features and image tokens do not match, tokens: 1, features: 16"); some families count the flattened
    features' elements there (tokens times width), which the second try divides out."""
    try:
        width = model.get_input_embeddings().weight.shape[-1]
    except NotImplementedError:  # a class that names no input embeddings (PP-FormulaNet's encoder-decoder)
        width = _text_width(model.config)
    for _ in range(3):
        try:
            with torch.no_grad():
                model(**image_inputs(model_type, model.config))
            return
        except ValueError as error:
            match = FEATURE_COUNT.search(str(error))
            if match is None:
                raise
            tokens = int(match.group("tokens") or match.group("tokens2"))
            features = int(match.group("features") or match.group("features2"))
            if tokens == features:
                if features % width:
                    raise
                features //= width
            GENERIC_IMAGE_TOKENS[model_type] = features
    with torch.no_grad():
        model(**image_inputs(model_type, model.config))
