"""Sliding-window and soft-capped layers in the paged engine: the same greedy tokens as no cache and as the naive
cache, windowed blocks given back as sequences advance, and the pool's bytes equal to inference/memory.py's.

The model is inference/benchmarks/windowed_model.py's Llama 3 whose layers declare windows (local, global,
local by default), fp32 with spread-out logits (initializer_range 0.2, as tests/conftest.py's model), so
that the rounding differences between cache layouts cannot flip an argmax. Every generation runs past 3x
its window.
"""

import pytest
import torch

from architectures.common.cache import KVSpec
from inference.batched import generate_batch
from inference.benchmarks.windowed_model import WindowedLlama
from inference.block_manager import RELEASED, BlockManager, BlockTable
from inference.engine import EngineConfig, LLMEngine
from inference.kv_groups import GroupedBlocks, table_groups
from inference.kv_pool import PagedKVPool
from inference.memory import global_specs, layer_blocks, paged_kv_bytes
from inference.sampling import SamplingParams, generate
from tests.conftest import tiny_config

NEW = 18  # new tokens per prompt: with windows of 3 to 6 every sequence (the shortest: 1 + 18) runs past 3x its window


def windowed(windows, softcap=None, layers=3, seed=0):
    torch.manual_seed(seed)
    return WindowedLlama(tiny_config(num_hidden_layers=layers), windows, softcap).eval()


def prompts(seed=1, lengths=(5, 13, 1, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]


def completions(outputs):
    return [o.completions[0] for o in outputs]


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices on a shared 2-core machine: threads only add contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("windows,softcap", [((4, None, 4), None), ((3, None, 6), None), ((5, None, 5), 2.0),
                                             ((6, 6, 6), None), ((None, None, None), 1.5)],
                         ids=["local-global-local", "two-windows", "softcap", "all-local", "softcap-only"])
def test_paged_engine_gives_the_tokens_of_no_cache_and_of_the_naive_cache(windows, softcap):
    model, batch = windowed(windows, softcap), prompts()
    expected = [generate(model, p, GREEDY, use_cache=False) for p in batch]
    assert [generate(model, p, GREEDY) for p in batch] == expected  # the naive cache, one prompt at a time
    assert generate_batch(model, batch, GREEDY) == expected  # left-padded together
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=256))
    ids = [engine.add_request(p, GREEDY) for p in batch[:2]]
    for p in batch[2:]:  # continuous batching: the others arrive mid-run
        engine.step()
        ids.append(engine.add_request(p, GREEDY))
    while engine.has_unfinished():
        engine.step()
    assert [engine.output(i).completions[0] for i in ids] == expected
    assert engine.blocks.num_used == 0, "finished sequences give every block back"
    engine.blocks.check_invariants([])


def test_the_reference_attention_applies_windows_and_softcaps():
    model, batch = windowed((3, None, 5), 2.0), prompts(lengths=(9, 2))
    few = SamplingParams(temperature=0.0, max_new_tokens=14)  # past 3x the window of 3 (it loops in Python)
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=64, attention="reference"))
    assert completions(engine.generate(batch, few)) == [generate(model, p, few, use_cache=False) for p in batch]


def test_int8_blocks_give_the_tokens_of_the_int8_naive_cache():
    model, batch = windowed((4, None, 4), 3.0), prompts(lengths=(5, 13))
    few = SamplingParams(temperature=0.0, max_new_tokens=12)  # past 3x the window of 4
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=256, kv_dtype="int8"))
    assert completions(engine.generate(batch, few)) == [generate(model, p, few, kv_dtype="int8") for p in batch]


def test_preemption_and_parallel_sampling_with_windows():
    model, batch = windowed((4, None, 4)), prompts()
    expected = [generate(model, p, GREEDY, use_cache=False) for p in batch]
    # 3 groups x 8 blocks hold the longest request's recompute (13 + 18 - 1 tokens) but not the batch
    small = LLMEngine(model, EngineConfig(block_size=4, num_blocks=24))
    assert completions(small.generate(batch, GREEDY)) == expected
    assert small.stats.preemptions > 0 and small.blocks.num_used == 0
    params = SamplingParams(temperature=1.0, max_new_tokens=NEW, seed=3, n=3)
    together = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128)).generate([batch[1]], params)[0]
    alone = [generate(model, batch[1], SamplingParams(temperature=1.0, max_new_tokens=NEW, seed=3 + i))
             for i in range(3)]
    assert together.completions == alone


