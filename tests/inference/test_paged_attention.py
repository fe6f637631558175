"""The batched paged attention and the Triton decode kernel equal the reference that walks block
tables one slot at a time.

Reference: `paged_attention_reference` (Python loops, fp32 softmax written out), itself checked
against causal SDPA on contiguous K/V. Tolerances: fp32 on the CPU, 1e-5 (the two differ only in
summation order); bf16 on a GPU, 2e-2 absolute (bf16 keeps 8 bits of mantissa: 4e-3 relative
per rounding, and the attention output is a weighted mean of values of magnitude ~1).
The GPU tests run where CUDA is present; the CPU suite skips them, saying so.
"""

import random

import pytest
import torch
import torch.nn.functional as F

from inference.engine import EngineConfig, LLMEngine
from inference.sampling import generate
from inference.paged_attention import attention_mask, paged_attention, paged_attention_reference
from inference.paged_cache import PagedBatch
from inference.step_metadata import (ScheduledSeq, StepMetadata, TableRows, _decode_metadata, _packed_metadata,
                                     build_metadata, host_metadata)
from inference.sampling import SamplingParams
from inference.triton_paged_attention import paged_decode_attention, triton_unavailable_reason

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU path: needs CUDA (run on the GPU machine; the CPU suite checks the reference)")
_no_triton = triton_unavailable_reason("cuda", 64)
needs_triton = pytest.mark.skipif(_no_triton is not None,
                                  reason=f"{_no_triton} (run on the GPU machine; the CPU suite checks the reference)")


def random_paged_batch(H, K, d, bs, ctx_and_new, num_blocks=64, dtype=torch.float32, device="cpu", seed=0):
    """Random K/V pool, random disjoint block tables, and packed queries for each (context, new) pair."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks + 1, bs, K, d, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks + 1, bs, K, d, generator=g).to(device, dtype)
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)  # physical order unrelated to logical order
    seqs = []
    for ctx, new in ctx_and_new:
        table = [free.pop() for _ in range(-(-ctx // bs))]
        seqs.append(ScheduledSeq(table, ctx - new, ctx))
    N = sum(new for _, new in ctx_and_new)
    q = torch.randn(N, H, d, generator=g).to(device, dtype)
    return q, k_cache, v_cache, seqs


def run_fast(q, k_cache, v_cache, seqs, bs):
    meta = build_metadata(seqs, [0] * q.shape[0], bs, k_cache.shape[0] - 1, q.device)
    mask = attention_mask(meta.q_pos, meta.block_tables.shape[1] * bs)
    return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.q_index, meta.out_index, mask)


def run_reference(q, k_cache, v_cache, seqs):
    return paged_attention_reference(q, k_cache, v_cache, [s.block_table for s in seqs], [s.end for s in seqs],
                                     [s.end - s.start for s in seqs])


def test_reference_equals_causal_sdpa_on_contiguous_kv():
    H, K, d, bs = 4, 2, 8, 4
    q, k_cache, v_cache, seqs = random_paged_batch(H, K, d, bs, [(11, 11)])
    table = seqs[0].block_table
    k = torch.cat([k_cache[b] for b in table])[:11].transpose(0, 1)[None]  # (1, K, 11, d)
    v = torch.cat([v_cache[b] for b in table])[:11].transpose(0, 1)[None]
    expected = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(run_reference(q, k_cache, v_cache, seqs), expected[0].transpose(0, 1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (8, 1)], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("mix", [
    [(9, 1), (1, 1), (17, 1), (4, 1)],  # decode: one new token each, contexts across block boundaries
    [(7, 7), (12, 12), (1, 1)],  # prefill of whole prompts
    [(13, 5), (3, 1), (20, 20), (8, 3)],  # mixed: prefix-cache hits (context before the new tokens) and decodes
], ids=["decode", "prefill", "mixed"])
def test_batched_paged_attention_matches_reference(H, K, mix):
    q, k_cache, v_cache, seqs = random_paged_batch(H, K, 16, 4, mix)
    torch.testing.assert_close(run_fast(q, k_cache, v_cache, seqs, 4), run_reference(q, k_cache, v_cache, seqs),
                               rtol=1e-5, atol=1e-5)


def test_decode_batch_padded_for_a_cuda_graph_gives_the_same_logits(model, prompts):
    """What a CUDA graph replays, checked eagerly on the CPU: padding rows and padded tables
    (`host_metadata` with pad_batch_to / pad_blocks_to) leave the real rows' logits unchanged."""
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=64))
    for p in prompts[:3]:
        engine.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=5))
    engine.step()  # prefill; the next step is decode-only
    out = engine.scheduler.schedule()
    tokens = [seq.token_ids[-1] for seq in out.seqs]
    pool = engine.pool
    with torch.no_grad():
        meta = build_metadata(out.slices, tokens, 4, pool.scratch_block, "cpu")
        eager = model(meta.input_ids, cache=PagedBatch(pool, meta))[0, meta.last_index]
        snapshot = [t.clone() for t in pool.tensors()]  # each (layers, num_blocks + 1, bs, K, d)
        flat, shapes = host_metadata(out.slices, tokens, 4, pool.scratch_block, pad_batch_to=8, pad_blocks_to=16)
        padded_meta = StepMetadata.from_flat(flat, shapes)
        padded = model(padded_meta.input_ids, cache=PagedBatch(pool, padded_meta))[0]  # (8, V)
    torch.testing.assert_close(padded[:len(tokens)], eager, rtol=1e-5, atol=1e-5)
    real = [b for b in range(pool.num_blocks) if b != pool.scratch_block]
    # The real rows rewrite their own slots with the same values (up to rounding); padding rows
    # must not touch any block but the scratch one.
    for now, before in zip(pool.tensors(), snapshot):
        torch.testing.assert_close(now[:, real], before[:, real], rtol=1e-5, atol=1e-5,
                                   msg="padding rows may only write into the scratch block")


