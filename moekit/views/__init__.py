"""Views: renderers of a `RoutingTrace` (HTML report, PNG plots); none runs a forward pass of its own."""

from .html_report import render_report, write_report
from .style import expert_colours

__all__ = ["expert_colours", "render_report", "write_report"]
