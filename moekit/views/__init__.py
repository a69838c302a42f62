"""Views: renderers of a `RoutingTrace` (HTML report, PNG plots); none runs a forward pass of its own."""

from .html_report import render_report, write_report
from .notebook import RoutingReport
from .style import expert_colours

__all__ = ["RoutingReport", "expert_colours", "render_report", "write_report"]
