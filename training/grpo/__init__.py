"""Group Relative Policy Optimization: the objective (notes/grpo.md). Sampling and the train script come separately."""

from training.grpo.loss import check_rewards, group_advantages, grpo_loss, k3

__all__ = ["check_rewards", "group_advantages", "grpo_loss", "k3"]
