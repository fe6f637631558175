"""The answers to the exercises of notes/kv-cache.md, computed from the code and compared with the hints
the note gives."""

from architectures.llama3 import preset
from inference.benchmarks.throughput import parse_args, workload
from inference.memory import main as memory_main


def test_positions_of_a_17_token_prompt_and_6_new_tokens(hints):
    # the formulas that tests/inference/test_naive_cache.py checks against the positions a model sees
    P, n = 17, 6
    assert (n * P + n * (n - 1) // 2, P + n - 1) == (117, 22)
    assert "6 x 17 + 15 = 117 positions without a cache, 17 + 5 = 22 with one" in hints("kv-cache")


def test_llama_3_2_1b_cache_with_and_without_gqa(hints):
    got = memory_main(["--preset", "llama-3.2-1b", "--seq-len", "8192", "--batch", "32"])
    assert got["bytes_per_token"] == 32_768 and got["naive_bytes"] == 8 * 2**30
    cfg = preset("llama-3.2-1b")
    without_gqa = got["naive_bytes"] * cfg.num_attention_heads // cfg.num_key_value_heads
    assert without_gqa == 32 * 2**30
    assert "32,768 bytes a token, 8 GiB for the batch; 32 GiB with 32 KV heads" in hints("kv-cache")


def test_logits_of_the_padded_prefill(hints):
    args, _ = parse_args([])  # the benchmark's default workload
    vocab = preset("llama-3.2-1b").vocab_size
    prompts, new_tokens = workload(args, vocab)
    longest, real = max(map(len, prompts)), sum(map(len, prompts))
    assert (len(prompts), longest, real, set(new_tokens)) == (64, 502, 16401, {256})
    padded = len(prompts) * longest
    assert padded == 32128
    gib = padded * vocab * 2 / 2**30  # bf16 logits of every padded position
    assert f"{gib:.2f}" == "7.68"
    assert "64 x 502 = 32,128 positions, 16,401 of them real" in hints("kv-cache")
    assert "32,128 x 128,256 x 2 bytes = 7.68 GiB" in hints("kv-cache")
