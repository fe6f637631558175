"""The OpenAI API's request and response shapes, for inference/server.py: what a request may hold (checked
here, so that every mistake becomes an HTTP 400 with the API's `error` object), how it becomes the engine's
`SamplingParams`, and the JSON of answers, stream chunks and errors.

Supported: /v1/completions (prompt: a string or a list of token ids) and /v1/chat/completions (messages
with string content or text parts), with max_tokens (max_completion_tokens), temperature, top_p, n, stop
(up to 4 strings), seed, stream (+ stream_options.include_usage), logprobs (completions: the top-k count,
at most 5; chat: logprobs + top_logprobs, at most 20), and two extensions vLLM also takes: top_k and
ignore_eos. Parameters the engine does not implement (penalties, logit_bias, echo, best_of != n, tools)
are refused by name rather than ignored; so is any unknown field.

Log-probabilities are the model's own (log-softmax of its logits, before temperature and top-k/top-p),
as vLLM reports them by default.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inference.sampling import SamplingParams

MAX_N = 16  # completions per request
MAX_STOP = 4  # stop strings per request (the API's limit)


class ApiError(Exception):
    """An error the API reports: HTTP status and the fields of its `error` object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- requests ----------------------------------------------------------------------------------------------

class Strict(BaseModel):
    # strict: "5" is not 5 and true is not 1; an unknown field is an error, not silently ignored.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with the usage counts, and no choices


class Sampling(Strict):
    """The fields both endpoints share."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # extension: 0 or -1 = all tokens
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension: run to max_tokens past the end-of-text token (benchmarks)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None  # accepted, unused


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def parse(model: type[Strict], body) -> Strict:
    """The request, validated; else ApiError 400 naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        loc = errors[0]["loc"]
        param = str(loc[0]) if loc else None
        same = [x for x in errors if x["loc"][:1] == loc[:1]]
        if len(same) > 1 and all(x["type"].endswith("_type") for x in same):  # a union: say what would do
            shapes = " or ".join(dict.fromkeys(str(x["loc"][-1]) for x in same))
            message = f"{param}: expected {shapes}, got {type(body.get(param)).__name__}"
        else:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
            message = f"{param}{where}: {errors[0]['msg']}"
        raise ApiError(400, message, param, "invalid_" + errors[0]["type"].split("_")[-1]) from None
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) != 0:
            raise ApiError(400, f"{name} is not supported by this server; leave it at 0", name)
    return request


def completion_prompt(request: CompletionRequest, encode) -> list[int]:
    """The prompt's ids: a string encoded with `encode`, or token ids as given (one prompt per request)."""
    prompt = request.prompt
    if request.echo:
        raise ApiError(400, "echo is not supported by this server; leave it false", "echo")
    if request.best_of not in (None, request.n):
        raise ApiError(400, "best_of is not supported by this server; leave it unset (or equal to n)", "best_of")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: this server takes one prompt per request, got {len(prompt)}; send one "
                                f"request per prompt (they are batched together anyway)", "prompt")
        prompt = prompt[0]
    try:
        ids = encode(prompt) if isinstance(prompt, str) else list(prompt)
    except ValueError as e:
        raise ApiError(400, f"prompt: {e}", "prompt") from None
    if not ids:
        raise ApiError(400, "prompt is empty: give some text or at least one token id", "prompt")
    return ids


def message_dicts(request: ChatRequest) -> list[dict]:
    """The conversation as training/chat.py's turns: a developer turn is a system turn, text parts joined."""
    return [{"role": "system" if m.role == "developer" else m.role,
             "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
            for m in request.messages]


def sampling_params(request: Sampling, prompt_len: int, context: int, stop_ids: set[int], default_max: int | None,
                    logprobs: int | None) -> SamplingParams:
    """The engine's parameters for this request, once its prompt and max_tokens fit the context.
    default_max None: all the room the context leaves (chat's default)."""
    max_param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
    asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if prompt_len >= context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, and the prompt has "
                            f"{prompt_len}; shorten it", "messages" if default_max is None else "prompt",
                       "context_length_exceeded")
    max_tokens = asked or default_max or context - prompt_len
    if prompt_len + max_tokens > context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, and you asked for "
                            f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate); "
                            f"lower {max_param} to at most {context - prompt_len}", max_param, "context_length_exceeded")
    try:
        return SamplingParams(temperature=request.temperature, top_k=max(request.top_k, 0), top_p=request.top_p,
                              max_new_tokens=max_tokens, seed=request.seed, n=request.n,
                              stop_token_ids=() if request.ignore_eos else tuple(sorted(stop_ids)),
                              ignore_eos=request.ignore_eos, logprobs=logprobs)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def stop_strings(request: Sampling) -> list[str]:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ApiError(400, f"stop: give at most {MAX_STOP} non-empty strings, got {stop!r:.80}", "stop")
    return stop


# ---- responses -------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, kind: str, model: str, choices: list[dict], used: dict | None = None) -> dict:
    out = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if used is not None:
        out["usage"] = used
    return out


def completion_logprobs(events, token_text, offsets: list[int]) -> dict:
    """The completions API's logprobs object for these token events."""
    return {"tokens": [token_text(e.token) for e in events], "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{token_text(t): v for t, v in e.top_logprobs} for e in events], "text_offset": offsets}


def chat_logprobs(events, token_text) -> dict:
    """The chat API's logprobs object (`content`: one entry per token) for these token events."""
    def entry(token: int, value: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, v) for t, v in e.top_logprobs]}
                        for e in events]}


def models_list(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llm-zoo"}]}
