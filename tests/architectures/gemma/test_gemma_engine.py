"""Gemma through the paged engine: the greedy tokens of no cache, past 3x the window, with Gemma 2's soft-caps
and Gemma 3's QK-norm and two RoPE bases; on a GPU also through the Triton decode kernel and CUDA graphs."""

import pytest
import torch

from architectures.gemma import Gemma
from architectures.gemma.config import GemmaConfig
from inference.engine import EngineConfig, LLMEngine
from inference.sampling import SamplingParams, generate

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)  # past 3 x the window of 4
PROMPTS = [[3, 9, 27, 4, 1], [7, 7, 2], [11, 5, 8, 13, 21, 34, 2, 6, 9]]


def gemma(model_type: str, head_dim: int = 8) -> Gemma:
    torch.manual_seed(0)
    extra = {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 8.0} if model_type == "gemma2" else {}
    cfg = GemmaConfig(model_type=model_type, vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=128,
                      sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=8, initializer_range=0.2,
                      **extra)
    return Gemma(cfg).eval()


def engine_tokens(model, **config):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128, **config))
    tokens = [o.completions[0] for o in engine.generate(PROMPTS, GREEDY)]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks, "every block back in the pool"
    return tokens


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_paged_engine_gives_the_greedy_tokens_of_no_cache(model_type):
    model = gemma(model_type)
    specs = model.cache_specs()
    assert {s.window for s in specs} == {4, None}, "local and global layers both present"
    expected = [generate(model, p, GREEDY, use_cache=False) for p in PROMPTS]
    assert engine_tokens(model, attention="gather") == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU path: needs CUDA (the CPU test checks the gather path)")
@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_triton_kernel_and_cuda_graphs_give_the_greedy_tokens_of_no_cache_on_gpu(model_type):
    model = gemma(model_type, head_dim=16).cuda()  # the decode kernel reads keys of 16 numbers or more
    expected = [generate(model, p, GREEDY, use_cache=False) for p in PROMPTS]
    assert engine_tokens(model, attention="triton") == expected
    assert engine_tokens(model, attention="triton", cuda_graphs=True) == expected
