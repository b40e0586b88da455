"""A small OpenAI-compatible HTTP endpoint: `/v1/chat/completions` and `/v1/models`, nothing more
(the protocol itself: rollout/openai_protocol.py; `stream: true`: rollout/openai_stream.py).

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
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rlhf.rollout.openai_protocol import (  # noqa: F401 - re-exported: the runner and tests import them here
    ChatRequest,
    ChatResult,
    RequestError,
    chat_response,
    error_body,
    normalize_message,
    parse_chat_request,
)
from rlhf.rollout.openai_stream import stream_body

_PATH = re.compile(r"^/e/([A-Za-z0-9_-]+)(/v1/.*)$")


# (episode key, parsed request) -> its n choices; raises RequestError for a refused call
ChatHandler = Callable[[str, ChatRequest], list[ChatResult]]
JSON, EVENTS = "application/json", "text/event-stream"


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

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        """(HTTP status, content type, body) for one request; never raises."""
        status, payload = self._answer(method, path, body)
        if isinstance(payload, bytes):
            return status, EVENTS, payload
        return status, JSON, json.dumps(payload).encode()

    def _answer(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any] | bytes]:
        match = _PATH.match(path.split("?", 1)[0])
        key, route = (match.group(1), match.group(2)) if match else (None, path)
        if key is not None and not self.known_key(key):
            return 404, error_body(f"unknown or finished episode {key!r}", "not_found", status=404)
        if method == "GET" and route.rstrip("/") == "/v1/models":
            return 200, {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "owned_by": "rlhf"}],
            }
        if method == "POST" and route.rstrip("/") == "/v1/chat/completions":
            if key is None:
                return 404, error_body(
                    "use the episode's base_url (…/e/<episode>/v1) for chat calls", "not_found", status=404
                )
            try:
                request = parse_chat_request(json.loads(body or b"null"))
                results = self.handle_chat(key, request)
            except json.JSONDecodeError as exc:
                return 400, error_body(f"the body is not JSON: {exc}")
            except RequestError as exc:
                return exc.status, error_body(str(exc), exc.code, exc.param, exc.status)
            except Exception as exc:  # an engine failure: the agent sees a 500, the runner re-raises it
                return 500, error_body(f"{type(exc).__name__}: {exc}", "server_error", status=500)
            call_id = self.next_call_id()
            if request.stream:  # generated whole, then written as events (rollout/openai_stream.py)
                return 200, stream_body(results, request, self.model, call_id)
            return 200, chat_response(results, request, self.model, call_id)
        return 404, error_body(
            f"no route {method} {route} (this endpoint serves /v1/chat/completions and /v1/models)",
            "not_found",
            status=404,
        )


def _handler_class(endpoint: ChatEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection for an episode's calls

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, content_type, data = endpoint.answer(method, self.path, body)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if content_type == EVENTS:
                self.send_header("Cache-Control", "no-cache")
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
