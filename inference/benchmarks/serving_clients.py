"""The clients of the serving load test (`python -m inference.benchmarks.serving_load`): many threads, each
streaming completions from the server one request after another, some dropping their connection mid-stream;
and the audit of what came back.

Each request is a prompt of token ids with its own max_tokens, greedy, ignore_eos (so that an answer has
exactly max_tokens tokens), streamed with the usage chunk. What a client records (`Outcome`): when the
request was sent, when its first chunk and its last arrived, the text, the usage, the finish reasons seen,
whether `data: [DONE]` came, and whether it disconnected on purpose. `audit` then checks that nothing was
lost (every request not dropped on purpose ended with one finish reason and [DONE]) and nothing duplicated
(no second finish, no chunk after it, no answer id twice, exactly max_tokens tokens), and `percentile` and
`summary` give the figures: requests/s, time to first token p50/p99, tokens/s.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field

from inference.http_client import EventStream


@dataclass
class Outcome:
    index: int
    max_tokens: int
    sent: float = 0.0
    first: float | None = None  # first chunk with a choice: the first token's text (time to first token)
    end: float | None = None
    text: str = ""
    ids: set = field(default_factory=set)  # answer ids seen (one, unless something is mixed up)
    finish_reasons: list = field(default_factory=list)
    chunks_after_finish: int = 0
    completion_tokens: int | None = None  # from the usage chunk
    done: bool = False  # [DONE] received
    dropped: bool = False  # this client disconnected on purpose, mid-stream
    error: str | None = None


def one_request(url: str, prompt: list[int], max_tokens: int, drop_after: int | None, index: int,
                api_key: str | None, model: str | None) -> Outcome:
    """Stream one completion; with drop_after=k, close the connection after k chunks with a choice."""
    out = Outcome(index, max_tokens)
    payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
               "stream_options": {"include_usage": True}}
    if model:
        payload["model"] = model
    out.sent = time.perf_counter()
    try:
        with EventStream(url, "/v1/completions", payload, api_key) as events:
            seen = 0
            for chunk in events:
                out.ids.add(chunk["id"])
                if chunk.get("usage"):
                    out.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    out.first = out.first or time.perf_counter()
                    out.chunks_after_finish += bool(out.finish_reasons)
                    out.text += choice["text"]
                    if choice["finish_reason"]:
                        out.finish_reasons.append(choice["finish_reason"])
                    seen += 1
                if drop_after is not None and seen >= drop_after:
                    out.dropped = True
                    break  # leaving the `with` closes the socket: the server sees the client go
            out.done = events.done
    except Exception as e:  # recorded, and counted as lost by the audit
        out.error = f"{type(e).__name__}: {e}"
    out.end = time.perf_counter()
    return out


def run_clients(url: str, prompts: list[list[int]], max_tokens: list[int], clients: int, disconnect_fraction: float,
                seed: int = 0, api_key: str | None = None, model: str | None = None) -> tuple[list[Outcome], float]:
    """`clients` threads work through the requests in order; returns (the outcomes by request, seconds)."""
    rng = random.Random(seed)
    drops = [rng.randint(1, max(n - 1, 1)) if rng.random() < disconnect_fraction else None for n in max_tokens]
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(len(prompts)):
        todo.put(i)
    outcomes: list[Outcome | None] = [None] * len(prompts)

    def client() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            outcomes[i] = one_request(url, prompts[i], max_tokens[i], drops[i], i, api_key, model)

    threads = [threading.Thread(target=client, name=f"client-{c}", daemon=True) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, time.perf_counter() - t0


def audit(outcomes: list[Outcome | None]) -> dict[str, list[str]]:
    """{"lost": [...], "duplicated": [...]}: what went wrong, request by request (empty lists: nothing)."""
    lost, duplicated, owner = [], [], {}
    for i, o in enumerate(outcomes):
        if o is None or o.error:
            lost.append(f"request {i}: {o.error if o else 'never sent'}")
            continue
        for rid in o.ids:
            if rid in owner:
                duplicated.append(f"answer id {rid} came to requests {owner[rid]} and {i}")
            owner[rid] = i
        if len(o.ids) > 1:
            duplicated.append(f"request {i}: chunks of {len(o.ids)} answers")
        if o.dropped:
            continue
        if not o.done or len(o.finish_reasons) != 1:
            lost.append(f"request {i}: done={o.done} finish_reasons={o.finish_reasons}")
        if len(o.finish_reasons) > 1 or o.chunks_after_finish:
            duplicated.append(f"request {i}: {len(o.finish_reasons)} finishes, {o.chunks_after_finish} chunks after one")
        if o.finish_reasons and (o.completion_tokens != o.max_tokens or o.finish_reasons[0] != "length"):
            duplicated.append(f"request {i}: {o.completion_tokens} tokens ({o.finish_reasons}), asked {o.max_tokens}")
    return {"lost": lost, "duplicated": duplicated}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the closest ranks; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(outcomes: list[Outcome], seconds: float) -> dict:
    """requests/s and tokens/s over the wall time, time to first token p50/p99 (ms) over answered requests."""
    answered = [o for o in outcomes if o and not o.error and not o.dropped]
    ttft = [1000 * (o.first - o.sent) for o in outcomes if o and o.first is not None]
    tokens = sum(o.completion_tokens or 0 for o in answered)
    return dict(seconds=seconds, requests=len(outcomes), answered=len(answered),
                dropped=sum(bool(o and o.dropped) for o in outcomes), req_per_s=len(answered) / seconds,
                tok_per_s=tokens / seconds, output_tokens=tokens, ttft_p50_ms=percentile(ttft, 50),
                ttft_p99_ms=percentile(ttft, 99))
