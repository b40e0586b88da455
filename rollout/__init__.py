"""vLLM rollout engines as Ray actors, plus the worker extension that loads synced weights."""

from rlhf.actor_group import split_evenly
from rollout.engine import RolloutEngine
from rollout.group import RolloutGroup

__all__ = ["RolloutEngine", "RolloutGroup", "split_evenly"]
