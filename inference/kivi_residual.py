"""int4 (KIVI) in the paged cache: a block fills in full precision, then is quantized whole.

KIVI ("KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Liu et al., 2024,
arXiv:2402.02750; the format is `KVFormat` in inference/quantized_kv.py) quantizes keys per channel
over a group of G tokens, and in the paged engine a group is a block (G = bs). A block can be
quantized only once its bs tokens exist, so each running sequence keeps the tokens of its last,
unfilled block in full precision, in its *residual*: a slot of the pool (`PagedKVPool.residual`,
{name: (num_state_slots, bs, *shape)} per layer), indexed by the sequence's state slot as a Mamba
state is. One step's bookkeeping, `KiviResidual`, is shared by every layer of the pass:
- write: each sequence's *work row* is its residual followed by its new tokens; the row's complete
  blocks are quantized into their blocks of the pool, and its last, partial block becomes the new
  residual;
- read: the gather lays each sequence's residual over the block it belongs to (whose stored codes are
  stale until it fills), and so does the reference over the whole dequantized pool; the int4 decode
  kernel (inference/triton_kivi_attention.py) reads the residual itself.
Tested against the naive int4 cache, which keeps its residual the same way, and against KIVI's
definition: tests/inference/test_quantized_kv.py.
"""

from __future__ import annotations

import torch

from inference.kv_pool import PagedKVPool, index_copy
from inference.step_metadata import ScheduledSeq


class KiviResidual:
    """The int4 writes and residual reads of one forward pass, over `pool` for the scheduled `seqs`.

    slots (B,): each sequence's state slot, on `device`, where its residual lives."""

    def __init__(self, pool: PagedKVPool, seqs: list[ScheduledSeq], slots: torch.Tensor, device):
        self.pool, self.seqs, self.slots, self.device = pool, seqs, slots, device
        self._index: dict | None = None  # built by the first layer that needs it (`index`)

    def index(self) -> dict:
        """Index tensors shared by every layer's int4 write and read, built on the host once per step.

        Sequence b computes positions start .. end - 1; its residual holds positions g0 * bs .. start - 1,
        g0 = start // bs. Its work row, W blocks long, holds positions g0 * bs on: the residual, then the new
        tokens. Its first `full` blocks are complete after the step and are quantized into their blocks;
        block `full` of the row, partial or empty, becomes the new residual."""
        if self._index is None:
            bs = self.pool.block_size
            start = torch.tensor([s.start for s in self.seqs])  # (B,)
            end = torch.tensor([s.end for s in self.seqs])
            first = torch.cumsum(end - start, 0) - (end - start)  # packed index of each sequence's first new token
            g0, r0 = start // bs, start % bs
            full = end // bs - g0  # (B,) blocks of the row that are complete
            W = int(full.max()) + 1
            w = torch.arange(W * bs)  # (W * bs,) slot of the work row
            from_residual = w[None] < r0[:, None]  # (B, W * bs)
            new_index = (first[:, None] + w[None] - r0[:, None]).clamp(0, int(end.sum() - start.sum()) - 1)
            j = torch.arange(W)
            nb = max(len(s.block_table) for s in self.seqs)
            tables = torch.tensor([s.block_table + [self.pool.scratch_block] * (nb - len(s.block_table))
                                   for s in self.seqs])  # (B, nb)
            block = tables.gather(1, (g0[:, None] + j[None]).clamp(max=nb - 1))  # (B, W)
            block = torch.where(j[None] < full[:, None], block, self.pool.scratch_block)  # incomplete: to scratch
            partial = end % bs != 0
            self._index = {name: t.to(self.device) for name, t in dict(
                from_residual=from_residual, new_index=new_index, block=block.reshape(-1),
                residual_src=full[:, None] * bs + torch.arange(bs)[None],  # (B, bs): row slots of the new residual
                last_block=(end // bs).clamp(max=nb - 1), partial=partial).items()}
            self._index["fills_a_block"] = bool(full.max() > 0)  # host-side: most decode steps fill none
        return self._index

    def write(self, layer: int, new: dict[str, torch.Tensor]) -> None:
        """new: {name: (1, N, *shape)}, the step's packed tokens of `layer`: complete blocks to the pool, quantized;
        each sequence's unfilled rest to its residual."""
        ix, fmt, bs = self.index(), self.pool.format, self.pool.block_size
        stored = self.pool.layer(layer)
        B = len(self.seqs)
        for name, t in new.items():
            residual = self.pool.residual[layer][name]  # (slots, bs, *shape)
            shape = t.shape[2:]
            held = residual[self.slots]  # (B, bs, *shape)
            Wbs = ix["from_residual"].shape[1]
            from_res = held[:, torch.arange(Wbs, device=t.device).clamp(max=bs - 1)]  # (B, W * bs, *shape)
            row = torch.where(ix["from_residual"].view(B, Wbs, *[1] * len(shape)), from_res, t[0][ix["new_index"]])
            # No block complete (most decode steps): every group would go to the scratch block, so skip encoding.
            for part, codes in (fmt.encode(name, row, len(shape)) if ix["fills_a_block"] else {}).items():
                cache = stored[part]  # (num_blocks + 1, 1, *part)
                index_copy(cache.view(-1, *cache.shape[2:]), ix["block"], codes.flatten(0, 1))
            rows = torch.arange(B, device=t.device)[:, None]
            residual.index_copy_(0, self.slots, row[rows, ix["residual_src"]])

    def lay_over_gathered(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """x: (B, S, *shape) the gathered blocks of `name`, dequantized; each sequence whose last block is
        unfilled gets that block's tokens from its residual (in place; returns x)."""
        ix, bs = self.index(), self.pool.block_size
        residual = self.pool.residual[layer][name]
        B = x.shape[0]
        blocks = x.view(B, -1, bs, *x.shape[2:])  # (B, nb, bs, *shape)
        rows = torch.arange(B, device=x.device)
        now = blocks[rows, ix["last_block"]]  # (B, bs, *shape)
        keep = ix["partial"].view(B, *[1] * (now.dim() - 1))
        blocks[rows, ix["last_block"]] = torch.where(keep, residual[self.slots], now)
        return x

    def lay_over_pool(self, layer: int, pool: dict[str, torch.Tensor]) -> None:
        """pool: {name: (num_blocks + 1, bs, *shape)}, every block of `layer` dequantized (the reference's view):
        each scheduled sequence's residual goes into the block it belongs to."""
        bs = self.pool.block_size
        for name, res in self.pool.residual.get(layer, {}).items():
            for s in self.seqs:
                if s.end % bs:
                    pool[name][s.block_table[s.end // bs]] = res[s.state_slot]
