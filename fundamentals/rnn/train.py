"""A character-level LSTM language model on Tiny Shakespeare, with the LSTM of cells.py.

    export ZOO_DATA_DIR=/work/shared/data        # where tinyshakespeare.txt is (else it is downloaded)
    python -m fundamentals.rnn.train              # 2-core CPU, a few minutes
    python -m fundamentals.rnn.train --cell torch # the same model on nn.LSTM (same init, same numbers)

Karpathy's char-rnn setting ("The Unreasonable Effectiveness of Recurrent Neural Networks",
2015): embed each character, run an LSTM, predict the next character. Data comes through the
zoo's data layer (training.data's `get_corpus` and `split_text`: validation is the last 10%
of the characters, as nanoGPT splits). Training reads random windows of `block_size`
characters from a zero state; validation runs the whole validation split as `eval_streams`
contiguous streams, carrying the state from one chunk to the next, and reports the mean
negative log-likelihood in nats per character.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from architectures.utils.command_line import command_line
from fundamentals.cli import AT_LEAST_0, AT_LEAST_1, parse_config
from fundamentals.common import report, start
from fundamentals.optim import warmup_cosine
from fundamentals.rnn.cells import make_lstm
from training.data import get_corpus, split_text


@dataclass
class CharLMConfig:
    RANGES: ClassVar = {"block_size": AT_LEAST_1, "eval_streams": AT_LEAST_1, "eval_chars": AT_LEAST_0}
    CHOICES: ClassVar = {"cell": ("ours", "torch")}

    dataset: str = "tinyshakespeare"  # or a local .txt file
    cell: str = "ours"  # "ours" (cells.py, a Python loop over time) or "torch" (nn.LSTM, same math, fused)
    embed: int = 64  # character embedding width
    hidden: int = 256  # LSTM hidden size H
    layers: int = 1  # stacked LSTM layers
    block_size: int = 64  # characters per training window (backpropagation through time this far)
    batch_size: int = 32  # windows per step
    steps: int = 1000  # optimizer steps
    lr: float = 3e-3  # AdamW peak
    warmup_steps: int = 50  # linear warm-up, then cosine to lr/10
    grad_clip: float = 1.0  # clip the global gradient norm: recurrent gradients can spike
    eval_streams: int = 32  # validation runs as this many contiguous streams in parallel
    eval_chars: int = 0  # 0: the whole validation split; else only its first eval_chars (quick runs)
    seed: int = 0  # initial weights and the training windows
    # 1: on a 2-core machine shared with other jobs, a second thread that must wait for a busy core
    # made each step several times slower (see fundamentals/nn/train.py); on an idle machine try 2
    threads: int = 1  # torch's CPU threads (1: see the comment above)


PRESETS = {
    "default": CharLMConfig(),
    "tiny": CharLMConfig(embed=16, hidden=32, block_size=16, batch_size=8, steps=20, eval_chars=2000),
}


class CharLSTM(nn.Module):
    def __init__(self, vocab_size: int, cfg: CharLMConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.embed)
        self.lstm = make_lstm(cfg.cell, cfg.embed, cfg.hidden, cfg.layers)
        self.head = nn.Linear(cfg.hidden, vocab_size)

    def forward(self, ids: torch.Tensor, state=None):
        """ids (B, T) -> logits (B, T, V), the state after the last step."""
        h, state = self.lstm(self.embed(ids), state)  # (B, T, H)
        return self.head(h), state


@torch.no_grad()
def validation_nats_per_char(model: CharLSTM, ids: torch.Tensor, cfg: CharLMConfig) -> float:
    """Mean -log p(next char) over the split, read as eval_streams contiguous streams in chunks."""
    model.eval()
    n = (len(ids) - 1) // cfg.eval_streams
    streams = ids[: n * cfg.eval_streams + 1]
    x = streams[:-1].reshape(cfg.eval_streams, n)  # (S, n): stream s is the s-th slice of the text
    y = streams[1:].reshape(cfg.eval_streams, n)
    total, state = 0.0, None
    for t in range(0, n, 256):  # 256-character chunks; the state carries the context across them
        logits, state = model(x[:, t:t + 256], state)
        total += F.cross_entropy(logits.flatten(0, 1), y[:, t:t + 256].flatten(), reduction="sum").item()
    model.train()
    return total / y.numel()


@command_line
def main(argv=None) -> dict:
    cfg, out = parse_config(argv, PRESETS, "python -m fundamentals.rnn.train", __doc__)
    clock, g = start(cfg)
    corpus = get_corpus(cfg.dataset)
    chars = sorted(set(corpus.text))  # the vocabulary: every character of the corpus
    stoi = {ch: i for i, ch in enumerate(chars)}
    train_text, val_text = split_text(corpus.text)
    train_ids = torch.tensor([stoi[ch] for ch in train_text])
    val_ids = torch.tensor([stoi[ch] for ch in val_text[: cfg.eval_chars or None]])
    if len(train_ids) <= cfg.block_size or len(val_ids) <= cfg.eval_streams:
        raise ValueError(f"{corpus.name}: {len(train_ids)} training and {len(val_ids)} validation characters are too "
                         f"few for --block-size {cfg.block_size} and --eval-streams {cfg.eval_streams}")
    print(f"corpus {corpus.name} ({corpus.origin}): {len(train_ids):,} train / {len(val_ids):,} validation "
          f"characters, vocabulary {len(chars)}", flush=True)
    model = CharLSTM(len(chars), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    for step in range(cfg.steps):
        starts = torch.randint(0, len(train_ids) - cfg.block_size, (cfg.batch_size,), generator=g)
        window = torch.stack([train_ids[s:s + cfg.block_size + 1] for s in starts])  # (B, T+1)
        logits, _ = model(window[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.lr, cfg.lr / 10, cfg.warmup_steps, cfg.steps)
        opt.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            print(f"step {step}: train loss {loss.item():.4f} nats/char ({clock():.0f} s)", flush=True)
    val = validation_nats_per_char(model, val_ids, cfg)
    result = {"task": "char LSTM language model", "corpus": corpus.name, "val_nats_per_char": round(val, 4),
              "val_chars": len(val_ids), "train_loss_last": round(loss.item(), 4),
              "parameters": sum(p.numel() for p in model.parameters()), "seconds": clock(), "config": asdict(cfg)}
    report(out, result)
    return result


if __name__ == "__main__":
    main()
