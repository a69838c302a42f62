"""The routing report inline in a notebook: `RoutingReport(trace)` as the last expression of a cell shows it.

Jupyter, VS Code and Colab render `_repr_html_`. The report is the same self-contained page `write_report` writes,
framed in an iframe's `srcdoc`, so its styles and script neither leak into the notebook nor reach the network.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from ..analysis import RoutingTrace
from .html_report import render_report, write_report


@dataclass
class RoutingReport:
    """A routing report to show inline (`_repr_html_`) or save (`save`); `height` is the frame's, in pixels."""

    trace: RoutingTrace
    title: str = "MixtureKit routing report"
    height: int = 720

    def html(self) -> str:
        """The whole report page (what `save` writes)."""
        return render_report(self.trace, title=self.title)

    def _repr_html_(self) -> str:
        return (f'<iframe title="{html.escape(self.title)}" style="width:100%;height:{int(self.height)}px;border:0" '
                f'sandbox="allow-scripts" srcdoc="{html.escape(self.html(), quote=True)}"></iframe>')

    def save(self, path: str | Path) -> Path:
        return write_report(self.trace, path, title=self.title)
