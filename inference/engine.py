"""The paged inference engine: requests in, tokens out, many sequences sharing one forward pass.

Paper: "Efficient Memory Management for Large Language Model Serving with PagedAttention"
(Kwon et al., 2023, arXiv:2309.06180); the structure (block manager, scheduler, model runner)
follows vLLM and nano-vllm. Tested against the naive KV cache and against no cache at all:
tests/inference/test_engine.py asserts the same greedy tokens for batches of prompts of
different lengths, with and without prefix caching, with requests arriving mid-run, in
reversed order and under forced preemption, and that parallel sampling equals independent
runs with the same seeds.

    engine = LLMEngine(model, EngineConfig(num_blocks=512))
    engine.add_request(prompt_ids, SamplingParams(temperature=0.0, max_new_tokens=64))
    while engine.has_unfinished():
        for event in engine.step():   # streaming: the tokens of this step, as they come
            print(event.request_id, event.token)

One step = schedule (inference/scheduler.py) -> copy-on-write copies -> one forward pass of
all scheduled sequences packed in one row (inference/step_metadata.py), whose cache is a view of
the pool (inference/paged_cache.py over inference/kv_pool.py) -> sample -> bookkeeping.
Attention (EngineConfig.attention, chosen in inference/attention_choice.py): on a GPU, decode-only steps
run the Triton kernel of inference/triton_paged_attention.py and other steps the batched gather of
inference/paged_attention.py; on a CPU every step runs the gather.

A request can be stopped before it ends (`abort`: a client that went away, a stop string a server found
in the text), which gives its blocks back at once; `check_request` runs the submission checks alone, with
no side effect, so a server can refuse a bad request before it reaches the thread that owns the engine.

K/V may be stored quantized (EngineConfig.kv_dtype: "int8", "fp8", "int4"; inference/quantized_kv.py):
the pool's blocks hold codes and scales, so the same memory holds about twice (int8, fp8) or over three
times (int4) the tokens. Prefix caching, copy-on-write and preemption work on quantized blocks
as on plain ones; int4 (KIVI) keeps each running sequence's unfilled last block in full precision in a
slot of its own, as a state is kept, so it runs without CUDA graphs; its decode steps run the kernel of
inference/triton_kivi_attention.py, which reads the 4-bit blocks and the residual in place.

Models whose layers keep a per-sequence state (Mamba-2, Nemotron-H) are served the same way:
what the engine does follows the layers' cache specs, never the architecture. The pool gives
such layers one state slot per seat (max_num_seqs), the scheduler gives each running sequence a
slot, a forked sequence gets a copy of its parent's state, and prefix caching is off: a cached
prefix of K/V blocks cannot restore the state the layers had after it.

Sliding-window layers (Gemma 2 and 3) keep one block table per group of layers (inference/kv_groups.py):
a windowed group's blocks before its window go back to the pool as a sequence advances, so a long
sequence's memory grows with its global layers only; each layer reads through its group's tables, with
its own window and soft-cap, on every attention path.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from dataclasses import dataclass, field
from typing import Iterator

import torch

from inference.attention_choice import choose_attention
from inference.block_manager import BlockManager, StateSlots
from inference.cuda_graphs import DecodeGraphs
from inference.kv_groups import GroupedBlocks
from inference.kv_pool import PagedKVPool
from inference.paged_cache import PagedBatch
from inference.quantized_kv import valid_kv_dtypes
from inference.sampling import SamplingParams, check_prompt_ids, eos_ids, sample_next
from inference.scheduler import Scheduler, Sequence
from inference.step_metadata import build_metadata


@dataclass
class EngineConfig:
    block_size: int = 16  # token slots per KV block (vLLM's default)
    num_blocks: int | None = None  # blocks in the pool; None: gpu_memory_fraction of free GPU memory, or 4096 on CPU
    gpu_memory_fraction: float = 0.5  # with num_blocks=None on a GPU: share of the free memory given to the pool
    max_num_seqs: int = 256  # sequences in one forward pass at most
    max_num_batched_tokens: int = 4096  # tokens computed in one forward pass (one longer prompt may run alone)
    enable_prefix_caching: bool = True  # reuse the K/V of full blocks whose whole prefix was seen before
    attention: str = "auto"  # "triton" (decode steps read K/V in place; CUDA), "gather" (any device),
    # "reference" (slow oracle, for tests), or "auto": "triton" where it can run, else "gather"
    cuda_graphs: bool = False  # replay decode-only steps from CUDA graphs (needs a CUDA device)
    max_model_len: int | None = None  # longest prompt + max_new_tokens; None: the model's max_position_embeddings
    kv_dtype: str | None = None  # how blocks store K/V: None (the model's dtype), "fp32", "bf16", "fp16", or
    # quantized "int8" / "fp8" (a scale per token and KV head) / "int4" (KIVI; a key group is a block)

    def __post_init__(self):
        # Checked here, so that dataclasses.replace checks overrides too. A 0 would otherwise read
        # as "not set" (`cfg.num_blocks or default`) or make a scheduler that never schedules.
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"EngineConfig.num_blocks must be >= 1, got {self.num_blocks}; leave it None to size "
                             f"the pool from free GPU memory (4096 blocks on a CPU)")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"EngineConfig.gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.kv_dtype is not None and self.kv_dtype not in valid_kv_dtypes():
            raise ValueError(f"unknown EngineConfig.kv_dtype {self.kv_dtype!r}; choose one of "
                             f"{', '.join(valid_kv_dtypes())} (or None for the model's own dtype)")


@dataclass
class TokenEvent:
    """One generated token, as soon as it exists (what a streaming API sends)."""
    request_id: str
    index: int  # which of the request's n completions
    token: int
    finished: bool
    finish_reason: str | None  # "stop" or "length" once finished
    logprob: float | None = None  # with SamplingParams.logprobs set: log-probability of `token`
    top_logprobs: list[tuple[int, float]] | None = None  # and the most likely tokens' [(id, logprob)]


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    completions: list[list[int]]  # n completions; completion i was sampled with seed + i
    finish_reasons: list[str | None]


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # tokens computed for prompts and recomputes (prefix-cache hits excluded)
    decode_tokens: int = 0  # tokens computed for running sequences
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    preemptions: int = 0
    cow_copies: int = 0
    util_per_step: list[float] = field(default_factory=list)  # block manager's KV utilisation, each step

    @property
    def mean_utilisation(self) -> float:
        return sum(self.util_per_step) / max(len(self.util_per_step), 1)


class LLMEngine:
    def __init__(self, model, config: EngineConfig | None = None, **overrides):
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(EngineConfig)})
        if unknown:
            raise TypeError(f"unknown EngineConfig field {unknown[0]!r}; see EngineConfig for the fields")
        cfg = dataclasses.replace(config or EngineConfig(), **overrides)
        self.model, self.config = model.eval(), cfg
        self.max_model_len = cfg.max_model_len or model.config.max_position_embeddings
        if self.max_model_len > model.config.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                             f"{model.config.max_position_embeddings}")
        if cfg.max_num_batched_tokens < cfg.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={cfg.max_num_batched_tokens} must be >= max_num_seqs="
                             f"{cfg.max_num_seqs}: every running sequence needs a token of the budget")
        self.device = next(model.parameters()).device
        # The storage format, checked before anything is allocated (an fp8 that this torch lacks fails here).
        self.kv_format = PagedKVPool.block_format(cfg.kv_dtype, next(model.parameters()).dtype, self.device,
                                                  cfg.block_size)
        residual = self.kv_format.residual  # int4: a full-precision residual slot per running sequence
        if cfg.cuda_graphs and residual:
            raise ValueError("cuda_graphs=True: an int4 cache writes each sequence's residual slot, which the decode "
                             "graphs do not index; run int4 without CUDA graphs, or use kv_dtype='int8'")
        stateful = [i for i, s in enumerate(model.cache_specs()) if s is not None and s.per_sequence]
        self.prefix_caching = cfg.enable_prefix_caching and not stateful
        if cfg.enable_prefix_caching and stateful:
            print(f"note: prefix caching is off: layers {stateful} keep a per-sequence state, which cached K/V blocks "
                  f"cannot restore", file=sys.stderr)
        if cfg.cuda_graphs and stateful:
            raise ValueError(f"cuda_graphs=True: the decode graphs replay attention layers only, and layers {stateful} "
                             f"keep a per-sequence state; run without CUDA graphs")
        num_blocks = cfg.num_blocks or self._default_num_blocks()
        slots = cfg.max_num_seqs if stateful or residual else 0  # one per seat
        self.pool = PagedKVPool.for_model(model, num_blocks, cfg.block_size, slots, cfg.kv_dtype)
        self.blocks = BlockManager(num_blocks, cfg.block_size, self.prefix_caching)
        self.scheduler = Scheduler(self._grouped(self.blocks), cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   StateSlots(slots) if slots else None)
        self.attention = choose_attention(cfg.attention, model, self.kv_format, self.device, cfg.block_size)
        self.graphs = DecodeGraphs(model, self.pool, cfg.max_num_seqs, self.attention) if cfg.cuda_graphs else None
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._requests: dict[str, tuple[list[int], list[Sequence]]] = {}
        self._eos = eos_ids(model.config.eos_token_id)

    def _grouped(self, blocks: BlockManager) -> GroupedBlocks:
        """The block tables of each sequence, one per group of layers of the pool (one without windows)."""
        return GroupedBlocks(blocks, [g.window for g in self.pool.table_groups])

    def _default_num_blocks(self) -> int:
        if self.device.type != "cuda":
            return 4096
        free, _ = torch.cuda.mem_get_info(self.device)
        cfg = self.config
        per_block = PagedKVPool.bytes_per_block(self.model, cfg.block_size, cfg.kv_dtype)
        if per_block == 0:  # no layer keeps anything per token (a pure Mamba-2): blocks are bookkeeping only
            return 4096
        free -= cfg.max_num_seqs * (PagedKVPool.bytes_per_state_slot(self.model)
                                    + PagedKVPool.bytes_per_residual_slot(self.model, cfg.block_size, cfg.kv_dtype))
        return max(1, int(free * self.config.gpu_memory_fraction) // per_block)

    # ---- requests --------------------------------------------------------------------------------

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ints, once the request can run here; else a ValueError that says why.
        Reads only what never changes after construction, so any thread may call it while another steps."""
        check_prompt_ids(prompt_ids)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's bos id)")
        V = self.model.config.vocab_size
        bad = next((i for i, t in enumerate(prompt) if not 0 <= t < V), None)
        if bad is not None:
            raise ValueError(f"token id {prompt[bad]} at position {bad} is outside the vocabulary [0, {V})")
        P, M = len(prompt), params.max_new_tokens
        if P > self.max_model_len:
            raise ValueError(f"prompt of {P} tokens exceeds the model's maximum of {self.max_model_len} tokens "
                             f"(max_model_len); shorten the prompt")
        if P + M > self.max_model_len:
            raise ValueError(f"prompt of {P} tokens + max_new_tokens={M} exceeds max_model_len={self.max_model_len}; "
                             f"lower max_new_tokens to at most {self.max_model_len - P} or shorten the prompt")
        # K/V are stored for every token but the last generated one. A sequence that needs more
        # blocks than the whole pool could never finish: refuse it now rather than hang later. With
        # sliding windows that is every group's blocks of the whole sequence, as a recompute holds them.
        need = self.scheduler.blocks.peak_blocks(P + M - 1)
        if need > self.blocks.num_blocks:
            raise ValueError(f"request needs {need} KV blocks of {self.blocks.block_size} tokens ({P} prompt + {M} new), "
                             f"but the whole pool has {self.blocks.num_blocks}; raise num_blocks or lower max_new_tokens")
        return prompt

    def add_request(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                    request_id: str | None = None) -> str:
        """Queue a prompt; returns its id. Every check happens here (`check_request`), so a bad request
        fails now, with a message, instead of failing (or hanging) later inside a step."""
        prompt = self.check_request(prompt_ids, params)
        P, M = len(prompt), params.max_new_tokens
        rid = str(next(self._ids)) if request_id is None else request_id
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        arrival = next(self._arrivals)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        parent = Sequence(rid, 0, arrival, list(prompt), P, params, gen, pending_forks=params.n - 1)
        if M == 0:
            self._requests[rid] = (prompt, [parent] + [self._child(parent, i) for i in range(1, params.n)])
            for s in self._requests[rid][1]:
                s.finished, s.finish_reason = True, "length"
            return rid
        self._requests[rid] = (prompt, [parent])
        self.scheduler.add(parent)
        return rid

    def _child(self, parent: Sequence, i: int) -> Sequence:
        seed = parent.params.seed
        gen = torch.Generator().manual_seed(seed + i) if seed is not None else None
        return Sequence(parent.request_id, i, parent.arrival, parent.token_ids[:parent.prompt_len],
                        parent.prompt_len, parent.params, gen)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop completions at once and give their blocks and state slots back to the pool.

        index=None: every unfinished completion of the request stops and the engine forgets the request
        (its `output` is gone); a server calls this when a client disconnects, and also once it has sent a
        whole answer, so that the engine does not keep every request it ever served. index=i: completion i
        alone stops (a server found a stop string in its text), finishing with reason "stop"."""
        if request_id not in self._requests:
            raise ValueError(f"unknown request id {request_id!r} (never added, or already aborted)")
        seqs = self._requests[request_id][1]
        if index is None:
            del self._requests[request_id]
        else:
            seqs = [s for s in seqs if s.index == index]
            if not seqs:
                raise ValueError(f"request {request_id!r} has no completion {index} running (its siblings are forked "
                                 f"at its first token); abort the whole request with index=None")
        for seq in seqs:
            if not seq.finished:
                self.scheduler.abort(seq, "abort" if index is None else "stop")

    # ---- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Schedule, copy the blocks copy-on-write asks for, run one forward pass of every scheduled
        sequence, sample each one's next token; returns the tokens of this step."""
        out = self.scheduler.schedule()
        if not out.seqs:
            return []
        self._count(out)
        self.pool.copy_blocks(out.copies)  # before the pass, which writes into the copies
        logits = self._forward(out)  # (B, V)
        return self._sample_and_update(out.seqs, logits)

    def _count(self, out) -> None:
        """Add the scheduled step to the engine's statistics."""
        st = self.stats
        st.steps += 1
        st.preemptions += len(out.preempted)
        st.cow_copies += len(out.copies)
        st.prefill_tokens += out.num_prefill_tokens
        st.decode_tokens += sum(s.end - s.start for s in out.slices) - out.num_prefill_tokens
        st.cached_prompt_tokens += out.num_cached_tokens
        st.util_per_step.append(self.blocks.kv_utilisation())

    def _forward(self, out) -> torch.Tensor:
        """(B, V): the logits of each scheduled sequence's last token, replayed from a CUDA graph where one
        serves the step, else from an eager pass."""
        token_ids = [t for seq, s in zip(out.seqs, out.slices) for t in seq.token_ids[s.start:s.end]]
        if self.graphs is not None and self.graphs.can_run(out.slices):
            logits = self.graphs.run(out.slices, token_ids)
            if logits is not None:
                return logits
        meta = build_metadata(out.slices, token_ids, self.pool.block_size, self.pool.scratch_block, self.device)
        batch = PagedBatch(self.pool, meta, self.attention, out.slices)
        hidden = self.model.hidden_states(meta.input_ids, cache=batch)  # (1, N, D)
        # The head only where a token is sampled: each sequence's last position, not every prompt token.
        return self.model.compute_logits(hidden[0, meta.last_index])  # (B, V)

    def _sample_and_update(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        """Each sequence (and any sibling forked from it now) takes its next token and finishes if it should."""
        # One argmax over the batch for the greedy rows: a single device-to-host copy per step.
        greedy_tokens = logits.argmax(-1).tolist()
        events: list[TokenEvent] = []
        for b, seq in enumerate(seqs):
            seq.num_computed = len(seq.token_ids)
            for s in [seq] + self._fork(seq):
                if s.params.temperature == 0:
                    token = greedy_tokens[b]
                else:  # each completion draws from its own generator, as an independent run would
                    token = int(sample_next(logits[b:b + 1], s.params, s.generator))
                s.token_ids.append(token)
                reason = self._finish_reason(s, token)
                if reason:
                    self.scheduler.finish(s, reason)
                events.append(TokenEvent(s.request_id, s.index, token, reason is not None, reason,
                                         *self._logprobs(logits[b], token, s.params.logprobs)))
        return events

    @staticmethod
    def _logprobs(logits: torch.Tensor, token: int, top: int | None) -> tuple:
        """(logprob of `token`, its `top` most likely alternatives [(id, logprob)]) under the model's own
        distribution (before temperature, top-k and top-p), or (None, None) when the request asked for none."""
        if top is None:
            return None, None
        logprobs = logits.float().log_softmax(-1)  # (V,)
        values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
        return float(logprobs[token]), list(zip(ids.tolist(), values.tolist()))

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """At a parent's first sample, its n - 1 siblings: they start from the same logits, and from a copy of
        its state slot (what the pass just wrote after the prompt). [] for any other sequence."""
        children = []
        for i in range(1, seq.pending_forks + 1):
            child = self._child(seq, i)
            self.scheduler.fork(seq, child)
            if child.state_slot >= 0:
                self.pool.copy_states([(seq.state_slot, child.state_slot)])
            self._requests[seq.request_id][1].append(child)
            children.append(child)
        seq.pending_forks = 0
        return children

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.params.stop_token_ids or (token in self._eos and not seq.params.ignore_eos):
            return "stop"
        if len(seq.token_ids) - seq.prompt_len >= seq.params.max_new_tokens:
            return "length"
        return None

    # ---- running to completion -------------------------------------------------------------------

    def stream(self) -> Iterator[TokenEvent]:
        """Step until every queued request is done, yielding tokens as they are produced."""
        while self.has_unfinished():
            yield from self.step()

    def output(self, request_id: str) -> RequestOutput:
        prompt, seqs = self._requests[request_id]
        seqs = sorted(seqs, key=lambda s: s.index)
        return RequestOutput(request_id, prompt, [s.output_ids for s in seqs], [s.finish_reason for s in seqs])

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] = SamplingParams()
                 ) -> list[RequestOutput]:
        """Run `prompts` to completion (with any requests already queued); outputs in prompt order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one, or one per prompt")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        for _ in self.stream():
            pass
        return [self.output(i) for i in ids]

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (benchmarks call it between runs, so no run reuses another's K/V)."""
        if self.has_unfinished():
            raise RuntimeError("reset_prefix_cache needs an idle engine; finish or drop the requests first")
        self.blocks = BlockManager(self.blocks.num_blocks, self.blocks.block_size, self.prefix_caching)
        self.scheduler.blocks = self._grouped(self.blocks)
