"""Train DeepSeek-V3 with the zoo's shared loop, data and tokenizer.

    python -m architectures.deepseek_v3.train --preset tiny            # 2-core CPU
    python -m architectures.deepseek_v3.train --preset shakespeare     # one GPU

The objective is cross-entropy: DeepSeek-V3 balances its experts mainly without an auxiliary
loss, by moving each router's bias after every optimizer step, the family's `on_step` in the
registry. `--seq-aux-loss-alpha A` (0 by default) adds the report's complementary sequence-wise
balance loss in training only; metrics.jsonl then carries `lm_loss` and `seq_balance_loss`
beside the total, and each MoE layer's load imbalance as `moe/l{i}/max_load`
(architectures/deepseek_v3/losses.py). The schedules are the same as Llama 3's
(training/recipes.py), so the two train on identical batches.
"""

from __future__ import annotations

from architectures.utils.command_line import command_line
from training.cli import run


@command_line
def main(argv=None) -> dict:
    return run("deepseek_v3", argv=argv)


if __name__ == "__main__":
    main()
