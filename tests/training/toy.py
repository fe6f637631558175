"""A toy language-modelling problem shared by the training-loop tests and the DDP worker:
a 2-layer Llama 3 on a shuffled cycle through a 40-token vocabulary (each token determines
the next, so the loss falls within a few dozen steps). `masked_batch` and
`summed_loss_with_reference` are its post-training variant: rows with different numbers of
supervised targets, and a loss that reads a frozen reference model and counts its tokens."""

import torch
import torch.nn.functional as F

from architectures.llama3 import Llama3, LlamaConfig
from training.loss_protocol import NUM_TOKENS
from training.train_config import TrainConfig

VOCAB, BLOCK = 40, 16
CORPUS = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0)).repeat(125)


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return Llama3(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              dropout=dropout))


def sample_batch(split, n, generator):
    data = CORPUS[:4000] if split == "train" else CORPUS[4000:]
    starts = torch.randint(0, len(data) - BLOCK - 1, (n,), generator=generator)
    x = torch.stack([data[s: s + BLOCK] for s in starts.tolist()])
    y = torch.stack([data[s + 1: s + BLOCK + 1] for s in starts.tolist()])
    return x, y


def config(**kw):
    base = dict(max_steps=12, batch_size=8, block_size=BLOCK, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                eval_interval=6, eval_batches=2, log_interval=1, device="cpu")
    return TrainConfig(**{**base, **kw})


def masked_batch(split, n, generator):
    """The toy batch with the first targets of each row masked (-100), as SFT masks a prompt:
    row i supervises its last 2i + 1 targets (capped at the row), so in a batch of 8, rows 0-3
    hold 16 supervised targets and rows 4-7 hold 48."""
    x, y = sample_batch(split, n, generator)
    y = y.clone()
    for i in range(n):
        y[i, : max(0, BLOCK - (2 * i + 1))] = -100
    return x, y


def summed_loss_with_reference(model, batch, frozen):
    """Cross-entropy plus 0.1 x KL(model || reference) per token, SUMMED over the supervised
    targets, with their count: the shape of a distillation or DPO loss on the loop's hooks."""
    x, y = batch
    logits = model(x).float()  # (B, T, V)
    with torch.no_grad():
        ref = frozen["reference"](x).float()  # (B, T, V)
    mask = y != -100  # (B, T)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    kl = F.kl_div(ref.log_softmax(-1), logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)  # (B, T)
    return ce + 0.1 * (kl * mask).sum(), {NUM_TOKENS: mask.sum()}
