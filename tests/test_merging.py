"""Merge baselines (`merge_experts`: linear, TIES) and `moekit merge` / `moekit compare`.

TIES is held to a reference written here from the definition (Yadav et al. 2023, as mergekit implements it), element
by element in float64, and to values worked out by hand; not to the library's own vectorised code."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import moekit
from moekit import CompatibilityError, MergeError, OutputError, merge_experts
from moekit.cli import app
from moekit.merging import ties_merge
from tiny_models import COMMON, VOCAB, make_model, save_model, tiny_config


def state_dict(folder) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def reference_ties(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
                   density: float) -> torch.Tensor:
    """TIES from its definition, one element at a time in float64: trim each task vector to its top `density`
    fraction by magnitude (int(density * n) entries, at least one), elect the sign of the weighted sum (+ on 0),
    average the kept entries of that sign with their weights (0 if none)."""
    base = base.double().flatten()
    trimmed = []
    for expert in experts:
        tau = (expert.double().flatten() - base).tolist()
        keep = len(tau) if density >= 1 else max(1, int(density * len(tau)))
        largest = set(sorted(range(len(tau)), key=lambda i: abs(tau[i]), reverse=True)[:keep])
        trimmed.append([value if i in largest else 0.0 for i, value in enumerate(tau)])
    merged = []
    for i in range(len(base)):
        total = sum(w * t[i] for w, t in zip(weights, trimmed))
        sign = 1.0 if total >= 0 else -1.0
        agreeing = [(w, t[i]) for w, t in zip(weights, trimmed) if t[i] != 0 and math.copysign(1.0, t[i]) == sign]
        divisor = sum(w for w, _ in agreeing)
        merged.append(sum(w * v for w, v in agreeing) / divisor if agreeing else 0.0)
    return (base + torch.tensor(merged, dtype=torch.float64)).view(experts[0].shape)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A base and three experts: the base plus its own random deltas each (so TIES has task vectors to trim)."""
    root = tmp_path_factory.mktemp("llamas")
    base = make_model(tiny_config("llama"), 0)
    folders = [save_model(base, root / "base")]
    for seed in (1, 2, 3):
        expert = make_model(tiny_config("llama"), 0)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in expert.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        folders.append(save_model(expert, root / f"expert{seed}"))
    return folders


@pytest.fixture(scope="module")
def tied_qwens(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwens")
    config = tiny_config("qwen2", tie_word_embeddings=True)
    return [save_model(make_model(config, seed), root / f"q{seed}") for seed in range(3)]


def test_ties_of_hand_made_tensors_equals_the_values_worked_out_by_hand():
    base = torch.tensor([0.5, 0.0, 1.0, 0.0, 0.0, 2.0, 0.0])
    first = base + torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 0.0])
    second = base + torch.tensor([-1.0, 2.0, 0.5, 0.0, -4.0, -0.25, 0.0])
    # density 1: the sign-elected disjoint mean. Sums of exactly 0 (elements 0, 1) elect +; element 3 moves in no expert
    expected = base + torch.tensor([1.0, 2.0, 0.5, 0.0, -4.0, -0.625, 0.0])
    assert torch.equal(ties_merge(base, [first, second], [1.0, 1.0], 1.0), expected)
    assert torch.equal(reference_ties(base, [first, second], [1.0, 1.0], 1.0).float(), expected)
    # weights 2 and 1: element 1 sums to 2*(-2) + 2 = -2 (elected -), element 0 to 2 - 1 = 1, element 4 to 6 - 4 = 2;
    # a weighted mean where both agree (element 5: (2*(-1) - 0.25) / 3 = -0.75)
    weighted = base + torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -0.75, 0.0])
    assert torch.equal(ties_merge(base, [first, second], [2.0, 1.0], 1.0), weighted)
    # a sign tie made by the weights: 2 * 1 + 1 * (-2) = 0 elects +, and only the positive entry is averaged
    tie = ties_merge(torch.zeros(1), [torch.tensor([1.0]), torch.tensor([-2.0])], [2.0, 1.0], 1.0)
    assert torch.equal(tie, torch.tensor([1.0]))
    # density 3/8 keeps the 3 entries of each task vector largest in magnitude: first {4: 3, 1: -2, 0: 1.5}, second
    # {4: -4, 1: 2.5, 0: -1}; elected: + (0.5), + (0.5), - (-1)
    base = torch.tensor([0.5, 0.0, 1.0, 0.0, 0.0, 2.0, 0.0, 1.0])
    first = base + torch.tensor([1.5, -2.0, 0.5, 0.125, 3.0, -1.0, 0.25, 0.0])
    second = base + torch.tensor([-1.0, 2.5, 0.375, 0.0, -4.0, -0.25, 0.75, 0.0])
    expected = base + torch.tensor([1.5, 2.5, 0.0, 0.0, -4.0, 0.0, 0.0, 0.0])
    assert torch.equal(ties_merge(base, [first, second], [1.0, 1.0], 3 / 8), expected)
    assert torch.equal(reference_ties(base, [first, second], [1.0, 1.0], 3 / 8).float(), expected)


