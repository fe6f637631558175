"""A small client of the server's OpenAI API on the standard library's http.client, for the zoo's own
commands (`python -m inference.chat`, the serving load test), which should not need the `openai` package:
one JSON request, or a stream of server-sent events read as they come, which the caller may drop mid-way
(`EventStream.close` shuts the socket, which the server sees as a disconnect).

Errors: a refused connection and an HTTP error are one `ServerError` whose message says what the server
answered (its `error.message`)."""

from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import urlsplit

from architectures.utils.command_line import UserRuntimeError


class ServerError(UserRuntimeError):
    """The server could not be reached, or answered with an error (status and message)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _connect(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url {url!r} is not an http(s) URL; give the server's address, e.g. http://127.0.0.1:8000")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname, parts.port, timeout=timeout), parts.path.rstrip("/")


def _send(url: str, method: str, path: str, payload: dict | None, api_key: str | None, timeout: float):
    conn, base = _connect(url, timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn.request(method, base + path, json.dumps(payload) if payload is not None else None, headers)
        response = conn.getresponse()
    except (ConnectionError, socket.timeout, OSError) as e:
        conn.close()
        raise ServerError(f"cannot reach the server at {url} ({e}); is it running?") from None
    if response.status != 200:
        text = response.read().decode("utf-8", errors="replace")
        conn.close()
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:200]
        raise ServerError(f"the server answered {response.status}: {message}", response.status)
    return conn, response


def request_json(url: str, method: str, path: str, payload: dict | None = None, api_key: str | None = None,
                 timeout: float = 600.0) -> dict:
    """One request (e.g. "POST", "/v1/completions"), its JSON answer."""
    conn, response = _send(url, method, path, payload, api_key, timeout)
    try:
        return json.loads(response.read())
    finally:
        conn.close()


class EventStream:
    """The chunks of a streamed answer, as dicts, as they arrive; ends at `data: [DONE]`."""

    def __init__(self, url: str, path: str, payload: dict, api_key: str | None = None, timeout: float = 600.0):
        self._conn, self._response = _send(url, "POST", path, {**payload, "stream": True}, api_key, timeout)
        self.done = False  # [DONE] was received

    def __iter__(self):
        for raw in self._response:  # http.client undoes the chunked encoding; a line comes as soon as it is whole
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data: "):
                continue  # the blank line between events, or a comment
            data = line[len("data: "):]
            if data == "[DONE]":
                self.done = True
                return
            yield json.loads(data)

    def close(self) -> None:
        """Drop the connection (mid-stream: the server sees the client go away)."""
        try:
            if self._conn.sock is not None:
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
