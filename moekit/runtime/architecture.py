"""Where a `transformers` causal LM keeps its blocks and FFNs, read off the model itself.

The decoder blocks are the `nn.ModuleList` with one entry per hidden layer, outside any vision or audio tower. A
block's FFN is its child module under one of a few names (`mlp`, `feed_forward`, `ffn`, `mlp_block`; GraniteMoeHybrid's
dense form: `shared_mlp`, the FFN its blocks keep when they hold no MoE beside it), and how that FFN
computes is derived from its children: its Linear layers (by shape: which reads the hidden size, which writes it), its
one parameter-free activation module and an optional output dropout. Only a gated FFN's three Linears need names to
tell the gate from the up projection (`GATE_UP_DOWN_NAMES`). `check_ffn_computes` confirms a derived layout
numerically on a small copy of the FFN, so a family whose FFN does something else (adds the residual, normalises
inside) is refused, not silently mis-composed.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ..errors import UnsupportedArchitectureError

LINEAR_TYPES = (nn.Linear, Conv1D)
FFN_CHILD_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
# An FFN that sits beside an MoE in a family's MoE form and is the block's whole FFN in its dense form (no MoE child)
FFN_BESIDE_MOE_NAMES = ("shared_mlp",)
# Gated FFNs: (gate, up, down) names, the only thing shapes cannot tell apart. Llama's and Mixtral's conventions.
GATE_UP_DOWN_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# One Linear holding gate and up rows (gate first), as Phi-3 (and GraniteMoeHybrid's `input_linear`) store them.
FUSED_GATE_UP_NAMES = ("gate_up_proj", "input_linear")
NORM_NAME_PARTS = ("norm", "ln")
# What an FFN without an activation module may call in its forward; the probe picks the one that reproduces it.
FUNCTIONAL_ACTIVATIONS = {"silu": lambda: nn.SiLU(), "gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU("tanh"),
                          "relu": lambda: nn.ReLU()}


def activation_module(ffn: nn.Module, layout: MlpLayout) -> nn.Module:
    """The module the MoE experts apply: the dense FFN's own, or a new one for a functional activation."""
    return FUNCTIONAL_ACTIVATIONS[layout.activation]() if layout.functional else getattr(ffn, layout.activation)


@dataclass(frozen=True)
class MlpLayout:
    """How one FFN computes, by its children's names (relative to the FFN module).

    `gated`: ``down(act(gate(x)) * up(x))``; `dense`: ``down(act(up(x)))``. `up` lists the source projections whose
    outputs are concatenated into the first stacked projection (gate first, as in the transformers v5 experts layout).
    `conv1d`: GPT-2 style `Conv1D` layers, whose weights are stored `[in, out]` and are transposed when stacked.
    `dropout`: a Dropout child applied to the FFN's output (GPT-J, CodeGen), kept on the MoE block's output.
    `child`: the FFN's name in its decoder block. `activation` names the FFN's activation module, or, for an FFN
    that calls a function in its forward (LFM2's `F.silu`), one of `FUNCTIONAL_ACTIVATIONS`, found by the probe.
    """

    kind: str
    up: tuple[str, ...]
    down: str
    activation: str
    conv1d: bool = False
    dropout: str | None = None
    child: str = "mlp"
    functional: bool = False

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.up, self.down)

    def describe(self) -> str:
        up = "/".join(self.up)
        return f"{self.kind} {up}/{self.down}" + (" (Conv1D)" if self.conv1d else "")


def language_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config of the model's language part: its nested text config in a multimodal wrapper (Gemma 3's, LLaVA's
    `text_config`), else the config itself (also where several text parts make the choice ambiguous)."""
    try:
        return config.get_text_config(decoder=True)
    except ValueError:  # several text parts (MusicGen's encoder and decoder): no one text model to name
        return config


def is_multimodal(config: PretrainedConfig) -> bool:
    """Whether the config wraps its text model beside other parts (a vision or audio tower, a projector): the
    wrapper is what is composed, through its language model."""
    return language_config(config) is not config


def num_layers(config: PretrainedConfig) -> int:
    """The number of decoder blocks: the language model's, in a multimodal wrapper."""
    for candidate in (language_config(config), config):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = getattr(candidate, key, None)
            if isinstance(value, int):
                return value
    raise UnsupportedArchitectureError(
        f"'{config.model_type}' has no language model config with a number of layers (get_text_config() finds no text "
        "decoder in it, as in vision-language-action models whose output is not next-token logits)")


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, LINEAR_TYPES) for m in module.modules())


