"""SFT (LoRA and stitches) and DPO of composed models on TRL's trainers and PEFT, with tiny models on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from moekit import TrainingError, compose
from moekit.training.dpo import run_dpo
from moekit.training.lora import apply_lora, load_lora, lora_config_for
from moekit.training.sft import run_sft
from moekit.training.upstream_warnings import upstream_checkpointing_renames_silenced
from tiny_models import VOCAB, make_model, save_model, tiny_config

WORDS = ("hello how are you fine thanks what color is the sky blue red green a cat sat on mat dog ran to park "
         "good bad yes no").split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]  # pad/bos/eos ids 0/1/2
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHATS = [
    [{"role": "user", "content": "hello how are you"}, {"role": "assistant", "content": "fine thanks"}],
    [{"role": "user", "content": "what color is the sky"}, {"role": "assistant", "content": "blue"}],
    [{"role": "user", "content": "a cat sat on a mat"}, {"role": "assistant", "content": "yes good cat"}],
    [{"role": "user", "content": "the dog ran to the park"}, {"role": "assistant", "content": "good dog"}],
]
PREFERENCES = [
    {"prompt": "hello how are you", "chosen": " fine thanks", "rejected": " bad"},
    {"prompt": "what color is the sky", "chosen": " blue", "rejected": " red green"},
    {"prompt": "a cat sat on", "chosen": " a mat", "rejected": " the dog"},
    {"prompt": "is the sky green", "chosen": " no", "rejected": " yes"},
]
QUIET = dict(per_device_train_batch_size=2, learning_rate=1e-2, bf16=False, seed=0)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that fits the tiny models' vocabulary, with a chat template."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """Composed btx, traditional (top-1, so the aux loss varies) and bts checkpoints that carry the tokenizer."""
    root = tmp_path_factory.mktemp("trl")
    tokenizer = tiny_tokenizer()
    experts = []
    for seed in range(3):
        folder = save_model(make_model(tiny_config("llama"), seed), root / f"e{seed}")
        tokenizer.save_pretrained(folder)
        experts.append(folder)
    routed = [{"name": "a", "source": str(experts[0])}, {"name": "b", "source": str(experts[1])}]
    paths = {
        method: compose({"method": method, "experts": routed, "num_experts_per_tok": 1}, root / method, progress=False)
        for method in ("btx", "traditional")
    }
    paths["bts"] = compose({"method": "bts", "base": {"name": "hub", "source": str(experts[0])},
                            "experts": [{"name": "a", "source": str(experts[1])},
                                        {"name": "b", "source": str(experts[2])}], "stitch_freq": 1},
                           root / "bts", progress=False)
    return paths


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _ids():
    return torch.randint(7, 7 + len(WORDS), (2, 9), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _adapter_keys(folder) -> set[str]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
        return set(handle.keys())


@pytest.mark.parametrize("method", ["btx", "traditional"])
def test_lora_sft_trains_saves_and_reloads_to_the_same_logits(composed, method, tmp_path):
    data = [{"messages": chat} for chat in CHATS]
    trainer = run_sft(composed[method], data, tmp_path / "sft", max_steps=3, **QUIET)
    peft_model = trainer.model.eval()
    assert isinstance(peft_model, PeftModel)
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 3
    # Activation checkpointing is on by default (non-reentrant: the model refuses the other kind).
    assert any(getattr(m, "gradient_checkpointing", False) for m in peft_model.modules())

    # The routers trained in full (PEFT modules_to_save), the adapter moved, the composed weights did not.
    keys = _adapter_keys(tmp_path / "sft")
    full = [k for k in keys if "lora_" not in k]  # modules_to_save are stored whole
    # (a router is saved whole: its weight and its loss-free balancing bias)
    assert full and all(k.endswith(("mlp.gate.weight", "router.weight", "gate.expert_bias", "router.expert_bias"))
                        for k in full)
    assert any("lora_B" in k and "self_attn" in k for k in keys)
    if method == "traditional":  # stacked experts get LoRA through PEFT's target_parameters
        assert any("mlp.experts" in k and "lora_B" in k for k in keys)
    ids = _ids()
    fresh = _load(composed[method])
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(peft_model, ids), _logits(fresh, ids), atol=0, rtol=0)
    trained = _logits(peft_model, ids)
    assert (trained - _logits(fresh, ids)).abs().max() > 1e-3

    with upstream_checkpointing_renames_silenced():  # PEFT's own call of a renamed transformers API
        reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "sft")).eval()
    torch.testing.assert_close(_logits(reloaded, ids), trained, atol=0, rtol=0)
    assert json.loads((tmp_path / "sft" / "adapter_config.json").read_text())["modules_to_save"]
    assert (tmp_path / "sft" / "tokenizer_config.json").is_file()


def test_sft_optimises_the_language_model_loss_plus_the_aux_loss_once(composed, tmp_path):
    trainer = run_sft(composed["btx"], [{"messages": chat} for chat in CHATS], tmp_path / "sft", max_steps=1,
                      save=False, **QUIET)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model = trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert own.aux_loss is not None and own.aux_loss > 0  # PEFT's router copies still feed the aux loss
    torch.testing.assert_close(loss, own.loss, atol=1e-5, rtol=0)  # the model's loss = LM loss + aux loss
    assert abs(loss - (own.loss - own.aux_loss)) > 1e-3
    logged = [h["aux_loss"] for h in trainer.state.log_history if "aux_loss" in h]
    assert logged and logged[0] > 0


def test_bts_sft_trains_only_the_stitches(composed, tmp_path):
    model = _load(composed["bts"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = _ids()
    hub_logits = _logits(model, ids)
    text = [{"text": " ".join(chat[0]["content"].split() + chat[1]["content"].split())} for chat in CHATS]
    run_sft(model, text, tmp_path / "bts", lora=False, max_steps=3, **QUIET)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("stitches.") for name in changed), changed
    assert any(name.endswith("scale") for name in changed)  # the merge into the hub opened up
    assert (_logits(model.eval(), ids) - hub_logits).abs().max() > 1e-4
    reloaded = _load(tmp_path / "bts")  # without LoRA the whole composed model is saved
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=0, rtol=0)


def test_bts_lora_targets_the_hub_and_keeps_stitches_trainable(composed):
    model = _load(composed["bts"])
    config = lora_config_for(model)
    assert config.modules_to_save == [f"stitches.{i}" for i in range(len(model.stitches))]
    peft_model = apply_lora(model, config)
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert lora_layers and all(".model.layers." in n and "self_attn" in n for n in lora_layers)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert not any("streams." in n for n in trainable)
    assert any("stitches.0.modules_to_save" in n for n in trainable)


@pytest.mark.parametrize("method, lora", [("btx", True), ("traditional", False)])
def test_dpo_runs_three_steps(composed, method, lora, tmp_path):
    settings = {**QUIET, "per_device_train_batch_size": 4}  # one batch each step: the margins are comparable
    trainer = run_dpo(composed[method], PREFERENCES, tmp_path / "dpo", lora=lora, max_steps=3, beta=0.5, **settings)
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"]
    assert all(h["aux_loss"] > 0 for h in history)  # the routers' aux loss is part of the DPO loss
    ids = _ids()
    fresh = _load(composed[method])
    if lora:  # the reference is the same model with its adapter off: the untouched composed model
        with trainer.model.disable_adapter():
            torch.testing.assert_close(_logits(trainer.model.eval(), ids), _logits(fresh, ids), atol=0, rtol=0)
        assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()
        assert not (tmp_path / "dpo" / "ref").exists()  # TRL wrapped the model itself: no pretrained-adapter copy
    else:  # a frozen copy of the starting model
        torch.testing.assert_close(_logits(trainer.ref_model, ids), _logits(fresh, ids), atol=0, rtol=0)
    assert (_logits(trainer.model.eval(), ids) - _logits(fresh, ids)).abs().max() > 1e-3


def test_load_lora_keeps_the_aux_loss(composed, tmp_path):
    model = _load(composed["traditional"])
    apply_lora(model).save_pretrained(tmp_path / "adapter")
    reloaded = load_lora(_load(composed["traditional"]), tmp_path / "adapter", is_trainable=True).train()
    ids = _ids()
    out = reloaded(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.requires_grad


def test_btx_expert_lora_needs_frozen_routers(composed):
    model = _load(composed["btx"])
    with pytest.raises(TrainingError, match="ParamWrapper"):
        lora_config_for(model, target_modules=["mlp.up_proj"])
    config = lora_config_for(model, train_routers=False)
    assert config.target_parameters and all(p.endswith("_proj.weight") and ".mlp." in p
                                            for p in config.target_parameters)
    assert not config.modules_to_save
    ids = _ids()
    expected = _logits(model, ids)
    peft_model = apply_lora(model, config)
    torch.testing.assert_close(_logits(peft_model, ids), expected, atol=0, rtol=0)  # LoRA starts at zero
    assert not any("router" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_bad_inputs_give_clear_errors(composed, tmp_path):
    path = composed["btx"]
    with pytest.raises(TrainingError, match="needs text or messages or prompt\\+completion"):
        run_sft(path, [{"question": "hello", "answer": "hi"}], tmp_path / "a", max_steps=1)
    with pytest.raises(TrainingError, match="needs prompt\\+chosen\\+rejected or chosen\\+rejected"):
        run_dpo(path, [{"prompt": "hello", "chosen": " hi"}], tmp_path / "b", max_steps=1)
    with pytest.raises(TrainingError, match="empty"):
        run_sft(path, [], tmp_path / "c", max_steps=1)
    with pytest.raises(TrainingError, match="empty"):
        run_dpo(path, Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}), tmp_path / "d", max_steps=1)
    with pytest.raises(TrainingError, match="'nope_proj' does not exist.*self_attn.q_proj"):
        run_sft(path, [{"messages": CHATS[0]}], tmp_path / "e", max_steps=1, target_modules=["nope_proj"])
    with pytest.raises(TrainingError, match="use_reentrant"):
        run_sft(path, [{"messages": CHATS[0]}], tmp_path / "f", max_steps=1,
                gradient_checkpointing_kwargs={"use_reentrant": True})


@pytest.mark.parametrize("method", ["btx", "traditional"])
def test_last_hidden_state_carries_the_balance_loss_in_a_training_forward(composed, method):
    """A loss built from `last_hidden_state` (as TRL's fused LM head builds its own) gets the balance loss's gradient:
    with the LM part zeroed, the routers' gradients are exactly those of `aux_loss` alone."""
    model = _load(composed[method]).train()
    model.config.alpha = model.current_alpha = 0.5

    def router_gradients(loss_of) -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss_of(model(input_ids=_ids())).backward()
        return {name: r.weight.grad.clone() for name, r in model.routers()}

    def from_hidden(output):  # a loss built from the hidden states alone, as TRL's fused head builds its own
        return output.last_hidden_state.float().pow(2).mean()

    with_balance = router_gradients(from_hidden)
    balance_alone = router_gradients(lambda output: output.aux_loss)
    model.eval()  # the same function of the hidden states, without the balance loss attached
    without_balance = router_gradients(from_hidden)
    for name, gradient in with_balance.items():
        assert balance_alone[name].abs().sum() > 0
        torch.testing.assert_close(gradient - without_balance[name], balance_alone[name], atol=1e-6, rtol=1e-4)
    # A loss that does not use the hidden states gets no second balance loss, also when a wrapper (DDP) sends them a
    # zero gradient.
    model.train()
    model.zero_grad()
    unused = model(input_ids=_ids())
    torch.autograd.backward([unused.aux_loss, unused.last_hidden_state],
                            [torch.ones(()), torch.zeros_like(unused.last_hidden_state)])
    for name, router in model.routers():
        torch.testing.assert_close(router.weight.grad, balance_alone[name], atol=1e-7, rtol=1e-5)


def test_plain_trl_sft_trainer_trains_with_the_balance_loss(composed, tmp_path):
    """`trl.SFTTrainer` as TRL's docs write it: its fused LM head reads the composed model's `last_hidden_state`,
    which carries the balance loss; `RoutingStatsCallback` logs that loss beside the loss."""
    import json

    from trl import SFTConfig, SFTTrainer

    from moekit import RoutingStatsCallback
    from moekit.training.upstream_warnings import upstream_checkpointing_renames_silenced

    model = _load(composed["btx"]).train()
    model.config.alpha = model.current_alpha = 0.5
    before = {name: r.weight.detach().clone() for name, r in model.routers()}
    with upstream_checkpointing_renames_silenced():
        trainer = SFTTrainer(model=model, train_dataset=Dataset.from_list([{"messages": chat} for chat in CHATS]),
                             args=SFTConfig(output_dir=str(tmp_path), max_steps=2, logging_steps=1, report_to="none",
                                            use_cpu=True, **QUIET), callbacks=[RoutingStatsCallback()])
        trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 2 and all(entry["routing/aux_loss"] > 0 for entry in history)
    assert json.dumps(history)  # plain numbers
    assert any(not torch.equal(before[name], r.weight) for name, r in model.routers())


def test_plain_trl_dpo_trainer_trains_with_lora(composed, tmp_path):
    """`trl.DPOTrainer` with a PEFT config, as TRL's docs write it: the reference is the adapter switched off."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from moekit import RoutingStatsCallback
    from moekit.training.upstream_warnings import upstream_checkpointing_renames_silenced

    model = _load(composed["traditional"]).train()
    model.config.alpha = model.current_alpha = 0.5
    with upstream_checkpointing_renames_silenced():
        trainer = DPOTrainer(model=model, train_dataset=Dataset.from_list(PREFERENCES),
                             args=DPOConfig(output_dir=str(tmp_path), max_steps=2, logging_steps=1, report_to="none",
                                            use_cpu=True, beta=0.5, **{**QUIET, "per_device_train_batch_size": 4}),
                             processing_class=AutoTokenizer.from_pretrained(composed["traditional"]),
                             peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                             callbacks=[RoutingStatsCallback()])
        trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in history)
    assert all(entry["routing/aux_loss"] > 0 for entry in history)


def test_the_trl_range_required_is_the_range_tested_and_the_adapter_names_it():
    """pyproject.toml requires the TRL releases the adapter is tested with (`make test` and `make test-oldest` run
    the newest and the oldest of them), the installed one is among them, and a trainer without TRL's MoE hooks is
    refused naming that range."""
    import re
    import tomllib
    import types
    from pathlib import Path

    import trl
    from packaging.requirements import Requirement

    from moekit.training.trl_adapter import TESTED_TRL, adapt_trainer

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    (required,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "trl"]
    assert required.specifier == Requirement(f"trl{TESTED_TRL}").specifier, (str(required.specifier), TESTED_TRL)
    assert required.specifier.contains(trl.__version__), trl.__version__
    with pytest.raises(TrainingError, match=re.escape(f"trl{TESTED_TRL}")):
        adapt_trainer(types.SimpleNamespace(model=None))
