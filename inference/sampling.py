"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling;
what every generator checks of a request before it starts (its params, its prompt ids, the EOS ids);
and the simplest generator: prefill the prompt, then decode one token at a time, with or without a
KV cache, streaming tokens as they are produced (`stream`, `generate`).

Top-p: "The Curious Case of Neural Text Degeneration" (Holtzman et al., 2019, arXiv:1904.09751).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from architectures.utils.command_line import UserTypeError
from inference.kv_cache import NaiveKVCache


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax); < 1 sharpens, > 1 flattens the distribution
    top_k: int = 0  # keep only the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability sums to >= top_p
    max_new_tokens: int = 128  # stop after this many generated tokens
    seed: int | None = None  # seeds this request's own generator: same seed, same tokens
    n: int = 1  # completions of one prompt (parallel sampling); completion i uses seed + i
    stop_token_ids: tuple[int, ...] = ()  # stop after producing any of these (the token is kept)
    ignore_eos: bool = False  # keep going past the model's EOS token (benchmarks want fixed lengths)
    logprobs: int | None = None  # the engine reports each token's log-probability and this many alternatives'

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n (completions per prompt) must be >= 1, got {self.n}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        # NaN passes every comparison below unnoticed (nan < 0 is False) and argparse's float
        # accepts "nan" and "inf", so non-finite values are refused by name first.
        for name in ("temperature", "top_k", "top_p"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs (alternatives per token) must be >= 0 or None, got {self.logprobs}")


def eos_ids(eos_token_id: int | list[int] | None) -> set[int]:
    """A config's `eos_token_id` as a set: Hugging Face configs hold one id, a list of ids
    (Llama 3 Instruct ends turns with several) or None."""
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, (list, tuple, set)):
        return {int(t) for t in eos_token_id}
    return {int(eos_token_id)}


def check_prompt_ids(prompt_ids, name: str = "prompt_ids") -> None:
    """Refuse text where token ids are expected. A str is a sequence too, so without this
    check "hello" would fail deep inside, at int('h'), with a message about something else."""
    text = isinstance(prompt_ids, (str, bytes)) or (
        isinstance(prompt_ids, (list, tuple)) and any(isinstance(t, (str, bytes)) for t in prompt_ids))
    if text or not hasattr(prompt_ids, "__len__"):
        shown = repr(prompt_ids) if len(repr(prompt_ids)) <= 60 else repr(prompt_ids)[:57] + "..."
        hint = "; encode the text with the tokenizer first" if text else ""
        raise UserTypeError(f"{name} must be a list of token ids, got {type(prompt_ids).__name__} {shown}{hint}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set the logits of tokens outside the top-k / top-p set to -inf. logits: (N, V) float."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (N, V) for the last position -> token ids (N,)."""
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu" else probs,
                             1, generator=generator).squeeze(-1).to(logits.device)


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
    if params.n != 1 or params.logprobs is not None:
        raise ValueError(f"stream makes one completion and no log-probabilities, got n={params.n}, logprobs="
                         f"{params.logprobs}; use inference.engine.LLMEngine for those")
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
