"""Evaluation as a role: the config's eval sets, scored every `eval_every` steps.

Each set (`evaluation.sets[i]`) is prompts (the run's held-out prompts, a built-in task, or a data
file), a checker (the task's, a rule, a user function, or the run's reward sources) and sampling
settings (samples per prompt, temperature, pass@k). Results are `eval/<set>/<figure>` at the step
whose weights produced them; the first set's reward mean is also `eval/reward_mean`, the headline the
console line and the reward plot show.

Where it runs:
* on the rollout engines, between two steps (`evaluation.separate_engines: false`, the default): the
  step waits for it;
* on engines of its own (`separate_engines: true`, placed as `placement.evaluation`): after a step the
  learner pushes its weights to them (a snapshot; `WeightSync` as for the rollout engines) and a
  driver thread generates while training goes on. Scoring runs on the driver's thread when the
  results are collected (the reward pipeline is not shared across threads), and the rows are logged
  with the step they belong to.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rlhf.config.schema import EvalSetConfig, RunConfig, SamplingConfig
from rlhf.types import Prompt, Sample

HEADLINE = "eval/reward_mean"


@dataclass
class EvalSet:
    cfg: EvalSetConfig
    prompts: list[Prompt]
    sampling: SamplingConfig
    rule: Any = None  # a rlhf.reward.rules.RuleReward; None: the run's reward pipeline scores the set


@dataclass
class Evaluation:
    """One evaluation of every set with the weights of `step`: {set name: figures}."""

    step: int
    summaries: dict[str, dict[str, float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {f"eval/{name}/{k}": v for name, summary in self.summaries.items() for k, v in summary.items()}
        if self.summaries:
            out[HEADLINE] = next(iter(self.summaries.values()))["reward_mean"]
            out["eval/step"] = float(self.step)
        return out


def configured_sets(cfg: RunConfig) -> list[EvalSetConfig]:
    """`evaluation.sets`, or the default held-out set when the data has held-out prompts."""
    if cfg.evaluation.sets:
        return list(cfg.evaluation.sets)
    if cfg.data.num_eval > 0:
        return [EvalSetConfig(name="held_out", reward="reward")]
    return []


def _set_data_config(cfg: RunConfig, es: EvalSetConfig):
    """A DataConfig reading the set's source with the run's prompt formatting."""
    from rlhf.data.prompts import is_fixed_set

    builtin = es.source.startswith("builtin:") and not is_fixed_set(es.source)  # a generated task
    same_task = builtin and es.source == cfg.data.source and es.task_args == cfg.data.task_args
    return dataclasses.replace(
        cfg.data,
        source=es.source,
        task_args=dict(es.task_args),
        input_key=es.input_key,
        label_key=es.label_key,
        # the training task's own prompts are left out of its evaluation prompts
        num_train=cfg.data.num_train if same_task else 1,
        num_eval=(es.num_prompts or cfg.data.num_eval) if builtin else 0,
        seed=cfg.data.seed + es.seed,
    )


def build_sets(cfg: RunConfig, tokenizer, held_out=None) -> list[EvalSet]:
    """Prompts, checker and sampling of every configured set; `held_out` is the run's PromptData
    (built here when not given). Bad input raises one line naming `evaluation.sets[i]`."""
    from rlhf.data.prompts import PromptData, is_fixed_set
    from rlhf.reward.rules import RewardError, RuleReward

    sets = []
    for i, es in enumerate(configured_sets(cfg)):
        where = f"evaluation.sets[{i}] ({es.name})"
        try:
            if es.source is None:
                data = held_out if held_out is not None else PromptData(cfg.data, tokenizer)
                prompts = data.eval_prompts()
            else:
                data = PromptData(_set_data_config(cfg, es), tokenizer)
                builtin = es.source.startswith("builtin:") and not is_fixed_set(es.source)
                prompts = data.eval_prompts() if builtin else data.prompts_in_order(es.num_prompts)
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        prompts = prompts[: es.num_prompts] if es.num_prompts else prompts
        if not prompts:
            raise ValueError(f"{where}: no evaluation prompts in {es.source or cfg.data.source}")
        rule = None
        if es.reward != "reward":
            try:
                rule = RuleReward.from_config(es.reward, {}, data.task, timeout_s=cfg.reward.timeout_s)
            except RewardError as exc:
                raise ValueError(f"{where}.reward: {exc}") from None
        sampling = dataclasses.replace(
            cfg.rollout.sampling,
            n=es.samples_per_prompt,
            temperature=cfg.rollout.eval_temperature if es.temperature is None else es.temperature,
            max_new_tokens=es.max_new_tokens or cfg.rollout.sampling.max_new_tokens,
        )
        sets.append(EvalSet(es, prompts, sampling, rule))
    return sets


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which `correct` solve the prompt: 1 - C(n-c, k) / C(n, k)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def score(es: EvalSet, samples: list[Sample], reward=None) -> None:
    """Fill `Sample.reward` with the set's checker (a failing call scores 0 and is counted)."""
    if es.rule is None:
        reward.score(samples)
        return
    values, _errors = es.rule.score(samples, f"eval {es.cfg.name}", on_error="zero")
    for sample, value in zip(samples, values):
        sample.reward, sample.reward_parts = value, {es.cfg.reward: value}


