"""Stopping requests before they end (`LLMEngine.abort`), the submission checks alone (`check_request`),
and per-token log-probabilities: what a server needs of the engine.

An aborted request gives every block back at once, whether it was running or still waiting, and
the requests beside it generate exactly the tokens they generate alone (the no-cache reference)."""

import pytest
import torch

from inference.engine import EngineConfig, LLMEngine
from inference.sampling import SamplingParams, generate

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def expected(model, prompts):
    return [generate(model, p, GREEDY, use_cache=False) for p in prompts]


def live_tables(engine):
    return [s.block_table for s in engine.scheduler.running]


def test_aborting_a_running_request_frees_its_blocks_at_once_and_leaves_the_others_alone(model, prompts, expected):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    ids = [engine.add_request(p, GREEDY) for p in prompts[:3]]
    seen = {i: [] for i in ids}
    for _ in range(3):
        for e in engine.step():
            seen[e.request_id].append(e.token)
    held = len(engine.scheduler.running[1].block_table)
    used = engine.blocks.num_used
    engine.abort(ids[1])
    assert engine.blocks.num_used == used - held, "the aborted request's blocks are free before the next step"
    engine.blocks.check_invariants(live_tables(engine))
    for e in engine.stream():
        assert e.request_id != ids[1], "no token of an aborted request"
        seen[e.request_id].append(e.token)
    assert [seen[ids[0]], seen[ids[2]]] == [expected[0], expected[2]]
    assert engine.blocks.num_used == 0
    with pytest.raises(ValueError, match="unknown request id"):
        engine.abort(ids[1])


def test_aborting_a_waiting_request_takes_it_out_of_the_queue(model, prompts, expected):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128, max_num_seqs=1, max_num_batched_tokens=64))
    first, second, third = (engine.add_request(p, GREEDY) for p in prompts[:3])
    engine.step()
    assert [s.request_id for s in engine.scheduler.waiting] == [second, third]
    engine.abort(second)
    assert [s.request_id for s in engine.scheduler.waiting] == [third]
    done = {}
    for e in engine.stream():
        done.setdefault(e.request_id, []).append(e.token)
    assert done[third] == expected[2] and second not in done
    assert engine.blocks.num_used == 0


def test_aborting_a_finished_request_forgets_it(model, prompts):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    rid = engine.generate([prompts[0]], GREEDY)[0].request_id
    engine.abort(rid)
    with pytest.raises(KeyError):
        engine.output(rid)


def test_stopping_one_completion_of_n_keeps_its_siblings_and_their_seeds(model, prompts):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=11, n=3)
    alone = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128)).generate([prompts[2]], params)[0].completions
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    rid = engine.add_request(prompts[2], params)
    with pytest.raises(ValueError, match="forked at its first token"):
        engine.abort(rid, index=1)  # before the first step the siblings do not exist yet
    engine.step()
    engine.step()
    engine.abort(rid, index=1)
    engine.blocks.check_invariants(live_tables(engine))
    for _ in engine.stream():
        pass
    out = engine.output(rid)
    assert out.finish_reasons == ["length", "stop", "length"]
    assert out.completions[0] == alone[0] and out.completions[2] == alone[2]
    assert out.completions[1] == alone[1][:2], "completion 1 stopped after its second token"
    assert engine.blocks.num_used == 0


def test_check_request_refuses_what_add_request_refuses_and_changes_nothing(model, prompts):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=8))
    assert engine.check_request(prompts[0], GREEDY) == prompts[0]
    with pytest.raises(ValueError, match="max_model_len"):
        engine.check_request(prompts[0], SamplingParams(max_new_tokens=128))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.check_request(prompts[4], GREEDY)  # 40 + 12 tokens need 13 blocks of 4; the pool has 8
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.check_request([5, 97], GREEDY)
    assert not engine.has_unfinished() and engine.blocks.num_used == 0


def test_logprobs_are_the_models_own_log_softmax_at_each_position(model, prompts, expected):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    params = SamplingParams(temperature=0.0, max_new_tokens=6, logprobs=3)
    rid = engine.add_request(prompts[1], params)
    events = [e for e in engine.stream() if e.request_id == rid]
    ids = torch.tensor([prompts[1] + expected[1][:6]])
    with torch.no_grad():
        reference = model(ids)[0, len(prompts[1]) - 1:-1].float().log_softmax(-1)  # (6, V)
    for i, e in enumerate(events):
        assert e.logprob == pytest.approx(reference[i, e.token].item(), abs=1e-4)
        values, top = reference[i].topk(3)
        assert [t for t, _ in e.top_logprobs] == top.tolist(), "alternatives, most likely first"
        assert [v for _, v in e.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
    assert [e.token for e in events] == expected[1][:6], "asking for logprobs changes no token"
    zero = LLMEngine(model, EngineConfig(block_size=4, num_blocks=128))
    zero.add_request(prompts[1], SamplingParams(temperature=0.0, max_new_tokens=2, logprobs=0))
    assert all(e.top_logprobs == [] and e.logprob is not None for e in zero.stream())
