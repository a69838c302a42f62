"""The built-in demo: train three tiny domain experts on this machine, compose them, and compare perplexities.

It runs offline on a CPU in a few minutes, so anyone can see what composition does to experts that really differ,
without downloading a model. Steps, each its own function so more can be slotted in (router training goes between
composing and evaluating):

1. build the domains (`domains.py`);
2. train a tokenizer, a seed model and one expert per domain (`tiny_experts.py`), or reuse them from `workdir`;
3. compose the experts with `moekit.compose`, once per method;
4. train each composition's routers on the mixed training text (`moekit.training.train_routers`);
5. score every model on every domain's validation text, and show where each domain's tokens are routed;
6. write the routing report (HTML) and a PNG of the router-trained btx model.
"""

from __future__ import annotations

import json
import time
import zlib
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from ..compose import compose
from ..evaluation import perplexity
from ..training import train_routers
from .domains import DOMAIN_NAMES, Domain, build_domains
from .tiny_experts import (
    TinySettings, branch_experts, encode_documents, save, tiny_llama, torch_threads, train, train_tokenizer,
    validation_blocks,
)

MARKER = "demo-experts.json"
# Bumped whenever the training code changes in a way the settings do not capture, so old caches are retrained.
MARKER_VERSION = 1
METHODS: tuple[str, ...] = ("btx", "traditional")
# Untrained routers, small random weights: tokens spread over the experts, so the table shows what composing alone
# does (with zeros, top-k ties would always pick the first experts). Router training makes them pick the right one.
ROUTER_INIT = "random"
TOP_K = 2

FULL = TinySettings()
QUICK = replace(
    FULL, vocab_size=384, hidden_size=64, num_layers=2, intermediate_size=172, num_heads=2, seq_len=64, batch_size=8,
    seed_steps=40, seed_lr=3e-3, expert_steps=40, expert_lr=3e-3, warmup_steps=4, eval_blocks=6, router_steps=10,
    router_windows=16,
)
FULL_CHARS, QUICK_CHARS = 240_000, 24_000


def _domains(quick: bool, seed: int) -> dict[str, Domain]:
    if quick:
        return build_domains(seed, chars_per_domain=QUICK_CHARS, max_document_chars=4_000)
    return build_domains(seed, chars_per_domain=FULL_CHARS)


def _fingerprint(domains: dict[str, Domain]) -> int:
    """A cheap content check: cached experts are reused only if they were trained on the same text."""
    crc = 0
    for name, domain in domains.items():
        for document in [name, *domain.train, "\0", *domain.validation]:
            crc = zlib.crc32(document.encode("utf-8", "surrogatepass"), crc)
    return crc


def _paths(workdir: Path) -> dict[str, Path]:
    return {"seed": workdir / "seed", **{name: workdir / "experts" / name for name in DOMAIN_NAMES}}


