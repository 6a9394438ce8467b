"""The shared training loop, configs and presets, checkpoints."""

from reference_impls.training.config import (
           PRESETS,
           TrainConfig,
           add_config_arguments,
           build_config,
           field_docs,
)
from reference_impls.training.loop import RunDirectory, train
from reference_impls.training.method import Method, NonFiniteLossError, StepContext, step_context

__all__ = ["PRESETS", "Method", "NonFiniteLossError", "RunDirectory", "StepContext", "TrainConfig",
           "add_config_arguments", "build_config", "field_docs", "step_context", "train"]
