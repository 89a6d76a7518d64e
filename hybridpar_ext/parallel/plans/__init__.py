"""Plans: how each model family is split by :func:`hybridpar_ext.parallel.parallelize_module`.
Everything model-specific lives here, one file per family."""

from .gpt import GPTStage, build_stage, check_parallel_config, gpt_plan, layer_plan, parallelize

__all__ = ["GPTStage", "build_stage", "check_parallel_config", "gpt_plan", "layer_plan", "parallelize"]
