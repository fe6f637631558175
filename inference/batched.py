"""Static batching with the naive KV cache: what a first batched implementation does.

All prompts are left-padded to the longest and go through the model together; the batch
then decodes in lock-step, one token per row per step, until every row is done. A row that
stopped early keeps its slots and keeps being computed (its outputs are thrown away), and
no new prompt can join until the whole batch ends. `BatchStats` records what that costs:
slots reserved versus slots holding tokens that some unfinished sequence still needs.

This is the baseline the paged engine (inference/engine.py) is measured against, in the
same process, by inference/benchmarks/throughput.py; tests/inference/test_engine.py checks that both
give the same greedy tokens as recomputing without a cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from architectures.utils.command_line import UserTypeError
from inference.kv_cache import NaiveKVCache
from inference.sampling import SamplingParams, check_prompt_ids, eos_ids, sample_next


@dataclass
class BatchStats:
    slots_allocated: int = 0  # B x capacity, reserved up front
    kv_bytes: int = 0  # bytes of the K/V buffers
    prefill_tokens: int = 0  # token positions the prefill computed, padding included
    util_per_step: list[float] = field(default_factory=list)  # live tokens / slots allocated, at each forward pass

    @property
    def mean_utilisation(self) -> float:
        return sum(self.util_per_step) / max(len(self.util_per_step), 1)


def _stop_ids(model, params: SamplingParams) -> set[int]:
    return set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids(model.config.eos_token_id))


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams(),
                   stats: BatchStats | None = None, kv_dtype: str | None = None) -> list[list[int]]:
    """New tokens for each prompt, decoded as one left-padded static batch with a naive cache
    (storing K/V as `kv_dtype` says, inference/quantized_kv.py; None: in the model's dtype).

    `params` is one SamplingParams for every prompt or one per prompt; row i draws from its own
    generator seeded with its params' seed, as `inference.generate.generate` would, so a row's
    tokens do not depend on which other prompts share its batch.
    """
    if isinstance(prompts, (str, bytes)):
        raise UserTypeError(f"prompts must be a list of prompts, each a list of token ids, got "
                            f"{type(prompts).__name__} {prompts[:40]!r}; encode the texts with the tokenizer first")
    for i, p in enumerate(prompts):
        check_prompt_ids(p, f"prompts[{i}]")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's bos id)")
    params = params if isinstance(params, list) else [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one, or one per prompt")
    if any(p.n != 1 for p in params):
        raise ValueError("the naive batch decodes one completion per prompt; use inference.engine.LLMEngine for n > 1")
    B, longest = len(prompts), max(len(p) for p in prompts)
    steps = max(p.max_new_tokens for p in params)
    limit = model.config.max_position_embeddings
    if longest + steps > limit:
        raise ValueError(f"longest prompt ({longest} tokens) + max_new_tokens={steps} exceeds the model's "
                         f"max_position_embeddings={limit}; shorten the prompts or lower max_new_tokens")
    device = next(model.parameters()).device
    pad = [longest - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad[b] + prompts[b] for b in range(B)], device=device)  # (B, longest)
    cache = NaiveKVCache.for_model(model, B, longest + steps, pad, kv_dtype=kv_dtype)
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
    stops = [_stop_ids(model, p) for p in params]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [p.max_new_tokens == 0 for p in params]
    if stats is not None:
        stats.slots_allocated, stats.kv_bytes = B * cache.capacity, cache.nbytes()
        stats.prefill_tokens = B * longest

    def record(k: int) -> None:  # after forward pass k: unfinished rows hold their prompt + k tokens
        if stats is not None:
            live = sum(len(prompts[b]) + k for b in range(B) if not done[b])
            stats.util_per_step.append(live / stats.slots_allocated)

    # (B, V): the prefill, every row padded to the longest; the head runs on the last position only.
    logits = model.compute_logits(model.hidden_states(ids, cache=cache)[:, -1])
    record(0)
    k = 0
    while not all(done):
        greedy = all(p.temperature == 0 for p in params)
        # One argmax for the whole batch when every row is greedy; otherwise each row samples
        # with its own generator, exactly as a single-prompt run would.
        tokens = logits.float().argmax(-1).tolist() if greedy else [
            int(sample_next(logits[b:b + 1], params[b], gens[b])) for b in range(B)]
        for b in range(B):
            if not done[b]:
                out[b].append(tokens[b])
                done[b] = tokens[b] in stops[b] or len(out[b]) >= params[b].max_new_tokens
        if all(done):
            break
        # Finished rows still go through the model (static batching): feed them any valid token.
        nxt = torch.tensor([[tokens[b] if not done[b] else 0] for b in range(B)], device=device)  # (B, 1)
        logits = model.compute_logits(model.hidden_states(nxt, cache=cache)[:, -1])
        k += 1
        record(k)
    return out
