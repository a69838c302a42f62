"""How a block's FFN computes, derived from its children: its Linear layers (by shape: which reads the hidden size,
which writes it), its one parameter-free activation module and an optional output dropout. Only a gated FFN's
three Linears need names to tell the gate from the up projection (`GATE_UP_DOWN_NAMES`). `check_ffn_computes`
confirms a derived layout numerically on a small copy of the FFN, so a family whose FFN does something else (adds
the residual, normalises inside) is refused, not silently mis-composed."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...errors import UnsupportedArchitectureError
from .architecture import (
    LINEAR_TYPES, describe_parallel_lists, ffn_child, is_mixture_of_experts, linear_names, linear_shape,
)

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
