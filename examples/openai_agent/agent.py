"""An agent written against the OpenAI client, trained as it is (docs/agents.md, "Training your own
agent"). It answers an arithmetic question, is asked to check its work, and earns 1 when the final
number is right. From the repository root:

    PYTHONPATH=examples/openai_agent rlhf train examples/openai_agent/config.yaml

Nothing here knows about training: point `base_url` at any OpenAI-compatible server and it runs the
same. During training the framework calls `solve_then_check(prompt, base_url)` once per episode, with
a base_url on one rollout engine that records every call's tokens and logprobs.
"""

from __future__ import annotations

from openai import OpenAI

from rlhf.tasks import get_task

SYSTEM = "You are a calculator. Reply with the result."


def solve_then_check(prompt, base_url: str, max_tokens: int = 32):
    """prompt: rlhf.types.Prompt (the question is metadata["raw_prompt"], the answer is label).
    Returns (reward, info); an exception or a hang ends only this episode."""
    client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=0)  # retries would hide errors
    model = client.models.list().data[0].id  # any name is accepted; this is the policy's path
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": prompt.metadata["raw_prompt"]},
    ]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
    messages.append({"role": "assistant", "content": first.choices[0].message.content})
    messages.append({"role": "user", "content": "Check your work. Reply with the final number only."})
    final = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
    answer = final.choices[0].message.content
    reward = get_task("arithmetic").check(answer, prompt.label)
    return reward, {"first_answer": first.choices[0].message.content, "final_answer": answer}
