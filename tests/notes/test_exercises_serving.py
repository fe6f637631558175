"""The answers to the exercises of notes/serving.md, computed from the code and compared with the hints the
note gives."""

import pytest

from inference.engine import EngineConfig, LLMEngine
from inference.sampling import SamplingParams
from inference.text_stream import TextStream

PIECES = ["The", " end", ".\n", "\nMore"]


def test_what_each_token_releases_before_a_stop_string(hints):
    stream = TextStream(lambda ids: "".join(PIECES[i] for i in ids), stop=["\n\n"])
    released = []
    for token in range(len(PIECES)):
        released.append(stream.add(token)[0])
        if stream.stopped:
            break
    assert released == ["The", " end", ".", ""] and stream.stopped and stream.text == "The end."
    other = TextStream(lambda ids: "".join((PIECES[:3] + ["And"])[i] for i in ids), stop=["\n\n"])
    assert [other.add(t)[0] for t in range(4)] == ["The", " end", ".", "\nAnd"] and not other.stopped
    hint = hints("serving")
    assert '"The", " end", ".", then "" and the stream stops; its text is "The end."' in hint
    assert 'a fourth token "And" would release "\\nAnd"' in hint


def test_the_longest_answer_a_small_pool_admits(hints, model):
    engine = LLMEngine(model, EngineConfig(block_size=16, num_blocks=6))  # 96 slots; the model's context is 128
    prompt = [1] * 40
    longest = max(m for m in range(1, 89) if _admitted(engine, prompt, m))
    assert longest == 57 and engine.scheduler.blocks.peak_blocks(40 + longest - 1) == 6
    with pytest.raises(ValueError, match="needs 7 KV blocks"):
        engine.check_request(prompt, SamplingParams(max_new_tokens=58))
    assert "40 + 57 - 1 = 96 tokens fill the 6 blocks; 58 would need a seventh" in hints("serving")


def _admitted(engine, prompt, max_new_tokens):
    try:
        engine.check_request(prompt, SamplingParams(max_new_tokens=max_new_tokens))
        return True
    except ValueError:
        return False
