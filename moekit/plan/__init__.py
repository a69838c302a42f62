"""Plan: decide every output tensor's origin from configs and tensor headers, and check compatibility."""

from .compatibility import check_compatible, check_dense_tensors
from .planner import DTYPES, CompositionPlan, TensorPlan, build_plan, source_dtype
from .summary import plan_summary

__all__ = [
    "DTYPES", "CompositionPlan", "TensorPlan", "build_plan", "check_compatible", "check_dense_tensors", "plan_summary",
    "source_dtype",
]
