"""Llama 3 is the same function as transformers' LlamaForCausalLM.

Tiny random LlamaForCausalLM models are built from configs, saved with `save_pretrained`
(the hub layout) and loaded with our `from_pretrained`. Logits must agree within 1e-4 in
fp32 (both compute the same ops in the same order up to SDPA kernels and fp32 rounding;
1e-4 is far below any real difference, which shows up at 1e-2 or more), and greedy
generations must be token-for-token identical, with our KV cache on and off.
"""

import itertools

import pytest
import torch

# The oracle is imported, never skipped: without it these tests must fail, not pass vacuously.
import transformers

from architectures.llama3 import from_pretrained
from inference.generate import generate
from inference.sampling import SamplingParams

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def make_reference(tmp_path, gqa_ratio=2, rope_scaling=None, tie=False, seed=0, **overrides):
    torch.manual_seed(seed)
    heads = 4
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=heads // gqa_ratio, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, rope_scaling=rope_scaling, tie_word_embeddings=tie, **overrides,
    )
    ref = transformers.LlamaForCausalLM(cfg).eval()
    # Random init leaves the norms at 1; perturb them so a swapped or ignored norm would show.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    return ref


CASES = list(itertools.product([1, 2, 4], [None, LLAMA3_ROPE], [False, True]))


@pytest.mark.parametrize("gqa_ratio,rope_scaling,tie", CASES,
                         ids=[f"gqa{g}-{'llama3rope' if r else 'rope'}-{'tied' if t else 'untied'}" for g, r, t in CASES])
def test_logits_match_transformers(tmp_path, gqa_ratio, rope_scaling, tie):
    ref = make_reference(tmp_path, gqa_ratio, rope_scaling, tie)
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, 97, (3, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == (3, 100, 97)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie


@pytest.mark.parametrize("gqa_ratio,rope_scaling", [(1, None), (4, LLAMA3_ROPE)])
def test_greedy_generation_matches_transformers_with_and_without_cache(tmp_path, gqa_ratio, rope_scaling):
    ref = make_reference(tmp_path, gqa_ratio, rope_scaling)
    ours = from_pretrained(tmp_path)
    prompt = [5, 17, 42, 8, 3, 77]
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40,
                            pad_token_id=0)[0, len(prompt):].tolist()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=40)
    assert generate(ours, prompt, greedy, use_cache=True) == expected
    assert generate(ours, prompt, greedy, use_cache=False) == expected


def test_sharded_checkpoint_loads(tmp_path):
    ref = make_reference(tmp_path / "ref")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = from_pretrained(tmp_path / "sharded")
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_our_checkpoint_loads_in_transformers(tmp_path):
    """The converse direction: what our train script writes is a valid LlamaForCausalLM directory."""
    from architectures.llama3 import Llama3, LlamaConfig, save_pretrained

    torch.manual_seed(0)
    ours = Llama3(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"},
                              tie_word_embeddings=True)).eval()
    save_pretrained(ours, tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_bf16_load_is_close_to_fp32(tmp_path):
    make_reference(tmp_path)
    fp32, bf16 = from_pretrained(tmp_path), from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        # bf16 keeps 8 mantissa bits: logits of order 1 agree to a few hundredths.
        torch.testing.assert_close(bf16(ids).float(), fp32(ids), rtol=0.05, atol=0.05)
