"""The KV memory formulas of inference/memory.py (and notes/kv-cache.md) equal the bytes of real caches."""


from architectures.llama3 import preset
from inference.engine import EngineConfig, LLMEngine
from inference.kv_cache import NaiveKVCache
from inference.memory import DTYPE_BYTES, cache_specs, kv_bytes_per_token, main, naive_kv_bytes, paged_kv_bytes
from inference.kv_pool import PagedKVPool
from inference.sampling import SamplingParams


def test_naive_formula_equals_the_cache_tensors(model):
    cache = NaiveKVCache.for_model(model, batch_size=3, capacity=50)
    assert naive_kv_bytes(model.cache_specs(), 3, 50, 4) == cache.nbytes()
    # 2 (K, V) x 2 layers x 2 KV heads x 16 head_dim x 4 bytes
    assert kv_bytes_per_token(model.cache_specs(), 4) == 2 * 2 * 2 * 16 * 4


def test_paged_formula_equals_the_blocks_the_engine_holds(model, prompts):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    per_block = PagedKVPool.bytes_per_block(model, 4)
    assert engine.pool.nbytes() == (128 + 1) * per_block  # + the scratch block
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=6))
    engine.step()  # every prompt admitted and prefilled: each holds ceil(len / 4) blocks
    assert engine.blocks.num_used * per_block == paged_kv_bytes(model.cache_specs(), [len(p) for p in prompts], 4, 4)


def test_estimator_for_llama_3_2_1b(capsys):
    got = main(["--preset", "llama-3.2-1b", "--seq-len", "8192", "--batch", "32"])
    # 2 x 16 layers x 8 KV heads x 64 head_dim x 2 bytes (bf16) = 32 KiB per token
    assert got["bytes_per_token"] == 32768 == kv_bytes_per_token(cache_specs("llama3", preset("llama-3.2-1b")), DTYPE_BYTES["bf16"])
    assert got["naive_bytes"] == 32 * 8192 * 32768 == 8 * 2**30
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("memory ")]
    assert [dict(kv.split("=") for kv in l.split()[1:])["cache"] for l in lines] == ["naive", "paged"]
    half = main(["--preset", "llama-3.2-1b", "--seq-len", "8192", "--batch", "32", "--mean-len", "4000"])
    assert half["paged_bytes"] == 32 * 250 * 16 * 32768 + 32 * 250 * 4  # ceil(4000 / 16) = 250 blocks each


def test_latent_cache_is_set_beside_per_head_kv_and_gqa_of_the_same_depth(capsys):
    """DeepSeek-V3 caches 576 numbers per token and layer (d_c + d_h^R = 512 + 64) over 61 layers;
    the contrast lines are the same 61 layers caching each of the 128 heads' decompressed K and V
    (d_h + d_h^R = 192 and d_v = 128), and GQA with Llama 3 70B's 8 KV heads of 128."""
    got = main(["--family", "deepseek_v3", "--preset", "deepseek-v3"])
    assert got["bytes_per_token"] == 576 * 61 * 2 == 70_272
    assert got["contrast_bytes_per_token"] == {"per_head_kv": 61 * 128 * (192 + 128) * 2,  # 4,997,120
                                               "gqa": 2 * 61 * 8 * 128 * 2}  # 249,856
    lines = [dict(kv.split("=") for kv in l.split()[1:]) for l in capsys.readouterr().out.splitlines()
             if l.startswith("memory contrast=")]
    assert [(l["contrast"], int(l["bytes_per_token"]), l["ratio"]) for l in lines] == [
        ("per_head_kv", 4_997_120, "71.11"), ("gqa", 249_856, "3.56")]
    main(["--preset", "llama-3.2-1b"])  # a model without a latent cache gets no contrast lines
    assert "contrast" not in capsys.readouterr().out
