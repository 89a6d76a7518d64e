"""Choosing the layout: a planner that predicts memory and step time of a GPT under every
DP x TP x PP layout (with microbatching, sequence parallelism, recomputation and ZeRO-1) on
a cluster, and recommends the fastest that fits. ``python -m hybridpar_ext plan``."""

from .calibration import DEFAULT as DEFAULT_CALIBRATION
from .calibration import Calibration, from_bench_results
from .costs import Layout, Memory, StepTime, step_flops, total_params
from .planner import Plan, PlanError, Prediction, format_plan, layouts, plan, predict
from .specs import PRECISIONS, PRESETS, ClusterSpec, ModelSpec, Precision

__all__ = ["Calibration", "ClusterSpec", "DEFAULT_CALIBRATION", "Layout", "Memory", "ModelSpec",
           "PRECISIONS", "PRESETS", "Plan", "PlanError", "Precision", "Prediction", "StepTime",
           "format_plan", "from_bench_results", "layouts", "plan", "predict", "step_flops",
           "total_params"]
