"""The single controller: generate -> score -> advantages -> train -> sync weights -> log.

The driver holds no model weights. It builds one Ray actor group per role and then reads as the
loop in `Trainer.step`, top to bottom.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from rlhf.algorithms import advantages as adv_fns
from rlhf.algorithms import filters, kl, old_logprobs
from rlhf.algorithms.gae import gae
from rlhf.config.loader import resolve_device, to_dict, to_yaml
from rlhf.config.schema import RunConfig
from rlhf.data.models import check_engine_can_run, resolve_model_path
from rlhf.data.prompts import PromptData
from rlhf.evaluation import sets as evaluation
from rlhf.evaluation import summary as run_summary
from rlhf.loop.batch import make_train_batch
from rlhf.placement import RayPlacement, make_plan
from rlhf.production import checkpoint as ckpt
from rlhf.production import lineage
from rlhf.production.metrics import MetricsLogger, Timer, plot_rewards, sample_metrics, sample_rows, step_line
from rlhf.production.monitoring import RunMonitor, engine_actor_options
from rlhf.production.watchdog import StallWatchdog
from rlhf.reward.pipeline import drop_unscored_groups
from rlhf.types import Sample, TrainBatch


def log(msg: str) -> None:
    tqdm.write(f"[rlhf] {msg}", file=sys.stderr)


@dataclass
class Roles:
    rollout: object
    policy: object
    reference: object | None
    critic: object | None
    reward: object
    sync: object
    placement: object
    evaluator: evaluation.Evaluator


def init_ray(device: str) -> bool:
    """Join RAY_ADDRESS or start a local Ray; returns whether this call started it."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    env_vars = {"TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env_vars.update({"DS_ACCELERATOR": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    if address:
        # A `ray job submit` driver already runs in the job's runtime env, which Ray will not merge
        # with another one here; each role group sets the variables its actors need itself.
        log(f"joining Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(runtime_env={"env_vars": env_vars}, log_to_driver=True)
    return True


def new_run_dir(cfg: RunConfig) -> tuple[Path, str]:
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"resume: run directory {run_dir} does not exist")
        return run_dir, run_dir.name
    stem = Path(cfg.source_file).stem if cfg.source_file else "run"
    name = cfg.logging.run_name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.logging.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir, name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Owns the roles and the loop state; `run()` is the whole training run."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg)
        seed_everything(cfg.seed)
        self.run_dir, self.run_name = new_run_dir(cfg)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        log(f"run directory: {self.run_dir}")
        self.model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
        check_engine_can_run(self.model_path, self.device)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.data = PromptData(cfg.data, self.tokenizer)
        self.step = 0
        self.engine_logprobs = old_logprobs.engine_logprobs_needed(cfg.algorithm, cfg.rollout.max_staleness)
        self.started_ray = False
        self.roles: Roles | None = None
        self.loop = None  # the asynchronous loop (rollout.max_staleness >= 1), started by run()
        self.last_metrics: dict[str, float] = {}  # recorded in each checkpoint's lineage manifest
        self.watchdog: StallWatchdog | None = None
        self.lineage_parent: str | None = None
        self.metrics = MetricsLogger(
            self.run_dir, cfg.logging.project, self.run_name, cfg.logging.wandb_mode, to_dict(cfg)
        )
        self.metrics.log_dataset(cfg.data)
        self.monitor: RunMonitor | None = None  # Ray metrics (rlhf/production/monitoring.py), once Ray is up

    # ------------------------------------------------------------------ set-up
    def start_roles(self) -> Roles:
        from rlhf.reward import RewardPipeline
        from rlhf.rollout import RolloutGroup
        from rlhf.sync.driver_side import WeightSync
        from rlhf.trainer import LearnerGroup

        cfg = self.cfg
        self.started_ray = init_ray(self.device)
        plan = make_plan(cfg)
        log("placement:\n" + plan.describe())
        placement = RayPlacement(plan)
        t0 = time.perf_counter()
        # Start the slow engines first; learners initialise while vLLM loads.
        rollout_options = engine_actor_options(placement.actor_options("rollout"), self.run_name, "rollout")
        rollout = RolloutGroup(cfg, self.model_path, self.device, rollout_options)
        policy = LearnerGroup(cfg, self.model_path, "policy", self.device, placement.actor_options("learner"))
        reference = None
        if cfg.algorithm.kl_coef > 0:
            reference = LearnerGroup(
                cfg, self.model_path, "reference", self.device, placement.actor_options("reference")
            )
        critic = None
        if cfg.trainer.critic.enabled:
            critic = LearnerGroup(
                cfg, self.model_path, "critic", self.device, placement.actor_options("critic")
            )
        reward_opts = placement.actor_options("reward_model") if plan.has_role("reward_model") else None
        reward = RewardPipeline(
            cfg.reward, task=self.data.task, device=self.device, actor_options=reward_opts
        )
        sync = WeightSync(cfg.sync, policy, rollout, self.device)
        sync.setup()
        rollout.on_restart = sync.resync  # a restarted engine gets the learner's current weights
        eval_options = None
        if plan.has_role("evaluation"):
            eval_options = engine_actor_options(
                placement.actor_options("evaluation"), self.run_name, "evaluation"
            )
        evaluator = evaluation.Evaluator.for_run(
            cfg,
            evaluation.build_sets(cfg, self.tokenizer, held_out=self.data),
            rollout,
            reward,
            policy,
            self.device,
            self.model_path,
            eval_options,
        )
        log(f"roles ready in {time.perf_counter() - t0:.0f}s")
        return Roles(rollout, policy, reference, critic, reward, sync, placement, evaluator)

    def maybe_resume(self) -> None:
        self.lineage_parent = lineage.parent_of(self)  # the resumed checkpoint, or the model's own
        if not self.cfg.resume:
            return
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:
            log(f"resume: no checkpoint in {self.run_dir}; starting from step 0")
            return
        state = ckpt.load_driver_state(latest)
        self.roles.policy.load(str(latest / "policy"))
        if self.roles.critic is not None:
            self.roles.critic.load(str(latest / "critic"))
        self.data.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        # The engines started from the base weights: bring them to the checkpoint's.
        self.roles.sync.push()
        log(f"resumed from {latest} at step {self.step}")

    # ------------------------------------------------------------------ one step
    def generate(self, timer: Timer, metrics: dict) -> list[Sample]:
        """Sample n responses per prompt; with DAPO dynamic sampling, keep only informative groups."""
        cfg, rollout = self.cfg, self.roles.rollout
        want = cfg.rollout.prompts_per_step
        with timer.phase("generate"):
            samples = rollout.generate(
                self.data.next_batch(want), cfg.rollout.sampling, logprobs=self.engine_logprobs
            )
        metrics.update({f"time/{k}": v for k, v in getattr(rollout, "last_timing", {}).items()})
        if not cfg.algorithm.dynamic_sampling:
            return samples
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

    def advantages(self, batch: TrainBatch, timer: Timer, metrics: dict) -> None:
        alg, roles = self.cfg.algorithm, self.roles
        if alg.overlong_filter:  # before advantages: filtered samples must not enter batch statistics
            truncated = torch.tensor([s == "length" for s in self._finish_reasons])
            batch.loss_mask = batch.loss_mask * filters.overlong_mask(truncated)[:, None]
        if roles.reference is not None:
            with timer.phase("ref_logprobs"):
                batch.ref_logprobs = roles.reference.logprobs(batch)
        if old_logprobs.learner_pass_needed(alg, roles.reference is not None):
            with timer.phase("old_logprobs"):
                batch.old_logprobs = roles.policy.logprobs(batch)
        # pi_old known before training: from the pass above or the engine (else the training pass has it)
        policy_logprobs = batch.old_logprobs if batch.old_logprobs is not None else batch.rollout_logprobs
        rewards = batch.rewards
        token_kl = None
        if batch.ref_logprobs is not None and policy_logprobs is not None:
            token_kl = kl.kl_estimate(policy_logprobs, batch.ref_logprobs, alg.kl_estimator) * batch.loss_mask
            metrics["reward/kl_to_ref"] = float(token_kl.sum(1).mean())
        with timer.phase("advantages"):
            if alg.advantage == "gae":
                batch.values = roles.critic.values(batch)
                coef = alg.kl_coef if (token_kl is not None and alg.kl_in == "reward") else 0.0
                kl_term = token_kl if token_kl is not None else torch.zeros_like(batch.loss_mask)
                token_rewards = adv_fns.token_level_rewards(rewards, kl_term, batch.loss_mask, coef)
                batch.advantages, batch.returns = gae(
                    token_rewards, batch.values, batch.loss_mask, alg.gamma, alg.lam
                )
            else:
                if token_kl is not None and alg.kl_in == "reward":
                    rewards = adv_fns.apply_kl_to_rewards(rewards, token_kl, batch.loss_mask, alg.kl_coef)
                batch.advantages = adv_fns.compute_advantages(alg, rewards, batch.group, batch.loss_mask)
        metrics["train/advantage_abs_mean"] = float(
            (batch.advantages.abs() * batch.loss_mask).sum() / batch.loss_mask.sum().clamp(min=1)
        )

    def audit(self, samples: list[Sample], timer: Timer, metrics: dict) -> None:
        """Engine vs learner logprobs on a probe batch: catches a sync that did not land."""
        k = self.cfg.sync.audit_samples
        if not self.cfg.sync.audit or k <= 0:
            return
        probe = [s for s in samples if s.response_ids and any(s.response_mask or [1])][:k]
        if not probe:
            return
        seqs = [(s.prompt.token_ids, s.response_ids) for s in probe]
        with timer.phase("audit"):
            # every engine scores the whole (small) probe: a sync that missed one engine shows
            per_engine = self.roles.rollout.group.call("logprobs", seqs)
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
            metrics["sync/audit_logprob_diff_max"] = max(
                metrics.get("sync/audit_logprob_diff_max", 0.0), float(diff.max())
            )
        metrics["sync/audit_logprob_diff"] = sum(engine_means) / len(engine_means)
        metrics["sync/audit_worst_engine_diff"] = max(engine_means)
        tol = self.cfg.sync.audit_tolerance or (5e-3 if self.device == "cpu" else 5e-2)
        worst = max(range(len(engine_means)), key=engine_means.__getitem__)
        if engine_means[worst] > tol:
            log(
                f"warning: weight-sync audit: engine {worst}: mean |engine - learner| logprob = "
                f"{engine_means[worst]:.2e} > {tol:.0e}"
            )

    def run_step(self) -> dict[str, float]:
        """One step of the synchronous or asynchronous loop; a dead learner rank stops the run with
        one line naming it and the command that resumes from the last checkpoint."""
        from rlhf.actor_group import GroupCallError, RunStopped

        try:
            return self.loop.step() if self.loop else self.step_once()
        except GroupCallError as exc:
            if not (exc.actor_died and exc.role in ("policy", "reference", "critic")):
                raise
            latest = ckpt.latest_checkpoint(self.run_dir)
            since = f"its last checkpoint ({latest.name})" if latest else "step 0 (no checkpoint yet)"
            config = self.cfg.source_file or "CONFIG"
            raise RunStopped(
                f"{exc.role} rank {exc.rank} died during {exc.method} in step {self.step + 1} "
                f"({type(exc.cause).__name__}); the run stopped. Resume from {since}: "
                f"rlhf train {config} resume={self.run_dir}"
            ) from exc

    def step_once(self) -> dict[str, float]:
        roles = self.roles
        timer, metrics = Timer(), {}
        t0 = time.perf_counter()
        samples = self.generate(timer, metrics)
        samples = self.score(samples, timer, metrics)
        self.dump_samples(samples)
        self._finish_reasons = [s.finish_reason for s in samples]
        batch = make_train_batch(samples, self.pad_id)
        self.gpus_to_learners(timer)
        self.advantages(batch, timer, metrics)
        stats = self.train_on(batch, timer)
        self.wake_engines(timer, metrics)
        with timer.phase("sync"):
            metrics.update(roles.sync.push())
        if self.audit_due():
            self.audit(samples, timer, metrics)
        self.offload_learners(timer)
        return self.step_metrics(metrics, samples, stats, timer, time.perf_counter() - t0)

    def train_on(self, batch: TrainBatch, timer: Timer) -> dict[str, float]:
        """One optimizer step of the policy (and the critic): both loops' training phase."""
        with timer.phase("train"):
            stats = self.roles.policy.train(batch)
            if self.roles.critic is not None:
                stats.update({f"critic/{k}": v for k, v in self.roles.critic.train(batch).items()})
        return stats

    def step_metrics(
        self, metrics: dict, samples: list[Sample], stats: dict, timer: Timer, elapsed: float
    ) -> dict[str, float]:
        """The per-step figures every loop logs (synchronous and asynchronous alike)."""
        metrics.update(sample_metrics(samples))
        metrics.update({f"train/{k}": v for k, v in stats.items() if not k.startswith("critic/")})
        metrics.update({k: v for k, v in stats.items() if k.startswith("critic/")})
        metrics.update(timer.as_metrics())
        metrics["fault/engine_restarts"] = float(self.roles.rollout.restarts)
        gen_tokens = sum(len(s.response_ids) for s in samples)
        metrics["time/step_s"] = elapsed
        metrics["perf/generated_tokens"] = gen_tokens
        metrics["perf/tokens_per_s"] = gen_tokens / elapsed
        if "generate" in timer.seconds:
            metrics["perf/generate_tokens_per_s"] = gen_tokens / timer.seconds["generate"]
        return metrics

    def audit_due(self) -> bool:
        """Every step when synchronous; every 10th when asynchronous, where the engines' scoring pass
        waits behind a generate call (`sync.audit_every` overrides)."""
        every = self.cfg.sync.audit_every
        if every is None:
            every = 10 if self.cfg.rollout.max_staleness > 0 else 1
        return every > 0 and (self.step + 1) % every == 0

    def dump_samples(self, samples: list[Sample]) -> None:
        """The first `logging.samples_per_step` samples of each step, for reading what the policy writes."""
        rows = sample_rows(samples[: max(self.cfg.logging.samples_per_step, 0)], self.step + 1)
        if rows:
            with open(self.run_dir / "samples.jsonl", "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

    # ------------------------------------------------------------------ sharing the GPUs (colocated)
    # Colocated on GPUs, engines and learners take turns: vLLM releases its weights and KV cache while
    # the learners compute (and wakes before the sync, which needs both sides' weights resident); with
    # trainer.offload_during_generation the learners move their states to host memory while vLLM works.
    def engine_sleeps(self) -> bool:
        colocated_gpu = self.device == "cuda" and self.roles.placement.colocated("rollout", "learner")
        wanted = self.cfg.rollout.sleep_between_steps
        return colocated_gpu if wanted is None else bool(wanted and colocated_gpu)

    def learner_offloads(self) -> bool:
        colocated_gpu = self.device == "cuda" and self.roles.placement.colocated("rollout", "learner")
        return colocated_gpu and bool(self.cfg.trainer.offload_during_generation)

    def gpus_to_learners(self, timer: Timer) -> None:
        if self.engine_sleeps():
            with timer.phase("sleep"):
                self.roles.rollout.sleep()
        if self.learner_offloads():
            with timer.phase("reload"):
                self.roles.policy.reload()

    def wake_engines(self, timer: Timer, metrics: dict | None = None) -> None:
        if not self.engine_sleeps():
            return
        if self.cfg.trainer.release_cache_before_wake and not self.learner_offloads():
            with timer.phase("release"):
                released = self.roles.policy.release_cache()
                if self.roles.critic is not None:
                    self.roles.critic.release_cache()
            if metrics is not None:
                metrics.update({f"memory/{k}": v for k, v in released.items()})
        with timer.phase("wake"):
            self.roles.rollout.wake()

    def offload_learners(self, timer: Timer) -> None:
        if self.learner_offloads():
            with timer.phase("offload"):
                self.roles.policy.offload()

    # ------------------------------------------------------------------ eval, checkpoints
    def evaluation_due(self) -> bool:
        """Before the first step of a run, every `eval_every` steps, and after the last step."""
        every, step = self.cfg.eval_every, self.step
        return step == 0 or step == self.cfg.steps or bool(every and step % every == 0)

    def evaluate(self) -> dict[str, float]:
        """Evaluate the current weights: the results at once (on the rollout engines), or {} while the
        evaluation's own engines work (`log_finished_evaluations` logs them with this step later)."""
        result = self.roles.evaluator.start(self.step)
        if result is None:
            return {}
        self.record_evaluation(result)
        return result.metrics()

    def log_finished_evaluations(self, wait: bool = False) -> None:
        for result in self.roles.evaluator.collect(wait):
            self.record_evaluation(result)
            self.metrics.log(result.step, result.metrics())
            log(f"eval of step {result.step}: reward {result.metrics()[evaluation.HEADLINE]:.3f}")

    def record_evaluation(self, result: evaluation.Evaluation) -> None:
        for name, summary in result.summaries.items():
            self.monitor.record_eval(result.step, name, summary)

    def save(self) -> Path:
        roles = self.roles

        # An asynchronous run saves the prompts in its buffer as not yet served: a resume regenerates them.
        data = self.loop.producer.data_state() if self.loop else self.data.state_dict()

        def save_models(tmp: Path) -> None:
            roles.policy.save(str(tmp / "policy"))
            if roles.critic is not None:
                roles.critic.save(str(tmp / "critic"))
            manifest = lineage.build_manifest(self, self.step, self.last_metrics, self.lineage_parent, data)
            lineage.write_manifest(tmp, manifest)  # inside the checkpoint: as atomic as the rest

        state = {"data": data, "rng": ckpt.rng_state(), "run_name": self.run_name}
        path = ckpt.save_checkpoint(
            self.run_dir, self.step, save_models, state, self.cfg.checkpoint.keep_last
        )
        self.metrics.log_checkpoint(path, self.lineage_parent)
        self.lineage_parent = str(path)  # the next checkpoint of this run descends from this one
        log(f"checkpoint written: {path}")
        return path

    # ------------------------------------------------------------------ the run
    def run(self) -> Path:
        cfg = self.cfg
        started = time.perf_counter()
        self.roles = self.start_roles()
        self.monitor = RunMonitor(self.run_name)
        try:
            self.maybe_resume()
            if self.step == 0 and (before := self.evaluate()):
                self.metrics.log(0, before)
                log(f"eval before training: reward {before[evaluation.HEADLINE]:.3f}")
            self.offload_learners(Timer())  # the first generation runs with the learners off the GPU too
            if cfg.rollout.max_staleness > 0:
                from rlhf.loop.async_loop import AsyncLoop

                self.loop = AsyncLoop(self)
                self.loop.start()
                log(f"asynchronous: the engines run up to {cfg.rollout.max_staleness} step(s) ahead")
            self.watchdog = StallWatchdog(cfg.logging.stall_factor, log)
            self.watchdog.start()
            bar = tqdm(total=cfg.steps, initial=self.step, desc="rlhf", unit="step", file=sys.stderr)
            while self.step < cfg.steps:
                metrics = self.run_step()
                self.watchdog.step_done(metrics["time/step_s"])
                self.last_metrics = metrics
                self.step += 1
                if self.evaluation_due():
                    metrics.update(self.evaluate())
                self.metrics.log(self.step, metrics)
                self.monitor.record_step(self.step, metrics)
                self.log_finished_evaluations()
                if self.step % max(1, cfg.logging.log_every) == 0 or self.step == cfg.steps:
                    tqdm.write(step_line(self.step, cfg.steps, metrics), file=sys.stderr)
                bar.update(1)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.steps:
                    self.save()
            bar.close()
            self.log_finished_evaluations(wait=True)
            self.save()
            if evaluation.HEADLINE in metrics:
                log(f"eval after training: reward {metrics[evaluation.HEADLINE]:.3f}")
            png = None
            if cfg.logging.plot:
                png = plot_rewards(
                    self.run_dir / "metrics.jsonl",
                    self.run_dir / "reward_curve.png",
                    eval_temperature=cfg.rollout.eval_temperature,
                )
                self.metrics.log_image("reward_curve", png)
            rows = run_summary.read_metrics(self.run_dir / "metrics.jsonl")
            for line in run_summary.closing_lines(
                rows, self.run_dir, png or None, time.perf_counter() - started
            ):
                log(line)
        finally:
            self.shutdown()
        return self.run_dir

    def shutdown(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.loop is not None:
            self.loop.stop()
            self.loop = None
        self.metrics.close()
        if self.roles is None:
            return
        for group in (
            self.roles.evaluator,
            self.roles.rollout,
            self.roles.policy,
            self.roles.reference,
            self.roles.critic,
            self.roles.reward,
        ):
            if group is not None and hasattr(group, "shutdown"):
                try:
                    group.shutdown()
                except Exception as e:  # shutting down must not hide the real error
                    log(f"warning: shutdown of {type(group).__name__} failed: {e}")
        self.roles.placement.remove()
        if self.started_ray:  # leave Ray as we found it (tests and notebooks run several trainings)
            ray.shutdown()


def train(cfg: RunConfig) -> Path:
    """Entry point of `rlhf train`; returns the run directory."""
    return Trainer(cfg).run()