def _is_layer_list(module: nn.Module, count: int) -> bool:
    """A list of one entry per layer whose entries hold Linear layers: what decoder blocks (or XLM's parallel
    per-layer parts) look like."""
    return isinstance(module, nn.ModuleList) and len(module) == count and all(_has_linear(b) for b in module)


# Words that name a vision or audio tower (in a module's name or its config's class or model type): its block lists
# are the tower's, never the text decoder's.
TOWER_WORDS = ("vision", "visual", "image", "img", "audio", "speech", "video")


def _names_a_tower(text: str) -> bool:
    return any(part.startswith(TOWER_WORDS) for part in re.split(r"[^a-z]+", text.lower()) if part)


def _is_tower_config(sub: object, config: PretrainedConfig) -> bool:
    """Whether a submodule's config is another part's than the text model's: one of `config`'s sub-configs other
    than its text config (Git's vision_config), or a config named for a modality (`GitVisionConfig`)."""
    if not isinstance(sub, PretrainedConfig) or sub is config or type(sub) is type(config):
        return False  # the text model's config, or a copy of it (a decoder built from its own copy)
    try:
        text = config.get_text_config(decoder=True)
    except ValueError:
        text = config
    if sub is text:
        return False
    parts = [getattr(config, key, None) for key in getattr(config, "sub_configs", None) or {}]
    return any(sub is part for part in parts) or _names_a_tower(type(sub).__name__) or _names_a_tower(
        str(getattr(sub, "model_type", "")))


def _tower_names(model: nn.Module, config: PretrainedConfig) -> list[str]:
    """Qualified names of the model's vision and audio towers: submodules whose config is a tower's, or whose own
    name says so (`image_encoder`, `vision_model`, `audio_tower`)."""
    towers: list[str] = []
    for name, module in model.named_modules():
        if not name or any(_within(name, tower) for tower in towers):
            continue
        if _is_tower_config(getattr(module, "config", None), config) or _names_a_tower(name.rpartition(".")[2]):
            towers.append(name)
    return towers


def _within(name: str, parent: str) -> bool:
    return not parent or name == parent or name.startswith(parent + ".")


def _decoder_name(model: nn.Module) -> str | None:
    """The qualified name of the text decoder transformers gives (`get_decoder()`), when it is a proper submodule."""
    try:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    except Exception:  # noqa: BLE001  (a family whose lookup raises gives no preference)
        return None
    if decoder is None or decoder is model:
        return None
    return next((name for name, module in model.named_modules() if module is decoder), None)


def language_model_name(model: nn.Module, config: PretrainedConfig) -> str:
    """The qualified name of a multimodal wrapper's language model (`model.language_model`): the decoder transformers
    names (`get_decoder()`), where bts streams and `vision: drop` find the decoder's tensors in the wrapper's files."""
    name = _decoder_name(model)
    if name is None:
        raise UnsupportedArchitectureError(
            f"'{config.model_type}' does not name its language model (get_decoder() gives no submodule of "
            f"{type(model).__name__}), so its decoder cannot be taken out of the wrapper; compose it with vision: keep "
            "and method traditional or btx")
    return name


def decoder_layers(model: nn.Module, config: PretrainedConfig) -> tuple[str, nn.ModuleList]:
    """The qualified name and the list of the model's decoder blocks: the first list of one entry per layer whose
    entries hold Linear layers, outside any vision or audio tower (`_tower_names`; Git's image encoder has as many
    layers as its text decoder), and under the decoder transformers names (`get_decoder()`) where it holds one."""
    count = num_layers(config)
    candidates = [(name, module) for name, module in model.named_modules() if _is_layer_list(module, count)]
    towers = _tower_names(model, config)
    text = [(name, module) for name, module in candidates if not any(_within(name, tower) for tower in towers)]
    decoder = _decoder_name(model)
    under_decoder = [(name, module) for name, module in text if decoder is not None and _within(name, decoder)]
    if under_decoder or text:
        return (under_decoder or text)[0]
    in_towers = f" outside its vision/audio towers ({', '.join(name for name, _ in candidates)})" if candidates else ""
    raise UnsupportedArchitectureError(
        f"{type(model).__name__} ({config.model_type}): found no list of {count} decoder blocks{in_towers}; "
        "MixtureKit composes decoder-only models whose blocks are listed once per layer"
    )


