"""Our calls into transformers use no deprecated API on the installed release: generation, the cache, training
forwards. transformers announces some deprecations as warnings (failed by pyproject's filter) and some only in its
log (`warning_once`), which these tests read."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from moekit import compose
from tiny_models import make_model, padded_prompts, save_model, tiny_config


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("deprecations")
    return root, [save_model(make_model(tiny_config("llama"), seed), root / f"m{seed}") for seed in range(3)]


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _deprecations_while(run) -> list[str]:
    handler = _Messages()
    logger = transformers_logging.get_logger("transformers")
    logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # a message logged once before would not be logged again
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        logger.removeHandler(handler)
    found = handler.messages + [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    return [m for m in found if "deprecat" in m.lower()]


@pytest.mark.parametrize("method", ["traditional", "btx", "bts"])
def test_generate_and_train_forward_log_no_deprecation(folders, method):
    root, sources = folders
    experts = [{"name": f"e{i}", "source": str(s)} for i, s in enumerate(sources[1:])]
    recipe = ({"method": "bts", "base": {"name": "hub", "source": str(sources[0])}, "experts": experts}
              if method == "bts" else {"method": method, "experts": experts, "num_experts_per_tok": 2})
    model = AutoModelForCausalLM.from_pretrained(compose(recipe, root / method, progress=False)).eval()
    prompt, mask = padded_prompts(2, 6, seed=0)

    def run():
        model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        model.train()
        model(input_ids=prompt, attention_mask=mask, labels=prompt).loss.backward()
        model.eval()

    assert _deprecations_while(run) == []


def test_the_check_sees_a_logged_deprecation():
    logger = transformers_logging.get_logger("transformers.generation.utils")
    assert _deprecations_while(lambda: logger.warning_once("`foo` is deprecated, use `bar`")) != []
