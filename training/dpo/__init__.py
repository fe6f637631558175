"""Direct Preference Optimization and its IPO / SLiC variants: the loss (notes/dpo.md)."""

from training.dpo.loss import LOSS_TYPES, dpo_loss, dpo_metrics, sequence_logps

__all__ = ["LOSS_TYPES", "dpo_loss", "dpo_metrics", "sequence_logps"]
