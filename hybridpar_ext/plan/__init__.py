"""Choosing the layout: a planner that predicts memory and step time of a GPT under every
DP x TP x PP layout (with microbatching, sequence parallelism, recomputation, ZeRO-1 and the
pipeline schedule: 1F1B, interleaved, ZB-H1) on a cluster, and recommends the fastest that
fits, beside a layout the user names if asked. ``python -m hybridpar_ext plan``."""

from .calibration import DEFAULT as DEFAULT_CALIBRATION
from .calibration import Calibration, from_bench_results
from .costs import RECOMPUTE, SCHEDULES, Layout, Memory, StepTime, step_flops, total_params
from .named import parse_layout
from .planner import Plan, PlanError, Prediction, check_layout, format_plan, layouts, plan, predict
from .specs import PRECISIONS, PRESETS, ClusterSpec, ModelSpec, Precision

__all__ = ["Calibration", "ClusterSpec", "DEFAULT_CALIBRATION", "Layout", "Memory", "ModelSpec",
           "PRECISIONS", "PRESETS", "Plan", "PlanError", "Precision", "Prediction", "RECOMPUTE",
           "SCHEDULES", "StepTime", "check_layout", "format_plan", "from_bench_results", "layouts",
           "parse_layout", "plan", "predict", "step_flops", "total_params"]