@pytest.mark.parametrize("density, weights", [(1.0, None), (0.3, None), (0.5, [1.0, 2.0, 0.5])])
def test_ties_merge_equals_the_reference_on_every_tensor(tmp_path, llamas, density, weights):
    base, *experts = llamas
    output = merge_experts(experts, tmp_path / "ties", "ties", base=base, density=density, weights=weights,
                           progress=False)
    merged = load_file(output / "model.safetensors")
    sources = [state_dict(folder) for folder in llamas]
    assert set(merged) == set(sources[0])
    for name, tensor in merged.items():
        expected = reference_ties(sources[0][name], [s[name] for s in sources[1:]], weights or [1.0] * 3, density)
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6, msg=name)
    # density 0.3: most of each task vector is trimmed away, so many elements keep the base's value exactly
    if density < 1:
        unchanged = sum((merged[n] == sources[0][n]).sum().item() for n in merged)
        assert unchanged > 0.1 * sum(t.numel() for t in merged.values())


def test_linear_merge_of_identical_copies_is_the_model_exactly(tmp_path, tied_qwens):
    model = AutoModelForCausalLM.from_pretrained(tied_qwens[0])
    ids = torch.randint(3, VOCAB, (2, 7))
    output = merge_experts([tied_qwens[0]] * 2, tmp_path / "two", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(output)
    for name, tensor in model.state_dict().items():
        assert torch.equal(merged.state_dict()[name], tensor), name
    assert torch.equal(merged(input_ids=ids).logits, model(input_ids=ids).logits)
    # three bf16 copies (exact in the float32 sum), and weights: still the model itself
    bf16 = save_model(model.to(torch.bfloat16), tmp_path / "bf16")
    output = merge_experts([bf16] * 3, tmp_path / "three", weights=[1, 3, 0.5], progress=False)
    stored = load_file(output / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in stored.items())


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.25]])
def test_linear_merge_is_the_weighted_mean_of_the_state_dicts(tmp_path, llamas, weights):
    experts = llamas[1:]
    output = merge_experts(experts, tmp_path / "linear", weights=weights, progress=False)
    merged = load_file(output / "model.safetensors")
    sources = [state_dict(folder) for folder in experts]
    w = weights or [1.0] * 3
    for name, tensor in merged.items():
        expected = sum(wi * s[name].double() for wi, s in zip(w, sources)) / sum(w)
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6, msg=name)
    if weights is None:  # the plain mean is the composer's averaging, bit for bit: a composition's shared weights
        composed = moekit.compose({"method": "traditional", "experts": [
            {"name": f"e{i}", "source": str(p)} for i, p in enumerate(experts)]}, tmp_path / "composed", progress=False)
        shared = load_file(composed / "model.safetensors")
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
            assert torch.equal(merged[name], shared[name]), name


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_the_merged_checkpoint_loads_and_gives_the_logits_of_a_merge_in_memory(tmp_path, tied_qwens, method,
                                                                                no_loading_warnings):
    base, *experts = tied_qwens
    output = merge_experts(experts, tmp_path / method, method, base=base if method == "ties" else None,
                           density=0.5, weights=[1.0, 3.0], progress=False)
    assert "lm_head.weight" not in load_file(output / "model.safetensors")  # tied: the embedding is the head
    loaded = AutoModelForCausalLM.from_pretrained(output)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    sources = [state_dict(folder) for folder in tied_qwens]
    in_memory = {}
    for name in sources[0]:
        if method == "ties":
            in_memory[name] = reference_ties(sources[0][name], [s[name] for s in sources[1:]], [1.0, 3.0], 0.5)
        else:
            in_memory[name] = (sources[1][name].double() + 3 * sources[2][name].double()) / 4
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tied_qwens[0])).eval()
    reference.load_state_dict({name: tensor.float() for name, tensor in in_memory.items()})
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)


class _BufferedLlamaConfig(LlamaConfig):
    model_type = "mixturekit_test_buffered_llama"


