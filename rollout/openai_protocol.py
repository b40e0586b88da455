"""The OpenAI chat-completions protocol as the endpoint speaks it: request validation and the
`chat.completion` answer (rollout/openai_server.py serves them; rollout/openai_stream.py writes the
same answer as server-sent events).

Parameters that would change what is sampled in ways the trainer cannot follow (a response format,
logit biases, a forced tool) are refused with HTTP 400 naming the field rather than silently
ignored; sampling settings (temperature, top_p, seed, ...) are not read, as documented: the policy
is trained at rollout.sampling's, so it must be sampled at them too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

# Message keys templates read; the rest of what clients echo back (refusal, audio, annotations, ...)
# is dropped, so an assistant message sent back as the client's object equals the one we returned.
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
MAX_CHOICES = 16  # n per request; each choice is generated and recorded like a call of its own

# Request fields refused with a 400 when set: field -> why.
_UNSUPPORTED = {
    "response_format": "structured output is not enforced by this endpoint (only {'type': 'text'})",
    "logit_bias": "logit biases would change the distribution the policy is trained on",
    "functions": "use 'tools' (the legacy 'functions' field is not supported)",
    "function_call": "use 'tool_choice' (the legacy 'function_call' field is not supported)",
    "audio": "only text output is supported",
    "prediction": "predicted outputs are not supported",
}


class RequestError(Exception):
    """A request the endpoint answers with an OpenAI-style error body and this HTTP status."""

    def __init__(
        self, status: int, message: str, code: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass
class ChatRequest:
    """The parts of a chat completion request that change what is generated or returned."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    tools: list[dict[str, Any]] | None = None
    return_token_ids: bool = False  # vLLM's extension: prompt and completion token ids in the answer
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    parse_tool_calls: bool = False  # tools given and tool_choice is not "none"


@dataclass
class ChatResult:
    """One generated choice, as the agent runner hands it back to the server."""

    text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "tool_calls"
    token_texts: list[str] = field(default_factory=list)  # for `logprobs.content[i].token`
    # the assistant message as returned: content (None when only tool calls), tool_calls when parsed
    message: dict[str, Any] | None = None
    pieces: list[str] = field(default_factory=list)  # per token, the content it adds (for streaming)

    def response_message(self) -> dict[str, Any]:
        return self.message or {"role": "assistant", "content": self.text}


def _normalize_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """Assistant `tool_calls` as templates and the recorded conversation hold them: id, type and
    function {name, arguments as a JSON string} (clients send the string; some code sends a dict)."""
    if not isinstance(calls, list):
        raise RequestError(400, f"{where} must be a list", param=where)
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(
                400, f"{where}[{i}] needs a 'function' with a string 'name'", param=f"{where}[{i}]"
            )
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        out.append(
            {
                "id": str(call.get("id") or ""),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return out


def normalize_message(message: Any, where: str = "messages") -> dict[str, Any]:
    """A chat message as templates take it: text content, only the keys in MESSAGE_KEYS, no Nones."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError(400, f"each message needs a string 'role', got {str(message)[:200]}", param=where)
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise RequestError(400, "only text content parts are supported", param=f"{where}.content")
            parts.append(part["text"])
        content = "".join(parts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise RequestError(
            400,
            f"message content must be a string or text parts, got {type(content).__name__}",
            param=f"{where}.content",
        )
    out = {k: message[k] for k in MESSAGE_KEYS if message.get(k) not in (None, [])}
    out["content"] = content
    if "tool_calls" in out:
        out["tool_calls"] = _normalize_tool_calls(out["tool_calls"], f"{where}.tool_calls")
    return out


def _positive_int(body: dict[str, Any], key: str, default: int | None) -> int | None:
    value = body.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise RequestError(400, f"'{key}' must be a positive integer, got {value!r}", param=key)
    return value


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for key, reason in _UNSUPPORTED.items():
        value = body.get(key)
        if value in (None, {}, []) or (key == "response_format" and value == {"type": "text"}):
            continue
        raise RequestError(400, f"'{key}' is not supported: {reason}", param=key)
    if body.get("top_logprobs"):
        raise RequestError(
            400, "'top_logprobs' is not supported (logprobs: true gives each token's)", "top_logprobs"
        )
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise RequestError(400, "'modalities' is not supported: only text output", param="modalities")
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "auto", "none"):
        raise RequestError(
            400,
            "'tool_choice' must be 'auto' or 'none': a required or named tool cannot be forced "
            "without changing what the policy samples",
            param="tool_choice",
        )


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a `/v1/chat/completions` body (errors name the field in `param`)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", param="messages")
    _refuse_unsupported(body)
    n = _positive_int(body, "n", 1) or 1
    if n > MAX_CHOICES:
        raise RequestError(400, f"'n' must be at most {MAX_CHOICES}, got {n}", param="n")
    max_tokens = _positive_int(body, "max_tokens", None)
    max_tokens = _positive_int(body, "max_completion_tokens", max_tokens)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of strings", param="stop")
    tools = body.get("tools") or None
    if tools is not None and not (
        isinstance(tools, list)
        and all(isinstance(t, dict) and t.get("type", "function") == "function" for t in tools)
    ):
        raise RequestError(400, "'tools' must be a list of {'type': 'function', ...} objects", param="tools")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    return ChatRequest(
        messages=[normalize_message(m, f"messages[{i}]") for i, m in enumerate(messages)],
        max_tokens=max_tokens,
        stop=stop,
        logprobs=bool(body.get("logprobs")),
        tools=tools,
        return_token_ids=bool(body.get("return_token_ids")),
        n=n,
        stream=bool(body.get("stream")),
        include_usage=bool(options.get("include_usage")),
        parse_tool_calls=bool(tools) and body.get("tool_choice") != "none",
    )


def logprobs_content(result: ChatResult, start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
    """`logprobs.content` entries of the completion's tokens [start, end)."""
    texts = result.token_texts or [""] * len(result.completion_ids)
    return [
        {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
        for t, lp in list(zip(texts, result.logprobs))[start:end]
    ]


def usage(results: list[ChatResult]) -> dict[str, int]:
    prompt = len(results[0].prompt_ids) if results else 0
    completion = sum(len(r.completion_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_response(
    results: list[ChatResult], request: ChatRequest, model: str, call_id: str
) -> dict[str, Any]:
    """The `chat.completion` object: one choice per result, in order."""
    choices = []
    for i, result in enumerate(results):
        choice: dict[str, Any] = {
            "index": i,
            "message": dict(result.response_message()),
            "finish_reason": result.finish_reason,
            "logprobs": {"content": logprobs_content(result)} if request.logprobs else None,
        }
        if request.return_token_ids:
            choice["token_ids"] = list(result.completion_ids)
        choices.append(choice)
    body: dict[str, Any] = {
        "id": f"chatcmpl-{call_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(results),
    }
    if request.return_token_ids:
        body["prompt_token_ids"] = list(results[0].prompt_ids)
    return body


def error_body(
    message: str, code: str = "invalid_request_error", param: str | None = None, status: int = 400
) -> dict[str, Any]:
    """OpenAI's error object; every 400 has type invalid_request_error (its `code` may say more)."""
    kind = "invalid_request_error" if status == 400 else code
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
