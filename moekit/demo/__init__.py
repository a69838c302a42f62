"""The built-in demo: tiny experts trained offline on this machine, composed and compared by perplexity."""

from .run import run_demo

__all__ = ["run_demo"]
