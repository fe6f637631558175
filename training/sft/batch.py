"""SFT's batch: conversations as rows of token ids, with the loss on the assistant's tokens only.

A conversation renders to ids and a mask of the assistant's tokens (training/chat.py). A row's
labels are the next ids where the next id is the assistant's and -100 elsewhere, so the prompt,
the role headers and the padding carry no loss:

    ids      <|bos|> <|user|> What is 2 + 2 ? <|eos|> <|assistant|>  4   <|eos|>
    labels     -100    -100  -100 ...           -100        4     <|eos|>  -100

Packing. Instruction data is short (an arithmetic conversation is about 20 tokens) and one
conversation per row of 128 wastes most of the row on padding. Packing puts several whole
conversations in one row, and then two things must hold for the packed row to compute what the
separate rows would (tests/training/sft/test_sft.py checks the losses are equal):
- attention does not cross conversations: token t sees token s only if both belong to the same
  conversation and s <= t (a block-diagonal causal mask);
- positions restart at 0 with every conversation, so RoPE sees each one as it would alone.
`PackedRows` gives the model both through the seam attention already has for caches: it answers
the `Cache` protocol (architectures/common/cache.py) with the packed positions and a view whose
mask is block-diagonal, and keeps this call's keys and values (with their gradients), so every
attention layer of every family attends within conversations without a line of model code knowing
about packing. A layer with a recurrent state (Mamba-2) cannot restart it mid-row: packing refuses it.

A batch is a dict: input_ids (n, T), labels (n, T), and when packed doc_ids (n, T) (which
conversation each position belongs to; -1 for padding) and positions (n, T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from architectures.common.cache import CacheView
from training.chat import ChatFormat
from architectures.common.loss import IGNORE_INDEX


@dataclass
class Encoded:
    ids: list[int]  # the rendered conversation
    trained: list[bool]  # whether each id is the assistant's (content and end-of-turn)


def encode_all(conversations: list, fmt: ChatFormat, block_size: int, name: str = "conversation") -> list[Encoded]:
    """Render every conversation; one longer than a row (block_size inputs + 1 target) is an error."""
    out = []
    for i, conv in enumerate(conversations):
        ids, trained = fmt.render(conv, f"{name} {i}")
        if len(ids) > block_size + 1:
            raise ValueError(f"{name} {i} renders to {len(ids)} tokens, more than a row holds (block_size "
                             f"{block_size} inputs + 1 target); raise --block-size (up to the model's context) or "
                             f"drop the conversations longer than {block_size + 1} tokens")
        out.append(Encoded(ids, trained))
    return out


def pack(rows: list[list[Encoded]], block_size: int, pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """rows[i] = the conversations of row i -> the batch dict. Unpacked rows hold one conversation
    each and are padded to the longest; packed rows are block_size long."""
    width = block_size if packed else max(len(c.ids) for r in rows for c in r) - 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    doc = torch.full((len(rows), width), -1, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, convs in enumerate(rows):
        start = 0
        for d, c in enumerate(convs):
            n = len(c.ids)
            if start + n - 1 > width:
                raise ValueError(f"row {r} packs {start + n - 1} input tokens, more than block_size {width}")
            # inputs are the conversation's ids but its last; each input's label is the id after it,
            # kept only where that id is the assistant's.
            ids[r, start:start + n - 1] = torch.tensor(c.ids[:-1])
            target = torch.tensor(c.ids[1:])
            labels[r, start:start + n - 1] = torch.where(torch.tensor(c.trained[1:]), target, IGNORE_INDEX)
            doc[r, start:start + n - 1] = d
            pos[r, start:start + n - 1] = torch.arange(n - 1)
            start += n - 1
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch.update(doc_ids=doc, positions=pos)
    return batch


class SFTBatches:
    """The loop's `sample_batch(split, n, generator)` over encoded train / validation conversations.

    Each row draws conversations at random (from the generator, so a batch depends only on the
    seed and the step) and, when packing, keeps adding them while the next one fits."""

    def __init__(self, train: list[Encoded], val: list[Encoded], block_size: int, pad_id: int, packed: bool = True):
        if not train or not val:
            raise ValueError(f"SFT needs training and validation conversations, got {len(train)} and {len(val)}")
        self.splits = {"train": train, "val": val}
        self.block_size, self.pad_id, self.packed = block_size, pad_id, packed

    def rows(self, split: str, n: int, generator: torch.Generator) -> list[list[Encoded]]:
        pool = self.splits[split]
        draw = lambda: pool[int(torch.randint(len(pool), (1,), generator=generator))]  # noqa: E731
        rows, nxt = [], draw()
        for _ in range(n):
            row, used = [nxt], len(nxt.ids) - 1
            nxt = draw()
            while self.packed and used + len(nxt.ids) - 1 <= self.block_size:
                row.append(nxt)
                used += len(nxt.ids) - 1
                nxt = draw()
            rows.append(row)
        return rows

    def __call__(self, split: str, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return pack(self.rows(split, n, generator), self.block_size, self.pad_id, self.packed)


class PackedRows:
    """The `Cache` protocol for one training forward pass over packed rows: positions restart per
    conversation and each layer's queries see the keys of their own conversation, up to themselves.

    It stores this call's tensors as they are (no copy, no no_grad), so gradients flow through them
    exactly as through attention without a cache."""

    def __init__(self, doc_ids: torch.Tensor, positions: torch.Tensor):
        self.pos = positions  # (B, T)
        same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
        causal = torch.ones(doc_ids.shape[1], doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device).tril()
        self.mask = same & causal  # (B, T, S=T), True = visible; padding (-1) sees only padding
        self.stored: dict[int, dict[str, torch.Tensor]] = {}

    def positions(self, batch_size: int, seq_len: int, device) -> torch.Tensor:
        if (batch_size, seq_len) != tuple(self.pos.shape):
            raise ValueError(f"packed positions are {tuple(self.pos.shape)}, the model got ({batch_size}, {seq_len})")
        return self.pos

    def max_length(self) -> int:
        return 0  # nothing before this call

    def write(self, layer: int, **new: torch.Tensor) -> None:
        self.stored[layer] = new

    def read(self, layer: int) -> CacheView:
        if layer not in self.stored:  # a layer that stores nothing per token keeps a state instead
            self.state(layer)
        return CacheView(tensors=self.stored[layer], mask=self.mask)

    def state(self, layer: int) -> dict[str, torch.Tensor]:
        raise ValueError(f"layer {layer} carries a recurrent state from token to token, which cannot restart at "
                         f"each conversation of a packed row; train this model with --pack false")

    def advance(self, seq_len: int) -> None:
        self.stored.clear()  # the forward pass is over; autograd keeps what backward needs
