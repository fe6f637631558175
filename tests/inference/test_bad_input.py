"""Bad requests fail at submission with a message that says what is wrong and what to do."""

import pytest

from architectures.utils.command_line import UserTypeError
from inference.batched import generate_batch
from inference.engine import EngineConfig, LLMEngine
from inference.sampling import stream
from inference.sampling import SamplingParams, eos_ids


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


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", float("inf")),
                                         ("top_p", float("nan")), ("top_p", float("inf")), ("top_k", float("inf"))])
def test_non_finite_sampling_settings(field, value):
    # NaN slips through every range check (nan < 0 is False), and argparse's float accepts "nan".
    with pytest.raises(ValueError, match=rf"{field} must be a finite number, got {value}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("fields,message", [
    (dict(num_blocks=0), r"num_blocks must be >= 1, got 0; leave it None to size the pool"),
    (dict(num_blocks=-4), r"num_blocks must be >= 1, got -4"),
    (dict(block_size=0), r"block_size must be >= 1, got 0"),
    (dict(max_num_seqs=0), r"max_num_seqs must be >= 1, got 0"),
    (dict(max_num_batched_tokens=-1), r"max_num_batched_tokens must be >= 1, got -1"),
    (dict(gpu_memory_fraction=0.0), r"gpu_memory_fraction must be in \(0, 1\], got 0.0"),
    (dict(gpu_memory_fraction=1.5), r"gpu_memory_fraction must be in \(0, 1\], got 1.5"),
    (dict(gpu_memory_fraction=float("nan")), r"gpu_memory_fraction must be in \(0, 1\], got nan"),
])
def test_engine_config_that_describes_no_pool_or_no_batch(model, fields, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**fields)
    with pytest.raises(ValueError, match=message):
        LLMEngine(model, **fields)


def test_num_blocks_none_sizes_the_pool_by_default(model):
    # 0 used to be read as "not set" and silently gave this default pool; only None means that now.
    assert LLMEngine(model, EngineConfig(num_blocks=None)).blocks.num_blocks == 4096  # the CPU default


def test_a_prompt_given_as_text_is_refused_with_a_hint(engine, model):
    hint = r"must be a list of token ids, got str 'hello'; encode the text with the tokenizer first"
    with pytest.raises(UserTypeError, match="prompt_ids " + hint):
        engine.add_request("hello")
    assert not engine.has_unfinished()
    with pytest.raises(UserTypeError, match="prompt_ids " + hint):
        stream(model, "hello")  # checked when called, before any token is asked for
    with pytest.raises(UserTypeError, match=r"prompts\[1\] " + hint):
        generate_batch(model, [[1, 2], "hello"])
    with pytest.raises(UserTypeError, match=r"prompts must be a list of prompts, each a list of token ids, got str"):
        generate_batch(model, "hello")
    with pytest.raises(UserTypeError, match=r"prompt_ids must be a list of token ids, got list \['he', 'llo'\]; "):
        engine.add_request(["he", "llo"])  # tokens as strings: text too
    assert issubclass(UserTypeError, TypeError), "callers that catch TypeError still catch it"


def test_the_library_stream_still_refuses_a_request_longer_than_the_context(model):
    # Only the generate command line shortens the request (with a note); the library says what is wrong.
    with pytest.raises(ValueError, match=r"prompt of 120 tokens \+ max_new_tokens=20 exceeds the model's "
                                         r"max_position_embeddings=128"):
        stream(model, [1] * 120, SamplingParams(max_new_tokens=20))


def test_eos_ids_reads_every_form_of_a_config_eos_token_id():
    assert eos_ids(None) == set() and eos_ids(2) == {2} and eos_ids([2, 5]) == {2, 5}


def test_naive_batch_stops_at_any_of_a_list_of_eos_ids(model, prompts):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6)
    expected = generate_batch(model, prompts[:2], greedy)
    original, model.config.eos_token_id = model.config.eos_token_id, [expected[0][2], 10**6]  # as Llama 3 Instruct
    try:
        got = generate_batch(model, prompts[:2], greedy)
    finally:
        model.config.eos_token_id = original
    assert got[0] == expected[0][:expected[0].index(expected[0][2]) + 1]
    stop = next((i for i, t in enumerate(expected[1]) if t == expected[0][2]), None)
    assert got[1] == (expected[1] if stop is None else expected[1][:stop + 1])
