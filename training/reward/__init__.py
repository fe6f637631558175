"""A reward model: a scalar head on a zoo model, fitted with the Bradley-Terry loss (notes/ppo.md)."""

from training.reward.loss import bradley_terry_loss
from training.reward.model import ScalarModel, load_scalar_model, save_scalar_model

__all__ = ["ScalarModel", "bradley_terry_loss", "load_scalar_model", "save_scalar_model"]
