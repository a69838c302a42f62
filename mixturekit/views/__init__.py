"""Views: renderers of a `RoutingTrace` (HTML report, PNG plots); none runs a forward pass of its own."""

from .html_report import expert_colours, render_report, write_report

__all__ = ["expert_colours", "render_report", "write_report"]
