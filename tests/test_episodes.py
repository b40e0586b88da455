"""The episode runner and its token bookkeeping, with a scripted policy instead of an engine (fast).

The scripted policy writes given texts as a model would (its tokens + EOS), so these tests check what
the runner does with them: template deltas equal a full re-tokenization's suffix, only the policy's
tokens are unmasked, rewards add up, budgets and turn limits end episodes, and a failing, hanging or
junk-returning environment ends only its own episode.
"""

from __future__ import annotations

import time

import pytest
from rlhf.rollout.chat_tokens import ChatTokens
from rlhf.rollout.environments import Environment
from rlhf.rollout.environments.guess_number import GuessNumberEnv
from rlhf.rollout.episodes import Completion, EpisodeRunner, call_all

from rlhf.config.schema import EnvironmentConfig
from rlhf.loop.batch import make_train_batch
from rlhf.production.metrics import episode_metrics
from rlhf.testing import build_tokenizer
from rlhf.types import Prompt


@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def tokenizer(request):
    return build_tokenizer(add_bos=request.param)


def scripted_policy(tokenizer, answers: dict[int, list[str]], calls: list | None = None):
    """generate(inputs, budgets): episode e (numbered in first-call order) writes answers[e][turn]; an
    episode is recognised in later calls because its input extends what it had so far."""
    history: list[tuple[int, list[int], int]] = []  # (episode, its ids after its last turn, turns)

    def generate(inputs, budgets):
        if calls is not None:
            calls.append(len(inputs))
        first = not history
        out, now = [], []
        for i, (ids, budget) in enumerate(zip(inputs, budgets)):
            if first:
                episode, turn = i, 0
            else:
                episode, _, turn = next(h for h in history if ids[: len(h[1])] == h[1] and h not in now)
            text = answers[episode][min(turn, len(answers[episode]) - 1)]
            token_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            reason = "stop" if len(token_ids) <= budget else "length"
            token_ids = token_ids[:budget]
            out.append(
                Completion(token_ids, tokenizer.decode(token_ids, skip_special_tokens=True), None, reason)
            )
            now.append((episode, list(ids) + token_ids, turn + 1))
        history[:] = now
        return out

    return generate


def _prompt(tokenizer, index: int, secret: int, text: str = "Guess my number between 1 and 9.") -> Prompt:
    chat = ChatTokens(tokenizer)
    rendered, ids = chat.prompt([{"role": "user", "content": text}])
    return Prompt(index=index, text=rendered, token_ids=ids, label=secret)


def test_template_delta_equals_the_full_retokenization_suffix(tokenizer):
    chat = ChatTokens(tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 12 * 7."}]
    _, ids = chat.prompt(messages)
    answer = "Let us compute: 84"
    generated = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    new = [{"role": "tool", "content": '{"result": 84}'}, {"role": "user", "content": "Sure?"}]
    ids = ids + generated + chat.close_turn(generated) + chat.delta(new)[1]
    conversation = [*messages, {"role": "assistant", "content": answer}, *new]
    full = tokenizer(
        tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )["input_ids"]
    assert ids == full
    # a turn cut before its end-of-turn token is closed with the template's whole turn end
    assert (
        chat.close_turn(generated[:-1]) == chat.turn_end_ids
        and chat.close_turn(generated) == chat.turn_end_ids[1:]
    )


def test_guess_number_episodes_mask_rewards_and_batching(tokenizer):
    cfg = EnvironmentConfig(name="guess_number", max_turns=4, max_tokens=200)
    runner = EpisodeRunner(cfg, GuessNumberEnv, tokenizer, context_len=1024)
    prompts = [_prompt(tokenizer, 0, secret=7), _prompt(tokenizer, 1, secret=3, text="Pick between 1 and 9.")]
    answers = {0: ["5", "8", "7"], 1: ["1", "2", "4", "6"], 2: ["3"], 3: ["nothing"]}
    calls: list[int] = []
    samples = runner.run(prompts, [10, 11], 2, scripted_policy(tokenizer, answers, calls), max_new_tokens=16)
    assert [s.group for s in samples] == [10, 10, 11, 11]
    assert calls == [4, 3, 3, 2]  # turn k of every live episode is one engine call
    first = samples[0]
    assert first.finish_reason == "stop" and first.episode["turns"] == 3
    assert first.episode["reward"] == pytest.approx(-0.1 - 0.1 + 1.0)
    assert first.episode["turn_rewards"] == pytest.approx([-0.1, -0.1, 1.0])
    assert "Higher." in first.response_text and "Lower." in first.response_text
    # the policy's tokens are exactly where the mask is 1, the environment's where it is 0
    eos = tokenizer.eos_token_id
    policy = [t for t, m in zip(first.response_ids, first.response_mask) if m]
    assert policy == [
        t for a in ["5", "8", "7"] for t in tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]
    ]
    env_text = tokenizer.decode([t for t, m in zip(first.response_ids, first.response_mask) if not m])
    assert env_text.count("Higher.") == 1 and "<|im_start|>assistant" in env_text
    # prompt + response is what re-rendering the whole conversation gives
    conversation = [{"role": "user", "content": "Guess my number between 1 and 9."}]
    for guess, reply in [("5", "Higher."), ("8", "Lower.")]:
        conversation += [{"role": "assistant", "content": guess}, {"role": "user", "content": reply}]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    full = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert (first.prompt.token_ids + first.response_ids)[: len(full)] == full
    assert samples[1].finish_reason == "max_turns" and samples[1].episode["turns"] == 4
    assert samples[2].finish_reason == "stop" and samples[2].episode["reward"] == 1.0
    assert samples[3].finish_reason == "max_turns" and "Please answer" in samples[3].response_text
    batch = make_train_batch(samples, pad_token_id=0)
    p = len(first.prompt.token_ids)
    assert batch.loss_mask[0, p : p + len(first.response_ids)].tolist() == first.response_mask
    assert batch.loss_mask[0].sum() == sum(first.response_mask) < len(first.response_ids)
    assert batch.rollout_logprobs is None
    metrics = episode_metrics(samples)
    assert metrics["episode/done_frac"] == 0.5 and metrics["episode/turns_mean"] == (3 + 4 + 1 + 4) / 4
    assert metrics["episode/success_frac"] == 0.5  # games won (info["success"]), whatever the reward
    assert "episode/tool_call_frac" not in metrics


