"""One way to call every actor of a group: split the work, call, gather in rank order, fail fast.

Every role (rollout engines, learner ranks, reward-model replicas) is a list of Ray actors that the
driver calls together. `ActorGroup` is the only place that fans calls out and gathers them, so all
roles report a failed call the same way: the first error, with the group's name and the actor's
rank, as soon as it happens (a rank blocked in a collective would otherwise hang `ray.get`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


class GroupCallError(RuntimeError):
    """A call on one actor failed: `role` and `rank` say which (e.g. "rollout", 1)."""

    def __init__(self, role: str, rank: int, method: str, cause: BaseException):
        self.role, self.rank, self.method, self.cause = role, rank, method, cause
        super().__init__(f"{role} rank {rank}: {method} failed: {type(cause).__name__}: {cause}")

    @property
    def actor_died(self) -> bool:
        import ray

        return isinstance(self.cause, ray.exceptions.RayActorError)


class RunStopped(RuntimeError):
    """The run cannot heal itself (a learner rank died): one line with what died and how to resume."""


def split_evenly(num_items: int, num_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) chunks whose sizes differ by at most one (earlier chunks larger)."""
    if num_parts < 1:
        raise ValueError(f"split_evenly: need at least one part, got {num_parts}")
    base, extra = divmod(num_items, num_parts)
    bounds, start = [], 0
    for part in range(num_parts):
        end = start + base + (1 if part < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def gather(refs: Sequence[Any], who: Sequence[tuple[str, int]], method: str, timeout_s: float | None = None):
    """`ray.get(refs)` in order, but the first failure raises at once as a `GroupCallError` naming
    `who[i]` = (role, rank), the actor of `refs[i]` (a peer blocked in a collective would otherwise hang)."""
    import ray

    index_of = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        wait = None if deadline is None else max(deadline - time.monotonic(), 0)
        ready, pending = ray.wait(pending, num_returns=1, timeout=wait)
        if not ready:
            late = ", ".join(f"{role} rank {rank}" for role, rank in (who[index_of[r]] for r in pending))
            raise TimeoutError(f"{method} still running on {late} after {timeout_s:.0f}s")
        try:
            ray.get(ready[0])
        except Exception as exc:
            role, rank = who[index_of[ready[0]]]
            raise GroupCallError(role, rank, method, exc) from exc
    return ray.get(list(refs))


class ActorGroup:
    """The actors of one role, addressed by rank."""

    def __init__(self, actors: Sequence[Any], label: str):
        self.actors = list(actors)
        self.label = label

    def __len__(self) -> int:
        return len(self.actors)

    def submit(
        self,
        method: str,
        *args: Any,
        per_rank: Sequence[Sequence[Any]] | None = None,
        ranks: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> tuple[list[Any], list[int]]:
        """Start `method` on each rank in `ranks` (default all): `per_rank[i]` are rank i's leading
        positional arguments, followed by `args` and `kwargs` shared by all. Returns (refs, ranks)."""
        ranks = list(range(len(self.actors))) if ranks is None else list(ranks)
        if per_rank is not None and len(per_rank) != len(ranks):
            raise ValueError(f"{self.label}: {len(per_rank)} argument sets for {len(ranks)} ranks")
        refs = [
            getattr(self.actors[r], method).remote(
                *(per_rank[i] if per_rank is not None else ()), *args, **kwargs
            )
            for i, r in enumerate(ranks)
        ]
        return refs, ranks

    def call(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        """Call `method` on the chosen ranks (see `submit`) and return their results in rank order."""
        refs, ranks = self.submit(method, *args, **kwargs)
        return gather(refs, self.who(ranks), method, timeout_s)

    def who(self, ranks: Sequence[int]) -> list[tuple[str, int]]:
        """(role, rank) of these ranks, for `gather` and its errors."""
        return [(self.label, r) for r in ranks]

    def split_call(self, method: str, items: Sequence[Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Give rank i the i-th of `len(self)` near-equal contiguous chunks of `items` (ranks with an
        empty chunk are not called), then concatenate their result lists in rank order."""
        used = [(r, b) for r, b in enumerate(split_evenly(len(items), len(self.actors))) if b[1] > b[0]]
        per_rank = [(items[start:end],) for _, (start, end) in used]
        chunks = self.call(method, *args, per_rank=per_rank, ranks=[r for r, _ in used], **kwargs)
        return [item for chunk in chunks for item in chunk]


def balance(costs: Sequence[float], num_parts: int) -> list[list[int]]:
    """Item indices per part: largest cost first to the least-loaded part (cost, then count); each
    part's indices sorted. Used for learner rows (tokens) and rollout prompts (token budget)."""
    if num_parts < 1:
        raise ValueError(f"balance: need at least one part, got {num_parts}")
    loads = [0.0] * num_parts
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        part = min(range(num_parts), key=lambda p: (loads[p], len(parts[p])))
        parts[part].append(i)
        loads[part] += costs[i]
    return [sorted(p) for p in parts]
