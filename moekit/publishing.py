"""`moekit push PATH REPO`: upload a composed or exported checkpoint to the Hugging Face Hub, with a model card that
says what it was made from and how to load it.

The folder is checked before anything is sent (a checkpoint missing a file is refused, naming the file), and the whole
upload is one commit through `huggingface_hub.HfApi.create_commit`, so the repository never holds half a checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .distribution import install_instruction
from .errors import OutputError
from .sources.checkpoint_folder import card_front_matter
from .sources.local_files import PICKLE_SUFFIXES

COMPOSED_TYPE = "mixturekit"  # the checkpoint format's model_type (MixtureKitConfig.model_type)
RECIPE_FILE = "mixturekit_recipe.yaml"
EVALUATION_FILES = ("eval.json", "benchmark.json")  # written by `moekit eval --json` / `moekit benchmark --json`
SKIPPED_SUFFIXES = (*PICKLE_SUFFIXES, ".pkl")  # optimiser states and pickles are never uploaded


class PushError(OutputError):
    """The folder cannot be uploaded as a checkpoint."""


@dataclass(frozen=True)
class Upload:
    """What `push` would send: the files (by their path in the repository; bytes where a local path was redacted
    from the text) and the model card's text."""

    files: dict[str, Path | bytes]
    card: str


def local_paths(folder: Path) -> list[str]:
    """The local paths the recipe stored beside the weights names (sources, output, router data) and the sources of
    experts added by `moekit edit`: private, so a push replaces them by `<local>/NAME` in every text it uploads. Longest first, so no path is cut inside a longer one."""
    found = []
    recipe_path = folder / RECIPE_FILE
    if recipe_path.is_file():
        recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}
        models = [*(recipe.get("experts") or []), *([recipe["base"]] if isinstance(recipe.get("base"), dict) else [])]
        found += [str(m.get("source", "")) for m in models] + [str(recipe.get("output") or "")]
        found += [str(p) for p in (recipe.get("router_data") or {}).values()]
    config_path = folder / "config.json"
    if config_path.is_file():  # `moekit edit --add NAME=SOURCE` records its source there
        edits = json.loads(config_path.read_text(encoding="utf-8")).get("edits") or []
        found += [str(edit.get("source", "")) for edit in edits if isinstance(edit, dict)]
    found = [p for p in found if p and (Path(p).is_absolute() or Path(p).expanduser().exists())]
    variants = {variant for p in found for variant in (p, str(Path(p).expanduser().resolve()))}
    return sorted(variants, key=len, reverse=True)


def redact(text: str, paths: list[str]) -> str:
    for path in paths:
        text = text.replace(path, f"<local>/{Path(path).name}")
    return text


def _missing_files(folder: Path, config: dict) -> list[str]:
    missing = []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise PushError(f"'{index}' is not a valid safetensors index ({error}): nothing was uploaded") from None
        missing += [name for name in shards if not (folder / name).is_file()]
    elif not list(folder.glob("*.safetensors")):
        missing.append("model.safetensors (no safetensors weights, and no model.safetensors.index.json)")
    for reference in (config.get("auto_map") or {}).values():
        module = (reference if isinstance(reference, str) else reference[0]).split(".")[0] + ".py"
        if "--" not in module and not (folder / module).is_file():
            missing.append(f"{module} (named by the config's auto_map)")
    return missing


