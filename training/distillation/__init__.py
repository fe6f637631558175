"""Knowledge distillation: a student trained on a teacher's next-token distributions (notes/distillation.md).

`distillation_loss` is the objective; `python -m training.distillation.train` runs it on the shared loop."""

from training.distillation.loss import KINDS, distillation_loss

__all__ = ["KINDS", "distillation_loss"]
