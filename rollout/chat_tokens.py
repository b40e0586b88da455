"""Token ids for appending chat messages to a trajectory without re-tokenizing the conversation.

A multi-turn trajectory keeps the policy's tokens exactly as sampled (re-tokenizing its text can give
different ids, and then the learner would train on tokens the policy never produced). Environment
messages are appended as the chat template's *delta*: the template rendered with the new messages
minus the template rendered without them, tokenized alone. Both pieces start at a template
boundary (a special token such as <|im_start|>), so the delta's ids equal the suffix of a full
re-tokenization (tests/test_episodes.py checks this for the tiny tokenizers).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

# Placeholders for the fixed conversation the deltas are measured against (never sent to a model).
_USER, _ASSISTANT = "\u2063user-anchor\u2063", "\u2063assistant-anchor\u2063"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be extended message by message."""


class ChatTokens:
    """Prompt ids, turn-closing ids and message deltas for one tokenizer (HF, with a chat template)."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError("multi-turn episodes need a tokenizer with a chat template")
        self.tokenizer = tokenizer
        base = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}]
        self._base = base
        self._base_text = self.render(base, generation_prompt=False)
        end = self._base_text.rfind(_ASSISTANT)
        if end < 0:
            raise ChatTemplateError("the chat template does not render assistant messages' content")
        # What the template writes after an assistant message's content (ChatML: "<|im_end|>\n").
        self.turn_end_ids = self.encode(self._base_text[end + len(_ASSISTANT) :])

    def render(self, messages: list[dict], generation_prompt: bool = True, tools: list | None = None) -> str:
        """`tools` (OpenAI function schemas) go to templates that render them, e.g. in a system message."""
        extra = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(
            [_for_template(m) for m in messages],
            add_generation_prompt=generation_prompt,
            tokenize=False,
            **extra,
        )

    def encode(self, text: str) -> list[int]:
        """Template text already holds its special tokens: tokenize without adding any."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, messages: list[dict], tools: list | None = None) -> tuple[str, list[int]]:
        """The first prompt of an episode: the messages and the assistant generation prompt."""
        text = self.render(messages, tools=tools)
        return text, self.encode(text)

    def close_turn(self, generated: list[int]) -> list[int]:
        """Ids that end an assistant turn the way the template would: the part of `turn_end_ids`
        the policy did not write itself (it usually wrote the end-of-turn token as its EOS)."""
        ends = self.turn_end_ids
        for k in range(min(len(ends), len(generated)), 0, -1):
            if generated[-k:] == ends[:k]:
                return ends[k:]
        return list(ends)

    def delta(self, messages: list[dict], tools: list | None = None) -> tuple[str, list[int]]:
        """Text and ids the template adds for `messages` after a closed assistant turn, including the
        next assistant generation prompt."""
        base_text = self.render(self._base, False, tools) if tools else self._base_text
        full = self.render([*self._base, *messages], tools=tools)
        if not full.startswith(base_text):
            raise ChatTemplateError(
                "the chat template renders earlier turns differently once messages follow them "
                "(e.g. it strips reasoning from past turns), so a trajectory cannot be extended token by token"
            )
        text = full[len(base_text) :]
        return text, self.encode(text)


def parsed_arguments(arguments: Any) -> Any:
    """A tool call's arguments as the mapping they encode: OpenAI clients send them as a JSON string
    (left as it is when it is not JSON)."""
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(arguments)
    return arguments


def _for_template(message: dict) -> dict:
    """Templates (Qwen, Llama 3.1, like vLLM's own server) render a tool call's arguments as a mapping."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    out = []
    for call in calls:
        function = call.get("function") or {}
        if "arguments" in function:
            function = {**function, "arguments": parsed_arguments(function["arguments"])}
        out.append({**call, "function": function})
    return {**message, "tool_calls": out}
