"""Supervised fine-tuning: teach a pretrained model to answer, with the loss on its answers only.

    python -m training.sft.train --preset tiny                 # 2-core CPU, a few minutes
    python -m training.sft.train --preset tiny --base DIR      # any zoo or Hugging Face Llama 3 / Mixtral directory
    python -m training.sft.train --preset tiny --dataset chats.jsonl   # your own conversations

The base is a checkpoint directory with its tokenizer.json (default for `tiny`: the quick
start's, runs/llama3-tiny, trained first if it is missing). The data is the built-in instruction
set (training/tasks.py) or a chat dataset (training/chat.py: `messages`, ShareGPT or Alpaca
records, a local .json/.jsonl file or a hub name). Conversations are rendered in the base's own
chat format, packed into rows (training/sft/batch.py) and trained with the shared loop on the
assistant's tokens (training/sft/loss.py). Before and after, the held-out questions of each
built-in task are answered greedily and scored by exact match.

The options and presets are in training/sft/recipes.py; the run's steps (`prepare` loads the base
and the data, `fit` runs the loop, `report` scores) in training/sft/finetune.py, which
training/lora/train.py runs too, wrapping the model in adapters between `prepare` and `fit`. A
mixture-of-experts base (Mixtral, DeepSeek-V3) keeps its auxiliary losses and router-bias update
while it fine-tunes (training/posttrain.py).
"""

from __future__ import annotations

from architectures.utils.command_line import command_line
from training.sft import finetune


@command_line
def main(argv=None) -> dict:
    return finetune.run(argv)


if __name__ == "__main__":
    main()