class BrokenEnv(Environment):
    """Per episode: step 1 is fine; then episode 0 raises, 1 hangs, 2 returns junk, 3 goes on."""

    count = 0

    def __init__(self):
        self.me, BrokenEnv.count = BrokenEnv.count, BrokenEnv.count + 1
        self.turn = 0

    def step(self, text):
        self.turn += 1
        if self.turn == 2 and self.me == 0:
            raise RuntimeError("env bug")
        if self.turn == 2 and self.me == 1:
            time.sleep(3)
        if self.turn == 2 and self.me == 2:
            return "junk"
        return [{"role": "user", "content": "go on"}], 1.0, False, {}

    def final_reward(self):
        return 10.0


def test_failing_hanging_and_junk_environments_end_only_their_episode(tokenizer):
    BrokenEnv.count = 0
    cfg = EnvironmentConfig(name="x", max_turns=3, max_tokens=200, step_timeout_s=0.5)
    runner = EpisodeRunner(cfg, BrokenEnv, tokenizer, context_len=1024)
    prompts = [_prompt(tokenizer, i, 1) for i in range(4)]
    answers = {i: ["a", "b", "c"] for i in range(4)}
    start = time.monotonic()
    samples = runner.run(prompts, list(range(4)), 1, scripted_policy(tokenizer, answers), max_new_tokens=8)
    assert time.monotonic() - start < 2.5  # the hung step was abandoned after step_timeout_s
    errors = [s.episode["error"] for s in samples]
    assert "RuntimeError: env bug" in errors[0] and "step_timeout_s=0.5" in errors[1]
    assert "returned str" in errors[2] and errors[3] is None
    assert [s.finish_reason for s in samples] == ["env_error"] * 3 + ["max_turns"]
    # turn rewards + the final reward (asked of every episode whose environment did not fail)
    assert samples[3].episode["reward"] == 3 * 1.0 + 10.0 and samples[0].episode["final_reward"] == 0.0


def test_token_budget_and_context_end_episodes(tokenizer):
    cfg = EnvironmentConfig(name="guess_number", max_turns=10, max_tokens=12)
    runner = EpisodeRunner(cfg, GuessNumberEnv, tokenizer, context_len=1024)
    answers = {0: ["1"] * 10}
    (sample,) = runner.run(
        [_prompt(tokenizer, 0, 9)], [0], 1, scripted_policy(tokenizer, answers), max_new_tokens=8
    )
    assert sample.finish_reason == "length" and len(sample.response_ids) <= 12
    assert sample.response_mask[-1] == 1  # an episode always ends on the policy's turn
    # a long answer is cut by the per-turn limit, and the template closes the cut turn itself
    answers = {0: ["123 456 789 " * 4, "9"]}
    cfg = EnvironmentConfig(name="guess_number", max_turns=2, max_tokens=200)
    runner = EpisodeRunner(cfg, GuessNumberEnv, tokenizer, context_len=1024)
    (sample,) = runner.run(
        [_prompt(tokenizer, 0, 9)], [0], 1, scripted_policy(tokenizer, answers), max_new_tokens=4
    )
    assert sample.response_mask[:5] == [1, 1, 1, 1, 0] and sample.finish_reason == "stop"


def test_call_all_keeps_order_and_reports_errors():
    def boom():
        raise ValueError("bad")

    assert call_all([lambda: 1, boom, lambda: 3], 1.0) == [(True, 1), (False, "ValueError: bad"), (True, 3)]


class SilentEnv(Environment):
    """Says nothing after turn 1 (the policy simply gets another turn), done after turn 2."""

    def __init__(self):
        self.turn = 0

    def step(self, text):
        self.turn += 1
        return [], 0.5, self.turn == 2, {}


def test_an_environment_without_messages_gives_the_policy_another_turn(tokenizer):
    cfg = EnvironmentConfig(name="x", max_turns=4, max_tokens=200)
    runner = EpisodeRunner(cfg, SilentEnv, tokenizer, context_len=1024)
    answers = {0: ["first", "second"]}
    (sample,) = runner.run(
        [_prompt(tokenizer, 0, 1)], [0], 1, scripted_policy(tokenizer, answers), max_new_tokens=8
    )
    assert sample.finish_reason == "stop" and sample.episode["turns"] == 2 and sample.episode["reward"] == 1.0
    env_text = tokenizer.decode([t for t, m in zip(sample.response_ids, sample.response_mask) if not m])
    assert env_text == "\n<|im_start|>assistant\n"
