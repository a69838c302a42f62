"""Capture how a composed model routes: per token and router, the chosen experts, their weights and every
probability; for BTS, the stitch gate values per stream. The result is a tidy table every view renders from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd
import torch

from ..errors import MixtureKitError
from ..runtime.assembly.modeling import MixtureKitForCausalLM
from ..runtime.routed.routing import route
from ..runtime.bts.stitch import MERGE

_LAYER = re.compile(r"\.(\d+)\.")
IMAGE_TOKEN_LABEL = "<image>"  # how a view shows a position that holds an image feature, whatever its special token


class AnalysisError(MixtureKitError, ValueError):
    """The model or the text cannot be analysed."""


@dataclass
class RoutingTrace:
    """Everything captured from one run over some texts.

    `routes`: one row per (text, token, router) with `text_index, label, position, token, start, end, image, router,
    layer, module, experts` (top-k expert indices), `weights` (their renormalised weights), `probs` (all E
    probabilities) and `dominant` (the top expert's name). `image` is True at an image-placeholder position (the
    language model reads an image feature there; `token` is then `IMAGE_TOKEN_LABEL`). `gates` (BTS): one row per
    (text, token, stitch, stream) with `stitch, hub_block, direction, stream, gate_mean, gate_std` (and `image`).
    `truncated[i]` says text i was cut to `max_tokens`.
    """

    method: str
    expert_names: list[str]
    texts: list[str]
    labels: list[str | None]
    routes: pd.DataFrame
    gates: pd.DataFrame
    truncated: list[bool] = field(default_factory=list)
    max_tokens: int = 0
    # The model's expert history (`moekit edit`, opt-out): e.g. "law added", "e1 removed", "math opted out".
    expert_history: list[str] = field(default_factory=list)

    @property
    def routers(self) -> list[str]:
        return list(dict.fromkeys(self.routes["router"])) if len(self.routes) else []


def _router_parts(name: str) -> tuple[int, str]:
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else -1
    module = name[match.end():] if match else name
    return layer, module.removesuffix(".gate").removesuffix(".router") or "mlp"


def _check_model(model) -> None:
    if not isinstance(model, MixtureKitForCausalLM):
        raise AnalysisError(
            f"{type(model).__name__} is not a composed model: routing analysis needs a checkpoint written by "
            "`moekit compose` (model_type mixturekit)"
        )


def _check_labels(labels: list[str | None] | None, count: int, what: str) -> list[str | None]:
    labels = list(labels) if labels is not None else [None] * count
    if len(labels) != count:
        raise AnalysisError(f"{len(labels)} labels for {count} {what}: give one label per text, or none")
    return labels


def _token_limit(model: MixtureKitForCausalLM, max_tokens: int) -> int:
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)  # the language model's
    return min(max_tokens, positions) if positions else max_tokens


@dataclass
class _Prepared:
    """One text ready to run: its token ids, each token's span in `text`, which positions hold image features, and
    the other inputs of the forward (`pixel_values` and the family's image tensors)."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    image: list[bool]
    inputs: dict = field(default_factory=dict)


@torch.inference_mode()
def capture_routing(
    model: MixtureKitForCausalLM, tokenizer, texts: list[str], labels: list[str | None] | None = None,
    max_tokens: int = 512, *, images: list | None = None, processor=None,
) -> RoutingTrace:
    """Run `model` on each text (no gradient, one text at a time, at most `max_tokens` tokens each, and never more
    than the model's `max_position_embeddings`).

    `images` (an image-text composition): one entry per text, a PIL image, an image file's path, or None for a text
    read alone; texts with an image are prepared by `processor` (`load_processor(checkpoint)`: the one composed
    beside the checkpoint), which places the image where the text has its image token, else as its chat template
    does. Their image positions are labelled `IMAGE_TOKEN_LABEL` in the trace."""
    _check_model(model)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise AnalysisError("give at least one non-empty text to analyse")
    labels = _check_labels(labels, len(texts), "texts")
    images = _check_images(model, images, len(texts), processor)
    max_tokens = _token_limit(model, max_tokens)
    image_token = _image_token_id(model)
    prepared = []
    for text, image in zip(texts, images):
        if image is None:
            tokens = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
            ids = list(tokens["input_ids"])
            prepared.append(_Prepared(text, ids, list(tokens["offset_mapping"]), [i == image_token for i in ids]))
        else:
            prepared.append(_prepare_inputs(dict(_processed(processor, text, image)), tokenizer, image_token))
    return _capture(model, labels, prepared, max_tokens)


@torch.inference_mode()
def capture_routing_of_ids(
    model: MixtureKitForCausalLM, tokenizer, ids, labels: list[str | None] | None = None, max_tokens: int = 512,
) -> RoutingTrace:
    """`capture_routing` for texts already split into tokens: each row of `ids` (a `[n, seq_len]` tensor or lists of
    token ids, such as evaluation blocks) is one text, run as is; its tokens are decoded one by one for display."""
    _check_model(model)
    rows = [[int(i) for i in row] for row in ids]
    if not rows or any(not row for row in rows):
        raise AnalysisError("give at least one non-empty row of token ids to analyse")
    labels = _check_labels(labels, len(rows), "rows of token ids")
    image_token = _image_token_id(model)
    prepared = [_prepare_inputs({"input_ids": torch.tensor([row])}, tokenizer, image_token) for row in rows]
    return _capture(model, labels, prepared, _token_limit(model, max_tokens))


@torch.inference_mode()
def capture_routing_of_inputs(
    model: MixtureKitForCausalLM, tokenizer, inputs: list[dict], labels: list[str | None] | None = None,
    max_tokens: int = 512,
) -> RoutingTrace:
    """`capture_routing` for inputs a processor already made: each entry holds one text's `input_ids` (`[1, n]`) and
    whatever else the model's forward takes (an image-text composition: `pixel_values` and its family's image tensors,
    such as `image_grid_thw`). Tokens are decoded one by one; image positions are labelled `IMAGE_TOKEN_LABEL`."""
    _check_model(model)
    if not inputs or any("input_ids" not in entry or torch.as_tensor(entry["input_ids"]).numel() == 0
                         for entry in inputs):
        raise AnalysisError("give at least one input with non-empty `input_ids` to analyse")
    if any(torch.as_tensor(entry["input_ids"]).dim() == 2 and len(entry["input_ids"]) != 1 for entry in inputs):
        raise AnalysisError("each input holds one text: `input_ids` of shape [1, length]")
    labels = _check_labels(labels, len(inputs), "inputs")
    image_token = _image_token_id(model)
    if any("pixel_values" in entry for entry in inputs) and image_token is None:
        raise AnalysisError(_text_only(model))
    prepared = [_prepare_inputs(dict(entry), tokenizer, image_token) for entry in inputs]
    return _capture(model, labels, prepared, _token_limit(model, max_tokens))


def _image_token_id(model: MixtureKitForCausalLM) -> int | None:
    """The token id that stands for one image feature in the language model's input (None: a text-only model)."""
    if not model.config.is_multimodal:
        return None
    return getattr(model.config.text_config, "image_token_id", None)


def _text_only(model: MixtureKitForCausalLM) -> str:
    return (f"this {model.config.method} composition is text-only (its base is "
            f"'{model.config.text_config.model_type}'): images need a composition of image-text models that kept "
            "their vision tower (recipe `vision: keep`)")


def _check_images(model: MixtureKitForCausalLM, images: list | None, count: int, processor) -> list:
    """One image (or None) per text, opened as RGB; an image-text model and a processor when any is given."""
    if images is None:
        return [None] * count
    images = list(images)
    if len(images) != count:
        raise AnalysisError(f"{len(images)} images for {count} texts: give one per text (None for a text alone)")
    if all(image is None for image in images):
        return images
    if _image_token_id(model) is None:
        raise AnalysisError(_text_only(model))
    if processor is None or getattr(processor, "image_processor", None) is None:
        raise AnalysisError("texts with an image need the composition's processor (its image processor and image "
                            "tokens): pass processor=moekit.loading.load_processor(checkpoint)")
    return [_open_image(image) if image is not None else None for image in images]


def _open_image(image):
    """A PIL image as given, or the image file at a path, as RGB."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, UnidentifiedImageError, TypeError, AttributeError) as failure:
        raise AnalysisError(f"cannot read an image from {image!r}: give a PIL image or the path of an image file "
                            f"(PNG, JPEG, ...): {failure}") from failure


def _processed(processor, text: str, image) -> dict:
    """The processor's inputs for `text` with `image`: where the text holds the processor's image token the image
    goes there; otherwise the chat template places it (a user turn: the image, then the text), or, without a
    template, the image token is put before the text."""
    placeholders = [t for t in (getattr(processor, "boi_token", None), getattr(processor, "image_token", None)) if t]
    if not any(placeholder in text for placeholder in placeholders):
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": text}]
            text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        elif placeholders:
            text = f"{placeholders[0]} {text}"
        else:
            raise AnalysisError(f"{type(processor).__name__} names no image token and has no chat template: put the "
                                "model's image token in the text where the image goes")
    return processor(text=[text], images=[image], return_tensors="pt")


def _prepare_inputs(inputs: dict, tokenizer, image_token: int | None) -> _Prepared:
    """A processor's (or the caller's) inputs for one text, its tokens decoded one by one for display; image
    positions shown as `IMAGE_TOKEN_LABEL`."""
    ids = [int(i) for i in torch.as_tensor(inputs.pop("input_ids")).reshape(-1)]
    inputs.pop("attention_mask", None)  # one text, no padding: every token is attended
    image = [i == image_token for i in ids]
    tokens = [IMAGE_TOKEN_LABEL if is_image else tokenizer.decode([i]) for i, is_image in zip(ids, image)]
    offsets, end = [], 0
    for token in tokens:
        offsets.append((end, end + len(token)))
        end += len(token)
    return _Prepared("".join(tokens), ids, offsets, image, inputs)


def _cut(item: _Prepared, max_tokens: int) -> tuple[_Prepared, bool]:
    """`item` cut to its first `max_tokens` tokens, with the image tensors whose length is the text's; an image is
    never cut through (its features must all find their positions)."""
    if len(item.ids) <= max_tokens:
        return item, False
    if any(item.image[max_tokens:]) and item.inputs.get("pixel_values") is not None:
        last = max(i for i, is_image in enumerate(item.image) if is_image) + 1
        raise AnalysisError(f"a text's image positions end at token {last}, beyond the {max_tokens} tokens analysed: "
                            f"raise max_tokens (--max-tokens) to at least {last}, or shorten the text before the image")
    length = len(item.ids)
    inputs = {k: v[:, :max_tokens] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[:2] == (1, length)
              else v for k, v in item.inputs.items()}
    return _Prepared(item.text, item.ids[:max_tokens], item.offsets[:max_tokens], item.image[:max_tokens],
                     inputs), True


def _capture(
    model: MixtureKitForCausalLM, labels: list[str | None], prepared: list[_Prepared], max_tokens: int,
) -> RoutingTrace:
    """Run the model on each prepared text (cut to `max_tokens`) and tabulate routes and gates."""
    config = model.config
    names = list(config.expert_names)
    stitches = list(getattr(model, "stitches", []))
    for stitch in stitches:
        stitch.record_gates = True
    route_rows, gate_rows, truncated = [], [], []
    was_training = model.training
    model.eval()
    try:
        for index, (label, item) in enumerate(zip(labels, prepared)):
            item, cut = _cut(item, max_tokens)
            truncated.append(cut)
            tokens = [item.text[a:b] for a, b in item.offsets]
            extra = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in item.inputs.items()}
            if "pixel_values" in extra and extra["pixel_values"].is_floating_point():
                extra["pixel_values"] = extra["pixel_values"].to(model.dtype)
            output = model(input_ids=torch.tensor([item.ids], device=model.device), output_router_logits=True,
                           use_cache=False, **extra)
            base = {"text_index": index, "label": label}
            biases = model.routing_biases() if hasattr(model, "routing_biases") else {}
            for router, logits in zip(model.router_recorder.names, output.router_logits or ()):
                layer, module = _router_parts(router)
                probabilities = torch.softmax(logits.float(), dim=-1).cpu()
                weights, experts = route(logits, config.num_experts_per_tok, biases.get(router))
                for position, (token, (start, end)) in enumerate(zip(tokens, item.offsets)):
                    top = experts[position].tolist()
                    route_rows.append({**base, "position": position, "token": token, "start": start, "end": end,
                                       "image": item.image[position], "router": router, "layer": layer,
                                       "module": module, "experts": top, "weights": weights[position].tolist(),
                                       "probs": probabilities[position].tolist(), "dominant": names[top[0]]})
            for k, stitch in enumerate(stitches):
                running = [n for n in names if n not in set(getattr(config, "disabled_experts", None) or ())]
                streams = (["hub"] + running) if stitch.direction == MERGE else running
                for stream, gate in zip(streams, stitch.last_gates or []):
                    means, stds = gate[0].float().mean(-1).cpu(), gate[0].float().std(-1).cpu()
                    for position, token in enumerate(tokens):
                        gate_rows.append({**base, "position": position, "token": token,
                                          "image": item.image[position], "stitch": k,
                                          "hub_block": model.stitch_points[k], "direction": stitch.direction,
                                          "stream": stream, "gate_mean": means[position].item(),
                                          "gate_std": stds[position].item()})
    finally:
        for stitch in stitches:
            stitch.record_gates, stitch.last_gates = False, None
        model.train(was_training)
    return RoutingTrace(config.method, names, [item.text for item in prepared], labels, pd.DataFrame(route_rows),
                        pd.DataFrame(gate_rows), truncated, max_tokens, expert_history(config))


def expert_history(config) -> list[str]:
    """What happened to the experts since composing, from the config: added, removed or pruned, opted out."""
    verbs = {"add": "added", "remove": "removed", "prune": "pruned"}
    history = [f"{name} {verbs[edit['operation']]}" for edit in getattr(config, "edits", None) or []
               if edit.get("operation") in verbs for name in edit.get("experts", [])]
    return history + [f"{name} opted out" for name in getattr(config, "disabled_experts", None) or []]
