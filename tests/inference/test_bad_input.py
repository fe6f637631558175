"""Bad requests fail at submission with a message that says what is wrong and what to do."""

import pytest

from inference.batched import generate_batch
from inference.engine import EngineConfig, LLMEngine
from inference.sampling import SamplingParams


@pytest.fixture
def engine(model):
    return LLMEngine(model, EngineConfig(block_size=4, num_blocks=16))


def test_prompt_longer_than_the_model_maximum(engine):
    with pytest.raises(ValueError, match=r"prompt of 129 tokens exceeds the model's maximum of 128 tokens"):
        engine.add_request([1] * 129)
    with pytest.raises(ValueError, match=r"prompt of 100 tokens \+ max_new_tokens=40 exceeds max_model_len=128; "
                                         r"lower max_new_tokens to at most 28"):
        engine.add_request([1] * 100, SamplingParams(max_new_tokens=40))


def test_request_that_can_never_fit_in_the_pool_is_refused_at_submission(engine):
    # 16 blocks of 4 slots = 64 slots; 60 + 10 - 1 = 69 K/V slots needed.
    with pytest.raises(ValueError, match=r"needs 18 KV blocks of 4 tokens.*whole pool has 16; raise num_blocks"):
        engine.add_request([1] * 60, SamplingParams(max_new_tokens=10))
    assert not engine.has_unfinished(), "a refused request must not be queued (it would hang the engine)"
    engine.add_request([1] * 55, SamplingParams(max_new_tokens=10, temperature=0.0))  # 64 slots: fits exactly
    for _ in engine.stream():
        pass


def test_empty_prompt(engine, model):
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate_batch(model, [[1, 2], []])


@pytest.mark.parametrize("bad", [97, -1, 10**9])
def test_token_ids_outside_the_vocabulary(engine, bad):
    with pytest.raises(ValueError, match=rf"token id {bad} at position 2 is outside the vocabulary \[0, 97\)"):
        engine.add_request([1, 2, bad, 3])


def test_n_below_one():
    with pytest.raises(ValueError, match=r"n \(completions per prompt\) must be >= 1, got 0"):
        SamplingParams(n=0)


def test_negative_temperature():
    with pytest.raises(ValueError, match=r"temperature must be >= 0 \(0 means greedy\), got -0.5"):
        SamplingParams(temperature=-0.5)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5])
def test_top_p_outside_zero_one(top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=top_p)


def test_negative_top_k():
    with pytest.raises(ValueError, match=r"top_k must be >= 0 \(0 disables it\), got -1"):
        SamplingParams(top_k=-1)


def test_params_of_the_wrong_type_and_a_reused_request_id(engine):
    with pytest.raises(TypeError, match="params must be a SamplingParams, got dict"):
        engine.add_request([1, 2], {"temperature": 0})
    engine.add_request([1, 2], SamplingParams(max_new_tokens=4), request_id="a")
    with pytest.raises(ValueError, match="request id 'a' is already in use"):
        engine.add_request([3], SamplingParams(max_new_tokens=4), request_id="a")


def test_engine_config_mistakes(model):
    with pytest.raises(TypeError, match="unknown EngineConfig field 'blocksize'"):
        LLMEngine(model, blocksize=8)
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds the model's max_position_embeddings=128"):
        LLMEngine(model, EngineConfig(num_blocks=8, max_model_len=4096))
