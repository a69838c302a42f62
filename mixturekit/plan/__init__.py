"""Plan: decide every output tensor's origin from configs and tensor headers, and check compatibility."""

from .planner import CompositionPlan, TensorPlan, build_plan, check_compatible
from .summary import plan_summary

__all__ = ["CompositionPlan", "TensorPlan", "build_plan", "check_compatible", "plan_summary"]
