"""Autoregressive generation for any architecture of the zoo: prefill the prompt, then decode
one token at a time, with or without a KV cache, streaming tokens as they are produced."""

from __future__ import annotations

from typing import Iterator

import torch

from inference.kv_cache import NaiveKVCache
from inference.sampling import SamplingParams, check_prompt_ids, sample_next


def stream(model, prompt_ids: list[int], params: SamplingParams = SamplingParams(), stop_ids=(),
           use_cache: bool = True, kv_dtype: str | None = None) -> Iterator[int]:
    """Yield new token ids one by one; stops after max_new_tokens or on a token in stop_ids.
    kv_dtype: how the cache stores K/V (None: the model's dtype; "int8", "fp8", "int4": quantized,
    inference/quantized_kv.py).

    The arguments are checked when `stream` is called, not at the first `next()`, so a bad
    request fails where it was made."""
    check_prompt_ids(prompt_ids)
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's bos id)")
    if params.n != 1:
        raise ValueError(f"stream makes one completion, got n={params.n}; use inference.engine.LLMEngine for n > 1")
    stop_ids = set(stop_ids) | set(params.stop_token_ids)
    limit = model.config.max_position_embeddings
    if len(prompt_ids) + params.max_new_tokens > limit:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds the "
            f"model's max_position_embeddings={limit}; shorten the prompt or lower max_new_tokens"
        )
    cache = None
    if use_cache:  # made here, so that a bad kv_dtype fails where the request was made
        cache = NaiveKVCache.for_model(model, 1, len(prompt_ids) + params.max_new_tokens, kv_dtype=kv_dtype)
    elif kv_dtype is not None:
        raise ValueError(f"kv_dtype={kv_dtype!r} sets how a cache stores K/V, and use_cache=False keeps none")
    return _tokens(model, prompt_ids, params, stop_ids, cache)


@torch.no_grad()
def _tokens(model, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int],
            cache: NaiveKVCache | None) -> Iterator[int]:
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(params.seed) if params.seed is not None else None
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    use_cache = cache is not None
    # The head runs on the last position only: the prompt's other logits would never be used.
    logits = model.compute_logits(model.hidden_states(ids, cache=cache)[:, -1])  # prefill: (1, V)
    for i in range(params.max_new_tokens):
        token = sample_next(logits, params, generator)  # (1,)
        yield int(token)
        if int(token) in stop_ids or i == params.max_new_tokens - 1:
            return
        ids = torch.cat([ids, token[:, None]], dim=1)
        # With a cache only the new token goes through the model; without one, everything again.
        logits = model.compute_logits(model.hidden_states(ids[:, -1:] if use_cache else ids, cache=cache)[:, -1])


def generate(model, prompt_ids: list[int], params: SamplingParams = SamplingParams(), stop_ids=(),
             use_cache: bool = True, kv_dtype: str | None = None) -> list[int]:
    return list(stream(model, prompt_ids, params, stop_ids, use_cache, kv_dtype))
