"""The step body both loops share: scored samples -> batch -> advantages -> train -> push -> audit.

`StepBody.learn` is that body. The synchronous loop (`Trainer.step_once`) reaches it through
generate -> dynamic sampling (DAPO) -> score; the asynchronous one (`AsyncLoop.step`) through the
buffer its producer fills. What one phase hands the next is an argument, never trainer state.

`StepBody` is a base of `Trainer` (rlhf/loop/driver.py), which provides `cfg`, `roles`, `data`,
`pad_id`, `engine_logprobs`, `run_dir`, `step`, `device`, `_audited_initial` and the GPU hand-over
between engines and learners (`gpus_to_learners`, `wake_engines`, `offload_learners`).
"""

from __future__ import annotations

import json
import sys

import torch
from tqdm import tqdm

from rlhf.algorithms import advantages as adv_fns
from rlhf.algorithms import filters, kl, old_logprobs
from rlhf.loop.batch import make_train_batch
from rlhf.production.metrics import Timer, sample_metrics, sample_rows
from rlhf.reward.pipeline import drop_unscored_groups
from rlhf.types import Sample, TrainBatch


def log(msg: str) -> None:
    tqdm.write(f"[rlhf] {msg}", file=sys.stderr)


class StepBody:
    """The phases of one step, each reading what it needs from its arguments and the trainer's roles."""

    # ------------------------------------------------------------------ samples in
    def generate(self, timer: Timer, metrics: dict) -> list[Sample]:
        """n responses for each of the step's prompts."""
        cfg, rollout = self.cfg, self.roles.rollout
        with timer.phase("generate"):
            samples = rollout.generate(
                self.data.next_batch(cfg.rollout.prompts_per_step),
                cfg.rollout.sampling,
                logprobs=self.engine_logprobs,
            )
        metrics.update({f"time/{k}": v for k, v in getattr(rollout, "last_timing", {}).items()})
        return samples

    def dynamic_sampling(self, samples: list[Sample], timer: Timer, metrics: dict) -> list[Sample]:
        """DAPO: score, keep the groups whose rewards differ, and generate for more prompts until
        `rollout.prompts_per_step` groups are kept or `algorithm.max_sampling_rounds` is reached.
        The kept samples are scored already (`score` does not score them again)."""
        cfg, rollout = self.cfg, self.roles.rollout
        want = cfg.rollout.prompts_per_step
        kept: list[Sample] = []
        extra, rounds = 0, 0
        while True:
            with timer.phase("reward"):
                self.roles.reward.score(samples)
            if cfg.reward.on_error == "drop":
                samples, _ = drop_unscored_groups(samples)
            rewards = torch.tensor([s.reward for s in samples])
            groups = torch.tensor([s.group for s in samples])
            keep = filters.dynamic_sampling_keep(rewards, groups)
            kept += [s for s, k in zip(samples, keep.tolist()) if k]
            rounds += 1
            if len({s.group for s in kept}) >= want or rounds >= cfg.algorithm.max_sampling_rounds:
                break
            with timer.phase("generate"):
                offset = max(s.group for s in samples) + 1
                more = self.data.next_batch(want)
                samples = rollout.generate(
                    more, cfg.rollout.sampling, group_offset=offset, logprobs=self.engine_logprobs
                )
            extra += len(more) * cfg.rollout.sampling.n
        if not kept:  # every group was uninformative: train on the last round (zero advantages)
            log("warning: dynamic sampling kept no group; training on the last round's samples")
            kept = samples
        groups_kept = set(sorted({s.group for s in kept})[:want])
        kept = [s for s in kept if s.group in groups_kept]
        metrics.update(
            {"dapo/extra_generations": extra, "dapo/kept_groups": len(groups_kept), "dapo/rounds": rounds}
        )
        return kept

    def score(self, samples: list[Sample], timer: Timer, metrics: dict) -> list[Sample]:
        """Rewards (and DAPO's overlong penalty) on every sample; returns the samples to train on
        (with `reward.on_error: drop`, groups with an unscored sample are left out)."""
        cfg = self.cfg
        if not cfg.algorithm.dynamic_sampling:  # dynamic sampling scored them already
            with timer.phase("reward"):
                self.roles.reward.score(samples)
        if cfg.reward.on_error == "drop":
            samples, dropped = drop_unscored_groups(samples)
            metrics["reward/dropped_groups"] = float(dropped)
        if cfg.algorithm.overlong_buffer > 0:
            lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
            penalty = filters.overlong_penalty(
                lengths,
                cfg.rollout.sampling.max_new_tokens,
                cfg.algorithm.overlong_buffer,
                cfg.algorithm.overlong_penalty,
            )
            for s, p in zip(samples, penalty.tolist()):
                s.reward += p
            metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
        metrics.update(self.roles.reward.last_stats())
        return samples

    # ------------------------------------------------------------------ the shared body
    def learn(self, samples: list[Sample], timer: Timer, metrics: dict, wait_for_push: bool) -> dict:
        """Scored samples -> batch -> advantages -> train -> push -> audit; the training stats.

        `wait_for_push=False` (asynchronous) hands the push to the learners' background thread; the
        engines load it after the generate call they are in."""
        self.dump_samples(samples)
        batch = make_train_batch(samples, self.pad_id)
        # First step of this process: the engines (still awake) and the learners score the same probe
        # before any push, so a gap the per-step audit reports is told apart from one the sync made.
        first = not self._audited_initial and self.cfg.sync.audit_every != 0  # 0: never audit
        initial = self.engine_scores(samples, timer) if first else None
        self._audited_initial = True
        self.gpus_to_learners(timer)
        if initial is not None:
            note = "before any push (engine and learner read the model differently)"
            self.compare_scores(*initial, timer, metrics, prefix="sync/audit_initial", note=note)
        truncated = [s.finish_reason == "length" for s in samples]
        self.advantages(batch, truncated, timer, metrics)
        stats = self.train_on(batch, timer)
        self.wake_engines(timer, metrics)
        with timer.phase("sync"):
            metrics.update(self.roles.sync.push(wait=wait_for_push))
        if self.audit_due():
            self.audit(samples, timer, metrics)
        self.offload_learners(timer)
        return stats

    def advantages(self, batch: TrainBatch, truncated: list[bool], timer: Timer, metrics: dict) -> None:
        """Reference and pi_old logprobs where needed, KL, then the advantages (and returns) in place."""
        alg, roles = self.cfg.algorithm, self.roles
        if alg.overlong_filter:  # before advantages: filtered samples must not enter batch statistics
            batch.loss_mask = batch.loss_mask * filters.overlong_mask(torch.tensor(truncated))[:, None]
        if roles.reference is not None:
            with timer.phase("ref_logprobs"):
                batch.ref_logprobs = roles.reference.logprobs(batch)
        if old_logprobs.learner_pass_needed(alg, roles.reference is not None):
            with timer.phase("old_logprobs"):
                batch.old_logprobs = roles.policy.logprobs(batch)
        # pi_old known before training: from the pass above or the engine (else the training pass has it)
        policy_logprobs = batch.old_logprobs if batch.old_logprobs is not None else batch.rollout_logprobs
        token_kl = None
        if batch.ref_logprobs is not None and policy_logprobs is not None:
            token_kl = kl.kl_estimate(policy_logprobs, batch.ref_logprobs, alg.kl_estimator) * batch.loss_mask
            metrics["reward/kl_to_ref"] = float(token_kl.sum(1).mean())
        with timer.phase("advantages"):
            if adv_fns.advantage_needs_critic(alg.advantage):
                batch.values = roles.critic.values(batch)
            inputs = adv_fns.AdvantageInputs(
                batch.rewards, batch.group, batch.loss_mask, token_kl, batch.values
            )
            batch.advantages, returns = adv_fns.estimate_advantages(alg, inputs)
            if returns is not None:
                batch.returns = returns
        metrics["train/advantage_abs_mean"] = float(
            (batch.advantages.abs() * batch.loss_mask).sum() / batch.loss_mask.sum().clamp(min=1)
        )

    def train_on(self, batch: TrainBatch, timer: Timer) -> dict[str, float]:
        """One optimizer step of the policy (and the critic)."""
        with timer.phase("train"):
            stats = self.roles.policy.train(batch)
            if self.roles.critic is not None:
                stats.update({f"critic/{k}": v for k, v in self.roles.critic.train(batch).items()})
        return stats

    # ------------------------------------------------------------------ checks and records
    def audit_due(self) -> bool:
        """Every step when synchronous; every 10th when asynchronous, where the engines' scoring pass
        waits behind a generate call (`sync.audit_every` overrides)."""
        every = self.cfg.sync.audit_every
        if every is None:
            every = 10 if self.cfg.rollout.max_staleness > 0 else 1
        return every > 0 and (self.step + 1) % every == 0

    def audit(self, samples: list[Sample], timer: Timer, metrics: dict) -> None:
        """Engine vs learner logprobs on a probe batch: catches a sync that did not land."""
        scored = self.engine_scores(samples, timer)
        if scored is not None:
            self.compare_scores(*scored, timer, metrics, prefix="sync/audit")

    def engine_scores(self, samples: list[Sample], timer: Timer) -> tuple[list, list] | None:
        """(probe samples, each engine's logprobs of them at T=1); None when auditing is off."""
        k = self.cfg.sync.audit_samples
        if not self.cfg.sync.audit or k <= 0:
            return None
        probe = [s for s in samples if s.response_ids and any(s.response_mask or [1])][:k]
        if not probe:
            return None
        with timer.phase("audit"):
            # every engine scores the whole (small) probe: a sync that missed one engine shows
            seqs = [(s.prompt.token_ids, s.response_ids) for s in probe]
            return probe, self.roles.rollout.group.call("logprobs", seqs)

    def compare_scores(
        self, probe: list[Sample], per_engine: list, timer: Timer, metrics: dict, prefix: str, note: str = ""
    ) -> None:
        """The learner scores `probe`; `{prefix}_logprob_diff` (mean |engine - learner| over the
        policy's tokens, averaged over engines), `_diff_max` and `_worst_engine_diff`; a warning
        above the tolerance."""
        with timer.phase("audit"):
            batch = make_train_batch(probe, self.pad_id)
            learner_lp = self.roles.policy.logprobs(batch, temperature=1.0)  # the engine scores at T=1
        engine_means = []
        for engine_lp in per_engine:
            diffs = []
            for i, s in enumerate(probe):
                p = len(s.prompt.token_ids)
                learner = learner_lp[i, p : p + len(s.response_ids)]
                diff = (learner - torch.tensor(engine_lp[i], dtype=learner.dtype)).abs()
                if s.response_mask is not None:  # multi-turn: only the policy's own tokens
                    diff = diff[torch.tensor(s.response_mask, dtype=torch.bool)]
                diffs.append(diff)
            diff = torch.cat(diffs)
            engine_means.append(float(diff.mean()))
            metrics[f"{prefix}_logprob_diff_max"] = max(
                metrics.get(f"{prefix}_logprob_diff_max", 0.0), float(diff.max())
            )
        metrics[f"{prefix}_logprob_diff"] = sum(engine_means) / len(engine_means)
        metrics[f"{prefix}_worst_engine_diff"] = max(engine_means)
        tol = self.cfg.sync.audit_tolerance or (5e-3 if self.device == "cpu" else 5e-2)
        worst = max(range(len(engine_means)), key=engine_means.__getitem__)
        if engine_means[worst] > tol:
            log(
                f"warning: weight-sync audit{' ' + note if note else ''}: engine {worst}: mean "
                f"|engine - learner| logprob = {engine_means[worst]:.2e} > {tol:.0e}"
            )

    def step_metrics(
        self, metrics: dict, samples: list[Sample], stats: dict, timer: Timer, elapsed: float
    ) -> dict[str, float]:
        """The per-step figures every loop logs (synchronous and asynchronous alike)."""
        metrics.update(sample_metrics(samples))
        metrics.update({f"train/{k}": v for k, v in stats.items() if not k.startswith("critic/")})
        metrics.update({k: v for k, v in stats.items() if k.startswith("critic/")})
        metrics.update(timer.as_metrics())
        metrics["fault/engine_restarts"] = float(self.roles.rollout.restarts)
        metrics["fault/learner_restarts"] = float(getattr(self, "learner_restarts", 0))
        gen_tokens = sum(len(s.response_ids) for s in samples)
        metrics["time/step_s"] = elapsed
        metrics["perf/generated_tokens"] = gen_tokens
        metrics["perf/tokens_per_s"] = gen_tokens / elapsed
        if "generate" in timer.seconds:
            metrics["perf/generate_tokens_per_s"] = gen_tokens / timer.seconds["generate"]
        return metrics

    def dump_samples(self, samples: list[Sample]) -> None:
        """The first `logging.samples_per_step` samples of each step, for reading what the policy writes."""
        rows = sample_rows(samples[: max(self.cfg.logging.samples_per_step, 0)], self.step + 1)
        if rows:
            with open(self.run_dir / "samples.jsonl", "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
