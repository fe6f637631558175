"""The paged KV cache on the model's side: one pool of blocks per layer, and the cache object
that one forward pass of the engine hands to the model.

Paper: "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(Kwon et al., 2023, arXiv:2309.06180). Tested against the naive cache and against no cache
(tests/inference/test_engine.py), and its attention against a reference
(tests/inference/test_paged_attention.py).

A forward pass of the engine packs every scheduled sequence into one row: input_ids (1, N)
holds, sequence after sequence, the tokens whose K/V are not yet in the cache (a whole
prompt for a new sequence, one token for a decoding one). The model does not know; it sees
a cache that answers the same four calls as `NaiveKVCache`:
    positions(1, N)   each token's position within its own sequence, (1, N)
    max_length()      None: lengths are per sequence, and the engine checked them at submission
    attend(l, q, k, v) writes this step's K/V into their slots of layer l's pool, then attends
    advance(N)        nothing: the block manager did the bookkeeping before the pass
Architectures that keep other state per token (DeepSeek's latent vectors) or per sequence
(Mamba-2's recurrent state) would read the same metadata (`seq_index`, `query_start`) to
find their sequence; notes/paged-attention.md says how.

Block `num_blocks` of the pool (one past the blocks the block manager hands out) is scratch:
padding rows of a CUDA-graph batch write there, so they never touch a sequence's blocks.
"""

from __future__ import annotations

import array
import math
from dataclasses import dataclass

import torch

from inference.paged_attention import attention_mask, paged_attention, paged_attention_reference


