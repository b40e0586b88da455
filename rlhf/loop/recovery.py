"""A learner rank that dies mid-run: the learner roles restart from the run's last checkpoint, inside
the same job.

ZeRO shards the optimizer states across the ranks of a role, so one rank cannot be replaced alone:
every learner role (policy, reference, critic) is shut down and started again on the placement it
had, reloads the last checkpoint (or the base model, before the first one), gets a freshly planned
weight sync, and pushes the checkpoint's weights into the running engines. The driver rewinds its
data stream and random state to the checkpoint, so the steps after it are generated and trained
again: the run ends with the planned number of trained samples. `trainer.max_restarts` bounds how
often a run does this (docs/reliability.md).
"""

from __future__ import annotations

import time

from rlhf.loop.step import log
from rlhf.production import checkpoint as ckpt
from rlhf.production import storage
from rlhf.production.metrics import Timer


def restart_learners(trainer, exc) -> None:
    """Replace every learner role of `trainer` after `exc` (a GroupCallError: a learner rank died)
    and bring the run back to its last checkpoint; the caller runs the step again."""
    from rlhf.loop.driver import seed_everything

    cfg, roles = trainer.cfg, trainer.roles
    trainer.learner_restarts += 1
    latest = ckpt.latest_checkpoint(trainer.run_uri)
    log(
        f"{exc.role} rank {exc.rank} died during {exc.method} in step {trainer.step + 1} "
        f"({type(exc.cause).__name__}); restarting the learners from "
        f"{storage.basename(latest) if latest else 'the base model (no checkpoint yet)'} "
        f"(restart {trainer.learner_restarts} of trainer.max_restarts={cfg.trainer.max_restarts})"
    )
    start = time.perf_counter()
    asynchronous = trainer.loop is not None
    if asynchronous:  # its buffered samples came from weights the rewind discards
        trainer.loop.stop()
        trainer.loop = None
    for group in (roles.policy, roles.reference, roles.critic):
        if group is not None and hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except Exception as e:  # the survivors are killed anyway; say so and go on
                log(f"warning: shutting down {type(group).__name__} after a learner death failed: {e}")
    roles.sync.shutdown()

    roles.policy, roles.reference, roles.critic = trainer.start_learners(roles.placement)
    roles.sync = trainer.connect(roles.policy, roles.rollout)
    roles.evaluator.reconnect(roles.policy, cfg.sync)
    if latest is not None:
        trainer.load_checkpoint(latest)
    else:
        trainer.data.load_state_dict(trainer.data_at_start)
        seed_everything(cfg.seed)
        trainer.step = 0
    trainer.wake_engines(Timer())  # the engines may have been asleep for the learners' turn
    roles.sync.push()  # the engines hold newer weights than the checkpoint's: bring them back
    trainer.offload_learners(Timer())
    if asynchronous:
        from rlhf.loop.async_loop import AsyncLoop

        trainer.loop = AsyncLoop(trainer)
        trainer.loop.start()
    log(f"learners restarted in {time.perf_counter() - start:.0f}s; the run goes on from step {trainer.step}")
