"""Reference implementations of RL for visual generative models."""
