"""The OpenAI-compatible server (inference/server.py), tested with the official `openai` client against a
real uvicorn on 127.0.0.1 serving a tiny SFT checkpoint (two real steps of training.sft).

Oracle for the text: `python -m inference.generate` (its `main`, same checkpoint, same prompt, greedy),
which runs the naive generator, not the engine: a greedy answer must be byte for byte what it prints,
for a plain completion and for a chat reply. Oracle for the API: the client parses every answer and
every stream chunk into its own types, so a field of the wrong shape fails here."""

import concurrent.futures
import time

import httpx
import openai
import pytest
import torch

from inference import generate
from inference.engine import EngineConfig
from inference.server import ServerThread
from training.inference_setup import load_checkpoint, server_app

PROMPT = "Line 3: to be, or"
QUESTION = "What is 12 + 30?"
NAME = "tiny-sft"
ENGINE = EngineConfig(block_size=4, num_blocks=256, max_num_seqs=16, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def loaded(sft_checkpoint):
    return load_checkpoint(sft_checkpoint, None, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def server(loaded):
    model, tokenizer, folders = loaded
    server = ServerThread(server_app(model, tokenizer, folders, NAME, ENGINE)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def generate_text(checkpoint, prompt, n, *flags):
    return generate.main(["--checkpoint", str(checkpoint), "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", str(n), "--device", "cpu", *flags])


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def wait_idle(server, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(server)
        if h["requests"] == h["running"] == h["waiting"] == 0:
            return h
        time.sleep(0.02)
    raise AssertionError(f"the server did not go idle: {health(server)}")


# ---- the text: byte for byte generate's ------------------------------------------------------------------

def test_a_greedy_completion_is_what_generate_prints(sft_checkpoint, client, capsys):
    want = generate_text(sft_checkpoint, PROMPT, 24, "--no-chat")
    capsys.readouterr()
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    assert PROMPT + got.choices[0].text == want
    streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    assert PROMPT + "".join(c.choices[0].text for c in streamed) == want
    assert got.usage.prompt_tokens == len(loaded_tokens(sft_checkpoint, PROMPT))


def loaded_tokens(checkpoint, text):
    from training.tokenizer import Tokenizer
    return Tokenizer.from_file(checkpoint).encode(text)


def test_a_greedy_chat_reply_is_what_generate_prints(sft_checkpoint, client, capsys):
    want = generate_text(sft_checkpoint, QUESTION, 24)  # an SFT checkpoint: generate asks in its chat format
    capsys.readouterr()
    messages = [{"role": "user", "content": QUESTION}]
    got = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens and not chunks[-1].choices


# ---- sampling parameters ----------------------------------------------------------------------------------

def test_n_completions_with_a_seed_are_reproducible_whatever_else_is_batched(client):
    def ask(seed, n=2):
        out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.95,
                                        seed=seed, n=n, extra_body={"top_k": 50, "ignore_eos": True})
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    alone = ask(5)
    assert len(alone) == 2 and alone[0] != alone[1], "completion i draws with seed + i"
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # the same request among others, in one batch
        crowd = [pool.submit(ask, s) for s in (1, 5, 2, 3, 5, 4)]
        results = [f.result() for f in crowd]
    assert results[1] == results[4] == alone
    assert ask(6, n=1) == alone[1:], "completion 1 of seed 5 is completion 0 of seed 6"


def test_max_tokens_bounds_the_answer_and_usage_counts_it(client):
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=7, temperature=0.8, seed=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 7


def test_a_stop_string_across_tokens_ends_the_text_before_it(client):
    full = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, logprobs=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    tokens = full.logprobs.tokens
    j = next(j for j in range(2, len(tokens) - 1) if tokens[j].strip() and tokens[j + 1].strip())
    stop = tokens[j][-1] + tokens[j + 1][0]  # the end of one token and the start of the next
    want = full.text[:full.text.find(stop)]
    for stream in (False, True):
        out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "@@"],
                                        stream=stream, extra_body={"ignore_eos": True})
        choices = [c.choices[0] for c in out] if stream else out.choices
        assert "".join(c.text for c in choices) == want
        assert choices[-1].finish_reason == "stop"


def test_logprobs_come_with_their_tokens(client):
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True}).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    # Each token's own text: a token holding part of a character shows U+FFFD, which the whole text does not.
    joined = "".join(lp.tokens)
    assert joined == out.text or ("\ufffd" in joined and len(joined) >= len(out.text))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # Greedy: the chosen token is the most likely. (The API keys alternatives by their text, so two tokens
    # that both show U+FFFD keep one entry between them.)
    assert all(v >= max(top.values()) - 1e-5 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True}).choices[0]
    assert len(chat.logprobs.content) == 4 and all(len(t.top_logprobs) == 3 for t in chat.logprobs.content)