def parallel_layer_lists(model: nn.Module, config: PretrainedConfig,
                         layers_name: str | None = None) -> list[tuple[str, nn.ModuleList]]:
    """The decoder list and every other list of one entry per layer holding Linears beside it (same parent), in
    module order: more than one when a family keeps each layer's parts in parallel lists (XLM's `attentions` and
    `ffns`) instead of blocks that hold them all. `layers_name`: the decoder list's, when the caller has it."""
    if layers_name is None:
        layers_name, _ = decoder_layers(model, config)
    parent, count = layers_name.rpartition(".")[0], num_layers(config)
    lists = model.get_submodule(parent).named_children() if parent else model.named_children()
    return [(f"{parent}.{name}" if parent else name, module) for name, module in lists
            if _is_layer_list(module, count)]


def describe_parallel_lists(parallel: list[tuple[str, nn.ModuleList]]) -> str:
    return ", ".join(f"{name} of {type(module[0]).__name__}" for name, module in parallel)


def stitch_layers(model: nn.Module, config: PretrainedConfig) -> tuple[str, nn.ModuleList]:
    """bts's blocks: `decoder_layers`, refused where a block's output is not the end of a layer. A stitch acts on a
    block's output (the residual stream) and a stream is stepped one block at a time, so a family whose layers are
    parallel per-layer lists (XLM: attention, then residual, norm and FFN from other lists) cannot be stitched."""
    layers_name, layers = decoder_layers(model, config)
    parallel = parallel_layer_lists(model, config, layers_name)
    if len(parallel) > 1:
        raise UnsupportedArchitectureError(
            f"bts cannot stitch '{config.model_type}': its layers are not blocks but parallel per-layer lists "
            f"({describe_parallel_lists(parallel)}), so no block's output is the end of a layer (after its residual), "
            "where stitches act and expert streams are stepped")
    return layers_name, layers


def ffn_child(block: nn.Module) -> str | None:
    """The name of the block's FFN module, or None when it has none under a known name. A `shared_mlp` counts only
    when no child of the block is an MoE: beside one it is an always-on shared expert, not the block's FFN."""
    for name in FFN_CHILD_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    if any(is_mixture_of_experts(child) for child in block.children()):
        return None
    for name in FFN_BESIDE_MOE_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    return None


def is_mixture_of_experts(ffn: nn.Module) -> bool:
    return "experts" in dict(ffn.named_children()) or hasattr(ffn, "num_experts")


