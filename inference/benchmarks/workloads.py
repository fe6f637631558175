"""The library the inference benchmark scripts share: what they measure on, and how they time it.

The scripts of this folder (throughput.py, quantized_kv.py, paged_decode.py, ...) import from here
and never from one another, so that each stays a script (python -m inference.benchmarks.NAME):
- `make_prompts` and `run_paged`: the prompt workload of `python -m inference.benchmarks.throughput`
  and the paged engine run on it, which quantized_kv.py runs again for each kv_dtype;
- `scattered_seqs` and `quantized_blocks`: one decode step over a pool whose blocks lie in no
  particular order, and that pool quantized as the engine stores it, for the kernel benchmarks;
- `sync`, `reset_peak`, `peak_gib`: the CUDA bookkeeping around a timed region (no-ops on a CPU).
"""

from __future__ import annotations

import random
import time

import torch

from inference.engine import EngineConfig, LLMEngine
from inference.quantized_kv import kv_format
from inference.sampling import SamplingParams
from inference.step_metadata import ScheduledSeq

# ---- timing ------------------------------------------------------------------------------------------


def sync(device) -> None:
    """Wait for the GPU's queued work, so that a host clock read after it measures that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float:
    """The most GPU memory allocated since `reset_peak`, in GiB (nan on a CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else float("nan")


# ---- the prompt workload and the paged engine on it -----------------------------------------------------


def make_prompts(n: int, min_len: int, max_len: int, vocab: int, shared_prefix: int = 0, seed: int = 0):
    """n prompts of random token ids, lengths uniform in [min_len, max_len], each after the same
    `shared_prefix` random tokens."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (shared_prefix,), generator=g).tolist()
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [prefix + torch.randint(0, vocab, (L,), generator=g).tolist() for L in lengths]


def run_paged(model, prompts, new_tokens: list[int], device, engine_cfg: EngineConfig) -> dict:
    """The paged engine of `engine_cfg` on `prompts`, greedy, EOS ignored, prompt i making new_tokens[i]
    tokens: the timed run's seconds, tokens, memory and engine statistics, after an untimed warm-up."""
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in new_tokens]
    engine = LLMEngine(model, engine_cfg)
    # Warm-up on the whole workload: kernels, and the CUDA graphs of every shape the run needs.
    engine.generate(prompts, params) if engine_cfg.cuda_graphs else engine.generate(prompts[:2], params[:2])
    engine.reset_prefix_cache()
    sync(device), reset_peak(device)
    engine.stats = type(engine.stats)()
    t0 = time.perf_counter()
    outputs = [o.completions[0] for o in engine.generate(prompts, params)]
    sync(device)
    seconds = time.perf_counter() - t0
    st = engine.stats
    return dict(seconds=seconds, output_tokens=sum(map(len, outputs)), peak_mem_gib=peak_gib(device),
                kv_gib=engine.pool.nbytes() / 2**30,
                kv_util=st.mean_utilisation, prefill_tokens=st.prefill_tokens,
                cached_prompt_tokens=st.cached_prompt_tokens, preemptions=st.preemptions, steps=st.steps,
                attention=engine.attention,
                util_per_step=st.util_per_step, outputs=outputs)


# ---- one decode step over scattered, quantized blocks ----------------------------------------------------


def scattered_seqs(contexts: list[int], bs: int, num_blocks: int, rng: random.Random) -> list[ScheduledSeq]:
    """A decode step: sequence b has contexts[b] tokens, its last one new, in blocks of bs drawn from
    range(num_blocks) in an order `rng` shuffles (physical blocks in no particular order, as after a long run)."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    return [ScheduledSeq([free.pop() for _ in range(-(-c // bs))], c - 1, c) for c in contexts]


def quantized_blocks(kv_dtype: str, k: torch.Tensor, v: torch.Tensor, seqs: list[ScheduledSeq]):
    """Quantize a pool of bf16 blocks k, v (num_blocks + 1, bs, K, d) as the engine stores them.
    Returns ({stored name: tensor}, k_deq, v_deq, residuals): the dequantized blocks are what the gather
    path reads. int4 (bs = the key group): each sequence's unfilled last block is its residual, bf16
    (B, bs, K, d) for k and v, slot b for sequence b, and the dequantized blocks hold those tokens there."""
    int4 = kv_dtype == "int4"
    fmt = kv_format(kv_dtype, torch.bfloat16, k.device, k.shape[1] if int4 else None)
    if not int4:
        parts = {**fmt.encode("k", k), **fmt.encode("v", v)}
        return parts, fmt.decode("k", parts), fmt.decode("v", parts), None
    # one group per block: (num_blocks + 1, 1, *group part), as the pool stores them
    parts = {n: t.unsqueeze(1).contiguous() for x, name in ((k, "k"), (v, "v"))
             for n, t in fmt.encode(name, x.flatten(0, 1)).items()}
    flat = {n: t.squeeze(1) for n, t in parts.items()}
    k_deq, v_deq = fmt.decode("k", flat).view(k.shape), fmt.decode("v", flat).view(v.shape)
    last = torch.tensor([s.block_table[-1] for s in seqs], device=k.device)  # (B,)
    partial = torch.tensor([s.end % k.shape[1] != 0 for s in seqs], device=k.device)[:, None, None, None]
    k_deq[last] = torch.where(partial, k[last], k_deq[last])
    v_deq[last] = torch.where(partial, v[last], v_deq[last])
    return parts, k_deq, v_deq, (k[last], v[last])
