"""`moekit` command line: thin commands over the Python API."""

from __future__ import annotations

import atexit
import gc
from pathlib import Path
from typing import Optional

import typer

from .errors import MixtureKitError
from .export.targets import EXPORT_TARGETS


class _ReportingErrors(typer.core.TyperGroup):
    """Every command's `MixtureKitError` (bad input, refused composition, ...) ends the command with its one-line
    message and exit code 2, not a traceback: one place instead of a try block per command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MixtureKitError as error:
            _fail(error)


app = typer.Typer(
    cls=_ReportingErrors,
    help="Compose Mixture-of-Experts models from dense Hugging Face checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _every_command() -> None:
    # Python's shutdown collects garbage over every object importing torch and transformers made: 0.7-0.8 s of a 4.8 s
    # `compose` on 2 cores (docs/performance.md). Frozen, they are skipped, and still freed as the modules go.
    atexit.register(gc.freeze)


SCORING_DEVICE = typer.Option(None, "--device", help="Where to score: auto (CUDA, then MPS, then the CPU), cuda, mps or cpu.")


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def compose(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (overrides the recipe's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Compose the recipe into a checkpoint folder."""
    from .compose import compose as run_compose
    from .inspection import checkpoint_summary

    path = run_compose(recipe, output=output, overwrite=overwrite)
    typer.echo(checkpoint_summary(path))
    typer.echo(f"wrote {path}")


@app.command()
def inspect(target: Path = typer.Argument(..., help="Recipe YAML file, or a composed checkpoint folder.")) -> None:
    """Print the plan of a recipe (nothing is written), or the structure of a composed checkpoint."""
    from .inspection import checkpoint_summary
    from .plan import build_plan, plan_summary
    from .runtime.assembly.config import require_composed

    if target.is_dir():
        require_composed(target, "`inspect` takes a recipe file or a composed checkpoint")
        typer.echo(checkpoint_summary(target))
    else:
        typer.echo(plan_summary(build_plan(target)))


@app.command()
def push(
    checkpoint: Path = typer.Argument(..., help="A composed, exported or trained checkpoint folder."),
    repo_id: str = typer.Argument(..., help="The Hub repository, e.g. my-org/code-math-moe."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created if missing)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="The commit's message."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and print the card; upload nothing."),
) -> None:
    """Upload a checkpoint to the Hugging Face Hub in one commit, with a model card (sources, method, k, alpha, how to
    load it, routing figures and evaluation results found beside the weights). Incomplete folders are refused."""
    from .publishing import plan_upload, push as run_push

    if dry_run:
        upload = plan_upload(checkpoint, repo_id)
        typer.echo("\n".join(["would upload:", *upload.files, "README.md (the card below)", "", upload.card]))
        return
    typer.echo(f"uploaded: {run_push(checkpoint, repo_id, private=private, revision=revision, commit_message=commit_message)}")


@app.command()
def benchmark(
    checkpoint: Path = typer.Argument(..., help="A composed checkpoint folder (its recipe names the experts and base)."),
    tasks: str = typer.Option(..., "--tasks", help="lm-evaluation-harness tasks, comma-separated."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="A folder of your own task YAML files."),
    limit: Optional[float] = typer.Option(None, "--limit", help="Examples per task (a fraction if below 1): a quick look."),
    experts: bool = typer.Option(True, "--experts/--no-experts", help="Also score each expert (and the base)."),
    export: bool = typer.Option(False, "--export", help="Also score the native export (Mixtral, Qwen MoE)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot examples per prompt."),
    batch_size: int = typer.Option(1, "--batch-size", help="lm-eval's batch size."),
    device: Optional[str] = SCORING_DEVICE,
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Default: as `moekit.load` chooses for the device."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the markdown table here."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the table and raw scores as JSON here."),
) -> None:
    """Accuracy on lm-evaluation-harness tasks for the composition, each of its experts and its base, in one table
    (one row per model, one column per task, the best per column in bold)."""
    from .benchmarking import benchmark as run_benchmark, write_benchmark

    table = run_benchmark(checkpoint, [t.strip() for t in tasks.split(",") if t.strip()], include_path=include_path,
                          limit=limit, experts=experts, base=experts, export=export, device=device, dtype=dtype,
                          batch_size=batch_size, num_fewshot=num_fewshot)
    write_benchmark(table, output, json_path)
    typer.echo(table.markdown())


