"""`moekit report`: load a composed checkpoint, capture how it routes some texts (with their images), and write the
HTML report and PNG figures, all renderers of that one trace (`views`)."""

from __future__ import annotations

from pathlib import Path

from .errors import MixtureKitError


def report_checkpoint(
    checkpoint: Path, texts: list[str], sources: list[str], output: Path, labels: list[str] | None = None,
    images: list[Path] | None = None, max_tokens: int = 512, png_dir: Path | None = None,
) -> tuple[object, list[Path]]:
    """The routing trace of `texts` through the checkpoint and the files written from it (the HTML report first).
    `sources` names each text for messages (`--text 1`, `--file F`); `images` go with the first texts, in order."""
    from .analysis import capture_routing
    from .loading import load, load_processor, load_tokenizer
    from .runtime.assembly.config import require_composed
    from .views import write_report

    if not texts:
        raise MixtureKitError("give at least one --text TEXT or --file FILE to analyse")
    empty = [source for source, content in zip(sources, texts) if not content.strip()]
    if empty:
        raise MixtureKitError(f"nothing to analyse in {', '.join(empty)}: every text must be non-empty")
    if len(images or []) > len(texts):
        raise MixtureKitError(f"{len(images)} --image for {len(texts)} texts: give at most one image per text")
    require_composed(checkpoint, "a report shows how a Mixture-of-Experts routes tokens")
    tokenizer = load_tokenizer(checkpoint, "a report needs one to split text into tokens")
    model = load(checkpoint)
    read_images = processor = None
    if images:
        read_images = list(images) + [None] * (len(texts) - len(images))
        if model.config.is_multimodal:  # else capture_routing says why images cannot be read
            processor = load_processor(checkpoint, "--image needs it to turn the image into the model's inputs")
    trace = capture_routing(model, tokenizer, texts, labels or None, max_tokens=max_tokens, images=read_images,
                            processor=processor)
    paths = [write_report(trace, output, title=f"Routing of {checkpoint.resolve().name}")]
    if png_dir is not None:
        paths += report_pngs(trace, png_dir)
    return trace, paths


def report_pngs(trace, folder: Path) -> list[Path]:
    """The PNG figures that apply to this trace: routing figures for routed models, gate strengths for bts."""
    from .views import plots

    if trace.routes.empty:
        return [plots.plot_gate_strength(trace, folder / "gate_strength.png")]
    paths = [plots.plot_utilisation_heatmap(trace, folder / "utilisation.png")]
    if any(label is not None for label in trace.labels):
        paths.append(plots.plot_routing_by_label(trace, folder / "routing_by_label.png"))
    return paths + [plots.plot_token_strip(trace, folder / f"token_strip_{i + 1}.png", text_index=i)
                    for i in range(len(trace.texts))]
