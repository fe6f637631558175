"""PPO for language models: rewards per token, GAE and the clipped losses (notes/ppo.md)."""

from training.ppo.loss import gae, kl_penalised_rewards, ppo_policy_loss, ppo_value_loss, whiten

__all__ = ["gae", "kl_penalised_rewards", "ppo_policy_loss", "ppo_value_loss", "whiten"]