def _cached(workdir: Path, marker: dict) -> bool:
    path = workdir / MARKER
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    folders_complete = all((folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
                           for folder in _paths(workdir).values())
    return saved == marker and folders_complete


def train_all(
    workdir: Path, domains: dict[str, Domain], settings: TinySettings, progress: bool = True,
) -> tuple[dict[str, Path], bool]:
    """Tokenizer, seed and experts saved under `workdir`, or reused when the marker matches. Returns (paths, reused)."""
    paths = _paths(workdir)
    marker = {"version": MARKER_VERSION, "settings": settings.to_dict(), "data": _fingerprint(domains)}
    if _cached(workdir, marker):
        return paths, True
    (workdir / MARKER).unlink(missing_ok=True)
    torch.manual_seed(settings.seed)
    mixed_train = [document for domain in domains.values() for document in domain.train]
    tokenizer = train_tokenizer(mixed_train, settings.vocab_size, max_length=max(256, settings.seq_len))
    streams = {name: encode_documents(tokenizer, domain.train) for name, domain in domains.items()}
    # The seed sees the domains interleaved: the mixed stream alternates documents round-robin across domains.
    seed_model = tiny_llama(settings, tokenizer)
    seed_stream = encode_documents(tokenizer, _interleave([domain.train for domain in domains.values()]))
    train(seed_model, seed_stream, settings.seed_steps, settings.seed_lr, settings, settings.seed, "seed", progress)
    save(seed_model, tokenizer, paths["seed"])
    for name, expert in branch_experts(seed_model, streams, settings, progress).items():
        save(expert, tokenizer, paths[name])
    (workdir / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return paths, False


def _interleave(groups: list[list[str]]) -> list[str]:
    """Round-robin documents so every stretch of the seed's stream mixes domains."""
    out, longest = [], max(len(group) for group in groups)
    for i in range(longest):
        out.extend(group[i] for group in groups if i < len(group))
    return out


def compose_all(workdir: Path, expert_paths: dict[str, Path]) -> dict[str, Path]:
    """One composition per method, through the public `compose` API, exactly as a user would call it."""
    outputs = {}
    for method in METHODS:
        recipe = {
            "method": method,
            "experts": [{"name": name, "source": str(expert_paths[name])} for name in DOMAIN_NAMES],
            "num_experts_per_tok": TOP_K,
            "router_init": ROUTER_INIT,
        }
        outputs[method] = compose(recipe, output=workdir / method, overwrite=True, progress=False)
    return outputs


def train_all_routers(
    workdir: Path, compositions: dict[str, Path], domains: dict[str, Domain], settings: TinySettings,
    tokenizer_folder: Path, progress: bool,
) -> dict[str, Path]:
    """Routers only, on windows of the mixed training text; each trained composition is saved beside the untrained."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    streams = [encode_documents(tokenizer, domain.train) for domain in domains.values()]
    generator = torch.Generator().manual_seed(settings.seed)
    windows = []
    for stream in streams:  # the same number of windows per domain
        starts = torch.randint(0, stream.numel() - settings.seq_len, (settings.router_windows,), generator=generator)
        windows.append(stream[starts[:, None] + torch.arange(settings.seq_len)])
    blocks = torch.cat(windows)
    trained = {}
    for method, folder in compositions.items():
        model = load_model(folder)
        train_routers(model, blocks, workdir / f"{method}-router-run", max_steps=settings.router_steps,
                      learning_rate=settings.router_lr, batch_size=settings.batch_size, seed=settings.seed,
                      progress=False)
        trained[f"{method}+routers"] = workdir / f"{method}+routers"
        model.save_pretrained(trained[f"{method}+routers"])
        tokenizer.save_pretrained(trained[f"{method}+routers"])
        if progress:
            print(f"trained the routers of {method} ({settings.router_steps} steps)", flush=True)
    return trained


def routing_by_domain(folder: Path, blocks: dict[str, torch.Tensor], tokenizer_folder: Path) -> dict[str, list[float]]:
    """For each domain, the share of its (token, router) pairs whose top choice is each expert
    (`analysis.routing_by_label` over the evaluation blocks, each block one labelled text)."""
    from ..analysis import capture_routing_of_ids
    from ..analysis.ordering import routing_by_label_in_text_order

    rows = [row for domain_blocks in blocks.values() for row in domain_blocks]
    labels = [domain for domain, domain_blocks in blocks.items() for _ in range(len(domain_blocks))]
    trace = capture_routing_of_ids(load_model(folder), AutoTokenizer.from_pretrained(tokenizer_folder), rows, labels)
    table = routing_by_label_in_text_order(trace)
    return {domain: table.loc[domain].tolist() for domain in table.index}


def format_routing(name: str, shares: dict[str, list[float]]) -> str:
    lines = [f"routing of {name}: share of each domain's tokens whose top expert is ...",
             f"{'domain':<12}" + "".join(f"{expert:>12}" for expert in DOMAIN_NAMES)]
    lines += [f"{domain:<12}" + "".join(f"{share:>12.1%}" for share in row) for domain, row in shares.items()]
    return "\n".join(lines)


def write_routing_report(
    workdir: Path, folder: Path, tokenizer_folder: Path, domains: dict[str, Domain],
) -> tuple[Path, Path]:
    """The HTML report and the per-domain PNG of one composition, on the start of each domain's validation text."""
    from ..analysis import capture_routing
    from ..views import write_report
    from ..views.plots import plot_routing_by_label

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    texts = {name: domain.validation[0][:400] for name, domain in domains.items()}
    trace = capture_routing(load_model(folder), tokenizer, list(texts.values()), list(texts), max_tokens=128)
    report = write_report(trace, workdir / "routing-report.html", title=f"Routing of the demo's {folder.name} model")
    png = workdir / "routing-by-domain.png"
    plot_routing_by_label(trace, png, title=routing_plot_title(folder.name, len(texts), trace.max_tokens))
    return report, png


def routing_plot_title(model: str, texts: int, tokens: int) -> str:
    """What the demo's PNG shows, in its own title: the model, and that it reads the start of one validation text
    per domain (the printed routing table reads the whole evaluation blocks, so the shares differ)."""
    return (f"{model} (MixtureKit demo): top expert by domain\n"
            f"first {tokens} tokens of one validation text per domain ({texts} texts)")


def evaluation_blocks(
    tokenizer: PreTrainedTokenizerFast, domains: dict[str, Domain], settings: TinySettings,
) -> dict[str, torch.Tensor]:
    """The same number of blocks per domain, so `mixed` weighs the domains equally."""
    streams = {name: encode_documents(tokenizer, domain.validation) for name, domain in domains.items()}
    count = min([settings.eval_blocks] + [stream.numel() // settings.seq_len for stream in streams.values()])
    return {name: validation_blocks(stream, settings.seq_len, count) for name, stream in streams.items()}


def load_model(folder: Path) -> PreTrainedModel:
    """Any folder, dense or composed: `moekit` is imported, so the composed architecture is registered."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def format_table(results: dict[str, dict[str, float]], timings: dict[str, float], reused: bool) -> str:
    """Rows are models, columns the domains and `mixed` (perplexity over all validation tokens)."""
    columns = [*DOMAIN_NAMES, "mixed"]
    width = max(len("model"), *(len(name) for name in results))
    lines = [f"{'model':<{width}}  " + "  ".join(f"{column:>10}" for column in columns)]
    lines.append("-" * len(lines[0]))
    for model, scores in results.items():
        lines.append(f"{model:<{width}}  " + "  ".join(f"{scores[column]:>10.2f}" for column in columns))
    lines.append("validation perplexity, lower is better; mixed: all domains' tokens, each domain weighing the same")
    trained = "reused from cache" if reused else "trained"
    lines.append(
        f"time: {sum(timings.values()):.1f} s in all (data and experts, {trained}: {timings['experts']:.1f} s; "
        f"composing: {timings['compose']:.1f} s; router training: {timings['routers']:.1f} s; "
        f"evaluating: {timings['evaluate']:.1f} s)"
    )
    return "\n".join(lines)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-file progress bars (weights loading, shards writing) so the demo's own stay readable."""
    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def evaluate_all(folders: dict[str, Path], blocks: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Perplexity of every model folder on the same validation blocks; one model in memory at a time."""
    return {name: perplexity(load_model(folder), blocks) for name, folder in folders.items()}


def run_demo(workdir: Path, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run the whole demo in `workdir`, print the perplexity table and return the numbers.

    Returns ``{"perplexity": {model: {domain: ppl, ..., "mixed": ppl}}, "models", "domains", "seconds", "timings",
    "reused_experts", "paths", "table"}``. Models are ``seed``, ``expert:<domain>`` and one per composition method.
    `quick` shrinks data, model and steps so the whole run takes seconds (for tests); `progress` shows training bars.
    """
    started = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = replace(QUICK if quick else FULL, seed=seed)
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = time.perf_counter() - started - sum(timings.values())

    with torch_threads(), _quiet_transformers():
        domains = _domains(quick, seed)
        if progress:
            steps = settings.seed_steps + len(domains) * settings.expert_steps
            print(f"demo in {workdir}: tokenizer, seed and {len(domains)} experts ({steps} training steps, "
                  "skipped when cached)", flush=True)
        paths, reused = train_all(workdir, domains, settings, progress)
        lap("experts")
        compositions = compose_all(workdir, {name: paths[name] for name in DOMAIN_NAMES})
        lap("compose")
        trained = train_all_routers(workdir, compositions, domains, settings, paths["seed"], progress)
        lap("routers")
        folders = {"seed": paths["seed"], **{f"expert:{name}": paths[name] for name in DOMAIN_NAMES}, **compositions,
                   **trained}
        blocks = evaluation_blocks(AutoTokenizer.from_pretrained(paths["seed"]), domains, settings)
        results = evaluate_all(folders, blocks)
        routing = {name: routing_by_domain(folder, blocks, paths["seed"]) for name, folder in trained.items()}
        lap("evaluate")
    seconds = time.perf_counter() - started
    report, png = write_routing_report(workdir, trained["btx+routers"], paths["seed"], domains)
    table = format_table(results, timings, reused)
    table += "\n\n" + "\n\n".join(format_routing(name, shares) for name, shares in routing.items())
    table += (f"\n\nrouting report: {report}\nrouting plot: {png} (the start of one validation text per domain, "
              "so its shares differ from the table's)")
    print(table, flush=True)
    return {
        "perplexity": results, "models": list(results), "domains": list(DOMAIN_NAMES), "seconds": seconds,
        "timings": timings, "reused_experts": reused, "routing": routing, "report": str(report), "png": str(png), "paths": {k: str(v) for k, v in folders.items()}, "table": table,
    }
