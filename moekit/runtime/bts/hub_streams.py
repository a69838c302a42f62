"""bts: the hub and its expert streams inside the composed model. The hub's block list calls back after each block,
and at a stitch point the stitches exchange hidden states between the hub and the streams (`streams`, `stitch`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from ...errors import RecipeError, UnsupportedArchitectureError
from ..base_model.architecture import stitch_layers
from ..base_model.cache_argument import CACHE_ARGUMENT
from ..base_model.dense_model import with_torch_dtype
from .stitch import MERGE, Stitch, build_stitches, matching_depths, stitch_points
from .streams import StitchedBlockList, StreamState, capture_stream, replace_output


class HubWithStreams:
    """What `MixtureKitForCausalLM` does for `bts` (a mixin: it reads the model's config and `_dense`, the hub)."""

    def _build_streams(self, hub: PreTrainedModel) -> None:
        """bts: the hub (`dense`), one frozen base model per expert (`streams.<name>`), and the `stitches`."""
        config, text_config = self.config, self.config.text_config
        _, hub_blocks = stitch_layers(hub, text_config)
        hub_blocks.__class__ = StitchedBlockList
        object.__setattr__(self, "_hub_blocks", hub_blocks)
        points = stitch_points(len(hub_blocks), None, config.stitch_layers_index)
        out_of_range = [p for p in points if not 0 <= p < len(hub_blocks)]
        if out_of_range:
            raise RecipeError(
                f"stitch_layers_index {out_of_range} out of range: the hub has blocks 0..{len(hub_blocks) - 1}"
            )
        streams, sizes, self._stream_blocks, self._stream_depths = {}, [], {}, {}
        for name, stream_config in zip(config.expert_names, config.expert_config_objects()):
            stream_config._attn_implementation = text_config._attn_implementation
            try:
                stream = MODEL_MAPPING[type(stream_config)](with_torch_dtype(stream_config))
            except KeyError:
                raise UnsupportedArchitectureError(f"'{stream_config.model_type}' has no base model class") from None
            _, blocks = stitch_layers(stream, stream_config)
            streams[name] = stream
            sizes.append(stream_config.hidden_size)
            self._stream_blocks[name] = blocks
            self._stream_depths[name] = matching_depths(points, len(hub_blocks), len(blocks))
        self.streams = nn.ModuleDict(streams)
        try:
            self.stitches = build_stitches(points, config.hidden_size, sizes, config.stitch_dropout,
                                           getattr(config, "stitch_directions", None))
        except ValueError as error:
            raise RecipeError(str(error)) from None
        self._stitch_at = {point: k for k, point in enumerate(points)}
        self.stitch_points = points

    def _stream_caches(self, cache: Any) -> dict[str, Any]:
        """Each expert stream's own KV cache, kept on the hub's cache object so generation carries it along."""
        caches = getattr(cache, "mixturekit_stream_caches", None)
        if caches is None:
            caches = {name: DynamicCache(config=c) for name, c in zip(self.streams, self.config.expert_config_objects())}
            cache.mixturekit_stream_caches = caches
        return caches

    def _forward_with_streams(self, arguments: dict[str, Any]) -> Any:
        """Capture every stream's block inputs, then run the hub; stitches act after the hub's stitch blocks."""
        use_cache = arguments.get("use_cache", getattr(self.config.text_config, "use_cache", True))
        cache = arguments.get(CACHE_ARGUMENT)
        if use_cache and cache is None:
            cache = arguments[CACHE_ARGUMENT] = DynamicCache(config=self.config.text_config)
        caches = self._stream_caches(cache) if use_cache else {}
        states = []
        disabled = set(getattr(self.config, "disabled_experts", None) or ())
        for name, stream in self.streams.items():
            if name in disabled:  # opted out: it reaches no stitch, so it need not run
                continue
            inputs = {k: arguments[k] for k in ("attention_mask", "position_ids", "cache_position") if k in arguments}
            if "input_ids" in arguments:
                inputs["input_ids"] = arguments["input_ids"]
            else:
                embeds, hub_type = arguments["inputs_embeds"], self.config.text_config.model_type
                if embeds.shape[-1] != stream.config.hidden_size:
                    raise ValueError(
                        f"inputs_embeds have width {embeds.shape[-1]}, but expert stream '{name}' has hidden size "
                        f"{stream.config.hidden_size}; pass input_ids so each stream embeds them itself"
                    )
                if stream.config.model_type != hub_type:
                    raise ValueError(
                        f"inputs_embeds are embeddings of the hub's family ({hub_type}), but expert stream '{name}' "
                        f"is a {stream.config.model_type} model, which embeds tokens its own way; pass input_ids so "
                        "each stream embeds them itself"
                    )
                inputs["inputs_embeds"] = embeds
            inputs.update({"use_cache": bool(use_cache), CACHE_ARGUMENT: caches.get(name)})
            states.append((name, capture_stream(stream, self._stream_blocks[name], inputs)))
        self._hub_blocks.after_block = lambda index, output: self._after_hub_block(states, index, output)
        try:
            return self._dense(**arguments, return_dict=True)
        finally:
            self._hub_blocks.after_block = None

    def _after_hub_block(self, states: list[tuple[str, StreamState]], index: int, output: Any) -> Any:
        k = self._stitch_at.get(index)
        if k is None:
            return output
        hub = output[0] if isinstance(output, (tuple, list)) else output
        for name, state in states:
            state.advance_to(self._stream_depths[name][k])
        stitch, experts = self.stitches[k], [state.hidden for _, state in states]
        self._check_stitch_width(hub, stitch)
        names = list(self.streams)
        active = [names.index(name) for name, _ in states]
        if stitch.direction == MERGE:
            hub = stitch.merge(hub, experts, active)
        else:
            for (_, state), updated in zip(states, stitch.broadcast(hub, experts, active)):
                state.hidden = updated
        return replace_output(output, hub)

    def _check_stitch_width(self, hub: torch.Tensor, stitch: Stitch) -> None:
        """Stitches mix hidden states of the hub's hidden size; a family whose blocks pass on something wider
        (Qwen4-Exp's hyper-connections: several residual streams side by side) has no such state between blocks."""
        if hub.shape[-1] != stitch.hub_size:
            raise UnsupportedArchitectureError(
                f"bts cannot stitch '{self.config.text_config.model_type}': its blocks pass on a state of width "
                f"{hub.shape[-1]}, not its hidden size {stitch.hub_size} (several residual streams side by side, as "
                "hyper-connections keep), so there is no hidden state between blocks for stitches to mix")
