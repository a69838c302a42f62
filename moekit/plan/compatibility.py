"""Whether source models can be composed: same architecture and shapes, same vocabulary and tokens, and tensors
that the base model's own class would build; each difference named exactly."""

from __future__ import annotations

import copy
import json

import torch

from ..errors import CompatibilityError
from ..runtime.assembly.checkpoint_check import saved_tensor_shapes
from ..runtime.base_model.dense_model import dense_model_class, with_torch_dtype
from ..sources.resolve import LocalModel

# Config keys that may differ between experts without changing what the weights compute.
HARMLESS_CONFIG_KEYS = {
    "_name_or_path", "name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "_commit_hash", "output_attentions", "output_hidden_states",
    "return_dict", "max_position_embeddings", "_attn_implementation_autoset", "tokenizer_class",
}


def _config_differences(reference: LocalModel, other: LocalModel) -> dict[str, tuple]:
    mine, theirs = reference.config.to_dict(), other.config.to_dict()
    keys = (set(mine) | set(theirs)) - HARMLESS_CONFIG_KEYS
    return {k: (mine.get(k), theirs.get(k)) for k in sorted(keys) if mine.get(k) != theirs.get(k)}


def _tokenizer_vocabulary(model: LocalModel) -> dict | None:
    path = model.folder / "tokenizer.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab")
        added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        if isinstance(vocab, list):  # unigram: [[piece, score], ...]
            vocab = {piece[0]: i for i, piece in enumerate(vocab)}
        return {**(vocab or {}), **added}
    path = model.folder / "vocab.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return None


def _token_differences(ref_tokens: dict, other_tokens: dict) -> tuple[list[tuple[int, str | None, str | None]], int]:
    """The ids whose token differs between two vocabularies (token -> id), sorted by id: the first few as
    (id, token in the first, token in the second; None where the id is absent), and how many ids differ."""
    ref_ids = {i: t for t, i in ref_tokens.items()}
    other_ids = {i: t for t, i in other_tokens.items()}
    ids = sorted(set(ref_ids) | set(other_ids), key=lambda i: (0, i, "") if isinstance(i, int) else (1, 0, str(i)))
    differing = [i for i in ids if ref_ids.get(i) != other_ids.get(i)]
    return [(i, ref_ids.get(i), other_ids.get(i)) for i in differing[:3]], len(differing)


def _tokenizer_mismatch(ref: LocalModel, other: LocalModel, ref_tokens: dict, other_tokens: dict,
                        valid: str) -> CompatibilityError:
    """The error for two different vocabularies: the first differing ids with each model's token, and what is valid."""
    first, count = _token_differences(ref_tokens, other_tokens)

    def shown(token: str | None) -> str:
        return "absent" if token is None else repr(token)

    if first:
        listed = "; ".join(f"id {i}: {shown(a)} in '{ref.name}', {shown(b)} in '{other.name}'" for i, a, b in first)
        what = f"{count} of {max(len(ref_tokens), len(other_tokens))} ids differ, the first: {listed}"
    else:  # the same ids, but a token listed under two ids in one of them
        tokens = sorted(set(ref_tokens.items()) ^ set(other_tokens.items()), key=lambda item: (str(item[1]), item[0]))
        what = f"token/id pairs in one only: {tokens[:3]}"
    return CompatibilityError(f"models '{ref.name}' and '{other.name}' have different tokenizers ({what}); {valid}")


def check_compatible(models: list[LocalModel], reference: int, same_architecture: bool = True) -> list[str]:
    """Raise CompatibilityError naming exactly what differs; return warnings for what is merely noted.

    Routed methods need one architecture and config; bts streams may differ from the hub in family, width and depth,
    but share its vocabulary: the same tokens at the same ids (every stream embeds the hub's token ids itself)."""
    ref = models[reference]
    notes = []
    if same_architecture:
        valid = "experts must share one tokenizer (the same tokens at the same ids)"
    else:
        valid = (f"bts streams may be of other families, widths and depths than the hub, but must use the hub "
                 f"'{ref.name}''s tokenizer (the same tokens at the same ids): give experts trained with it")
    vocabularies = {id(m): _tokenizer_vocabulary(m) for m in models}
    for other in models:
        if other is ref:
            continue
        if same_architecture and other.config.model_type != ref.config.model_type:
            raise CompatibilityError(
                f"models '{ref.name}' and '{other.name}' have different architectures: "
                f"{ref.config.model_type} vs {other.config.model_type}; compose models of one architecture "
                "(or use method: bts, whose expert streams may be of other families)"
            )
        ref_vocab, other_vocab = getattr(ref.config, "vocab_size", None), getattr(other.config, "vocab_size", None)
        if ref_vocab != other_vocab:
            raise CompatibilityError(
                f"models '{ref.name}' and '{other.name}' have different vocabulary sizes: {ref_vocab} vs "
                f"{other_vocab}; " + (f"{valid} and its embedding size ({ref_vocab} rows)" if not same_architecture
                                      else "experts must share one tokenizer and embedding size")
            )
        differences = _config_differences(ref, other) if same_architecture else {}
        if differences:
            listed = "; ".join(f"{k}: {a!r} vs {b!r}" for k, a, b in ((k, *v) for k, v in differences.items()))
            raise CompatibilityError(
                f"models '{ref.name}' and '{other.name}' differ in their configs ({listed}); experts must share "
                "the architecture they were branched from"
            )
        ref_tokens, other_tokens = vocabularies[id(ref)], vocabularies[id(other)]
        if ref_tokens is not None and other_tokens is not None and ref_tokens != other_tokens:
            raise _tokenizer_mismatch(ref, other, ref_tokens, other_tokens, valid)
    without_tokenizer = [m.name for m in models if vocabularies[id(m)] is None]
    if without_tokenizer and len(models) > 1:
        notes.append(f"tokenizers not compared for {without_tokenizer}: no tokenizer.json or vocab.json")
    return notes


def _check_tensors(models: list[LocalModel], expected: dict[str, tuple[int, ...]]) -> None:
    """Every model holds every expected tensor with the expected shape; the first miss or mismatch is named."""
    for model in models:
        for name, shape in expected.items():
            if name not in model.reader:
                raise CompatibilityError(
                    f"model '{model.name}' has no tensor '{name}' (files: {[p.name for p in model.weight_files]}); "
                    "give a complete checkpoint of the experts' architecture (e.g. re-save it with save_pretrained)"
                )
            found = model.reader.info(name).shape
            if found != shape:
                raise CompatibilityError(
                    f"model '{model.name}': tensor '{name}' has shape {list(found)}, expected {list(shape)} "
                    "as in the other models; first differing tensor"
                )


def check_dense_tensors(models: list[LocalModel], config) -> tuple[torch.nn.Module, dict[str, tuple[int, ...]]]:
    """A weightless (meta) dense model of `config` and the tensors it saves by name and shape (tied ones left out).
    Each model's reader addresses its tensors as the model loads them (the renamings and conversions transformers
    applies on load) and is checked to hold every one of them with that shape: the first miss or mismatch is a
    CompatibilityError."""
    dense = meta_dense_model(config)
    expected = saved_tensor_shapes(dense)
    for model in models:
        model.reader.read_as(dense)
    _check_tensors(models, expected)
    return dense, expected


def meta_dense_model(config) -> torch.nn.Module:
    """The base model built on the meta device: its modules and tensor shapes, no memory."""
    with torch.device("meta"):
        return dense_model_class(config)(with_torch_dtype(copy.deepcopy(config)))
