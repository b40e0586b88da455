"""`stream: true`: the answer as server-sent `chat.completion.chunk` events.

The reply is generated whole first (the engine batches concurrent calls into one `llm.generate`),
then written as chunks: one per token, whose content pieces join to exactly the non-streamed
message's content and whose logprobs are that token's. So a streamed call is recorded, trained and
returned exactly like the same call without `stream`; only the wire format differs. A reply with
parsed tool calls sends its content in one chunk and each call whole in one `tool_calls` delta.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rlhf.rollout.openai_protocol import ChatRequest, ChatResult, logprobs_content, usage


def _event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def stream_body(results: list[ChatResult], request: ChatRequest, model: str, call_id: str) -> bytes:
    """The whole event stream (`data: {...}` events, then `data: [DONE]`) for these choices."""
    created = int(time.time())
    events = []

    def chunk(index: int | None, delta: dict | None = None, **extra: Any) -> None:
        body: dict[str, Any] = {
            "id": f"chatcmpl-{call_id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
        }
        if index is not None:
            choice = {"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": None}
            for key in ("logprobs", "finish_reason", "token_ids"):
                if key in extra:
                    choice[key] = extra.pop(key)
            body["choices"].append(choice)
        if request.include_usage:
            body["usage"] = None
        body.update(extra)
        events.append(body)

    for i, result in enumerate(results):
        first = {"prompt_token_ids": list(result.prompt_ids)} if request.return_token_ids and i == 0 else {}
        chunk(i, {"role": "assistant", "content": ""}, **first)
        message = result.response_message()
        lps = (lambda a, b, r=result: {"content": logprobs_content(r, a, b)}) if request.logprobs else None
        if message.get("tool_calls"):  # the content, then every call whole; logprobs go out once
            content = message.get("content")
            if content:
                chunk(i, {"content": content}, logprobs=lps(0, None) if lps else None)
            calls = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
            chunk(i, {"tool_calls": calls}, **({"logprobs": lps(0, None)} if lps and not content else {}))
        else:
            pieces = result.pieces or [message.get("content") or ""]
            for k, piece in enumerate(pieces):
                chunk(i, {"content": piece}, logprobs=lps(k, k + 1) if lps else None)
        final: dict[str, Any] = {"finish_reason": result.finish_reason}
        if request.return_token_ids:
            final["token_ids"] = list(result.completion_ids)
        chunk(i, {}, **final)
    if request.include_usage:
        chunk(None, usage=usage(results))
    return b"".join(_event(e) for e in events) + b"data: [DONE]\n\n"


def content_pieces(decode: Any, ids: list[int], content: str) -> list[str]:
    """Per token, the text it adds to `content` (decoded cumulatively, so multi-byte characters
    split over tokens come out whole); the pieces join to exactly `content`."""
    pieces, emitted = [], ""
    for k in range(len(ids)):
        text = decode(ids[: k + 1])
        new = text if content.startswith(text) and len(text) > len(emitted) else emitted
        pieces.append(new[len(emitted) :])
        emitted = new
    if pieces and emitted != content:
        pieces[-1] += content[len(emitted) :]
    return pieces or [content]
