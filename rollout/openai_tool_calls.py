"""Parsed `tool_calls` in the endpoint's answers, read with rollout/tools.py's parser (one parser for
our own tool episodes and for agents): the chat template's tool-call format where it has one, else
`<tool_call>{json}</tool_call>`.

Only the text changes: the recorded call keeps the policy's tokens exactly as sampled (call text
included), and the assistant message the agent echoes back (content without the calls, plus
`tool_calls`) is what the agent runner stores as the conversation's last turn, so the follow-up with
the tools' results is recognised as its continuation and extended token by token.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from rlhf.rollout.tools import ToolBox, detect_tool_call_format


class ToolCallReader:
    """Builds the assistant message of a reply for a request that passed `tools`."""

    def __init__(self, tokenizer: Any):
        self.toolbox = ToolBox([], detect_tool_call_format(tokenizer))
        self.tokenizer = tokenizer

    def message(self, text: str, token_ids: list[int]) -> dict[str, Any] | None:
        """The message with `tool_calls`, or None when the reply holds no well-formed call (it is
        then returned as plain content, as the model wrote it). Calls are read from the decoded
        tokens, which still hold a stop string such as `</tool_call>` that the text lost."""
        full = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        source = full if full.startswith(text) else text
        spans = [(a, b, call) for a, b, call in self.toolbox.find(source) if call.error is None]
        if not spans:
            return None
        content, at = [], 0
        for a, b, _ in spans:
            content.append(source[at:a])
            at = b
        content.append(source[at:])
        calls = [
            {
                "id": f"call_{secrets.token_hex(12)}",
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for _, _, call in spans
        ]
        return {"role": "assistant", "content": "".join(content).strip() or None, "tool_calls": calls}