@app.command()
def upgrade(checkpoint: Path = typer.Argument(..., help="A composed checkpoint folder, written by any release.")) -> None:
    """Rewrite an older composed checkpoint's loader files in place, so that `trust_remote_code=True` loads it again
    (weights and config are untouched)."""
    from .runtime.assembly.config import require_composed
    from .runtime.assembly.loader_files import refresh_loader_files

    require_composed(checkpoint, "`upgrade` rewrites a composed checkpoint's loader files")
    rewritten = refresh_loader_files(checkpoint)
    typer.echo(f"rewrote {', '.join(rewritten)} in {checkpoint}" if rewritten
               else f"{checkpoint}: loader files already current (or none: auto_map is off)")


@app.command(name="convert-original")
def convert_original_command(
    checkpoint: Path = typer.Argument(..., help="A folder written by the original MixtureKit (the registry's "
                                      "mixturekit 1.1.1): its build or train output, traditional, btx or bts."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Convert a checkpoint of the original MixtureKit (model code copied beside it, trust_remote_code) into a moekit
    checkpoint, keeping its routers and stitches; says where the original's forward computes something else."""
    from .original import convert_original

    conversion = convert_original(checkpoint, output, overwrite=overwrite, progress=True)
    for note in conversion.notes:
        typer.echo(f"note: {note}.")
    if conversion.same_logits:
        typer.echo("same logits as the original's model on these weights (float32; in 16-bit up to rounding: moekit "
                   "computes router and stitch gates in float32)")
    typer.echo(f"wrote {conversion.path}: a {conversion.method} moekit checkpoint; load it with `import moekit` and "
               "AutoModelForCausalLM.from_pretrained (no trust_remote_code)")


@app.command()
def train(
    config: Path = typer.Argument(..., help="Training config YAML (model, stage, data, output, ...)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the output folder (same config; "
                                "max_steps and save_steps may change) from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Train what the composition added (routers, or stitches for bts); runs unchanged under `accelerate launch`."""
    from .training.config import load_train_config
    from .training.data_parallel import end_process_group, is_main_process
    from .training.run import run_training

    path = run_training(load_train_config(config), resume=resume, overwrite=overwrite)
    if is_main_process():
        typer.echo(f"wrote {path}")
    end_process_group()


@app.command(name="export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="Composed checkpoint folder."),
    to: str = typer.Option("auto", "--to", help=" | ".join(["auto", *EXPORT_TARGETS])),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    layout: str = typer.Option("per-expert", "--layout", help="per-expert (the Hub checkpoints' layout: llama.cpp's "
                               "converter, vLLM, SGLang, TGI) | packed (transformers 5's own)"),
) -> None:
    """Write a native MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3.5-MoE, Qwen3-VL-MoE) that serving engines
    run without custom code."""
    from .export import export

    path = export(checkpoint, to, output, overwrite=overwrite, progress=True, layout=layout)
    import json

    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    typer.echo(f"wrote {path}: {architecture}, {layout} layout; loads with AutoModelForCausalLM (no moekit "
               "needed) and in engines that run it" + ("; for llama.cpp, convert it with convert_hf_to_gguf.py"
                                                        if layout == "per-expert" else ""))


@app.command()
def edit(
    checkpoint: Path = typer.Argument(..., help="Composed checkpoint folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (the edited checkpoint)."),
    remove: Optional[list[str]] = typer.Option(None, "--remove", help="Expert to remove (repeatable)."),
    add: Optional[str] = typer.Option(None, "--add", help="NAME=SOURCE: a dense checkpoint of the same base to add "
                                      "as an expert (zero router rows)."),
    prune: Optional[int] = typer.Option(None, "--prune", help="Drop this many least used experts (needs --data)."),
    data: Optional[Path] = typer.Option(None, "--data", help="--prune: texts to count routing on (.txt lines or "
                                        ".jsonl with a text field)."),
    router_data: Optional[list[str]] = typer.Option(None, "--router-data", help="NAME=FILE for every expert: refit "
                                                    "every router from each expert's texts (no training)."),
    by: str = typer.Option("usage", "--by", help="--prune: usage (share of routed slots) or reap (routing weight x "
                           "expert output norm)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Remove, add or prune experts of a composed checkpoint, or refit its routers from each expert's texts, writing
    a new checkpoint (the source is left as it is)."""
    from .editing.one_edit import edit_checkpoint
    from .inspection import checkpoint_summary

    path, scores = edit_checkpoint(checkpoint, output, remove, add, prune, data, router_data, by, overwrite)
    if scores is not None:
        typer.echo(f"{'REAP saliency' if by == 'reap' else 'routed-slot share'}: "
                   + ", ".join(f"{n} {s:.3g}" for n, s in scores.items()))
    typer.echo(checkpoint_summary(path))
    typer.echo(f"wrote {path}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    context: typer.Context,
    checkpoint: Path = typer.Argument(..., help="Composed (traditional, btx) or exported checkpoint folder."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (the default: this machine only)."),
    vllm_python: Optional[Path] = typer.Option(None, "--vllm-python", help="Python of the environment with vLLM and "
                                               "moekit (default: $MOEKIT_VLLM_PYTHON, else this one)."),
) -> None:
    """An OpenAI-compatible server (vLLM) for the checkpoint; options after the known ones go to `vllm serve`."""
    from .serving.server import serve as run_serve

    run_serve(checkpoint, host=host, port=port, python=vllm_python, extra=list(context.args))


# Where `eval` and `compare` score models (as `moekit.load` loads them).
SCORING_DTYPE = typer.Option(None, "--dtype", help="auto | float32 | bfloat16 | float16 (default: float32 on the CPU, "
                             "the stored dtype on a GPU).")


@app.command(name="eval")
def evaluate_command(
    checkpoint: Path = typer.Argument(..., help="Model folder (composed or dense)."),
    data: list[str] = typer.Option(..., "--data", help="NAME=FILE (or a dataset name); repeat for several."),
    block_size: int = typer.Option(256, "--block-size"),
    max_blocks: int = typer.Option(64, "--max-blocks"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    device: Optional[str] = SCORING_DEVICE,
    score_dtype: Optional[str] = SCORING_DTYPE,
) -> None:
    """Perplexity per dataset and routing statistics, as a table (and JSON)."""
    import json

    from .data import named_data_sources
    from .evaluation import evaluate, format_evaluation

    results = evaluate(checkpoint, named_data_sources(data), block_size=block_size, max_blocks=max_blocks, progress=True,
                       device=device, dtype=score_dtype)
    typer.echo(format_evaluation(results))
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        typer.echo(f"wrote {json_path}")


@app.command()
def merge(
    experts: list[str] = typer.Argument(..., help="Dense checkpoints of one architecture: folders, .gguf files or "
                                        "Hub ids."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
    method: str = typer.Option("linear", "--method", help="linear (weighted mean) | ties (TIES-Merging over --base)"),
    base: Optional[str] = typer.Option(None, "--base", help="ties: the model the experts were fine-tuned from."),
    density: float = typer.Option(0.2, "--density", help="ties: the fraction of each task vector kept, in (0, 1]."),
    weight: Optional[list[float]] = typer.Option(None, "--weight", help="One weight per expert, in their order; "
                                                 "repeat (default: equal)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the first expert's) | float32 | bfloat16 | float16"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Merge dense checkpoints into one dense checkpoint: the baseline a composition of them should beat."""
    from .merging import merge_experts

    path = merge_experts(experts, output, method, base=base, density=density, weights=weight or None,
                         dtype=dtype, overwrite=overwrite, progress=True)
    typer.echo(f"wrote {path}: a {method} merge of {len(experts)} models, dense (loads with AutoModelForCausalLM)")


@app.command()
def compare(
    target: Path = typer.Argument(..., help="Composed checkpoint folder, or a recipe (composed into --workdir)."),
    data: list[str] = typer.Option(..., "--data", help="NAME=FILE (or a dataset name); repeat for several."),
    workdir: Path = typer.Option(..., "--workdir", "-w", help="Where the merges (and a recipe's composition) go."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="The recipe the checkpoint was composed from "
                                          "(default: the one compose stored in it)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base of the TIES merge (default: the recipe's; "
                                       "without one, no TIES merge)."),
    density: float = typer.Option(0.2, "--density", help="TIES: the fraction of each task vector kept."),
    block_size: int = typer.Option(256, "--block-size"),
    max_blocks: int = typer.Option(64, "--max-blocks"),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the table as OUT.md and OUT.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace merges (or a composition) in --workdir."),
    device: Optional[str] = SCORING_DEVICE,
    score_dtype: Optional[str] = SCORING_DTYPE,
) -> None:
    """Is this composition better than merging? Perplexity of each expert, the base, the linear and TIES merges of
    the experts, and the composition, on the same tokens."""
    import json

    from .comparison import compare_to_merging, format_comparison
    from .data import named_data_sources

    result = compare_to_merging(target, named_data_sources(data), workdir, recipe=recipe, base=base, density=density,
                                block_size=block_size, max_blocks=max_blocks, overwrite=overwrite,
                                device=device, dtype=score_dtype)
    table = format_comparison(result)
    typer.echo(table)
    if out is not None:
        out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        typer.echo(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


@app.command()
def report(
    checkpoint: Path = typer.Argument(..., help="Composed checkpoint folder (with its tokenizer)."),
    text: Optional[list[str]] = typer.Option(None, "--text", help="A text to analyse; repeat for several."),
    file: Optional[list[Path]] = typer.Option(None, "--file", exists=True, dir_okay=False,
                                              help="A UTF-8 text file to analyse; repeat for several."),
    label: Optional[list[str]] = typer.Option(None, "--label",
                                              help="One label (domain) per text: --text values first, then --file."),
    image: Optional[list[Path]] = typer.Option(
        None, "--image", exists=True, dir_okay=False,
        help="An image file read with a text (image-text compositions): the first --image goes with the first text "
             "(--text values first, then --file), and so on; texts after the last --image are read alone."),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Tokens analysed per text; longer texts are cut."),
    output: Path = typer.Option(..., "--output", "-o", help="HTML file to write."),
    png_dir: Optional[Path] = typer.Option(None, "--png-dir", help="Also write PNG figures into this folder."),
) -> None:
    """Write a self-contained HTML report (and PNGs) of how the model routes the tokens of some texts."""
    from .routing_report import report_checkpoint

    sources = [f"--text {i + 1}" for i in range(len(text or []))] + [f"--file {f}" for f in file or []]
    try:
        texts = list(text or []) + [f.read_text(encoding="utf-8") for f in file or []]
        trace, paths = report_checkpoint(checkpoint, texts, sources, output, label, image, max_tokens, png_dir)
    except UnicodeDecodeError as error:
        _fail(MixtureKitError(f"a --file is not UTF-8 text: {error}"))
    except (MixtureKitError, OSError) as error:
        _fail(error)
    for source, cut in zip(sources, trace.truncated):
        if cut:
            typer.echo(f"note: {source} was truncated to its first {max_tokens} tokens (see --max-tokens)")
    for path in paths:
        typer.echo(f"wrote {path}")


@app.command(name="app")
def app_command(
    checkpoint: Path = typer.Argument(..., help="Composed checkpoint folder (with its tokenizer)."),
    port: int = typer.Option(7860, "--port", help="Port to listen on (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (the default: this machine only)."),
    generate: int = typer.Option(0, "--generate", help="Default number of new tokens to generate before analysing."),
) -> None:
    """Serve a local page that shows how the model routes each token of a prompt you type (Ctrl-C stops it)."""
    from .views.app import serve

    try:
        server = serve(checkpoint, host=host, port=port, generate_tokens=generate)
    except (MixtureKitError, OSError) as error:
        _fail(error)
    try:
        typer.echo(f"serving {checkpoint} at {server.url} (Ctrl-C to stop)")
        server.wait()
    except KeyboardInterrupt:
        typer.echo("stopping")
    finally:
        server.close()


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo_output"), "--workdir", "-w", help="Where models and results go."),
    quick: bool = typer.Option(False, "--quick", help="A much smaller run, for smoke tests."),
) -> None:
    """Train tiny domain experts offline, compose them, and print per-domain perplexities."""
    from .demo import run_demo

    run_demo(workdir, quick=quick)


if __name__ == "__main__":
    app()