class PagedKVPool:
    """K and V for every layer: (layers, 2, num_blocks + 1, block_size, K, d), allocated once."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks
        self.kv = torch.zeros(num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim,
                              dtype=dtype, device=device)

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int) -> "PagedKVPool":
        cfg, p = model.config, next(model.parameters())
        return cls(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                   p.dtype, p.device)

    @staticmethod
    def bytes_per_block(model, block_size: int) -> int:
        cfg, p = model.config, next(model.parameters())
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * p.element_size()

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each (num_blocks + 1, block_size, K, d)."""
        return self.kv[layer, 0], self.kv[layer, 1]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst becomes a copy of block src, in every layer, in one indexed copy."""
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.kv[:, :, dst] = self.kv[:, :, src]


@dataclass
class ScheduledSeq:
    """One sequence in a forward pass: compute K/V (and logits) for token positions start .. end-1."""
    block_table: list[int]
    start: int
    end: int


@dataclass
class StepMetadata:
    """Index tensors of one forward pass, built on the host once per step (never per layer).

    N packed tokens, B sequences, Tmax the most new tokens of one sequence, nb the longest table.
    """
    input_ids: torch.Tensor  # (1, N) the tokens to compute, sequence after sequence
    positions: torch.Tensor  # (1, N) position of each token within its sequence
    slot_mapping: torch.Tensor  # (N,) flat slot (block * bs + offset) each token's K/V is written to
    block_tables: torch.Tensor  # (B, nb) physical blocks of each sequence, padded with the scratch block
    q_index: torch.Tensor  # (B, Tmax) packed index of sequence b's t-th new token (0 for padding)
    q_pos: torch.Tensor  # (B, Tmax) its position (0 for padding)
    out_index: torch.Tensor  # (N,) b * Tmax + t for each packed token
    last_index: torch.Tensor  # (B,) packed index of each sequence's last token: its logits are sampled
    seq_index: torch.Tensor  # (N,) which sequence each packed token belongs to
    query_start: torch.Tensor  # (B,) packed index of each sequence's first new token

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shapes: list[tuple]) -> "StepMetadata":
        """Views into one flat tensor (what `host_metadata` returns), in field order."""
        views, i = [], 0
        for shape in shapes:
            n = math.prod(shape)
            views.append(flat[i:i + n].view(shape))
            i += n
        return cls(*views)


def host_metadata(seqs: list[ScheduledSeq], token_ids: list[int], block_size: int, scratch_block: int,
                  pad_batch_to: int | None = None, pad_blocks_to: int | None = None) -> tuple[torch.Tensor, list]:
    """Every StepMetadata field, flattened into one CPU tensor (so one copy moves it to the GPU), and
    the fields' shapes. A step with prompts is built with vectorised torch ops (no Python loop over
    tokens); a decode-only step, one token per sequence, from plain lists, which is faster for it.

    pad_batch_to / pad_blocks_to pad B and nb for a CUDA graph of fixed shape: padding rows
    are one-token sequences at position 0 whose single block is the scratch block.
    """
    decode_only = all(s.end - s.start == 1 for s in seqs)
    build = _decode_metadata if decode_only else _packed_metadata
    return build(seqs, token_ids, block_size, scratch_block, pad_batch_to, pad_blocks_to)


def _packed_metadata(seqs: list[ScheduledSeq], token_ids: list[int], block_size: int, scratch_block: int,
                     pad_batch_to: int | None, pad_blocks_to: int | None) -> tuple[torch.Tensor, list]:
    """`host_metadata` of any step: sequences with any number of new tokens, packed."""
    B, bs = len(seqs), block_size
    Bp = pad_batch_to or B
    starts = torch.tensor([s.start for s in seqs] + [0] * (Bp - B))  # (Bp,)
    q_lens = torch.tensor([s.end - s.start for s in seqs] + [1] * (Bp - B))  # (Bp,)
    nb = max(pad_blocks_to or 0, max(len(s.block_table) for s in seqs))
    rows = [s.block_table + [scratch_block] * (nb - len(s.block_table)) for s in seqs]
    tables = torch.tensor(rows + [[scratch_block] * nb] * (Bp - B))  # (Bp, nb)
    ids = torch.tensor(token_ids + [0] * (Bp - B))  # (N,)
    N, Tmax = int(q_lens.sum()), int(q_lens.max())
    seq_index = torch.repeat_interleave(torch.arange(Bp), q_lens)  # (N,)
    query_start = torch.cumsum(q_lens, 0) - q_lens  # (Bp,)
    t_in_seq = torch.arange(N) - query_start[seq_index]  # (N,)
    pos = starts[seq_index] + t_in_seq  # (N,)
    slot = tables[seq_index, pos // bs] * bs + pos % bs  # (N,)
    t = torch.arange(Tmax)
    valid = t[None] < q_lens[:, None]  # (Bp, Tmax)
    q_index = torch.where(valid, query_start[:, None] + t, 0)
    q_pos = torch.where(valid, starts[:, None] + t, 0)
    out_index = seq_index * Tmax + t_in_seq
    last_index = query_start + q_lens - 1
    parts = [ids[None], pos[None], slot, tables, q_index, q_pos, out_index, last_index, seq_index, query_start]
    return torch.cat([p.reshape(-1) for p in parts]), [tuple(p.shape) for p in parts]


def _decode_metadata(seqs: list[ScheduledSeq], token_ids: list[int], bs: int, scratch_block: int,
                     pad_batch_to: int | None, pad_blocks_to: int | None) -> tuple[torch.Tensor, list]:
    """`host_metadata` of a decode-only step, the engine's commonest, in plain Python lists and one
    tensor: the general path's ~25 small torch ops take several times as long on the host, and
    between CUDA-graph steps the GPU waits for the host. With one token per sequence, N = B and
    Tmax = 1, so every packing map is the identity. tests/inference/test_paged_attention.py checks
    it equals the general path."""
    B = len(seqs)
    Bp = pad_batch_to or B
    nb = max(pad_blocks_to or 0, max(len(s.block_table) for s in seqs))
    pos = [s.start for s in seqs] + [0] * (Bp - B)  # (Bp,) the new token's position
    tables = [x for s in seqs for x in s.block_table + [scratch_block] * (nb - len(s.block_table))]
    tables += [scratch_block] * (nb * (Bp - B))  # (Bp * nb,)
    slot = [tables[b * nb + p // bs] * bs + p % bs for b, p in enumerate(pos)]  # (Bp,)
    ids = list(token_ids) + [0] * (Bp - B)
    ar = list(range(Bp))
    # Field order of StepMetadata: input_ids, positions, slot_mapping, block_tables, q_index,
    # q_pos, out_index, last_index, seq_index, query_start.
    # Through array.array: torch.tensor(list) converts the ~3k ints one by one, several times slower.
    flat = torch.frombuffer(array.array("q", ids + pos + slot + tables + ar + pos + ar + ar + ar + ar),
                            dtype=torch.int64)
    shapes = [(1, Bp), (1, Bp), (Bp,), (Bp, nb), (Bp, 1), (Bp, 1), (Bp,), (Bp,), (Bp,), (Bp,)]
    return flat, shapes


def build_metadata(seqs: list[ScheduledSeq], token_ids: list[int], block_size: int, scratch_block: int,
                   device) -> StepMetadata:
    flat, shapes = host_metadata(seqs, token_ids, block_size, scratch_block)
    return StepMetadata.from_flat(flat.to(device), shapes)


class PagedBatch:
    """The cache object the model receives for one forward pass of the paged engine.

    attention="gather" is the batched `paged_attention` for every step (CPU and GPU);
    "triton" runs decode-only steps (one new token per sequence) through the Triton kernel of
    inference/triton_paged_attention.py, which reads K/V in place, and other steps (prefills,
    mixed) through the gather; "reference" runs `paged_attention_reference`, the slow oracle,
    for tests.
    """

    def __init__(self, pool: PagedKVPool, meta: StepMetadata, attention: str = "gather",
                 seqs: list[ScheduledSeq] | None = None):
        if attention not in ("gather", "triton", "reference"):
            raise ValueError(f"attention must be 'gather', 'triton' or 'reference', got {attention!r}")
        if attention == "reference" and seqs is None:
            raise ValueError("the reference attention walks the block tables: pass seqs")
        self.pool, self.meta, self.attention, self.seqs = pool, meta, attention, seqs
        # Tmax == 1: every sequence brings exactly one token, a decode-only step (known from a shape,
        # so deciding costs no host synchronisation and a CUDA graph captures one branch).
        self.decode_kernel = attention == "triton" and meta.q_index.shape[1] == 1
        self.mask = self.context_lens = None

    def positions(self, batch_size: int, seq_len: int, device) -> torch.Tensor:
        N = self.meta.positions.shape[1]
        if batch_size != 1 or seq_len != N:
            raise ValueError(f"the paged cache expects the step's {N} tokens packed as input_ids of shape (1, {N}), "
                             f"got ({batch_size}, {seq_len})")
        # Built here, once per forward pass, so that every layer shares it (and a CUDA graph captures it).
        if self.decode_kernel:
            self.context_lens = self.meta.positions[0] + 1  # (B,): the new token sees itself and all before it
        else:
            # The additive mask SDPA would otherwise rebuild from a boolean one in every layer.
            allowed = attention_mask(self.meta.q_pos, self.meta.block_tables.shape[1] * self.pool.block_size)
            self.mask = torch.zeros(allowed.shape, dtype=self.pool.kv.dtype, device=allowed.device)
            self.mask.masked_fill_(~allowed, float("-inf"))  # (B, Tmax, S): 0 where visible, -inf elsewhere
        return self.meta.positions

    def max_length(self) -> None:
        return None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (1, H, N, d); k, v: (1, K, N, d) -> (1, H, N, d)
        k_cache, v_cache = self.pool.layer(layer)  # (num_blocks + 1, bs, K, d)
        K, d = k_cache.shape[2], k_cache.shape[3]
        # Write first, then read: every slot of this step is in place before any query looks.
        k_cache.view(-1, K, d).index_copy_(0, self.meta.slot_mapping, k[0].transpose(0, 1))  # (N, K, d)
        v_cache.view(-1, K, d).index_copy_(0, self.meta.slot_mapping, v[0].transpose(0, 1))
        q_tok = q[0].transpose(0, 1)  # (N, H, d)
        m = self.meta
        if self.decode_kernel:  # N == B: query b is sequence b's one new token
            from inference.triton_paged_attention import paged_decode_attention  # imports triton: GPU only

            out = paged_decode_attention(q_tok, k_cache, v_cache, m.block_tables, self.context_lens)
        elif self.attention == "reference":
            out = paged_attention_reference(q_tok, k_cache, v_cache, [s.block_table for s in self.seqs],
                                            [s.end for s in self.seqs], [s.end - s.start for s in self.seqs])
        else:
            out = paged_attention(q_tok, k_cache, v_cache, m.block_tables, m.q_index, m.out_index, self.mask)
        return out.transpose(0, 1)[None]  # (1, H, N, d)

    def advance(self, seq_len: int) -> None:
        pass
