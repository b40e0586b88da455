"""A small OpenAI-compatible HTTP endpoint: `/v1/chat/completions` and `/v1/models`, nothing more.

It exists so agent code written against an OpenAI client can be trained (rollout/agent_runner.py).
The server only speaks the protocol: it parses a request, hands it to a callback that returns the
completion (the agent runner generates it with the engine's vLLM and records its tokens), and
writes the OpenAI-shaped answer. Every URL carries an episode key, `/e/<key>/v1/...`, so a call is
tied to its episode whatever client sends it.

The stdlib `ThreadingHTTPServer` serves it from daemon threads of the engine actor: no event loop
to share with Ray's, no extra dependency, and a request thread may simply block until its
completion is ready (the engine generates in the actor's own thread, batching concurrent calls).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Message keys templates read; the rest of what clients echo back (refusal, audio, annotations, ...)
# is dropped, so an assistant message sent back as the client's object equals the one we returned.
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
_PATH = re.compile(r"^/e/([A-Za-z0-9_-]+)(/v1/.*)$")


class RequestError(Exception):
    """A request the endpoint answers with an OpenAI-style error body and this HTTP status."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class ChatRequest:
    """The parts of a chat completion request that change what is generated or returned."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    tools: list[dict[str, Any]] | None = None
    return_token_ids: bool = False  # vLLM's extension: prompt and completion token ids in the answer


@dataclass
class ChatResult:
    """One generated reply, as the agent runner hands it back to the server."""

    text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    token_texts: list[str] = field(default_factory=list)  # for `logprobs.content[i].token`


def normalize_message(message: Any) -> dict[str, Any]:
    """A chat message as templates take it: text content, only the keys in MESSAGE_KEYS, no Nones."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError(400, f"each message needs a string 'role', got {str(message)[:200]}")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise RequestError(400, "only text content parts are supported")
            parts.append(part["text"])
        content = "".join(parts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise RequestError(
            400, f"message content must be a string or text parts, got {type(content).__name__}"
        )
    out = {k: message[k] for k in MESSAGE_KEYS if message.get(k) not in (None, [])}
    out["content"] = content
    return out


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a `/v1/chat/completions` body. Sampling settings (temperature, top_p, seed, ...) are
    not read: the policy is trained at rollout.sampling's, so it must be sampled at them too."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list")
    if body.get("stream"):
        raise RequestError(400, "stream=true is not supported by this endpoint")
    if body.get("n", 1) not in (1, None):
        raise RequestError(400, "only n=1 is supported (call again for more samples)")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise RequestError(400, f"max_tokens must be a positive integer, got {max_tokens!r}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of strings")
    tools = body.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise RequestError(400, "'tools' must be a list")
    return ChatRequest(
        messages=[normalize_message(m) for m in messages],
        max_tokens=max_tokens,
        stop=stop,
        logprobs=bool(body.get("logprobs")),
        tools=tools,
        return_token_ids=bool(body.get("return_token_ids")),
    )


def chat_response(result: ChatResult, request: ChatRequest, model: str, call_id: str) -> dict[str, Any]:
    """The `chat.completion` object for one reply (choices[0] only, as n is always 1)."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": result.text},
        "finish_reason": result.finish_reason,
        "logprobs": None,
    }
    if request.logprobs:
        texts = result.token_texts or [""] * len(result.completion_ids)
        choice["logprobs"] = {
            "content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                for t, lp in zip(texts, result.logprobs)
            ]
        }
    body: dict[str, Any] = {
        "id": f"chatcmpl-{call_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": len(result.prompt_ids),
            "completion_tokens": len(result.completion_ids),
            "total_tokens": len(result.prompt_ids) + len(result.completion_ids),
        },
    }
    if request.return_token_ids:
        body["prompt_token_ids"] = list(result.prompt_ids)
        choice["token_ids"] = list(result.completion_ids)
    return body


def error_body(message: str, code: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


# (episode key, parsed request) -> the reply; raises RequestError for a refused call
ChatHandler = Callable[[str, ChatRequest], ChatResult]


class ChatEndpoint:
    """The HTTP server of one engine, for the duration of one generate call (`with` block)."""

    def __init__(self, host: str, model: str, handle_chat: ChatHandler, known_key: Callable[[str], bool]):
        self.model = model
        self.handle_chat = handle_chat
        self.known_key = known_key
        self._calls = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, 0), _handler_class(self))
        self.server.daemon_threads = True  # a request still waiting at shutdown must not block the actor
        self.host, self.port = host, self.server.server_address[1]
        self._thread: threading.Thread | None = None

    def base_url(self, key: str, public_host: str | None = None) -> str:
        """What the agent passes to `OpenAI(base_url=...)`: its calls then land on episode `key`."""
        return f"http://{public_host or self.host}:{self.port}/e/{key}/v1"

    def __enter__(self) -> ChatEndpoint:
        self._thread = threading.Thread(target=self.server.serve_forever, name="openai-endpoint", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def next_call_id(self) -> str:
        with self._lock:
            self._calls += 1
            return str(self._calls)

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one request; never raises."""
        match = _PATH.match(path.split("?", 1)[0])
        key, route = (match.group(1), match.group(2)) if match else (None, path)
        if key is not None and not self.known_key(key):
            return 404, error_body(f"unknown or finished episode {key!r}", "not_found")
        if method == "GET" and route.rstrip("/") == "/v1/models":
            return 200, {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "owned_by": "rlhf"}],
            }
        if method == "POST" and route.rstrip("/") == "/v1/chat/completions":
            if key is None:
                return 404, error_body(
                    "use the episode's base_url (…/e/<episode>/v1) for chat calls", "not_found"
                )
            try:
                request = parse_chat_request(json.loads(body or b"null"))
                result = self.handle_chat(key, request)
            except json.JSONDecodeError as exc:
                return 400, error_body(f"the body is not JSON: {exc}")
            except RequestError as exc:
                return exc.status, error_body(str(exc), exc.code)
            except Exception as exc:  # an engine failure: the agent sees a 500, the runner re-raises it
                return 500, error_body(f"{type(exc).__name__}: {exc}", "server_error")
            return 200, chat_response(result, request, self.model, self.next_call_id())
        return 404, error_body(
            f"no route {method} {route} (this endpoint serves /v1/chat/completions and /v1/models)",
            "not_found",
        )


def _handler_class(endpoint: ChatEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection for an episode's calls

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, payload = endpoint.answer(method, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_message(self, *args) -> None:  # one line per call would flood the actor's log
            pass

    return Handler
