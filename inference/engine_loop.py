"""The one thread that owns the paged engine: requests go in through a queue, tokens come out through
each request's own callback.

An `LLMEngine` is not thread-safe (its scheduler, block manager and pool change at every step), and it
should not be: continuous batching needs one place that sees every request, so a server runs exactly
one loop that owns the engine and does nothing else:

    while True:
        take every command waiting in the queue (block on it when there is nothing to compute)
            "add": engine.add_request; "stop": engine.abort(id, i); "release": engine.abort(id)
        engine.step()                        # one forward pass over every running sequence
        hand each request its tokens         # one callback per request per step

Any other thread (the server's event loop) talks to it through `submit`, `stop_completion` and
`release`, which only put a command on the queue, and reads `stats()`, a snapshot the loop publishes
after each step. A request's callback (its "sink") is called on the engine thread with a list of
`TokenEvent`s, or with an exception if the request failed; the asyncio side hands them to the event loop
with `loop.call_soon_threadsafe` (inference/server.py's `async_sink`). A sink must be quick: the whole
batch waits while it runs.

Every request ends with `release`, which gives back whatever it still holds and makes the engine forget
it: a client that disconnects mid-stream frees its blocks before the next step. Tested in
tests/inference/test_engine_loop.py with plain threads, and through the HTTP server in
tests/inference/test_server.py.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import traceback
from typing import Callable

from inference.engine import LLMEngine
from inference.sampling import SamplingParams

Sink = Callable[[object], None]  # called on the engine thread with list[TokenEvent], or an exception


class EngineLoop:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}  # live requests; touched by the engine thread only
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._snapshot: dict = {}
        self._publish()

    # ---- any thread -----------------------------------------------------------------------------------

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink) -> str:
        """Queue a request; returns its id. The engine's submission checks run here, in the caller's thread
        (a ValueError says what is wrong), so a bad request never reaches the loop."""
        prompt = self.engine.check_request(prompt_ids, params)
        rid = f"req-{next(self._ids)}"
        self._commands.put(("add", rid, prompt, params, sink))
        return rid

    def stop_completion(self, request_id: str, index: int) -> None:
        """Completion `index` of the request is over (its text reached a stop string): stop computing it."""
        self._commands.put(("stop", request_id, index))

    def release(self, request_id: str) -> None:
        """The request is over for its client (answered, failed or gone): free what it holds, forget it."""
        self._commands.put(("release", request_id))

    def stats(self) -> dict:
        """The pool and the queues as of the last step: free and total blocks, running and waiting sequences,
        live requests, steps run."""
        return dict(self._snapshot)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop after the current step; requests still live get a RuntimeError."""
        if self._thread.is_alive():
            self._commands.put(("close",))
            self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            for command in self._take_commands():
                if command[0] == "close":
                    self._fail_all(RuntimeError("the server is shutting down"))
                    self._publish()
                    return
                self._apply(command)
            if self.engine.has_unfinished():
                self._step()
            self._publish()

    def _take_commands(self) -> list[tuple]:
        """Every queued command; when the engine has nothing to compute, wait for the first one."""
        commands = [] if self.engine.has_unfinished() else [self._commands.get()]
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: tuple) -> None:
        kind, rid = command[0], command[1]
        if kind == "add":
            _, _, prompt, params, sink = command
            try:
                self.engine.add_request(prompt, params, request_id=rid)
            except Exception as e:  # checked at submit; anything left is reported to the request, not raised here
                self._send(sink, e, rid)
                return
            self._sinks[rid] = sink
        elif rid in self._sinks:  # "stop" or "release" of a live request (a failed one is gone already)
            if kind == "stop":
                self.engine.abort(rid, command[2])
            else:
                del self._sinks[rid]
                self.engine.abort(rid)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # a bug: fail the requests in flight, keep serving
            traceback.print_exc(file=sys.stderr)
            self._fail_all(e)
            return
        by_request: dict[str, list] = {}
        for event in events:
            by_request.setdefault(event.request_id, []).append(event)
        for rid, request_events in by_request.items():
            if rid in self._sinks:
                self._send(self._sinks[rid], request_events, rid)

    def _send(self, sink: Sink, item, rid: str) -> None:
        try:
            sink(item)
        except Exception:  # the receiving side is gone (its event loop closed): nobody will release it
            traceback.print_exc(file=sys.stderr)
            if rid in self._sinks:
                del self._sinks[rid]
                self.engine.abort(rid)

    def _fail_all(self, error: Exception) -> None:
        for rid, sink in list(self._sinks.items()):
            del self._sinks[rid]
            self.engine.abort(rid)
            try:
                sink(error)
            except Exception:
                pass  # its receiver is gone too; its blocks are back, which is what matters

    def _publish(self) -> None:
        blocks, scheduler = self.engine.blocks, self.engine.scheduler
        self._snapshot = dict(free_blocks=blocks.num_free_blocks, total_blocks=blocks.num_blocks,
                              used_blocks=blocks.num_used, running=len(scheduler.running),
                              waiting=len(scheduler.waiting), requests=len(self._sinks),
                              steps=self.engine.stats.steps)