@needs_cuda
@pytest.mark.parametrize("mix", [[(300, 1)] * 8 + [(33, 1)] * 8, [(200, 200), (64, 13), (129, 1)]],
                         ids=["decode", "mixed"])
def test_batched_paged_attention_matches_reference_on_gpu_in_bf16(mix):
    q, k_cache, v_cache, seqs = random_paged_batch(32, 8, 64, 16, mix, num_blocks=256, dtype=torch.bfloat16,
                                                   device="cuda")
    expected = run_reference(q.cpu().float(), k_cache.cpu().float(), v_cache.cpu().float(), seqs)
    torch.testing.assert_close(run_fast(q, k_cache, v_cache, seqs, 16).float().cpu(), expected, rtol=0, atol=2e-2)


def gpu_model_and_prompts(lengths, max_len: int):
    """A random fp32 Llama 3 on the GPU with spread-out logits (initializer_range=0.2, see
    conftest), so greedy argmaxes are far from ties, and one random prompt per length."""
    from architectures.llama3 import Llama3, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_len,
                      initializer_range=0.2)
    g = torch.Generator().manual_seed(1)
    return Llama3(cfg).cuda().eval(), [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]


@needs_cuda
def test_cuda_graph_decode_matches_eager_decode_and_no_cache_on_gpu():
    # Padding the batch and the tables for the graph changes fp32 rounding (~1e-6), never a greedy token.
    model, prompts = gpu_model_and_prompts((5, 40, 77, 130, 16, 3), max_len=512)
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    eager = LLMEngine(model, EngineConfig(num_blocks=256, cuda_graphs=False)).generate(prompts, params)
    engine = LLMEngine(model, EngineConfig(num_blocks=256, cuda_graphs=True))
    graphed = engine.generate(prompts, params)
    assert engine.graphs.enabled and engine.graphs.graphs, "the decode steps must have run from CUDA graphs"
    assert [o.completions for o in graphed] == [o.completions for o in eager]
    assert [o.completions[0] for o in eager] == [generate(model, p, params, use_cache=False) for p in prompts]


