"""`mixturekit` command line: thin commands over the Python API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import MixtureKitError

app = typer.Typer(
    help="Compose Mixture-of-Experts models from dense Hugging Face checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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
    from .plan import checkpoint_summary

    try:
        path = run_compose(recipe, output=output, overwrite=overwrite)
    except MixtureKitError as error:
        _fail(error)
    typer.echo(checkpoint_summary(path))
    typer.echo(f"wrote {path}")


@app.command()
def inspect(target: Path = typer.Argument(..., help="Recipe YAML file, or a composed checkpoint folder.")) -> None:
    """Print the plan of a recipe (nothing is written), or the structure of a composed checkpoint."""
    from .plan import build_plan, checkpoint_summary, plan_summary

    try:
        if target.is_dir():
            if not (target / "config.json").is_file():
                raise MixtureKitError(f"'{target}' has no config.json: give a recipe file or a composed checkpoint")
            import json

            if json.loads((target / "config.json").read_text()).get("model_type") != "mixturekit":
                raise MixtureKitError(f"'{target}' is not a MixtureKit checkpoint (its model_type is not mixturekit)")
            typer.echo(checkpoint_summary(target))
        else:
            typer.echo(plan_summary(build_plan(target)))
    except MixtureKitError as error:
        _fail(error)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Training config YAML (model, stage, data, output, ...)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUTPUT/checkpoints."),
) -> None:
    """Train what the composition added (routers, or stitches for bts); runs unchanged under `accelerate launch`."""
    from .training.config import load_train_config
    from .training.run import run_training

    try:
        path = run_training(load_train_config(config), resume=resume)
    except MixtureKitError as error:
        _fail(error)
    typer.echo(f"wrote {path}")


@app.command(name="export")
def export_command(
    checkpoint: Path = typer.Argument(..., help="Composed checkpoint folder."),
    to: str = typer.Option("auto", "--to", help="auto | mixtral | qwen2_moe | qwen3_moe"),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Write a native MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE) that serving engines run without custom code."""
    from .export import export

    try:
        path = export(checkpoint, to, output, overwrite=overwrite, progress=True)
    except MixtureKitError as error:
        _fail(error)
    typer.echo(f"wrote {path}")


@app.command(name="eval")
def evaluate_command(
    checkpoint: Path = typer.Argument(..., help="Model folder (composed or dense)."),
    data: list[str] = typer.Option(..., "--data", help="NAME=FILE (or a dataset name); repeat for several."),
    block_size: int = typer.Option(256, "--block-size"),
    max_blocks: int = typer.Option(64, "--max-blocks"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
) -> None:
    """Perplexity per dataset and routing statistics, as a table (and JSON)."""
    import json

    from .evaluation import evaluate, format_evaluation

    named = dict(item.split("=", 1) if "=" in item else (Path(item).stem, item) for item in data)
    try:
        results = evaluate(checkpoint, named, block_size=block_size, max_blocks=max_blocks)
    except MixtureKitError as error:
        _fail(error)
    typer.echo(format_evaluation(results))
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        typer.echo(f"wrote {json_path}")


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
