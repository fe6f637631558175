"""The thread that owns the engine (inference/engine_loop.py), driven from plain threads: concurrent
requests get exactly the tokens they get alone, a released request frees its blocks, a stopped completion
ends, and the loop keeps going after a request fails."""

import queue
import threading

import pytest

from inference.engine import EngineConfig, LLMEngine
from inference.engine_loop import EngineLoop
from inference.sampling import SamplingParams, generate

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


@pytest.fixture
def loop(model):
    loop = EngineLoop(LLMEngine(model, EngineConfig(block_size=4, num_blocks=64))).start()
    yield loop
    loop.close()


def collect(loop, prompt, params):
    """Submit and wait: {index: tokens}, and the finish reasons."""
    inbox = queue.Queue()
    rid = loop.submit(prompt, params, inbox.put)
    tokens, reasons = {}, {}
    while len(reasons) < params.n:
        item = inbox.get(timeout=30)
        if isinstance(item, BaseException):
            raise item
        for e in item:
            tokens.setdefault(e.index, []).append(e.token)
            if e.finished:
                reasons[e.index] = e.finish_reason
    loop.release(rid)
    return tokens, reasons


def wait_until_idle(loop):
    for _ in range(300):
        s = loop.stats()
        if s["requests"] == 0 and s["running"] == 0 and s["waiting"] == 0:
            return s
        threading.Event().wait(0.01)
    raise AssertionError(f"the loop did not go idle: {loop.stats()}")


def test_concurrent_requests_get_the_tokens_they_get_alone_and_give_every_block_back(loop, model, prompts):
    results = [None] * len(prompts)

    def client(i):
        results[i] = collect(loop, prompts[i], GREEDY)[0][0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [generate(model, p, GREEDY, use_cache=False) for p in prompts]
    stats = wait_until_idle(loop)
    assert stats["used_blocks"] == 0 and stats["free_blocks"] == stats["total_blocks"] == 64


def test_a_request_released_mid_run_frees_its_blocks(loop, prompts):
    inbox = queue.Queue()
    rid = loop.submit(prompts[4], SamplingParams(temperature=0.0, max_new_tokens=80, ignore_eos=True), inbox.put)
    inbox.get(timeout=30)  # its first token: it is running, holding blocks
    assert loop.stats()["used_blocks"] > 0
    loop.release(rid)
    assert wait_until_idle(loop)["used_blocks"] == 0


def test_a_stopped_completion_ends_and_its_siblings_go_on(loop, prompts):
    inbox = queue.Queue()
    params = SamplingParams(temperature=1.0, max_new_tokens=30, seed=1, n=2, ignore_eos=True)
    rid = loop.submit(prompts[1], params, inbox.put)
    counts, finished = {0: 0, 1: 0}, {}
    while len(finished) < 2:
        for e in inbox.get(timeout=30):
            counts[e.index] += 1
            if e.index == 0 and counts[0] == 2:
                loop.stop_completion(rid, 0)  # the caller ends it: no event says so
                finished[0] = "stop"
            if e.finished:
                finished[e.index] = e.finish_reason
    loop.release(rid)
    assert finished == {0: "stop", 1: "length"} and counts[1] == 30
    assert counts[0] < 30, "completion 0 stopped soon after it was told (a token or two already under way)"
    assert wait_until_idle(loop)["used_blocks"] == 0


def test_a_bad_request_is_refused_in_the_callers_thread_and_the_loop_goes_on(loop, prompts):
    with pytest.raises(ValueError, match="max_model_len"):
        loop.submit(prompts[0], SamplingParams(max_new_tokens=500), lambda item: None)
    assert collect(loop, prompts[0], GREEDY)[1] == {0: "length"}


def test_closing_fails_the_requests_still_live(model, prompts):
    loop = EngineLoop(LLMEngine(model, EngineConfig(block_size=4, num_blocks=64))).start()
    inbox = queue.Queue()
    loop.submit(prompts[0], SamplingParams(temperature=0.0, max_new_tokens=100, ignore_eos=True), inbox.put)
    inbox.get(timeout=30)
    loop.close()
    items = []
    while not inbox.empty():
        items.append(inbox.get())
    assert isinstance(items[-1], RuntimeError) and loop.stats()["used_blocks"] == 0
