"""RewardPipeline: every configured source scores every sample; the reward is their weighted sum.

Reward-model actors and HTTP services are started first and work while the cheap rule functions run
inline in the driver; then their results are collected. Each sample keeps the unweighted score of
every source in `Sample.reward_parts[name]`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from rlhf.reward.http import HttpReward
from rlhf.reward.model import RewardModelActor
from rlhf.reward.rules import UNSCORED, RewardError, RuleReward, score_each

from rlhf.actor_group import ActorGroup, GroupCallError, gather, split_evenly
from rlhf.config.schema import RewardConfig, RewardSourceConfig
from rlhf.types import Sample

log = logging.getLogger(__name__)

# The name a model/http source gets when the config leaves it at the dataclass default ("task").
_DEFAULT_NAMES = {"model": "rm", "http": "http"}


def _fail_all(
    source: str, exc: BaseException, samples: list[Sample], on_error: str
) -> tuple[list[float], int]:
    """A whole-batch failure (service down, actor died): raise, or score every sample 0."""
    message = f"{source} failed on all {len(samples)} samples: {type(exc).__name__}: {exc}"
    if on_error not in UNSCORED:
        raise RewardError(message) from exc
    log.warning("%s (%s; reward.on_error=%s)", message, UNSCORED[on_error], on_error)
    return [0.0 if on_error == "zero" else math.nan] * len(samples), len(samples)


class _RuleSource:
    def __init__(self, label: str, rule: RuleReward):
        self.label, self.rule = label, rule

    def submit(self, samples: list[Sample]):
        submit = getattr(self.rule, "submit", None)  # rules that run in a pool (code_tests) start now
        return submit(samples) if submit else None

    def collect(self, pending, samples: list[Sample], on_error: str) -> tuple[list[float], int]:
        if pending is not None:
            return self.rule.collect(pending, samples, self.label, on_error)
        return self.rule.score(samples, self.label, on_error)

    def shutdown(self) -> None:
        getattr(self.rule, "shutdown", lambda: None)()


class _ModelSource:
    """One reward model, replicated over `actor_options`; a batch is split evenly across replicas.

    A replica that dies while scoring is restarted (same options) and given its chunk again, up to
    `MAX_RESTARTS` times per batch; then the batch follows `reward.on_error`."""

    MAX_RESTARTS = 2

    def __init__(self, label: str, cfg: RewardSourceConfig, device: str, batch_size: int, actor_options):
        import ray

        self.label = label
        args = dict(cfg.args)
        unknown = set(args) - {"max_length"}
        if unknown:
            raise RewardError(
                f"{label}: unknown args {sorted(unknown)} for a model source (known: max_length)"
            )
        default = {"num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
        remote_cls = ray.remote(RewardModelActor)
        self._options = list(actor_options or [default])
        self._start = lambda i: remote_cls.options(**self._options[i]).remote(
            cfg.path, device, batch_size, args.get("max_length")
        )
        self.group = ActorGroup([self._start(i) for i in range(len(self._options))], label)
        self.restarts = 0
        try:
            self.group.call("ready")
        except Exception as exc:
            self.shutdown()
            raise RewardError(f"{label}: could not load reward model {cfg.path!r}: {exc}") from exc

    def submit(self, samples: list[Sample]):
        prompts = [s.prompt.text for s in samples]
        responses = [s.response_text for s in samples]
        bounds = [(a, b) for a, b in split_evenly(len(samples), len(self.group)) if b > a]
        chunks = [(prompts[a:b], responses[a:b]) for a, b in bounds]
        refs, ranks = self.group.submit("score", per_rank=chunks, ranks=range(len(bounds)))
        return refs, chunks

    def collect(self, pending, samples: list[Sample], on_error: str) -> tuple[list[float], int]:
        refs, chunks = pending
        for attempt in range(self.MAX_RESTARTS + 1):
            try:
                values = [
                    v for chunk in gather(refs, self.group.who(range(len(refs))), "score") for v in chunk
                ]
                break
            except GroupCallError as exc:
                if not exc.actor_died or attempt == self.MAX_RESTARTS:
                    return _fail_all(self.label, exc, samples, on_error)
                self.restart(exc.rank, exc.cause)
                refs[exc.rank] = self.group.actors[exc.rank].score.remote(*chunks[exc.rank])
        return score_each(self.label, samples, lambda i, _: values[i], on_error)

    def restart(self, rank: int, cause: BaseException) -> None:
        import ray

        log.warning("%s: reward model replica %d died (%s); restarting it", self.label, rank, cause)
        with contextlib.suppress(Exception):
            ray.kill(self.group.actors[rank])
        self.group.actors[rank] = self._start(rank)
        self.group.call("ready", ranks=[rank])
        self.restarts += 1

    @property
    def actors(self) -> list:
        return self.group.actors

    def shutdown(self) -> None:
        import ray

        for actor in self.group.actors:
            ray.kill(actor)
        self.group.actors = []


class _HttpSource:
    def __init__(self, label: str, cfg: RewardSourceConfig, pool: ThreadPoolExecutor):
        self.label, self.pool = label, pool
        try:
            self.client = HttpReward(cfg.url, args=cfg.args)
        except ValueError as exc:
            raise RewardError(f"{label}: {exc}") from exc

    def submit(self, samples: list[Sample]) -> Future:
        return self.pool.submit(
            self.client.score,
            [s.prompt.text for s in samples],
            [s.response_text for s in samples],
            [s.prompt.label for s in samples],
        )

    def collect(self, pending: Future, samples: list[Sample], on_error: str) -> tuple[list[float], int]:
        try:
            values = pending.result()
        except Exception as exc:
            return _fail_all(self.label, exc, samples, on_error)
        return score_each(self.label, samples, lambda i, _: values[i], on_error)

    def shutdown(self) -> None:
        self.client.close()


class RewardPipeline:
    """Scores samples with every source of `cfg.sources` and combines them by weight.

    `task` is the data task (its `check` backs the "task" rule); `actor_options` holds one
    `ray.remote(...).options(**)` dict per reward-model replica (from the placement plan).
    """

    def __init__(
        self,
        cfg: RewardConfig,
        task=None,
        device: str = "cpu",
        actor_options: list[dict[str, Any]] | None = None,
    ):
        if not cfg.sources:
            raise RewardError("reward.sources is empty: configure at least one reward source")
        if cfg.on_error not in ("raise", *UNSCORED):
            raise RewardError(f"reward.on_error must be 'raise', 'zero' or 'drop', got {cfg.on_error!r}")
        self.cfg = cfg
        self._pool: ThreadPoolExecutor | None = None
        self._stats: dict[str, float] = {}
        self.names: list[str] = []
        self.weights: list[float] = []
        self.sources: list[Any] = []
        try:
            for i, src in enumerate(cfg.sources):
                self._add_source(i, src, task, device, actor_options)
        except BaseException:
            self.shutdown()
            raise

    def _add_source(self, i: int, src: RewardSourceConfig, task, device: str, actor_options) -> None:
        where = f"reward.sources[{i}]"
        name = _DEFAULT_NAMES.get(src.kind, src.name) if src.name == "task" else src.name
        if name in self.names:
            raise RewardError(
                f"{where}: name {name!r} is already used by another source; give each a unique name"
            )
        if not isinstance(src.weight, int | float) or not math.isfinite(src.weight):
            raise RewardError(f"{where} ({name}): weight must be a finite number, got {src.weight!r}")
        label = f"{where} ({name})"
        if src.kind == "rule":
            try:
                rule = RuleReward.from_config(src.name, src.args, task, timeout_s=self.cfg.timeout_s)
                source = _RuleSource(label, rule)
            except RewardError as exc:
                raise RewardError(f"{where}: {exc}") from exc
        elif src.kind == "model":
            if not src.path:
                raise RewardError(f"{where} ({name}): kind 'model' needs `path` (a reward model directory)")
            source = _ModelSource(label, src, device, self.cfg.batch_size, actor_options)
        elif src.kind == "http":
            if not src.url:
                raise RewardError(f"{where} ({name}): kind 'http' needs `url`")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward-http")
            source = _HttpSource(label, src, self._pool)
        else:
            raise RewardError(f"{where}: unknown kind {src.kind!r} (expected rule, model or http)")
        self.names.append(name)
        self.weights.append(float(src.weight))
        self.sources.append(source)

    def score(self, samples: list[Sample]) -> list[float]:
        """Fill `reward_parts` and `reward` of every sample; return the rewards."""
        if not samples:
            self._stats = {"reward/errors": 0.0}
            return []
        # Remote work first, so it overlaps with the inline rules.
        pending = [src.submit(samples) for src in self.sources]
        order = sorted(range(len(self.sources)), key=lambda k: not isinstance(self.sources[k], _RuleSource))
        parts: dict[int, list[float]] = {}
        errors = 0
        for k in order:
            parts[k], n_errors = self.sources[k].collect(pending[k], samples, self.cfg.on_error)
            errors += n_errors
        rewards = []
        for j, sample in enumerate(samples):
            sample.reward_parts = {self.names[k]: parts[k][j] for k in range(len(self.sources))}
            sample.reward = sum(self.weights[k] * parts[k][j] for k in range(len(self.sources)))
            rewards.append(sample.reward)
        self._stats = {
            f"reward/{self.names[k]}_mean": sum(parts[k]) / len(samples) for k in range(len(self.sources))
        }
        self._stats["reward/errors"] = float(errors)
        for k, src in enumerate(self.sources):  # a rule's own figures, e.g. reward/code_tests_timeout
            stats = getattr(getattr(src, "rule", None), "stats", None)
            if stats:
                self._stats.update({f"reward/{self.names[k]}_{key}": v for key, v in stats().items()})
        models = [src for src in self.sources if isinstance(src, _ModelSource)]
        if models:
            self._stats["fault/reward_restarts"] = float(sum(src.restarts for src in models))
        return rewards

    def last_stats(self) -> dict[str, float]:
        """Per-source mean of the last `score` call (unweighted) and its error count."""
        return dict(self._stats)

    def shutdown(self) -> None:
        """Kill reward-model actors and close HTTP sessions."""
        for source in self.sources:
            source.shutdown()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def drop_unscored_groups(samples: list[Sample]) -> tuple[list[Sample], int]:
    """`reward.on_error: drop`: leave out every group with a sample that could not be scored (NaN
    reward). Returns (kept samples, dropped groups); no group left is an error."""
    bad = {s.group for s in samples if not math.isfinite(s.reward)}
    if not bad:
        return samples, 0
    kept = [s for s in samples if s.group not in bad]
    if not kept:
        raise RewardError(
            f"reward.on_error=drop: every one of the {len(bad)} group(s) had a sample that failed scoring"
        )
    return kept, len(bad)
