"""The paged engine generates exactly what the naive cache and no cache at all generate.

Reference: `inference.generate.generate(use_cache=False)` recomputes the whole sequence at
every step, one prompt at a time: no cache, no batching, nothing to get wrong. Greedy tokens
must be identical (not close): the model is fp32 with spread-out logits (see conftest), so
the ~1e-7 rounding differences between cache layouts cannot flip an argmax.
"""

import pytest
import torch

from inference.batched import generate_batch
from inference.engine import EngineConfig, LLMEngine
from inference.sampling import generate
from inference.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [generate(model, p, GREEDY, use_cache=False) for p in prompts]


def completions(outputs):
    return [o.completions[0] for o in outputs]


def test_naive_batched_cache_matches_no_cache(model, prompts, expected):
    assert generate_batch(model, prompts, GREEDY) == expected


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_paged_engine_matches_no_cache(model, prompts, expected, prefix_caching):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128, enable_prefix_caching=prefix_caching))
    assert completions(engine.generate(prompts, GREEDY)) == expected
    assert engine.blocks.num_used == 0, "finished sequences must give all their blocks back"


def test_paged_engine_with_the_reference_attention_matches_no_cache(model, prompts, expected):
    # The slow oracle of tests/inference/test_paged_attention.py, end to end (fewer tokens: it loops in Python).
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128, attention="reference"))
    few = SamplingParams(temperature=0.0, max_new_tokens=4)
    assert completions(engine.generate(prompts, few)) == [e[:4] for e in expected]


def test_batch_order_reversed_gives_the_same_tokens(model, prompts, expected):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    assert completions(engine.generate(prompts[::-1], GREEDY)) == expected[::-1]


def test_requests_arriving_mid_run_get_the_same_tokens(model, prompts, expected):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    ids = [engine.add_request(p, GREEDY) for p in prompts[:2]]
    for i, p in enumerate(prompts[2:]):
        for _ in range(i + 1):  # the batch is mid-decode when each new request arrives
            engine.step()
        ids.append(engine.add_request(p, GREEDY))
    while engine.has_unfinished():
        engine.step()
    assert [engine.output(i).completions[0] for i in ids] == expected


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_forced_preemption_gives_the_same_tokens(model, prompts, expected, prefix_caching):
    # 14 blocks of 4 slots hold the longest request (40 + 12 - 1 tokens) but not the batch.
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=14, enable_prefix_caching=prefix_caching))
    assert completions(engine.generate(prompts, GREEDY)) == expected
    assert engine.stats.preemptions > 0
    if prefix_caching:  # a recomputed sequence finds its own full blocks in the prefix cache
        assert engine.stats.cached_prompt_tokens > 0


def test_parallel_sampling_with_copy_on_write_equals_independent_runs(model, prompts):
    prompt = prompts[2]  # 33 tokens: its last block is partial, so the n completions share it until they write
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=10, seed=7, n=4)
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    together = engine.generate([prompt], params)[0].completions
    assert engine.stats.prefill_tokens == len(prompt), "the prompt is computed once for all n completions"
    assert engine.stats.cow_copies == 3, "the shared partial block is copied for all but its last writer"
    independent = [generate(model, prompt, SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=10,
                                                          seed=7 + i)) for i in range(4)]
    assert together == independent
    assert len({tuple(c) for c in together}) > 1, "different seeds should give different completions"


def test_parallel_sampling_survives_preemption(model, prompts):
    prompt = prompts[2]
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=3, n=3)
    small = LLMEngine(model, EngineConfig(block_size=4, num_blocks=12))
    big = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    assert small.generate([prompt], params)[0].completions == big.generate([prompt], params)[0].completions
    assert small.stats.preemptions > 0


def test_prefix_caching_computes_a_shared_prefix_once(model):
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, 97, (32,), generator=g).tolist()
    batch = [prefix + torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    on = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128, enable_prefix_caching=True))
    off = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128, enable_prefix_caching=False))
    assert completions(on.generate(batch, GREEDY)) == completions(off.generate(batch, GREEDY))
    total = sum(map(len, batch))
    assert off.stats.prefill_tokens == total
    # All four arrive in the same step; the first computes the prefix's 8 blocks, the other three hit them.
    assert on.stats.cached_prompt_tokens == 3 * 32
    assert on.stats.prefill_tokens == total - 3 * 32


def test_streaming_yields_every_token_as_it_is_made(model, prompts, expected):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    ids = [engine.add_request(p, GREEDY) for p in prompts[:3]]
    seen = {i: [] for i in ids}
    finished = []
    for event in engine.stream():
        assert event.request_id not in finished, "no token after a request's last one"
        seen[event.request_id].append(event.token)
        if event.finished:
            finished.append(event.request_id)
            assert event.finish_reason == "length"
    assert [seen[i] for i in ids] == expected[:3]


def test_stop_tokens_and_eos_end_a_completion(model, prompts, expected):
    stop_at = expected[1][4]
    first = expected[1].index(stop_at)
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    out = engine.generate([prompts[1]], SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(stop_at,)))
    assert out[0].completions[0] == expected[1][:first + 1] and out[0].finish_reasons == ["stop"]
    model.config.eos_token_id = stop_at  # the model's own EOS stops it too, unless ignore_eos
    try:
        eos_engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
        assert eos_engine.generate([prompts[1]], GREEDY)[0].completions[0] == expected[1][:first + 1]
        ignored = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
        assert eos_engine.generate([prompts[1]], ignored)[0].completions[0] == expected[1]
    finally:
        model.config.eos_token_id = None


def test_zero_new_tokens_finishes_at_once(model, prompts):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=16))
    out = engine.generate([prompts[0]], SamplingParams(max_new_tokens=0, n=2))[0]
    assert out.completions == [[], []] and engine.stats.steps == 0


def test_kv_utilisation_is_high_and_memory_is_returned(model, prompts):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    engine.generate(prompts, GREEDY)
    # Waste is at most one partly filled block per sequence: 3 of 4 slots at worst, ~1.5 on average.
    assert min(engine.stats.util_per_step) > 0.85
    assert engine.blocks.num_used == 0 and engine.blocks.num_free_blocks == 128
