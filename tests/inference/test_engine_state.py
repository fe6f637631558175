"""The paged engine serves models with per-sequence state (Mamba-2 and a Nemotron-H hybrid) and
generates exactly what the naive cache generates.

Reference: `inference.generate.generate` with the naive cache, one prompt at a time (itself
tested against transformers in tests/architectures/mamba2_hybrid/). Greedy tokens must be
identical, in fp32 with spread-out logits (initializer_range 0.2). The engine's paths that a state
makes different are each exercised: prompts of mixed lengths packed in one row (a mixed step
right-pads them per sequence), requests arriving mid-run, preemption (the state is recomputed
from scratch), and parallel sampling (a fork copies its parent's state).
"""

import pytest
import torch

from architectures.mamba2_hybrid import Mamba2Hybrid, Mamba2HybridConfig
from inference.block_manager import StateSlots
from inference.engine import EngineConfig, LLMEngine
from inference.sampling import generate
from inference.memory import main as memory_main
from inference.kv_pool import PagedKVPool
from inference.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


def make_model(pattern):
    torch.manual_seed(0)
    return Mamba2Hybrid(Mamba2HybridConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=len(pattern), hybrid_override_pattern=pattern,
        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=96, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, max_position_embeddings=128,
        time_step_limit=[0.001, float("inf")], initializer_range=0.2)).eval()


@pytest.fixture(scope="module", params=["M*-EM", "MM"], ids=["hybrid", "mamba2"])
def model(request):
    return make_model(request.param)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (7, 21, 1, 13, 5)]


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [generate(model, p, GREEDY) for p in prompts]


def completions(outputs):
    return [o.completions[0] for o in outputs]


def test_paged_engine_matches_the_naive_cache_and_gives_every_slot_back(model, prompts, expected, capsys):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=4))
    assert "prefix caching is off" in capsys.readouterr().err
    assert completions(engine.generate(prompts, GREEDY)) == expected
    assert engine.scheduler.state_slots.num_free == 4 and engine.blocks.num_used == 0


def test_requests_arriving_mid_run_get_the_same_tokens(model, prompts, expected):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=64))
    ids = [engine.add_request(p, GREEDY) for p in prompts[:2]]
    for i, p in enumerate(prompts[2:]):
        for _ in range(i + 1):  # mixed steps: new prompts packed beside decoding sequences
            engine.step()
        ids.append(engine.add_request(p, GREEDY))
    while engine.has_unfinished():
        engine.step()
    assert [engine.output(i).completions[0] for i in ids] == expected


def test_forced_preemption_recomputes_the_state_from_scratch(model, prompts, expected):
    # 8 blocks of 4 slots hold the longest request (21 + 10 - 1 tokens) but not the batch.
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=8))
    assert completions(engine.generate(prompts, GREEDY)) == expected
    assert engine.stats.preemptions > 0


def test_parallel_sampling_copies_the_parent_state_and_equals_independent_runs(model, prompts):
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=8, seed=7, n=3)
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=64))
    together = engine.generate([prompts[1]], params)[0].completions
    assert engine.stats.prefill_tokens == len(prompts[1]), "the prompt is computed once for all n completions"
    alone = [generate(model, prompts[1], SamplingParams(temperature=1.0, top_k=20, max_new_tokens=8, seed=7 + i))
             for i in range(3)]
    assert together == alone


def test_pool_sizes_state_slots_from_the_specs(model):
    pool = PagedKVPool.for_model(model, num_blocks=8, block_size=4, num_state_slots=3)
    specs = model.cache_specs()
    for i, spec in enumerate(specs):
        if spec is not None and spec.per_sequence:
            assert {n: tuple(t.shape) for n, t in pool.states[i].items()} == \
                {n: (3, *shape) for n, shape in spec.per_sequence.items()}
    assert pool.nbytes() == 9 * PagedKVPool.bytes_per_block(model, 4) + 3 * PagedKVPool.bytes_per_state_slot(model)
    with pytest.raises(ValueError, match="keep a per-sequence state.*num_state_slots >= 1"):
        PagedKVPool.for_model(model, num_blocks=8, block_size=4)


def test_memory_prints_the_fixed_state_per_sequence_beside_the_kv_per_token(capsys):
    got = memory_main(["--family", "mamba2_hybrid", "--preset", "nemotron-h-8b", "--seq-len", "8192", "--batch", "8"])
    # 24 Mamba-2 layers x (conv (8192 + 2*8*128) x 4 + ssm 128 x 64 x 128) x 2 bytes; 4 attention layers' K/V per token
    assert got["bytes_per_sequence"] == 24 * (10240 * 4 + 128 * 64 * 128) * 2
    assert got["bytes_per_token"] == 2 * 4 * 8 * 128 * 2
    out = capsys.readouterr().out
    assert "per sequence, whatever its length" in out and f"{got['bytes_per_sequence']} bytes" in out


def test_state_slots_are_taken_and_given_back_once():
    slots = StateSlots(2)
    a, b = slots.take(), slots.take()
    assert {a, b} == {0, 1} and slots.num_free == 0
    slots.free(a)
    with pytest.raises(RuntimeError, match="double free"):
        slots.free(a)
    assert slots.take() == a


def test_cuda_graphs_are_refused_for_a_model_with_state(model):
    with pytest.raises(ValueError, match="cuda_graphs=True.*per-sequence state"):
        LLMEngine(model, EngineConfig(block_size=4, num_blocks=8, cuda_graphs=True))