def test_windowed_blocks_go_back_as_a_sequence_advances_and_match_the_memory_formula():
    """After every decode step, the pool holds each global group's blocks for the whole context and each
    windowed group's blocks for its last `window` tokens: what inference/memory.py counts, to the byte."""
    window, bs = 6, 4
    model = windowed((window, None, window))
    engine = LLMEngine(model, EngineConfig(block_size=bs, num_blocks=256, enable_prefix_caching=False))
    specs, per_block = model.cache_specs(), PagedKVPool.bytes_per_block(model, bs)
    assert per_block == bs * 2 * 2 * 16 * 4, "a block is one layer's page (a group of 1 layer), not every layer's"
    assert engine.pool.nbytes() == 257 * per_block
    engine.add_request(prompts(lengths=(30,))[0], SamplingParams(temperature=0.0, max_new_tokens=40))
    engine.step()  # the prompt: every group holds all its blocks while the pass reads them
    assert engine.blocks.num_used == 3 * 8
    seq = engine.scheduler.running[0]
    while engine.has_unfinished():
        engine.step()
        if not engine.has_unfinished():
            break
        n = seq.num_computed  # tokens whose K/V are stored
        assert engine.blocks.num_used * per_block == paged_kv_bytes(specs, [n], bs, 4)
        assert engine.blocks.num_used == -(-n // bs) + 2 * layer_blocks(specs[0], n, bs)
        assert seq.tables[1].released == (n - window) // bs and seq.tables[0].released == 0
    assert engine.blocks.num_used == 0
    engine.blocks.check_invariants([])


def test_gemma_3_1b_shape_memory_and_groups():
    """26 layers, one KV head of 256 in bf16, 22 of them with a 512-token window (Gemma 3 1B's layout)."""
    specs = [KVSpec(1, 256, window=None if i % 6 == 5 else 512) for i in range(26)]
    assert paged_kv_bytes(specs, [32768], 16, 2) == 4 * 32768 * 1024 + 22 * 512 * 1024 == 145_752_064
    assert paged_kv_bytes(global_specs(specs), [32768], 16, 2) == 26 * 32768 * 1024 == 872_415_232
    groups = table_groups(specs)  # gcd(4, 22) = 2 layers a group: no slot of a block is padding
    assert [g.window for g in groups] == [None] * 2 + [512] * 11 and {len(g.layers) for g in groups} == {2}
    assert sorted(i for g in groups for i in g.layers) == list(range(26))
    with pytest.raises(ValueError, match="same per-token shapes"):
        table_groups([KVSpec(1, 256, window=4), KVSpec(2, 128)])


def test_memory_command_prints_windowed_bytes(monkeypatch, capsys):
    """`python -m inference.memory` on a family whose layers declare windows: the paged line counts each layer's
    blocks, beside what every layer global would hold (the family is the test model, put in the registry's place)."""
    import inference.memory as memory

    monkeypatch.setattr(memory, "cache_specs", lambda family, cfg: windowed((64, None, 64)).cache_specs())
    got = memory.main(["--preset", "llama-3.2-1b", "--seq-len", "1024", "--batch", "2", "--dtype", "fp32"])
    per_layer = 2 * 2 * 16 * 4  # K and V, 2 KV heads of 16, fp32
    assert got["paged_bytes"] - 3 * 2 * 64 * 4 == 2 * (1024 + 2 * 64) * per_layer  # minus 3 tables' entries
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("memory windows")][0]
    fields = dict(kv.split("=") for kv in line.split()[2:])
    assert int(fields["kv_bytes"]) == 2 * (1024 + 2 * 64) * per_layer
    assert int(fields["global_kv_bytes"]) == 2 * 3 * 1024 * per_layer


