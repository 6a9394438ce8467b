"""Samplers with log-probabilities: one step per family and a trajectory-recording rollout."""

from reference_impls.sampling.gaussian import gaussian_log_prob, reduce_over_pixels
from reference_impls.sampling.rollout import (
    SAMPLERS_BY_KIND,
    SamplerConfig,
    Schedule,
    Trajectory,
    apply_step,
    encode_prompts,
    guided_prediction,
    make_schedule,
    rollout,
    transition_log_prob,
)
from reference_impls.sampling.steps import (
    StepOutput,
    ddim_step,
    ddpm_step,
    flow_cps_step,
    flow_ode_step,
    flow_sde_step,
)

__all__ = [
    "SAMPLERS_BY_KIND", "SamplerConfig", "Schedule", "StepOutput", "Trajectory", "apply_step", "ddim_step",
    "ddpm_step", "encode_prompts", "flow_cps_step", "flow_ode_step", "flow_sde_step", "gaussian_log_prob",
    "guided_prediction", "make_schedule", "reduce_over_pixels", "rollout", "transition_log_prob",
]
