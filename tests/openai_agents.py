"""Agent functions for tests/test_openai_agent.py, written the way users write them: against the
`openai` client and a base_url. Importable as `openai_agents:<name>` once tests/ is on sys.path."""

from __future__ import annotations

import itertools
import threading
import time

from openai import OpenAI

_episodes = itertools.count()
_lock = threading.Lock()


def question(prompt) -> str:
    raw = prompt.metadata.get("raw_prompt", prompt.text)
    return raw if isinstance(raw, str) else str(raw)


def two_calls(prompt, base_url: str, max_tokens: int = 6, reward: float = 1.0):
    """Ask, then ask for a check with the reply in the history; returns what the endpoint sent back,
    so tests compare it with the trained samples."""
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": question(prompt)}]
    seen = []
    for follow_up in ("Check your answer.", None):
        reply = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0.3,  # not read: the endpoint samples at rollout.sampling's settings
            logprobs=True,
            extra_body={"return_token_ids": True},
        )
        choice = reply.choices[0]
        seen.append(
            {
                "prompt_ids": reply.model_extra["prompt_token_ids"],
                "ids": choice.model_extra["token_ids"],
                "logprobs": [t.logprob for t in choice.logprobs.content],
                "text": choice.message.content,
            }
        )
        messages.append(choice.message.model_dump())  # the client's own object, echoed back as is
        if follow_up:
            messages.append({"role": "user", "content": follow_up})
    score = reward if len(seen[-1]["text"]) % 2 == 0 else 0.0
    return score, {"seen": seen}


def two_calls_or_misbehave(prompt, base_url: str, max_tokens: int = 6):
    """Episode 1 of this process raises after one call, episode 2 hangs; every other one is `two_calls`."""
    with _lock:
        k = next(_episodes)
    if k == 1:
        client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        raise RuntimeError("the agent's own bug")
    if k == 2:
        time.sleep(60)
    return two_calls(prompt, base_url, max_tokens)