def test_prefix_caching_with_windows_stays_correct_after_blocks_are_given_back_and_reused():
    """A finished sequence's windowed blocks were given back long before it finished and then reused by others:
    a later prompt with its prefix hits only what every group still holds, and gets the tokens of no cache."""
    model = windowed((4, None, 4))
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(0, 97, (24,), generator=g).tolist()
    first, others = prefix + [5, 6], [torch.randint(0, 97, (9,), generator=g).tolist() for _ in range(4)]
    later = [prefix + [9, 9, 9], prefix[:6] + [1]]
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=40))
    outs = completions(engine.generate([first] + others, GREEDY))  # a small pool: given-back blocks are reused
    outs += completions(engine.generate(later, GREEDY))
    assert outs == [generate(model, p, GREEDY, use_cache=False) for p in [first] + others + later]
    # Arriving together, prompts sharing a prefix shorter than the window hit it in every group.
    together = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    shared = [prefix[:8] + [i] for i in range(3)]
    assert completions(together.generate(shared, GREEDY)) == [generate(model, p, GREEDY) for p in shared]
    assert together.stats.cached_prompt_tokens == 2 * 8


def test_block_manager_gives_back_blocks_before_the_window_and_keeps_its_invariants():
    blocks = BlockManager(20, 4)
    grouped = GroupedBlocks(blocks, [None, 5])
    tokens = list(range(40))
    tables = grouped.empty()
    grouped.allocate(tables, tokens, 0, 17)  # a prompt of 17: 5 blocks in each group
    assert [len(t) for t in tables] == [5, 5] and blocks.num_used == 10
    # Tokens 17 .. 20 next: the query at 17 sees 13 .. 17, so blocks 0 .. 2 (positions 0 .. 11) of the windowed
    # table go back first and its new block comes from them; the global table needs a new one.
    assert grouped.blocks_needed(tables, 17, 21) == 1 + 0
    child = grouped.fork(tables)  # shared with a fork, they would not come back, and block 4 is copied on write
    assert grouped.blocks_needed(tables, 17, 21) == (1 + 1) + (1 + 1)
    grouped.allocate(tables, tokens, 17, 21)
    assert tables[1][:3] == [RELEASED] * 3 and tables[1].released == 3 and tables[0].released == 0
    blocks.check_invariants(tables + child)  # the child still holds the 3 blocks the parent gave back
    grouped.free(child)
    blocks.check_invariants(tables)
    assert blocks.num_used == 6 + 3
    grouped.free(tables)
    blocks.check_invariants([])
    assert blocks.num_used == 0 and isinstance(grouped.take_prefix([[], []])[1], BlockTable)


def test_the_benchmark_runs_its_checks_and_both_models_at_a_tiny_size(capsys):
    from inference.benchmarks.sliding_window import main

    rows = main(["--smoke", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "ok=0" not in out and out.count("check tokens ok=1") == 8  # 4 paths x 2 soft-caps on a CPU
    windowed, every = rows
    assert (windowed["model"], every["model"]) == ("windowed", "global") and windowed["preemptions"] == 0
    assert windowed["seqs_in_budget"] > every["seqs_in_budget"] == 3  # the budget is what 3 global ones need
    assert out.rstrip().splitlines()[-1].startswith("| global |")


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU path: needs CUDA (run on the GPU machine; the "
                                                                     "CPU suite checks the gather and the reference)")


@needs_gpu
def test_triton_kernel_with_windows_and_softcaps_matches_the_reference_on_gpu():
    from inference.benchmarks.sliding_window import check_kernel

    check_kernel(torch.device("cuda"))  # raises SystemExit on the first mismatch


@needs_gpu
def test_engine_with_the_kernel_and_cuda_graphs_gives_the_tokens_of_no_cache_on_gpu():
    from inference.benchmarks.sliding_window import check_tokens

    check_tokens(torch.device("cuda"), window=8)  # gather, triton, triton + CUDA graphs vs no cache and naive


@needs_gpu
def test_int8_blocks_under_the_kernel_and_cuda_graphs_give_the_gather_paths_tokens_on_gpu():
    model, batch = windowed((4, None, 4), 3.0), prompts()
    model = model.cuda()
    runs = [completions(LLMEngine(model, EngineConfig(block_size=4, num_blocks=256, kv_dtype="int8", **kw))
                        .generate(batch, GREEDY)) for kw in (dict(attention="gather"), dict(attention="triton"),
                                                             dict(attention="triton", cuda_graphs=True))]
    assert runs[0] == runs[1] == runs[2]
