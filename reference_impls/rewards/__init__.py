"""A registry of named rewards; each says whether gradients flow through it."""

from reference_impls.rewards.registry import (
    REWARDS,
    RewardFunction,
    UnknownRewardError,
    get_reward,
    reward_names,
)

__all__ = ["REWARDS", "RewardFunction", "UnknownRewardError", "get_reward", "reward_names"]