def check_complete(folder: str | Path) -> dict:
    """The folder's config, after checking it is a whole checkpoint: config.json, every weight file the index names
    (or some safetensors), and the loader files its `auto_map` names. Raises `PushError` naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"'{folder}' is not a folder: give a checkpoint folder written by `moekit compose`, "
                        "`moekit export` or `moekit train`")
    if folder.name.startswith(".") and "partial" in folder.name:
        raise PushError(f"'{folder}' is an unfinished output (a staging folder): nothing was uploaded")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PushError(f"'{folder}' is not a complete checkpoint: config.json is missing; nothing was uploaded")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PushError(f"'{config_path}' is not valid JSON ({error}): nothing was uploaded") from None
    missing = _missing_files(folder, config)
    if missing:
        raise PushError(f"'{folder}' is not a complete checkpoint: missing {', '.join(missing)}; nothing was "
                        "uploaded")
    return config


def _evaluation_table(folder: Path) -> str:
    """A markdown table of the evaluation results stored beside the weights, or ''."""
    for name in EVALUATION_FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("markdown"), str):
            return f"\n## Evaluation\n\nFrom `{name}`:\n\n{data['markdown']}\n"
        if isinstance(data, dict):
            rows = [f"| {key} | {value} |" for key, value in _flatten(data).items()]
            return f"\n## Evaluation\n\nFrom `{name}`:\n\n| measure | value |\n| --- | --- |\n" + "\n".join(rows) + "\n"
    return ""


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + " / "))
        elif isinstance(value, (int, float, str)):
            flat[name] = round(value, 4) if isinstance(value, float) else value
    return flat


def _routing_figures(folder: Path, files: dict[str, Path]) -> str:
    pictures = sorted(name for name in files if name.endswith(".png"))
    pages = sorted(name for name in files if name.endswith(".html"))
    if not pictures and not pages:
        return ""
    lines = ["", "## Routing", ""]
    lines += [f"![{Path(name).stem}]({name})" for name in pictures]
    lines += [f"- [{name}]({name}): the routing report (open it in a browser)" for name in pages]
    return "\n".join(lines) + "\n"


def _composition_summary(folder: Path, config: dict) -> str:
    recipe_path = folder / RECIPE_FILE
    recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else {}
    method = config.get("method", recipe.get("method"))
    lines = ["", "## Composition", "", f"- method: `{method}`"]
    if method != "bts":
        lines.append(f"- experts per token (k): {config.get('num_experts_per_tok')} of {len(config.get('expert_names', []))}")
        lines.append(f"- load-balancing alpha: {config.get('alpha')} ({config.get('alpha_mode', 'fixed')})")
    experts = recipe.get("experts") or [{"name": name} for name in config.get("expert_names", [])]
    base = recipe.get("base")
    lines += ["", "| role | name | source | revision |", "| --- | --- | --- | --- |"]
    for role, model in ([("base" if method != "bts" else "hub", base)] if base else []) + [("expert", e) for e in experts]:
        source = model.get("source", "")
        lines.append(f"| {role} | {model.get('name', '')} | `{source}` | {model.get('revision') or '—'} |")
    return "\n".join(lines) + "\n"


def hub_card(folder: str | Path, repo_id: str, files: dict[str, Path] | None = None) -> str:
    """The model card uploaded with the checkpoint: the card the folder holds (compose's or export's) with how to
    install and load it from `repo_id`, what it was composed from, and its routing and evaluation figures."""
    folder = Path(folder)
    config = check_complete(folder)
    files = files if files is not None else upload_files(folder)
    existing = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else ""
    composed = config.get("model_type") == COMPOSED_TYPE
    if composed:
        use = (f"\n## Use\n\nInstall MixtureKit: {install_instruction()}. Then:\n\n```python\nimport moekit  "
               "# registers the architecture\nfrom transformers import AutoModelForCausalLM\n\nmodel = "
               f'AutoModelForCausalLM.from_pretrained("{repo_id}")\n```\n\nTools that take only a path load it with '
               "`trust_remote_code=True` once `moekit` is installed.\n")
        extra = _composition_summary(folder, config)
    else:
        use = (f"\n## Use\n\nA native `{config.get('model_type')}` checkpoint: no MixtureKit needed.\n\n```python\n"
               f'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("{repo_id}")'
               "\n```\n")
        extra = ""
    if not existing.startswith("---"):
        tags = ["moekit", "mixture-of-experts"] + ([config["method"]] if composed and config.get("method") else [])
        existing = card_front_matter(tags) + "\n" + existing
    return existing.rstrip() + "\n" + use + extra + _routing_figures(folder, files) + _evaluation_table(folder)


def upload_files(folder: str | Path) -> dict[str, Path]:
    """The files a push sends, by path in the repository: the folder's own files (sub-folders such as training
    checkpoints and hidden files stay behind; so do pickled states), the model card replaced by `hub_card`'s."""
    folder = Path(folder)
    return {path.name: path for path in sorted(folder.iterdir())
            if path.is_file() and not path.name.startswith(".") and path.suffix not in SKIPPED_SUFFIXES
            and path.name != "README.md"}


def plan_upload(folder: str | Path, repo_id: str) -> Upload:
    """What `push` would upload, checked, without any network; local paths redacted from the card and the recipe."""
    folder = Path(folder)
    check_complete(folder)
    files: dict[str, Path | bytes] = dict(upload_files(folder))
    private = local_paths(folder)
    for name in (RECIPE_FILE, "config.json"):
        if name in files and private:
            files[name] = redact((folder / name).read_text(encoding="utf-8"), private).encode("utf-8")
    return Upload(files, redact(hub_card(folder, repo_id, upload_files(folder)), private))


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a checkpoint folder to `repo_id` on the Hub in one commit; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    upload = plan_upload(folder, repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else str(content))
                  for name, content in upload.files.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=upload.card.encode("utf-8")))
    commit = api.create_commit(repo_id, operations=operations, repo_type="model", revision=revision,
                               commit_message=commit_message or f"Upload {Path(folder).name} with MixtureKit")
    return str(getattr(commit, "commit_url", commit))