def _refuse(model_type: str, why: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(f"'{model_type}' cannot be composed with `traditional`: {why}")


def _activation_child(children: dict[str, nn.Module], model_type: str, ffn: str) -> str | None:
    """The FFN's activation module among its children (not a Linear, dropout or norm), or None."""
    others = {n: m for n, m in children.items() if not isinstance(m, (*LINEAR_TYPES, nn.Dropout))}
    normed = sorted(n for n in others if any(part in n.lower() for part in NORM_NAME_PARTS)
                    or "norm" in type(others[n]).__name__.lower())
    if normed:
        raise _refuse(model_type, f"its FFN normalises inside ({ffn}.{normed[0]}, "
                      f"{type(others[normed[0]]).__name__}), which experts would each need their own copy of; "
                      "`btx` routes its Linears")
    if len(others) > 1:
        raise _refuse(model_type, f"found {len(others)} candidate activation modules in its FFN "
                      f"({', '.join(sorted(others))}), expected one")
    return next(iter(others)) if others else None


def mlp_layout(block: nn.Module, model_type: str,
               parallel: list[tuple[str, nn.ModuleList]] | None = None) -> MlpLayout:
    """Derive how the block's FFN computes from its children; refuse, saying why, anything `traditional` would
    get wrong. (`check_ffn_computes` confirms the result numerically.) `parallel`: `parallel_layer_lists` of the
    model, so that a block that is one of several parallel per-layer lists is refused as such."""
    child = ffn_child(block)
    block_linears = [n for n, m in block.named_children() if isinstance(m, LINEAR_TYPES)]
    if child is None and parallel and len(parallel) > 1:
        lists = describe_parallel_lists(parallel)
        raise _refuse(model_type, f"its layers are not blocks that each hold attention and FFN but parallel "
                      f"per-layer lists ({lists}), so there is no block whose FFN module the MoE block could replace")
    if child is None:
        if block_linears:
            raise _refuse(model_type, f"its FFN's Linears ({', '.join(block_linears)}) sit on the decoder block "
                          f"({type(block).__name__}) beside the attention, not in an FFN module the MoE block could "
                          f"replace; `btx` routes them (router_layers: [{', '.join(block_linears)}])")
        raise _refuse(model_type, f"its decoder block ({type(block).__name__}) has no FFN module (children: "
                      f"{', '.join(n for n, _ in block.named_children())}); a recurrent or encoder-style block")
    ffn = getattr(block, child)
    children = dict(ffn.named_children())
    if is_mixture_of_experts(ffn):
        others = [name for name in linear_names(block) if not name.startswith(child + ".")]
        raise _refuse(model_type, f"its FFN is already a Mixture-of-Experts ({type(ffn).__name__}); compose such "
                      f"experts with `btx` over the Linears beside it (router_layers: [{', '.join(others)}]), their "
                      "MoE FFNs averaged, or whole with `bts`")
    required = [p for p in list(inspect.signature(ffn.forward).parameters.values())[1:]
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise _refuse(model_type, f"its FFN's forward ({type(ffn).__name__}) takes more than the hidden states "
                      f"({', '.join(p.name for p in required)}); `btx` routes its Linears")
    linears = {n: m for n, m in children.items() if isinstance(m, LINEAR_TYPES)}
    nested = [n for n, m in ffn.named_modules() if isinstance(m, LINEAR_TYPES) and "." in n]
    if nested:
        raise _refuse(model_type, f"its FFN ({type(ffn).__name__}) nests a Linear ({child}.{nested[0]}) below its "
                      "children; `btx` routes it by name")
    activation = _activation_child(children, model_type, child)
    dropouts = [n for n, m in children.items() if isinstance(m, nn.Dropout)]
    conv1d = all(isinstance(m, Conv1D) for m in linears.values())
    if not conv1d and any(isinstance(m, Conv1D) for m in linears.values()):
        raise _refuse(model_type, "its FFN mixes Conv1D and Linear layers")
    shapes = {n: linear_shape(m) for n, m in linears.items()}  # (out, in)
    common = dict(activation=activation or "", conv1d=conv1d, dropout=dropouts[0] if len(dropouts) == 1 else None,
                  child=child)
    if len(dropouts) > 1:
        raise _refuse(model_type, f"its FFN has {len(dropouts)} dropouts ({', '.join(dropouts)}); which one applies "
                      "where cannot be told from its children")
    if len(linears) == 3:
        for gate, up, down in GATE_UP_DOWN_NAMES:
            if set(linears) == {gate, up, down}:
                return _with_activation(ffn, MlpLayout("gated", (gate, up), down, **common), model_type)
        raise _refuse(model_type, f"its FFN has three Linears ({', '.join(sorted(linears))}) named unlike a gated "
                      f"FFN's gate/up/down ({'; '.join('/'.join(t) for t in GATE_UP_DOWN_NAMES)})")
    if len(linears) != 2:
        raise _refuse(model_type, f"its FFN ({type(ffn).__name__}) has {len(linears)} Linear layers "
                      f"({', '.join(sorted(linears)) or 'none'}); an FFN has two (up, down) or three (gate, up, down)")
    orders = [(up, down) for up, down in (tuple(shapes), tuple(shapes)[::-1])
              if shapes[up][0] in (shapes[down][1], 2 * shapes[down][1]) and shapes[down][0] == shapes[up][1]]
    if not orders:
        first, second = shapes
        raise _refuse(model_type, f"its FFN's Linears {first} {list(shapes[first])} and {second} "
                      f"{list(shapes[second])} (out, in) do not chain as up then down")
    # d -> f -> d chains both ways round: which one is the up projection is what the FFN computes on a probe
    candidates = []
    for up, down in orders:
        fused = shapes[up][0] == 2 * shapes[down][1] and up in FUSED_GATE_UP_NAMES
        if shapes[up][0] == shapes[down][1] or fused:
            candidates.append(MlpLayout("gated" if fused else "dense", (up,), down, **common))
    if not candidates:
        up, down = orders[0]
        raise _refuse(model_type, f"its FFN's {up} writes {shapes[up][0]} features and {down} reads "
                      f"{shapes[down][1]}")
    runs = []  # candidates the FFN's forward runs with, if none reproduces it: check_ffn_computes says how it differs
    for candidate in candidates:
        try:
            return _with_activation(ffn, candidate, model_type, strict=True)
        except UnsupportedArchitectureError as error:
            if "could not run" not in str(error):
                runs.append(candidate)
    return _with_activation(ffn, (runs or candidates)[0], model_type)


def _with_activation(ffn: nn.Module, layout: MlpLayout, model_type: str, strict: bool = False) -> MlpLayout:
    """A layout without an activation module gets the functional activation that reproduces the FFN on a probe.
    `strict`: also a layout with an activation module must reproduce it (used to choose between candidates)."""
    if layout.activation:
        if strict:
            try:
                difference = _probe_differs(ffn, layout)
            except Exception as error:  # noqa: BLE001
                raise _refuse(model_type, f"its FFN could not run on a probe ({error})") from error
            if difference is not None:
                raise _refuse(model_type, f"its FFN does not compute {layout.describe()} ({difference})")
        return layout
    for name in FUNCTIONAL_ACTIVATIONS:
        candidate = replace(layout, activation=name, functional=True)
        try:
            if _probe_differs(ffn, candidate) is None:
                return candidate
        except Exception:  # noqa: BLE001  (the foreign forward's failure is reported by check_ffn_computes)
            break
    raise _refuse(model_type, f"its FFN ({type(ffn).__name__}) has no activation module, and none of "
                  f"{', '.join(FUNCTIONAL_ACTIVATIONS)} reproduces it on a probe")


def check_ffn_computes(block: nn.Module, layout: MlpLayout, model_type: str) -> None:
    """Run a small copy of the block's FFN (same module, tiny random Linears) against the layout's formula.

    Only the copy's Linears are new (and tiny), so this costs nothing at any model size, also on the meta device.
    A family whose FFN computes otherwise, or cannot run on the copy, is refused with what was found."""
    ffn = getattr(block, layout.child)
    try:
        difference = _probe_differs(ffn, layout)
    except Exception as error:  # noqa: BLE001  (any failure of a foreign forward is a refusal, with its text)
        raise _refuse(model_type, f"its FFN ({type(ffn).__name__}) could not be checked on a small copy "
                      f"({type(error).__name__}: {error})") from error
    if difference is not None:
        raise _refuse(model_type, f"its FFN ({type(ffn).__name__}) does not compute {layout.describe()} as "
                      f"down(act(gate(x)) * up(x)) or down(act(up(x))) ({difference}, on a small copy)")


def _probe_differs(ffn: nn.Module, layout: MlpLayout) -> str | None:
    """None when a small copy of `ffn` computes the layout's formula, else how it differs."""
    with torch.device("cpu"):  # also when the model is being built on the meta device
        return _probe_on_cpu(ffn, layout)


def _probe_on_cpu(ffn: nn.Module, layout: MlpLayout) -> str | None:
    probe = copy.copy(ffn)  # shares the parameter-free activation and dropout; its Linears are replaced below
    probe._modules, probe._parameters, probe._buffers = dict(ffn._modules), dict(ffn._parameters), dict(ffn._buffers)
    if not layout.functional and layout.activation and has_parameters(probe._modules[layout.activation]):
        probe._modules[layout.activation] = _cpu_copy(probe._modules[layout.activation])
    hidden, inner = 6, 10
    generator = torch.Generator().manual_seed(0)
    for name in layout.projections:
        is_up = name in layout.up
        rows = (2 * inner if layout.kind == "gated" and len(layout.up) == 1 else inner) if is_up else hidden
        columns = hidden if is_up else inner
        if layout.conv1d:
            small = Conv1D(rows, columns)
        else:
            small = nn.Linear(columns, rows, bias=getattr(getattr(ffn, name), "bias", None) is not None)
        with torch.no_grad():
            for parameter in small.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        probe._modules[name] = small
    modes = {module: module.training for module in probe.modules()}
    try:
        probe.eval()
        x = torch.randn(3, hidden, generator=generator)
        with torch.no_grad():
            got = probe(x)
            expected = _layout_formula(probe, layout, x)
    finally:
        for module, training in modes.items():
            module.training = training
    got = got[0] if isinstance(got, tuple) else got
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return f"it returns {type(got).__name__} {getattr(got, 'shape', '')}, not {tuple(expected.shape)}"
    if not torch.allclose(got, expected, atol=1e-5):
        return f"largest difference {(got - expected).abs().max().item():.2e}"
    return None


def has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _cpu_copy(activation: nn.Module) -> nn.Module:
    """An activation with parameters, on the CPU for the probe: its own values, or (from the meta device, where it
    has none) fixed ones in [0.25, 0.75]: the probe compares the FFN with the formula through this same module."""
    if all(not t.is_meta for t in [*activation.parameters(), *activation.buffers()]):
        return copy.deepcopy(activation).cpu()
    twin = copy.deepcopy(activation).to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*twin.parameters(), *twin.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(0.25 + 0.5 * torch.rand(tensor.shape, generator=torch.Generator().manual_seed(1)))
    return twin


def _layout_formula(ffn: nn.Module, layout: MlpLayout, x: torch.Tensor) -> torch.Tensor:
    activation = activation_module(ffn, layout)
    up = torch.cat([getattr(ffn, name)(x) for name in layout.up], dim=-1)
    if layout.kind == "gated":
        gate, up = up.chunk(2, dim=-1)
        return getattr(ffn, layout.down)(activation(gate) * up)
    return getattr(ffn, layout.down)(activation(up))


def linear_names(block: nn.Module) -> list[str]:
    """Names, relative to a decoder block, of its Linear (and GPT-2 Conv1D) layers: what `btx` can route."""
    return [name for name, module in block.named_modules() if isinstance(module, LINEAR_TYPES)]


def ffn_linear_names(block: nn.Module, model_type: str = "",
                     parallel: list[tuple[str, nn.ModuleList]] | None = None) -> list[str]:
    """`btx`'s default: the block's FFN Linears (under its FFN child), or its Linears outside attention when the
    FFN's Linears sit on the block itself (OPT-style `fc1`/`fc2`). `parallel`: `parallel_layer_lists` of the model;
    a block that is one of several parallel per-layer lists holds no FFN (XLM's is its attention), which is refused."""
    child = ffn_child(block)
    names = linear_names(block)
    if child is None and parallel and len(parallel) > 1:
        raise UnsupportedArchitectureError(
            f"'{model_type}' has no FFN in its decoder blocks for btx to route by default: its layers are parallel "
            f"per-layer lists ({describe_parallel_lists(parallel)}), so its blocks are the first list's "
            f"({type(block).__name__}) and the FFN's Linears lie outside them; router_layers can name the blocks' own "
            f"Linears ({', '.join(names)}) to route {type(block).__name__} instead")
    if child is not None and is_mixture_of_experts(getattr(block, child)):
        return []  # an MoE's router and experts are not an FFN's projections
    if child is not None:
        return [name for name in names if name.startswith(child + ".")]
    return [name for name in names if "." not in name]


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or a Conv1D."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def resolve_names(requested: list[str], valid: list[str], refuse) -> list[str]:
    """Full block-relative names for `requested` entries: a full name (`mlp.up_proj`) or a unique suffix
    (`up_proj`), without repeats. `refuse(entry, candidates)` builds the caller's error for an unknown or ambiguous
    entry (candidates: the names it could mean, none when unknown)."""
    resolved = []
    for entry in requested:
        candidates = [entry] if entry in valid else [name for name in valid if name.endswith("." + entry)]
        if len(candidates) != 1:
            raise refuse(entry, candidates)
        if candidates[0] not in resolved:
            resolved.append(candidates[0])
    return resolved