@pytest.mark.parametrize("pad", [None, (8, 16)], ids=["exact", "padded-for-a-graph"])
def test_decode_metadata_equals_the_general_packing(pad):
    """The plain-list builder of decode-only steps gives, field for field, what the general one gives."""
    g = random.Random(0)
    seqs = []
    for ctx in (1, 4, 5, 17, 33):
        table = [g.randrange(60) for _ in range(-(-ctx // 4))]
        seqs.append(ScheduledSeq(table, ctx - 1, ctx))
    tokens = [g.randrange(97) for _ in seqs]
    Bp, nb = pad or (None, None)
    fast, fast_shapes = _decode_metadata(seqs, tokens, 4, 63, Bp, nb)
    general, shapes = _packed_metadata(seqs, tokens, 4, 63, Bp, nb)
    assert fast_shapes == shapes
    assert torch.equal(fast, general)


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_reused_table_rows_equal_rows_built_afresh_through_forks_preemption_and_copy_on_write(model, prompts,
                                                                                             prefix_caching):
    """`TableRows` reuses a decode step's block-table rows where a table looks unchanged; at every decode step
    of a run with parallel sampling (copy-on-write), arrivals and a pool small enough to preempt, the
    metadata built with the reused rows equals the metadata built from scratch."""
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=20, enable_prefix_caching=prefix_caching))
    rows, checked, forward = TableRows(), [], engine._forward

    def checking_forward(out):
        if all(s.end - s.start == 1 for s in out.slices):
            tokens = [seq.token_ids[s.start] for seq, s in zip(out.seqs, out.slices)]
            nb = max(len(s.block_table) for s in out.slices) + len(checked) % 3  # padded, as graphs do
            args = (out.slices, tokens, 4, engine.pool.scratch_block, 16, nb)
            assert torch.equal(host_metadata(*args, table_rows=rows)[0], host_metadata(*args)[0])
            checked.append(len(out.slices))
        return forward(out)

    engine._forward = checking_forward
    engine.add_request(prompts[2], SamplingParams(temperature=1.0, max_new_tokens=12, seed=3, n=3))
    for p in prompts[:2] + prompts[3:]:
        engine.step()
        engine.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=12))
    while engine.has_unfinished():
        engine.step()
    assert len(checked) > 10 and engine.stats.preemptions > 0 and engine.stats.cow_copies > 0
    # The in-place changes the block manager makes: an appended block, and copy-on-write of the last one.
    table, rows = [5, 6], TableRows()
    assert list(rows.row(0, table, 4, 99)) == [5, 6, 99, 99]
    table.append(7)
    assert list(rows.row(0, table, 4, 99)) == [5, 6, 7, 99]
    table[-1] = 8
    assert list(rows.row(0, table, 4, 99)) == [5, 6, 8, 99]
    assert list(rows.row(0, [5, 6, 8], 4, 99)) == [5, 6, 8, 99] and rows.rows[0][0] is not table


