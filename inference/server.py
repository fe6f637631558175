"""An OpenAI-compatible HTTP server on the paged engine: FastAPI routes over one engine loop.

    app = create_app(EngineLoop(engine), codec, model_name="runs/sft-tiny", api_key=None)
    server = ServerThread(app).start()      # uvicorn on 127.0.0.1, a free port (tests, benchmarks, the chat command)
    ... OpenAI(base_url=server.url + "/v1", api_key="-") ...
    server.stop()

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (the engine loop's
snapshot: free and used blocks, running and waiting sequences, live requests). A request travels
HTTP -> parse and check (inference/openai_api.py; a mistake is a 400 with the API's error object, before
anything reaches the engine) -> `Generation` (inference/request_stream.py) -> the engine loop's queue
(inference/engine_loop.py) -> a scheduler step -> its tokens back through the request's queue -> text
(stop strings) -> one JSON answer, or server-sent events as tokens come.

`codec` is what turns text into ids and back (training/inference_setup.py's `TextCodec`, passed in by
`python -m inference.serve`, because the tokenizer lives in training/): completion_prompt(text),
chat_prompt(messages), decode(ids), and the ids that end and are hidden from a completion or a chat reply
(completion_stop_ids, completion_hidden, chat_stop_ids, chat_hidden). The server never dies on a bad
request: every failure inside a route is answered (400, 401, 404, 500) and the loop keeps serving.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference import openai_api as api
from inference.engine_loop import EngineLoop
from inference.request_stream import EventStream, Generation, until_disconnect

COMPLETION_DEFAULT_MAX = 16  # the completions API's default max_tokens (chat's: the room the context leaves)


def create_app(loop: EngineLoop, codec, model_name: str, api_key: str | None = None) -> FastAPI:
    """The app; it starts `loop` when it starts serving and closes it when it stops."""

    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.close()

    app = FastAPI(title="llm-zoo", lifespan=lifespan)
    app.state.loop, app.state.codec = loop, codec
    routes = Routes(loop, codec, model_name, api_key)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])

    @app.exception_handler(api.ApiError)
    async def api_error(request, e: api.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):  # unknown route, wrong method
        return JSONResponse(api.ApiError(e.status_code, str(e.detail), code=str(e.status_code)).body(), e.status_code)

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):
        traceback.print_exception(e, file=sys.stderr)
        error = api.ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    return app


class Routes:
    """The handlers, over one engine loop and one codec."""

    def __init__(self, loop: EngineLoop, codec, model_name: str, api_key: str | None):
        self.loop, self.codec, self.model_name, self.api_key = loop, codec, model_name, api_key
        self.created = int(time.time())
        self.context = loop.engine.max_model_len

    def check_key(self, request: Request) -> None:
        if self.api_key is not None and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise api.ApiError(401, "missing or incorrect API key: send the server's --api-key as "
                                    "'Authorization: Bearer KEY'", code="invalid_api_key")

    async def parse(self, request: Request, model: type[api.Strict]):
        self.check_key(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise api.ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        parsed = api.parse(model, body)
        if parsed.model not in (None, self.model_name):
            raise api.ApiError(404, f"the model {parsed.model!r} does not exist here; this server serves "
                                    f"{self.model_name!r} (GET /v1/models)", "model", "model_not_found")
        return parsed

    def generation(self, req, prompt_ids: list[int], stop_ids, hidden, default_max, logprobs) -> Generation:
        params = api.sampling_params(req, len(prompt_ids), self.context, stop_ids, default_max, logprobs)
        try:
            self.loop.engine.check_request(prompt_ids, params)  # vocabulary, pool size: refused here, not in the loop
        except ValueError as e:
            raise api.ApiError(400, str(e)) from None
        return Generation(self.loop, prompt_ids, params, api.stop_strings(req), hidden, self.codec.decode)

    def token_text(self, token: int) -> str:
        return self.codec.decode([token])

    async def health(self):
        return {"status": "ok", **self.loop.stats()}

    async def models(self, request: Request):
        self.check_key(request)
        return api.models_list(self.model_name, self.created)

    async def completions(self, request: Request):
        req = await self.parse(request, api.CompletionRequest)
        prompt_ids = api.completion_prompt(req, self.codec.completion_prompt)
        gen = self.generation(req, prompt_ids, self.codec.completion_stop_ids, self.codec.completion_hidden,
                              COMPLETION_DEFAULT_MAX, req.logprobs)
        rid, kind = f"cmpl-{uuid.uuid4().hex}", "text_completion"

        def choice(d) -> dict:
            lp = api.completion_logprobs(d.events, self.token_text, d.offsets) if req.logprobs is not None else None
            return {"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}

        async def chunks():
            async for d in gen.deltas():
                yield api.envelope(rid, kind, self.model_name, [choice(d)])
            if req.stream_options and req.stream_options.include_usage:
                yield api.envelope(rid, kind, self.model_name, [], api.usage(len(prompt_ids), gen.completion_tokens))

        if req.stream:
            return EventStream(chunks())
        done, whole = await until_disconnect(request.receive, gen.collect())
        return api.envelope(rid, kind, self.model_name, [choice(d) for d in whole],
                            api.usage(len(prompt_ids), gen.completion_tokens)) if done else None

    async def chat_completions(self, request: Request):
        req = await self.parse(request, api.ChatRequest)
        try:
            prompt_ids = self.codec.chat_prompt(api.message_dicts(req))
        except ValueError as e:
            raise api.ApiError(400, f"messages: {e}", "messages") from None
        top = (req.top_logprobs or 0) if req.logprobs else None
        gen = self.generation(req, prompt_ids, self.codec.chat_stop_ids, self.codec.chat_hidden, None, top)
        rid, kind = f"chatcmpl-{uuid.uuid4().hex}", "chat.completion.chunk"

        def logprobs(d):
            return api.chat_logprobs(d.events, self.token_text) if req.logprobs else None

        async def chunks():
            for i in range(req.n):
                yield api.envelope(rid, kind, self.model_name, [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            async for d in gen.deltas():
                yield api.envelope(rid, kind, self.model_name, [
                    {"index": d.index, "delta": {"content": d.text} if d.text else {}, "logprobs": logprobs(d),
                     "finish_reason": d.finish_reason}])
            if req.stream_options and req.stream_options.include_usage:
                yield api.envelope(rid, kind, self.model_name, [], api.usage(len(prompt_ids), gen.completion_tokens))

        if req.stream:
            return EventStream(chunks())
        done, whole = await until_disconnect(request.receive, gen.collect())
        choices = [{"index": d.index, "message": {"role": "assistant", "content": d.text}, "logprobs": logprobs(d),
                    "finish_reason": d.finish_reason} for d in whole]
        return api.envelope(rid, "chat.completion", self.model_name, choices,
                            api.usage(len(prompt_ids), gen.completion_tokens)) if done else None


class ServerThread:
    """uvicorn serving `app` from a background thread, on `host` and `port` (0: a free port, chosen by the
    system as the socket is bound, so that two servers never race for one)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._socket.close()