# ---- errors: the API's shape, and the server goes on ---------------------------------------------------------

BAD_REQUESTS = [
    ("completions", None, "invalid_json", None),  # malformed JSON
    ("completions", {"prompt": PROMPT, "max_tokens": "5"}, None, "max_tokens"),
    ("completions", {"prompt": PROMPT, "temperature": "hot"}, None, "temperature"),
    ("completions", {"prompt": 7}, None, "prompt"),
    ("completions", {"prompt": PROMPT, "stop": 5}, None, "stop"),
    ("completions", {"prompt": PROMPT, "max_tokens": 500}, "context_length_exceeded", "max_tokens"),
    ("completions", {"prompt": [5] * 200}, "context_length_exceeded", "prompt"),
    ("completions", {"prompt": PROMPT, "n": 0}, None, "n"),
    ("completions", {"prompt": PROMPT, "n": 17}, None, "n"),
    ("completions", {"prompt": PROMPT, "temperature": -0.5}, None, "temperature"),
    ("completions", {"prompt": PROMPT, "temperature": 2.5}, None, "temperature"),
    ("completions", {"prompt": PROMPT, "top_p": 0}, None, "top_p"),
    ("completions", {"prompt": PROMPT, "frequency_penalty": 1.0}, None, "frequency_penalty"),
    ("completions", {"prompt": PROMPT, "best_of": 3}, None, "best_of"),
    ("completions", {"prompt": PROMPT, "surprise": 1}, None, "surprise"),
    ("completions", {"prompt": ""}, None, "prompt"),
    ("completions", {"prompt": [5, 100000]}, None, None),  # a token id outside the vocabulary
    ("completions", [1, 2], None, None),  # JSON, but not an object
    ("chat/completions", {"messages": "hi"}, None, "messages"),
    ("chat/completions", {"messages": []}, None, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, None, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1000},
     "context_length_exceeded", "max_tokens"),
]


@pytest.mark.parametrize("route, body, code, param", BAD_REQUESTS, ids=[f"{r}-{p or c or i}" for i, (r, _, c, p)
                                                                        in enumerate(BAD_REQUESTS)])
def test_a_bad_request_is_a_400_with_the_apis_error_object(server, route, body, code, param):
    url = f"{server.url}/v1/{route}"
    r = httpx.post(url, content=b'{"prompt": "x",') if body is None else httpx.post(url, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"] and error["param"] == param
    if code:
        assert error["code"] == code


def test_the_server_keeps_answering_after_bad_requests(server, client):
    for route, body, _, _ in BAD_REQUESTS:
        httpx.post(f"{server.url}/v1/{route}", json=body)
    with pytest.raises(openai.BadRequestError) as e:  # the client raises the API's 400 as its own error
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=10_000)
    assert e.value.status_code == 400 and "at most" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="another-model", prompt=PROMPT)
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3).usage.completion_tokens <= 3
    assert wait_idle(server)["used_blocks"] == 0


def test_an_api_key_is_required_when_the_server_has_one(loaded):
    model, tokenizer, folders = loaded
    server = ServerThread(server_app(model, tokenizer, folders, NAME, ENGINE, api_key="sesame")).start()
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT})  # no key at all
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model=NAME, prompt=PROMPT, max_tokens=2).choices
        assert httpx.get(server.url + "/health").status_code == 200, "health needs no key"
    finally:
        server.stop()


# ---- one engine for every request ----------------------------------------------------------------------------

def test_concurrent_streams_get_what_they_get_one_at_a_time(client, server):
    prompts = [f"Line {i}: to be" for i in range(8)]

    def ask(prompt):
        chunks = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    one_at_a_time = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == one_at_a_time
    assert wait_idle(server)["used_blocks"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_blocks_at_once(client, server):
    steps = health(server)["steps"]
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=100, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert health(server)["used_blocks"] > 0, "mid-stream, the request holds blocks"
    stream.close()
    idle = wait_idle(server)
    assert idle["used_blocks"] == 0 and idle["free_blocks"] == idle["total_blocks"]
    assert idle["steps"] - steps < 50, "the engine stopped long before the 100 tokens asked for"


def test_serve_refuses_bad_options_in_one_line(command_error, tmp_path):
    from inference import serve

    assert "does not exist" in command_error(serve.main, ["--checkpoint", str(tmp_path / "nowhere")])
    assert "--port" in command_error(serve.main, ["--checkpoint", str(tmp_path), "--port", "70000"])
    assert "--max-num-seqs" in command_error(serve.main, ["--checkpoint", str(tmp_path), "--max-num-seqs", "0"])
