"""A toy language-modelling problem shared by the training-loop tests and the DDP worker:
a 2-layer Llama 3 on a shuffled cycle through a 40-token vocabulary (each token determines
the next, so the loss falls within a few dozen steps)."""

import torch

from architectures.llama3 import Llama3, LlamaConfig
from training.trainer import TrainConfig

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
