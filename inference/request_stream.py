"""One HTTP request's life on the server's event loop: its tokens arrive from the engine thread, become text
(stop strings included), and go out as they come; whatever ends the request (the answer is complete, an
error, the client disconnects) gives its sequences and blocks back to the engine.

- `async_sink`: the engine thread's callback for one request, handing each step's tokens to the event
  loop with `loop.call_soon_threadsafe` (asyncio objects are not thread-safe; this is the one hand-off);
- `Generation`: the request's n completions as text deltas (`Delta`), each through its own
  inference/text_stream.py `TextStream`; a completion that reaches a stop string is stopped in the
  engine at once; `release` in a `finally`, so that no ending can leak a request;
- `until_disconnect` and `EventStream`: run the answer while watching the connection, so that a client
  that goes away cancels its request now, not when the next token fails to send.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable

from starlette.responses import StreamingResponse

from inference.engine_loop import EngineLoop
from inference.sampling import SamplingParams
from inference.text_stream import TextStream


def async_sink(inbox: asyncio.Queue):
    """A sink for EngineLoop.submit that puts what the engine thread sends into `inbox`, on the event loop."""
    loop = asyncio.get_running_loop()

    def put(item) -> None:
        loop.call_soon_threadsafe(inbox.put_nowait, item)  # raises once the loop is closed: the engine drops it
    return put


@dataclass
class Delta:
    """New text of completion `index`, the token events it releases with their text offsets, and the finish
    reason once it is over ("stop": end of text or a stop string; "length": max_tokens)."""
    index: int
    text: str
    events: list = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Generation:
    def __init__(self, loop: EngineLoop, prompt_ids: list[int], params: SamplingParams, stop: list[str],
                 hidden: set[int], decode):
        self.loop, self.prompt_ids, self.params = loop, prompt_ids, params
        self.streams = [TextStream(decode, hidden, stop) for _ in range(params.n)]
        self.finish_reasons: list[str | None] = [None] * params.n
        self._released = [0] * params.n  # token events released so far, per completion

    @property
    def completion_tokens(self) -> int:
        """Tokens taken into the answers (tokens the engine made past a stop string are not counted)."""
        return sum(s.num_tokens for s in self.streams)

    async def deltas(self) -> AsyncIterator[Delta]:
        inbox: asyncio.Queue = asyncio.Queue()
        rid = self.loop.submit(self.prompt_ids, self.params, async_sink(inbox))
        try:
            while None in self.finish_reasons:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    raise item
                for event in item:
                    delta = self._take(rid, event)
                    if delta is not None:
                        yield delta
        finally:  # answered, failed, cancelled by a disconnect or closed unfinished: the engine lets it go
            self.loop.release(rid)

    def _take(self, rid: str, event) -> Delta | None:
        i, stream = event.index, self.streams[event.index]
        if self.finish_reasons[i] is not None:
            return None  # made before the engine heard that this completion had stopped
        text, events = stream.add(event.token, event)
        reason = None
        if stream.stopped:
            reason = "stop"
            if not event.finished:
                self.loop.stop_completion(rid, i)
        elif event.finished:
            more, rest = stream.finish()
            text, events, reason = text + more, events + rest, event.finish_reason
        self.finish_reasons[i] = reason
        if not (text or events or reason):
            return None
        offsets = stream.offsets[self._released[i]:self._released[i] + len(events)]
        self._released[i] += len(events)
        return Delta(i, text, events, offsets, reason)

    async def collect(self) -> list[Delta]:
        """The whole answer: one Delta per completion, in index order."""
        whole = [Delta(i, "") for i in range(self.params.n)]
        async for d in self.deltas():
            w = whole[d.index]
            w.text += d.text
            w.events += d.events
            w.offsets += d.offsets
            w.finish_reason = d.finish_reason
        return whole


async def until_disconnect(receive, work: Awaitable):
    """(True, work's result), or (False, None) if the client disconnected first, in which case `work` was
    cancelled (its finally blocks, a Generation's release among them, have run when this returns)."""
    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()


class EventStream(StreamingResponse):
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`. The body runs while the connection
    is watched: a disconnect cancels it at once, and the chunk generator is always closed."""

    def __init__(self, chunks: AsyncIterator[dict]):
        self._chunks = chunks
        super().__init__(self._events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(self):
        async for chunk in self._chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await until_disconnect(receive, self.stream_response(send))
        except OSError:
            pass  # the client went away while a chunk was being sent
        finally:
            await self.body_iterator.aclose()
            await self._chunks.aclose()
