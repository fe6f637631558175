"""CUDA graphs for the decode-only steps of the paged engine.

A decode step of a 1B model is a few milliseconds of GPU work spread over about a thousand
small kernels; launched one by one from Python, the launches, not the GPU, set the pace.
A CUDA graph records the launches of one forward pass once and replays them with a single
call (NVIDIA, "CUDA Graphs", CUDA C++ Programming Guide; the same idea as vLLM's
CUDAGraphRunner). A graph replays fixed shapes at fixed addresses, so:
- inputs live in one static buffer that each step overwrites (`StepMetadata.from_flat` views);
- the batch is padded to a bucket of sizes (padding rows compute into the scratch block), and
  block tables to a multiple of `block_step` blocks: one graph per (batch bucket, table bucket),
  captured the first time it is needed;
- nothing inside may synchronise with the host (the model skips its token-id check while a
  graph is being captured; the engine checked the ids at submission).
Tests (tests/inference/test_paged_attention.py): the padded batch a graph replays, run eagerly on
the CPU, gives the real rows' logits unchanged; on a GPU, graph decode gives the same tokens as
eager decode and as no cache.
"""

from __future__ import annotations

import warnings

import torch

from inference.kv_pool import PagedKVPool
from inference.paged_cache import PagedBatch
from inference.step_metadata import ScheduledSeq, StepMetadata, TableRows, host_metadata


def _buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 16, 16))
    return sorted({min(s, max_batch) for s in sizes})


class DecodeGraphs:
    def __init__(self, model, pool: PagedKVPool, max_batch: int, attention: str = "gather", block_step: int = 16):
        if pool.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {pool.device}")
        self.model, self.pool, self.attention, self.block_step = model, pool, attention, block_step
        self.batch_sizes = _buckets(max_batch)
        self.graphs: dict[tuple[int, int], tuple] = {}  # (Bp, nb) -> (graph, static flat input, logits)
        self.mempool = torch.cuda.graph_pool_handle()  # one memory pool shared by every graph
        self.table_rows = TableRows()  # the last step's block-table rows, reused where unchanged
        self.enabled = True

    def can_run(self, seqs: list[ScheduledSeq]) -> bool:
        return self.enabled and len(seqs) <= self.batch_sizes[-1] and all(s.end - s.start == 1 for s in seqs)

    def run(self, seqs: list[ScheduledSeq], token_ids: list[int]) -> torch.Tensor | None:
        """Logits (B, V) of a decode step, or None if capture failed (the caller then runs eagerly)."""
        B = len(seqs)
        Bp = next(s for s in self.batch_sizes if s >= B)
        nb = -(-max(len(s.block_table) for s in seqs) // self.block_step) * self.block_step
        flat, shapes = host_metadata(seqs, token_ids, self.pool.block_size, self.pool.scratch_block, Bp, nb,
                                     self.table_rows)
        if (Bp, nb) not in self.graphs:
            try:
                self.graphs[(Bp, nb)] = self._capture(flat, shapes)
            except Exception as e:  # an op that cannot be captured: fall back to eager, loudly, once
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly from now on")
                self.enabled = False
                torch.cuda.synchronize()
                return None
        graph, static, logits = self.graphs[(Bp, nb)]
        static.copy_(flat, non_blocking=True)
        graph.replay()
        return logits[:B]  # (B, V); valid until the next replay

    def _capture(self, flat: torch.Tensor, shapes: list) -> tuple:
        static = flat.to(self.pool.device)
        batch = PagedBatch(self.pool, StepMetadata.from_flat(static, shapes), self.attention)
        # Warm up on a side stream first (lazy initialisation, e.g. cuBLAS workspaces, must not be
        # captured). It writes the same K/V the replay will write, so it changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._decode(batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            logits = self._decode(batch)  # (Bp, V), a static output
        return graph, static, logits

    def _decode(self, batch: PagedBatch) -> torch.Tensor:
        hidden = self.model.hidden_states(batch.meta.input_ids, cache=batch)  # (1, Bp, D)
        return self.model.compute_logits(hidden[0, batch.meta.last_index])  # (Bp, V)