class _BufferedLlama(LlamaForCausalLM):
    """A Llama with a persistent integer buffer and a persistent float one, as some families have."""

    config_class = _BufferedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("counts", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("scale", torch.ones(4))


def test_integer_buffers_are_copied_and_float_ones_merged(tmp_path):
    AutoConfig.register(_BufferedLlamaConfig.model_type, _BufferedLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(_BufferedLlamaConfig, _BufferedLlama, exist_ok=True)
    config = _BufferedLlamaConfig(**COMMON)
    folders = []
    for seed in range(3):
        model = _BufferedLlama(config)
        model.counts.copy_(torch.tensor([1, 2, 3]) * (seed + 1))
        model.scale.fill_(seed + 1.0)
        folders.append(save_model(model, tmp_path / f"b{seed}"))
    linear = load_file(merge_experts(folders[1:], tmp_path / "linear", progress=False) / "model.safetensors")
    assert torch.equal(linear["counts"], torch.tensor([2, 4, 6]))  # the first expert's
    assert torch.equal(linear["scale"], torch.full((4,), 2.5))  # the mean of 2 and 3
    ties = load_file(merge_experts(folders[1:], tmp_path / "ties", "ties", base=folders[0], density=1.0,
                                   progress=False) / "model.safetensors")
    assert torch.equal(ties["counts"], torch.tensor([1, 2, 3]))  # the base's
    assert torch.equal(ties["scale"], torch.full((4,), 2.5))  # base 1 + mean of the agreeing task vectors 1 and 2


def _nothing_written(output) -> bool:
    return not output.exists() and not list(output.parent.glob(".moekit-partial-*"))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"experts": 1}, MergeError, "at least 2 experts, got 1"),
    ({"method": "ties"}, MergeError, "ties needs a base"),
    ({"method": "tie", "base": True}, MergeError,
     r"unknown merge method 'tie' \(did you mean 'ties'\?\); valid: linear, ties"),
    ({"method": "linear", "base": True}, MergeError, "takes no base"),
    ({"method": "ties", "base": True, "density": 0}, MergeError, r"density must be in \(0, 1\]"),
    ({"method": "ties", "base": True, "density": 1.5}, MergeError, r"density must be in \(0, 1\]"),
    ({"method": "ties", "base": True, "density": float("nan")}, MergeError, r"density must be in \(0, 1\]"),
    ({"weights": [1.0]}, MergeError, "1 weights for 2 experts"),
    ({"weights": [1.0, 0.0]}, MergeError, "weights must be positive"),
    ({"weights": [1.0, -2.0]}, MergeError, "weights must be positive"),
    ({"dtype": "bf16"}, MergeError, "unknown dtype 'bf16'.*valid: auto, float32, bfloat16, float16"),
])
def test_bad_settings_are_refused_and_nothing_is_written(tmp_path, llamas, kwargs, error, message):
    kwargs = dict(kwargs)
    experts = llamas[1:1 + kwargs.pop("experts", 2)]
    if kwargs.get("base") is True:
        kwargs["base"] = llamas[0]
    with pytest.raises(error, match=message):
        merge_experts(experts, tmp_path / "out", progress=False, **kwargs)
    assert _nothing_written(tmp_path / "out")


def test_incompatible_experts_are_refused_naming_what_differs(tmp_path, llamas):
    qwen = save_model(make_model(tiny_config("qwen2"), 0), tmp_path / "qwen")
    with pytest.raises(CompatibilityError, match="different architectures: llama vs qwen2"):
        merge_experts([llamas[1], qwen], tmp_path / "out", progress=False)
    wider = save_model(make_model(tiny_config("llama", intermediate_size=64), 0), tmp_path / "wider")
    with pytest.raises(CompatibilityError, match="intermediate_size: 48 vs 64"):
        merge_experts([llamas[1], wider], tmp_path / "out", "ties", base=llamas[0], progress=False)
    # the same config, one stored tensor of another shape
    reshaped = tmp_path / "reshaped"
    shutil.copytree(llamas[2], reshaped)
    tensors = load_file(reshaped / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:40].contiguous()
    save_file(tensors, reshaped / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CompatibilityError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \[40, 32\], "
                                                 r"expected \[48, 32\]"):
        merge_experts([llamas[1], reshaped], tmp_path / "out", progress=False)
    # different tokenizers (the composer's check)
    left, right = tmp_path / "left", tmp_path / "right"
    for folder, token in ((left, "b"), (right, "c")):
        shutil.copytree(llamas[1], folder)
        (folder / "vocab.json").write_text(json.dumps({"a": 0, token: 1}))
    with pytest.raises(CompatibilityError, match="different tokenizers"):
        merge_experts([left, right], tmp_path / "out", progress=False)
    assert _nothing_written(tmp_path / "out")


def test_an_existing_output_is_refused_unless_overwrite(tmp_path, llamas):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        merge_experts(llamas[1:3], output, progress=False)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    with pytest.raises(OutputError, match="holds keep.txt, which moekit did not write"):
        merge_experts(llamas[1:3], output, overwrite=True, progress=False)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    (output / "keep.txt").unlink()
    merge_experts(llamas[1:3], output, overwrite=True, progress=False)
    first = (output / "model.safetensors").read_bytes()
    merge_experts(llamas[0:2], output, overwrite=True, progress=False)  # a merge moekit wrote is replaced
    assert (output / "model.safetensors").read_bytes() != first


