"""The colours every view shares (HTML report, PNG plots, app), so an expert has one colour wherever it is shown."""

from __future__ import annotations

import colorsys

# Tableau 10: distinguishable for most colour-vision deficiencies and printable.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac"]
SEQUENTIAL = "#2166ac"  # one hue from white for shares, entropies and gate values


def expert_colours(count: int) -> list[str]:
    """One colour per expert: the fixed palette first, then evenly spaced hues, so every view agrees on colours."""
    colours = PALETTE[:count]
    for index in range(len(colours), count):
        red, green, blue = colorsys.hls_to_rgb((index * 0.618034) % 1.0, 0.5, 0.55)
        colours.append(f"#{round(red * 255):02x}{round(green * 255):02x}{round(blue * 255):02x}")
    return colours


def tint(colour: str, strength: float) -> str:
    """`colour` mixed with white: 0 is white, 1 the full colour (the scale every heatmap cell uses)."""
    strength = min(max(strength, 0.0), 1.0)
    channels = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 + (c - 255) * strength):02x}" for c in channels)