def random_decode_batch(H, K, contexts, bs=16, dtype=torch.bfloat16, device="cuda", seed=0):
    """Decode-step inputs: one query per sequence, in the strided layout the model hands over
    (q of (1, H, N, d) transposed to (N, H, d)); tables padded with the scratch block."""
    q, k_cache, v_cache, seqs = random_paged_batch(H, K, 64, bs, [(c, 1) for c in contexts],
                                                   num_blocks=sum(-(-c // bs) for c in contexts) + 8,
                                                   dtype=dtype, device=device, seed=seed)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # (N, H, d) with stride N*d between heads
    meta = build_metadata(seqs, [0] * len(seqs), bs, k_cache.shape[0] - 1, device)
    return q, k_cache, v_cache, seqs, meta


@needs_triton
@pytest.mark.parametrize("H,K", [(8, 8), (32, 8)], ids=["mha-r1", "gqa-r4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_triton_decode_kernel_matches_reference_in_bf16(H, K, seed):
    # Contexts around block (16) and tile (64) edges, and long ones, with random physical blocks.
    g = random.Random(seed)
    contexts = [1, 2, 15, 16, 17, 63, 64, 65, 128, 129] + [g.randint(1, 600) for _ in range(14)]
    q, k_cache, v_cache, seqs, meta = random_decode_batch(H, K, contexts, seed=seed)
    out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.positions[0] + 1)
    expected = run_reference(q.cpu().float(), k_cache.cpu().float(), v_cache.cpu().float(), seqs)
    torch.testing.assert_close(out.float().cpu(), expected, rtol=0, atol=2e-2)


@needs_triton
@pytest.mark.parametrize("splits,dv", [(2, 64), (3, 512), (5, 16)])
def test_merge_kernel_equals_the_torch_merge_on_gpu(splits, dv):
    from inference.split_decode import merge_splits

    g = torch.Generator().manual_seed(splits)
    acc = torch.randn(4, 6, splits, dv, generator=g)
    m = torch.randn(4, 6, splits, generator=g) * 4
    l = torch.rand(4, 6, splits, generator=g) + 0.5
    m[1, :, -1], l[1, :, -1], acc[1, :, -1] = float("-inf"), 0.0, 0.0  # a part past sequence 1's context
    expected = merge_splits(acc, m, l, torch.float32)  # on the CPU: the torch formula
    out = merge_splits(acc.cuda(), m.cuda(), l.cuda(), torch.float32)  # on the GPU: the Triton merge
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-6, atol=1e-6)


@needs_triton
def test_triton_decode_kernel_never_reads_past_a_context():
    """Slots after a sequence's last token, and the scratch block that pads the tables, hold NaN:
    if the kernel used any of them, even with a softmax weight of 0, the output would be NaN."""
    contexts = [1, 17, 40, 64, 100]
    q, k_cache, v_cache, seqs, meta = random_decode_batch(32, 8, contexts)
    for cache in (k_cache, v_cache):
        cache[-1] = float("nan")  # the scratch block
        for s in seqs:
            last, used = s.block_table[-1], (s.end - 1) % 16 + 1
            cache[last, used:] = float("nan")
    out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.positions[0] + 1)
    assert not out.isnan().any()
    nan_free = [c.nan_to_num(0.0).cpu().float() for c in (k_cache, v_cache)]
    torch.testing.assert_close(out.float().cpu(), run_reference(q.cpu().float(), *nan_free, seqs), rtol=0, atol=2e-2)


def test_triton_attention_on_a_cpu_is_refused_with_the_reason(model):
    with pytest.raises(ValueError, match="needs a CUDA GPU.*attention='gather'"):
        LLMEngine(model, EngineConfig(num_blocks=16, attention="triton"))
    assert LLMEngine(model, EngineConfig(num_blocks=16)).attention == "gather", "auto falls back to the gather"
    with pytest.raises(ValueError, match="attention must be one of"):
        LLMEngine(model, EngineConfig(num_blocks=16, attention="flash"))


@needs_triton
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_engine_with_the_triton_kernel_gives_the_gather_paths_tokens_on_gpu(cuda_graphs):
    # The kernel's fp32 sums differ from SDPA's in order only (~1e-6), which cannot flip a greedy
    # token; bf16 could, so the tokens would not be a test.
    model, prompts = gpu_model_and_prompts((5, 40, 77, 130, 16, 3, 300, 555), max_len=1024)
    params = SamplingParams(temperature=0.0, max_new_tokens=40)
    gather = LLMEngine(model, EngineConfig(num_blocks=512, attention="gather")).generate(prompts, params)
    engine = LLMEngine(model, EngineConfig(num_blocks=512, attention="triton", cuda_graphs=cuda_graphs))
    ids = [engine.add_request(p, params) for p in prompts[:4]]
    for _ in range(3):  # decode-only steps run the kernel; the later arrivals make mixed steps (the gather)
        engine.step()
    ids += [engine.add_request(p, params) for p in prompts[4:]]
    for _ in engine.stream():
        pass
    triton = [engine.output(i) for i in ids]
    assert [o.completions for o in triton] == [o.completions for o in gather]
    assert [o.completions[0] for o in gather[:3]] == [generate(model, p, params, use_cache=False) for p in prompts[:3]]


def test_prefill_in_a_triton_engine_runs_the_masked_gather_path(model, prompts):
    """With attention="triton", only decode-only steps go to the kernel; a prefill must take the
    gather path with its causal mask. Checked on the CPU, where such a step never touches Triton."""
    from inference.kv_pool import PagedKVPool

    seqs = [ScheduledSeq([0, 1], 0, 7), ScheduledSeq([2, 3, 4], 0, 10)]  # two prompts, block_size 4
    tokens = prompts[1][:7] + prompts[2][:10]
    logits = {}
    for attention in ("gather", "triton"):
        pool = PagedKVPool.for_model(model, num_blocks=8, block_size=4)
        meta = build_metadata(seqs, tokens, 4, pool.scratch_block, "cpu")
        with torch.no_grad():
            logits[attention] = model(meta.input_ids, cache=PagedBatch(pool, meta, attention))[0, meta.last_index]
    with torch.no_grad():
        expected = torch.stack([model(torch.tensor([prompts[1][:7]]))[0, -1], model(torch.tensor([prompts[2][:10]]))[0, -1]])
    torch.testing.assert_close(logits["triton"], logits["gather"], rtol=0, atol=0)
    torch.testing.assert_close(logits["gather"], expected, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("splits", [2, 5, None], ids=["2-parts", "5-parts", "auto"])
def test_triton_kernel_with_the_context_split_matches_reference(splits):
    """FlashDecoding: each context cut into parts walked by separate programs, merged afterwards; parts
    that fall past a short sequence's context hold nothing and must weigh nothing in the merge."""
    g = random.Random(2)
    contexts = [1, 15, 64, 65, 300, 599] + [g.randint(1, 600) for _ in range(6)]
    q, k_cache, v_cache, seqs, meta = random_decode_batch(32, 8, contexts, seed=2)
    out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.positions[0] + 1, splits=splits)
    expected = run_reference(q.cpu().float(), k_cache.cpu().float(), v_cache.cpu().float(), seqs)
    torch.testing.assert_close(out.float().cpu(), expected, rtol=0, atol=2e-2)


def latent_reference(q, rows, value_dim, seqs, scale, bs):
    """MLA's absorbed decode written out: every head's key is the whole cached row, its value the row's first
    value_dim numbers; one sequence at a time, the table walked slot by slot, fp32."""
    out = []
    for b, s in enumerate(seqs):
        keys = torch.stack([rows[s.block_table[p // bs], p % bs] for p in range(s.end)]).float()  # (ctx, w)
        p = (q[b].float() @ keys.T * scale).softmax(-1)  # (H, ctx)
        out.append(p @ keys[:, :value_dim])  # (H, value_dim)
    return torch.stack(out)


@needs_triton
@pytest.mark.parametrize("H,d_c,d_r", [(4, 32, 16), (128, 512, 64)], ids=["tiny-48", "deepseek-v3-576"])
@pytest.mark.parametrize("splits", [1, None], ids=["whole", "split"])
def test_triton_latent_kernel_matches_absorbed_attention_written_out(H, d_c, d_r, splits):
    from inference.triton_paged_attention import paged_latent_decode_attention

    bs, w = 16, d_c + d_r
    contexts = [1, 16, 33, 200, 517]
    num_blocks = sum(-(-c // bs) for c in contexts)
    free = list(range(num_blocks))
    random.Random(0).shuffle(free)
    seqs = [ScheduledSeq([free.pop() for _ in range(-(-c // bs))], c - 1, c) for c in contexts]
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(num_blocks + 1, bs, w, generator=g)  # + the scratch block
    rows[-1] = float("nan")  # the scratch block that pads the tables: never read
    q = torch.randn(len(seqs), H, w, generator=g)
    meta = build_metadata(seqs, [0] * len(seqs), bs, rows.shape[0] - 1, "cuda")
    scale = 0.1
    out = paged_latent_decode_attention(q.cuda().bfloat16(), rows.cuda().bfloat16(), d_c, meta.block_tables,
                                        meta.positions[0] + 1, scale=scale, splits=splits)
    expected = latent_reference(q.bfloat16().float(), rows.nan_to_num(0.0).bfloat16().float(), d_c, seqs, scale, bs)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float().cpu(), expected, rtol=0, atol=2e-2)


@needs_triton
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_engine_serves_latent_attention_with_the_triton_kernel_on_gpu(cuda_graphs):
    """DeepSeek-V3's absorbed decode through the kernel gives the gather path's greedy tokens (fp32), with
    prefills, arrivals mid-run and CUDA graphs; its latent rows are 32 + 16 wide, values the first 32.
    Dense feed-forwards only: in fp32 the MoE takes its per-expert loop, which reads sizes on the host and
    so cannot be captured in a graph."""
    from architectures.deepseek_v3 import DeepseekV3, DeepseekV3Config

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=1000, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                           qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                           first_k_dense_replace=2, max_position_embeddings=1024, initializer_range=0.2)
    model = DeepseekV3(cfg).cuda().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 40, 77, 130, 16, 300)]
    params = SamplingParams(temperature=0.0, max_new_tokens=30)
    gather = LLMEngine(model, EngineConfig(num_blocks=256, attention="gather")).generate(prompts, params)
    engine = LLMEngine(model, EngineConfig(num_blocks=256, attention="triton", cuda_graphs=cuda_graphs))
    assert engine.attention == "triton"
    ids = [engine.add_request(p, params) for p in prompts[:3]]
    for _ in range(3):
        engine.step()
    ids += [engine.add_request(p, params) for p in prompts[3:]]
    for _ in engine.stream():
        pass
    assert [engine.output(i).completions for i in ids] == [o.completions for o in gather]
    assert not cuda_graphs or engine.graphs.graphs, "the decode steps must have run from CUDA graphs"


def test_benchmark_grid_is_every_combination_of_the_listed_settings():
    from inference.benchmarks.paged_decode import grid_settings

    assert grid_settings("tile=64,128 splits=None,4") == [
        {"tile": 64, "splits": None}, {"tile": 64, "splits": 4}, {"tile": 128, "splits": None},
        {"tile": 128, "splits": 4}]
    with pytest.raises(ValueError, match="entry 'num_warps'"):
        grid_settings("num_warps")  # no values