def test_a_failed_write_leaves_nothing(tmp_path, llamas, monkeypatch):
    import errno

    from moekit import merging

    def disk_full(folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merging, "write_sharded", disk_full)
    with pytest.raises(OutputError, match="No space left on device.*nothing was written"):
        merge_experts(llamas[1:3], tmp_path / "out", progress=False)
    assert _nothing_written(tmp_path / "out")


def test_cli_merge(tmp_path, llamas):
    runner = CliRunner()
    done = runner.invoke(app, ["merge", str(llamas[1]), str(llamas[2]), "-o", str(tmp_path / "ties"), "--method",
                               "ties", "--base", str(llamas[0]), "--density", "0.5", "--weight", "1", "--weight", "2"])
    assert done.exit_code == 0, done.output
    assert "wrote" in done.output and "ties merge of 2 models" in done.output
    merged = load_file(tmp_path / "ties" / "model.safetensors")
    sources = [state_dict(folder) for folder in llamas[:3]]
    name = "model.layers.0.mlp.down_proj.weight"
    expected = reference_ties(sources[0][name], [sources[1][name], sources[2][name]], [1.0, 2.0], 0.5)
    torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6)
    refused = runner.invoke(app, ["merge", str(llamas[1]), str(llamas[2]), "-o", str(tmp_path / "x"), "--method",
                                  "ties"])
    assert refused.exit_code == 2 and "ties needs a base" in refused.output and not (tmp_path / "x").exists()


def test_cli_compare_prints_and_writes_one_row_per_model(tmp_path):
    from moekit.demo.tiny_experts import train_tokenizer

    texts = {"code": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40)],
             "prose": [f"The river number {i} runs quietly past the old mill and the town." for i in range(40)]}
    tokenizer = train_tokenizer([t for domain in texts.values() for t in domain], 300)
    config = tiny_config("llama", vocab_size=len(tokenizer))
    folders = {}
    for seed, name in enumerate(("seed", "code", "prose")):
        folders[name] = save_model(make_model(config, seed), tmp_path / name)
        tokenizer.save_pretrained(folders[name])
    data = {}
    for name, domain in texts.items():
        data[name] = tmp_path / f"{name}.jsonl"
        data[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in domain))
    recipe = {"method": "btx", "base": {"name": "seed", "source": str(folders["seed"])},
              "experts": [{"name": n, "source": str(folders[n])} for n in ("code", "prose")]}
    composed = moekit.compose(recipe, tmp_path / "composed", progress=False)
    arguments = ["compare", str(composed), "--data", f"code={data['code']}", "--data", f"prose={data['prose']}",
                 "--workdir", str(tmp_path / "work"), "--block-size", "16", "--max-blocks", "4",
                 "--out", str(tmp_path / "comparison")]
    done = CliRunner().invoke(app, arguments)
    assert done.exit_code == 0, done.output
    rows = ["expert code", "expert prose", "base seed", "linear merge", "TIES merge (density 0.2)",
            "composition (btx)"]
    table = (tmp_path / "comparison.md").read_text()
    for row in rows:
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        values = [float(cell) for cell in line.strip("| ").split(" | ")[1:]]
        assert len(values) == 3 and all(math.isfinite(v) and v > 1 for v in values), line
        assert line in done.output
    result = json.loads((tmp_path / "comparison.json").read_text())
    assert [m["name"] for m in result["models"]] == rows
    assert all(set(m["perplexity"]) == {"code", "prose", "mixed"} for m in result["models"])
    assert result["data"]["code"]["tokens"] == 4 * 15
    assert "best merge" in done.output
    assert (tmp_path / "work" / "linear" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "ties" / "model.safetensors").is_file()
    # the experts' own rows are their own models: the expert scores differ from each other and from the merges
    mixed = {m["name"]: m["perplexity"]["mixed"] for m in result["models"]}
    assert len(set(mixed.values())) == len(mixed)
    again = CliRunner().invoke(app, arguments)  # the merges exist now: refused before anything is rewritten
    assert again.exit_code == 2 and "already exists" in again.output
    # the recipe from the folder: a trained checkpoint has none, and says so
    (composed / "mixturekit_recipe.yaml").rename(tmp_path / "recipe.yaml")
    missing = CliRunner().invoke(app, [*arguments, "--overwrite"])
    assert missing.exit_code == 2 and "--recipe" in missing.output
    given = CliRunner().invoke(app, [*arguments, "--overwrite", "--recipe", str(tmp_path / "recipe.yaml")])
    assert given.exit_code == 0, given.output
    assert json.loads((tmp_path / "comparison.json").read_text()) == result  # the same merges, the same scores
