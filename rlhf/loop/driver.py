"""The single controller: generate -> score -> advantages -> train -> sync weights -> log.

The driver holds no model weights. It builds one Ray actor group per role and then reads as the
loop in `Trainer.step_once`, top to bottom.
"""

from __future__ import annotations

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

from rlhf.algorithms import old_logprobs
from rlhf.config.loader import resolve_device, to_dict, to_yaml
from rlhf.config.schema import RunConfig
from rlhf.data.models import check_engine_can_run, resolve_model_path
from rlhf.data.prompts import PromptData
from rlhf.evaluation import sets as evaluation
from rlhf.evaluation import summary as run_summary
from rlhf.loop import recovery
from rlhf.loop.step import StepBody, log
from rlhf.placement import RayPlacement, make_plan
from rlhf.production import checkpoint as ckpt
from rlhf.production import lineage, storage
from rlhf.production.metrics import MetricsLogger, Timer, plot_rewards, step_line
from rlhf.production.monitoring import RunMonitor, engine_actor_options
from rlhf.production.run_dir import open_run_dir, upload_run_files
from rlhf.production.watchdog import StallWatchdog


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer(StepBody):
    """Owns the roles and the loop state; `run()` is the whole training run, `step_once()` one
    synchronous step (the phases are `StepBody`'s, in rlhf/loop/step.py)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg)
        seed_everything(cfg.seed)
        storage.set_endpoint(cfg.logging.storage_endpoint)
        # run_dir: the run's own files (metrics, samples); run_uri: its checkpoints, the same directory
        # unless it is a storage URI (rlhf/production/run_dir.py)
        self.run_store = open_run_dir(cfg)
        self.run_dir, self.run_uri, self.run_name = (
            self.run_store.local,
            self.run_store.uri,
            self.run_store.name,
        )
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        if self.run_store.remote:  # the first write: a missing bucket or no access fails here, in one line
            storage.write_bytes(storage.join(self.run_uri, "config.yaml"), to_yaml(cfg).encode())
        log(
            f"run directory: {self.run_uri}"
            + (f" (files kept in {self.run_dir})" if self.run_store.remote else "")
        )
        self.model_path = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
        check_engine_can_run(self.model_path, self.device)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.data = PromptData(cfg.data, self.tokenizer)
        # where a learner restart without a checkpoint goes back to
        self.data_at_start = self.data.state_dict()
        self.step = 0
        self.learner_restarts = 0  # learner roles restarted after a rank died (recovery.py)
        self._audited_initial = False  # the first step of this process audits before its push too
        self.engine_logprobs = old_logprobs.engine_logprobs_needed(
            cfg.algorithm, cfg.rollout.max_staleness, old_logprobs.rollout_quantized(cfg)
        )
        self.started_ray = False
        self.roles: Roles | None = None
        self.loop = None  # the asynchronous loop (rollout.max_staleness >= 1), started by run()
        self.last_metrics: dict[str, float] = {}  # recorded in each checkpoint's lineage manifest
        self.watchdog: StallWatchdog | None = None
        self.lineage_parent: str | None = None
        self.metrics = MetricsLogger(self.run_dir, self.run_name, cfg.logging, to_dict(cfg), log)
        self.metrics.log_dataset(cfg.data)
        self.monitor: RunMonitor | None = None  # Ray metrics (rlhf/production/monitoring.py), once Ray is up

    # ------------------------------------------------------------------ set-up
    def start_roles(self) -> Roles:
        from rlhf.reward import RewardPipeline
        from rlhf.rollout import RolloutGroup

        cfg = self.cfg
        self.started_ray = init_ray(self.device)
        plan = make_plan(cfg)
        log("placement:\n" + plan.describe())
        placement = RayPlacement(plan)
        t0 = time.perf_counter()
        # Start the slow engines first; learners initialise while vLLM loads.
        rollout_options = engine_actor_options(placement.actor_options("rollout"), self.run_name, "rollout")
        rollout = RolloutGroup(cfg, self.model_path, self.device, rollout_options)
        policy, reference, critic = self.start_learners(placement)
        reward_opts = placement.actor_options("reward_model") if plan.has_role("reward_model") else None
        reward = RewardPipeline(
            cfg.reward, task=self.data.task, device=self.device, actor_options=reward_opts
        )
        sync = self.connect(policy, rollout)
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

    def start_learners(self, placement) -> tuple:
        """The learner roles: policy, reference (None without a KL term; with LoRA, the policy with
        its adapters off), critic (None unless enabled). Also used to restart them (recovery.py)."""
        from rlhf.trainer import LearnerGroup
        from rlhf.trainer.group import AdapterOffReference

        cfg = self.cfg
        policy = LearnerGroup(cfg, self.model_path, "policy", self.device, placement.actor_options("learner"))
        reference = None
        if cfg.algorithm.kl_coef > 0 and cfg.trainer.lora.rank > 0:
            reference = AdapterOffReference(policy)
        elif cfg.algorithm.kl_coef > 0:
            reference = LearnerGroup(
                cfg, self.model_path, "reference", self.device, placement.actor_options("reference")
            )
        critic = None
        if cfg.trainer.critic.enabled:
            critic = LearnerGroup(
                cfg, self.model_path, "critic", self.device, placement.actor_options("critic")
            )
        return policy, reference, critic

    def connect(self, policy, rollout):
        """The weight sync from `policy` into `rollout`'s engines; a restarted engine gets the
        learner's current weights through it."""
        from rlhf.sync.driver_side import WeightSync

        sync = WeightSync(self.cfg.sync, policy, rollout, self.device)
        sync.setup()
        rollout.on_restart = sync.resync
        return sync

    def maybe_resume(self) -> None:
        self.lineage_parent = lineage.parent_of(self)  # the resumed checkpoint, or the model's own
        if not self.cfg.resume:
            return
        latest = ckpt.latest_checkpoint(self.run_uri)
        if latest is None:
            log(f"resume: no checkpoint in {self.run_uri}; starting from step 0")
            return
        self.load_checkpoint(latest)
        # The engines started from the base weights: bring them to the checkpoint's.
        self.roles.sync.push()
        log(f"resumed from {latest} at step {self.step}")

    def load_checkpoint(self, latest: Path | str) -> None:
        """The learners' states and the driver's (data position, random state, step) from checkpoint
        `latest`: a resume, or learners restarted after a rank died (recovery.py)."""
        state = ckpt.load_driver_state(latest)
        self.roles.policy.load(storage.join(latest, "policy"))
        if self.roles.critic is not None:
            self.roles.critic.load(storage.join(latest, "critic"))
        self.data.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]

    # ------------------------------------------------------------------ one step
    def run_step(self) -> dict[str, float]:
        """One step of the synchronous or asynchronous loop. A dead learner rank restarts the learner
        roles from the last checkpoint (`trainer.max_restarts` times a run, recovery.py), and the
        step runs again from there; past that, the run stops with one line naming the rank and the
        command that resumes from the last checkpoint."""
        from rlhf.actor_group import GroupCallError, RunStopped

        try:
            return self.loop.step() if self.loop else self.step_once()
        except GroupCallError as exc:
            if not (exc.actor_died and exc.role in ("policy", "reference", "critic")):
                raise
            if self.learner_restarts < self.cfg.trainer.max_restarts:
                recovery.restart_learners(self, exc)
                return self.run_step()
            latest = ckpt.latest_checkpoint(self.run_uri)
            since = (
                f"its last checkpoint ({storage.basename(latest)})"
                if latest
                else "step 0 (no checkpoint yet)"
            )
            config = self.cfg.source_file or "CONFIG"
            restarts = f" after {self.learner_restarts} restart(s)" if self.learner_restarts else ""
            raise RunStopped(
                f"{exc.role} rank {exc.rank} died during {exc.method} in step {self.step + 1} "
                f"({type(exc.cause).__name__}); the run stopped{restarts} (trainer.max_restarts="
                f"{self.cfg.trainer.max_restarts}). Resume from {since}: "
                f"rlhf train {config} resume={self.run_uri}"
            ) from exc

    def step_once(self) -> dict[str, float]:
        """One synchronous step: generate, (DAPO) keep informative groups, score, then the shared
        body (`StepBody.learn`: batch, advantages, train, push, audit)."""
        timer, metrics = Timer(), {}
        t0 = time.perf_counter()
        samples = self.generate(timer, metrics)
        if self.cfg.algorithm.dynamic_sampling:
            samples = self.dynamic_sampling(samples, timer, metrics)
        samples = self.score(samples, timer, metrics)
        stats = self.learn(samples, timer, metrics, wait_for_push=True)
        return self.step_metrics(metrics, samples, stats, timer, time.perf_counter() - t0)

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
                self.roles.rollout.sleep(self.cfg.rollout.sleep_level)
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

    def save(self, final: bool = False) -> Path | str | None:
        """Write a checkpoint; on a storage URI a write that fails after its retries skips this one
        with a warning (the final one stops the run), and the run's own files are uploaded beside it."""
        roles = self.roles

        # An asynchronous run saves the prompts in its buffer as not yet served: a resume regenerates them.
        data = self.loop.producer.data_state() if self.loop else self.data.state_dict()

        def save_models(target: Path | str) -> None:  # a local temporary directory, or the checkpoint's URI
            roles.policy.save(storage.join(target, "policy"))
            if roles.critic is not None:
                roles.critic.save(storage.join(target, "critic"))
            manifest = lineage.build_manifest(self, self.step, self.last_metrics, self.lineage_parent, data)
            manifest["adapter"] = lineage.adapter_entry(storage.join(target, "policy", "adapter"))
            lineage.write_manifest(target, manifest)  # inside the checkpoint: as atomic as the rest

        state = {"data": data, "rng": ckpt.rng_state(), "run_name": self.run_name}
        path = ckpt.save_or_skip(
            self.run_uri, self.step, save_models, state, self.cfg.checkpoint.keep_last, final, warn=log
        )
        for line in upload_run_files(self.run_store):
            log(f"warning: {line}; the next checkpoint uploads it again")
        if path is None:
            return None
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
            self.save(final=True)
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
            for line in upload_run_files(self.run_store):  # the reward curve, on a storage URI
                log(f"warning: {line}")
            rows = run_summary.read_metrics(self.run_dir / "metrics.jsonl")
            for line in run_summary.closing_lines(
                rows, self.run_uri, png or None, time.perf_counter() - started
            ):
                log(line)
        finally:
            self.shutdown()
        return self.run_uri if self.run_store.remote else self.run_dir

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


def train(cfg: RunConfig) -> Path | str:
    """Entry point of `rlhf train`; returns the run directory (its URI for a run on a storage URI)."""
    return Trainer(cfg).run()
