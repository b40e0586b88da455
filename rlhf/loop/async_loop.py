"""Asynchronous RL (`rollout.max_staleness: k >= 1`): the engines generate the next batches while the
learner trains on this one.

Two sides share one thing, a bounded Ray queue of scored batches:

    producer (a driver thread)                       consumer (`AsyncLoop.step`, the driver loop)
    while running:                                   batch = buffer.get() ; free one slot
        take one of k slots                          drop groups more than k versions old (requeue them)
        prompts  = data.next_batch(P)                advantages ; train
        samples  = rollout.generate(prompts)         sync.push()  -> policy version + 1
        score(samples) ; buffer.put(samples)

Every sample carries the number of weight pushes its engine had received when it generated it
(`Sample.policy_version`); the learner's version is the pushes so far. A sample more than k versions
behind is not trained on: it is counted and its prompt is served again, so no prompt is lost.
Pushes go to the engines as soon as the learner finishes a step, without waiting for them: the
learners stage a copy of their weights and send it from a background thread while they train on the
next batch; an engine loads a push between two generate calls (requests in flight finish on the old
weights). See docs/async.md.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from queue import Empty, Full

from rlhf.production.metrics import Timer
from rlhf.types import Prompt, Sample


@dataclass
class RolloutBatch:
    samples: list[Sample]
    metrics: dict[str, float] = field(default_factory=dict)  # reward stats of these samples


def _key(prompt: Prompt) -> tuple[int, int]:
    return prompt.index, int(prompt.metadata.get("epoch", 0))


class Producer:
    """The rollout side: keeps the buffer filled with scored batches until stopped."""

    def __init__(self, trainer, buffer, max_staleness: int):
        self.trainer, self.buffer = trainer, buffer
        # At most k batches outstanding (being generated or waiting), so a batch is at most k versions
        # old when the learner takes it: batch i+1 is generated while the learner trains on batch i.
        self.slots = threading.Semaphore(max_staleness)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.busy_s = 0.0  # time the engines spent in generate calls (for the engine idle fraction)
        self.lock = threading.Lock()  # guards the trainer's prompt stream and `pending`
        self.pending: dict[tuple[int, int], Prompt] = {}  # handed out, not yet trained on or requeued
        self.thread = threading.Thread(target=self._run, name="rlhf-producer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        trainer = self.trainer
        cfg = trainer.cfg
        try:
            while not self.stop_event.is_set():
                if not self.slots.acquire(timeout=0.5):
                    continue
                with self.lock:
                    prompts = trainer.data.next_batch(cfg.rollout.prompts_per_step)
                    self.pending.update((_key(p), p) for p in prompts)
                start = time.perf_counter()
                samples = trainer.roles.rollout.generate(
                    prompts, cfg.rollout.sampling, logprobs=trainer.engine_logprobs
                )
                self.busy_s += time.perf_counter() - start
                metrics: dict[str, float] = {}
                samples = trainer.score(samples, Timer(), metrics)
                kept = {_key(s.prompt) for s in samples}  # reward.on_error=drop may leave groups out
                self.settle([p for p in prompts if _key(p) not in kept], [])
                item = RolloutBatch(samples, metrics)
                while not self.stop_event.is_set():
                    try:
                        self.buffer.put(item, timeout=0.5)
                        break
                    except Full:
                        continue
        except BaseException as exc:  # reported by the consumer, which owns the run
            self.error = exc

    def settle(self, trained: list[Prompt], stale: list[Prompt]) -> None:
        """Trained prompts leave `pending`; stale ones go back to the prompt stream."""
        with self.lock:
            for prompt in [*trained, *stale]:
                self.pending.pop(_key(prompt), None)
            self.trainer.data.requeue(stale)

    def data_state(self) -> dict:
        """The prompt stream's position, with every prompt not trained on yet to be served again."""
        with self.lock:
            return self.trainer.data.state_dict(pending=list(self.pending.values()))

    def stop(self, timeout_s: float = 120.0) -> None:
        self.stop_event.set()
        self.thread.join(timeout=timeout_s)


class AsyncLoop:
    """The learner side of an asynchronous run; `step()` is one optimizer step's worth."""

    def __init__(self, trainer):
        from ray.util.queue import Queue

        self.trainer = trainer
        self.max_staleness = trainer.cfg.rollout.max_staleness
        self.buffer = Queue(maxsize=self.max_staleness, actor_options={"num_cpus": 0})
        self.producer = Producer(trainer, self.buffer, self.max_staleness)
        self._busy_mark = 0.0

    def start(self) -> None:
        self.producer.start()

    def _check_producer(self) -> None:
        if self.producer.error is not None:
            raise RuntimeError(f"rollout producer failed: {self.producer.error!r}") from self.producer.error

    def take(self, metrics: dict) -> tuple[list[Sample], float]:
        """The next batch with at least one fresh group; stale groups are dropped and requeued."""
        version = self.trainer.roles.sync.version
        waited, dropped = 0.0, 0
        while True:
            start = time.perf_counter()
            item = None
            while item is None:
                self._check_producer()
                try:
                    item = self.buffer.get(timeout=0.5)
                except Empty:
                    continue
            waited += time.perf_counter() - start
            self.producer.slots.release()  # taken: the producer may start the next batch
            stale_groups = {s.group for s in item.samples if version - s.policy_version > self.max_staleness}
            stale = [s for s in item.samples if s.group in stale_groups]
            fresh = [s for s in item.samples if s.group not in stale_groups]
            dropped += len(stale)
            self.producer.settle([], list({_key(s.prompt): s.prompt for s in stale}.values()))
            if fresh:
                metrics.update(item.metrics)
                metrics["async/dropped_stale_samples"] = float(dropped)
                return fresh, waited

    def step(self) -> dict[str, float]:
        trainer, roles = self.trainer, self.trainer.roles
        timer, metrics = Timer(), {}
        start = time.perf_counter()
        samples, waited = self.take(metrics)
        staleness = [roles.sync.version - s.policy_version for s in samples]
        # The push is staged and sent from the learners' background thread; each engine loads it after
        # the generate call it is in (the previous push is collected first: one in flight at a time).
        stats = trainer.learn(samples, timer, metrics, wait_for_push=False)
        self.producer.settle(list({_key(s.prompt): s.prompt for s in samples}.values()), [])
        elapsed = time.perf_counter() - start
        busy, self._busy_mark = self.producer.busy_s - self._busy_mark, self.producer.busy_s
        metrics.update(
            {
                "async/staleness_mean": sum(staleness) / len(staleness),
                "async/staleness_max": float(max(staleness)),
                "async/buffer_size": float(self.buffer.qsize()),
                # partial rollouts: responses resumed under newer weights than they started with
                "async/resumed_frac": sum(len(set(s.token_versions or [])) > 1 for s in samples)
                / len(samples),
                "async/learner_idle_frac": waited / elapsed,
                "async/engine_idle_frac": max(0.0, 1.0 - busy / elapsed),
                "time/wait_s": waited,
            }
        )
        return trainer.step_metrics(metrics, samples, stats, timer, elapsed)

    def stop(self) -> None:
        self.producer.stop()
        from contextlib import suppress

        with suppress(Exception):  # the last push may still be in flight; the engines may be gone
            self.trainer.roles.sync.finish()
        with suppress(Exception):  # the queue actor may already be gone with Ray
            self.buffer.shutdown()
