"""vLLM rollout engines as Ray actors, plus the worker extension that loads synced weights."""

from rollout.engine import RolloutEngine
from rollout.group import RolloutGroup, split_evenly

__all__ = ["RolloutEngine", "RolloutGroup", "split_evenly"]