def summarize(es: EvalSet, samples: list[Sample], seconds: float) -> dict[str, float]:
    """The figures of one set: reward, solved fraction, pass@k, lengths, how it was sampled."""
    n = max(1, len(samples))
    rewards = [s.reward for s in samples]
    mean = sum(rewards) / n
    solved_by_group: dict[int, list[bool]] = {}
    for s in samples:
        solved_by_group.setdefault(s.group, []).append(s.reward >= es.cfg.correct_threshold)
    out = {
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / n),
        "solved_frac": sum(s.reward >= es.cfg.correct_threshold for s in samples) / n,
        "length_mean": sum(len(s.response_ids) for s in samples) / n,
        "truncated_frac": sum(s.truncated for s in samples) / n,
        "prompts": float(len(solved_by_group)),
        "samples": float(len(samples)),
        "temperature": float(es.sampling.temperature),
        "seconds": seconds,
    }
    for checker in ("task", "math"):  # a verifiable checker's mean is the set's accuracy
        if samples and all(checker in s.reward_parts for s in samples):
            out["accuracy"] = sum(s.reward_parts[checker] for s in samples) / n
            break
    if samples and any(s.episode is not None for s in samples):  # environments: turns, task success, tools
        from rlhf.production.metrics import episode_metrics

        out.update({k.removeprefix("episode/"): v for k, v in episode_metrics(samples).items()})
    for k in es.cfg.pass_k:
        per_prompt = [pass_at_k(len(v), sum(v), k) for v in solved_by_group.values() if len(v) >= k]
        if per_prompt:
            out[f"pass@{k}"] = sum(per_prompt) / len(per_prompt)
    return out


def generate(engines, sets: list[EvalSet]) -> list[tuple[list[Sample], float]]:
    """Every set's samples (and generation seconds) from `engines` (a RolloutGroup)."""
    out = []
    for es in sets:
        start = time.perf_counter()
        out.append((engines.generate(es.prompts, es.sampling), time.perf_counter() - start))
    return out


def evaluate(engines, sets: list[EvalSet], step: int, reward=None) -> Evaluation:
    """Generate, score and summarise every set now (blocking)."""
    return finish(sets, step, generate(engines, sets), reward)


def finish(sets: list[EvalSet], step: int, generated, reward=None) -> Evaluation:
    result = Evaluation(step)
    for es, (samples, seconds) in zip(sets, generated):
        score(es, samples, reward)
        result.summaries[es.cfg.name] = summarize(es, samples, seconds)
    return result


class Evaluator:
    """The evaluation role of a run: `start(step)` after a due step, `collect()` what finished.

    Without engines of its own it evaluates on the rollout engines at once and `start` returns the
    result; with them (`own_engines` + their `WeightSync`) `start` pushes the learner's weights to
    them, generates on a driver thread and returns None, and `collect` hands back finished results."""

    def __init__(self, sets: list[EvalSet], rollout, reward, own_engines=None, own_sync=None):
        self.sets, self.rollout, self.reward = sets, rollout, reward
        self.own_engines, self.own_sync = own_engines, own_sync
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlhf-eval") if own_engines else None
        )
        self._pending: list[tuple[int, Future]] = []
        self._engine_step = 0  # the step whose weights the own engines hold (they start from the base model)

    @classmethod
    def for_run(cls, cfg: RunConfig, sets, rollout, reward, policy, device, model_path, actor_options):
        """The role as a run configures it; with `separate_engines`, starts its engines and their sync."""
        if not (cfg.evaluation.separate_engines and sets):
            return cls(sets, rollout, reward)
        from rlhf.rollout import RolloutGroup
        from rlhf.sync.driver_side import WeightSync

        own_cfg = dataclasses.replace(
            cfg, placement=dataclasses.replace(cfg.placement, rollout=cfg.placement.evaluation)
        )
        engines = RolloutGroup(own_cfg, model_path, device, actor_options)
        sync = WeightSync(cfg.sync, policy, engines, device)
        sync.setup()
        engines.on_restart = sync.resync
        return cls(sets, rollout, reward, engines, sync)

    def reconnect(self, policy, sync_cfg) -> None:
        """New learners (a learner restart): the own engines' sync is planned anew from them, and
        the next evaluation pushes their weights whatever step it is."""
        if self.own_engines is None:
            return
        from rlhf.sync.driver_side import WeightSync

        for _, future in self._pending:  # an evaluation in flight finishes on the weights it had
            future.result()
        self.own_sync = WeightSync(sync_cfg, policy, self.own_engines, self.own_sync.device)
        self.own_sync.setup()
        self.own_engines.on_restart = self.own_sync.resync
        self._engine_step = -1

    def start(self, step: int) -> Evaluation | None:
        if not self.sets:
            return None
        if self.own_engines is None:
            return evaluate(self.rollout, self.sets, step, self.reward)
        for _, future in self._pending:  # the engines evaluate one snapshot at a time
            future.result()
        if step != self._engine_step:
            self.own_sync.push()
            self._engine_step = step
        self._pending.append((step, self._pool.submit(generate, self.own_engines, self.sets)))
        return None

    def collect(self, wait: bool = False) -> list[Evaluation]:
        """Finished evaluations of the own engines, scored now, oldest first (`wait`: all of them)."""
        done = []
        while self._pending and (wait or self._pending[0][1].done()):
            step, future = self._pending.pop(0)
            done.append(finish(self.sets, step, future.result(), self.reward))
        return done

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.own_engines is not None:
            self.own_engines.shutdown()
