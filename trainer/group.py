"""A learner role as a group of data-parallel Ray actors, planned and driven by the controller.

The group is the planner: it splits each batch across ranks (balanced by tokens), into mini-batches
(one optimizer step each) and micro-batches (packed by `trainer.micro_batch_tokens`), and computes the
global loss normalisers; every rank then executes its part of the plan in lock-step (same number of
forward/backward calls, so ZeRO's collectives line up).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import ray
import torch
from rlhf.trainer.learner import ROLES, Learner
from rlhf.trainer.packing import pack_micro_batches, row_lengths

from rlhf.actor_group import ActorGroup, balance
from rlhf.config.schema import RolePlacement, RunConfig
from rlhf.types import TrainBatch

PLACEMENT_KEY = {"policy": "learner", "reference": "reference", "critic": "critic"}


def split_rows(lengths: list[int], world_size: int) -> list[list[int]]:
    """Assign rows to ranks, longest first to the least-loaded rank (tokens, then rows); sorted per rank."""
    return balance(lengths, world_size)


def chunk(items: list[int], parts: int) -> list[list[int]]:
    """`parts` contiguous near-equal chunks (some empty when there are fewer items than parts)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (1 if p < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def shard_batch(batch: TrainBatch, world_size: int) -> tuple[list[list[int]], list[TrainBatch]]:
    """Rows of each rank and its shard; a rank without rows gets one loss-masked filler row."""
    if len(batch) == 0:
        raise ValueError("learner group: empty batch")
    rows_per_rank = split_rows(row_lengths(batch), world_size)
    shards = []
    for rows in rows_per_rank:
        if rows:
            shards.append(batch.select(rows))
        else:
            shortest = min(range(len(batch)), key=lambda i: int(batch.attention_mask[i].sum()))
            filler = batch.select([shortest])
            filler.loss_mask = torch.zeros_like(filler.loss_mask)
            shards.append(filler)
    return rows_per_rank, shards


def micro_batches(
    shard: TrainBatch, local_rows: list[int], token_budget: int, padded: bool = True
) -> list[list[int]]:
    """`local_rows` of a shard packed into micro-batches (lists of shard row indices)."""
    lengths = row_lengths(shard)
    packed = pack_micro_batches([lengths[i] for i in local_rows], token_budget, padded)
    return [[local_rows[j] for j in mb] for mb in packed]


def plan_steps(
    batch: TrainBatch,
    world_size: int,
    micro_batch_tokens: int,
    ppo_epochs: int = 1,
    mini_batches: int = 1,
    seed: int = 0,
    padded: bool = True,
) -> tuple[list[list[int]], list[TrainBatch], list[list[dict[str, Any]]]]:
    """Split `batch` over ranks once; then per epoch shuffle each rank's rows (when mini_batches > 1)
    and cut them into `mini_batches` optimizer steps, each packed into micro-batches (`padded`: a
    micro-batch costs rows x its longest row, else its real tokens; `trainer.packing`).

    Returns (rows_per_rank, shards, steps) with steps[rank] = list of dicts: `micro_batches`,
    `num_micro` (max over ranks: ranks with fewer run filler micro-batches), and the step's global
    loss normalisers `global_num_tokens` / `global_num_sequences` (over all ranks).
    """
    from rlhf.algorithms.losses import loss_normalizers

    if ppo_epochs < 1 or mini_batches < 1:
        raise ValueError(
            f"algorithm.ppo_epochs and algorithm.mini_batches must be >= 1, got {ppo_epochs}, {mini_batches}"
        )
    rows_per_rank, shards = shard_batch(batch, world_size)
    steps: list[list[dict[str, Any]]] = [[] for _ in range(world_size)]
    for epoch in range(ppo_epochs):
        generator = torch.Generator().manual_seed(seed + epoch)
        chunks = []
        for rows in rows_per_rank:
            local = list(range(len(rows)))
            if mini_batches > 1:  # a fresh order per epoch so mini-batches differ
                local = [local[j] for j in torch.randperm(len(local), generator=generator).tolist()]
            chunks.append(chunk(local, mini_batches))
        for m in range(mini_batches):
            local_rows = [chunks[r][m] for r in range(world_size)]
            global_rows = [rows_per_rank[r][j] for r in range(world_size) for j in local_rows[r]]
            if not global_rows:
                continue
            num_tokens, num_sequences = loss_normalizers(batch.loss_mask[global_rows])
            micro = [
                micro_batches(shards[r], local_rows[r], micro_batch_tokens, padded) for r in range(world_size)
            ]
            num_micro = max(len(mb) for mb in micro)
            for r in range(world_size):
                steps[r].append(
                    {
                        "micro_batches": micro[r],
                        "num_micro": num_micro,
                        "global_num_tokens": num_tokens,
                        "global_num_sequences": num_sequences,
                    }
                )
    return rows_per_rank, shards, steps


class LearnerGroup:
    """`world_size` Learner actors of one role; see docs/trainer.md."""

    def __init__(
        self,
        cfg: RunConfig,
        model_path: str,
        role: str,
        device: str,
        actor_options: list[dict[str, Any]] | None = None,
    ):
        if role not in ROLES:
            raise ValueError(f"LearnerGroup role must be one of {ROLES}, got {role!r}")
        placement: RolePlacement = getattr(cfg.placement, PLACEMENT_KEY[role])
        world_size = placement.replicas
        if actor_options is not None and len(actor_options) != world_size:
            raise ValueError(
                f"placement.{PLACEMENT_KEY[role]}.replicas is {world_size} but {len(actor_options)} actor option "
                "dicts were given (one per rank)"
            )
        if world_size < 1:
            raise ValueError(f"placement.{PLACEMENT_KEY[role]}.replicas must be >= 1, got {world_size}")
        self.cfg, self.role, self.device, self.world_size = cfg, role, device, world_size
        # The token budget of a micro-batch; an attribute so it can be tuned between steps.
        self.micro_batch_tokens = cfg.trainer.micro_batch_tokens
        self._train_calls = 0
        remote_cls = ray.remote(Learner)
        self._actors = []
        for rank in range(world_size):
            opts = self._actor_options(placement, actor_options[rank] if actor_options else None)
            self._actors.append(
                remote_cls.options(**opts).remote(cfg, model_path, role, device, rank, world_size)
            )
        self.group = ActorGroup(self._actors, role)
        master_addr, master_port = self.group.call("node_ip_and_free_port", ranks=[0])[0]
        self.group.call("setup", master_addr, master_port)

    def _actor_options(self, placement: RolePlacement, given: dict[str, Any] | None) -> dict[str, Any]:
        if given is None:
            gpus = (placement.gpus or 1.0) if self.device == "cuda" else 0.0
            given = {"num_cpus": placement.cpus, "num_gpus": gpus}
        opts = dict(given)
        runtime_env = dict(opts.get("runtime_env") or {})
        env = dict(runtime_env.get("env_vars") or {})
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cores = None  # OpenMP threads to give each rank; None: Ray's default (its num_cpus)
        if self.device == "cpu":
            # DeepSpeed chooses its accelerator at import time: this must be in the env before it.
            env["DS_ACCELERATOR"] = "cpu"
            # Roles take turns on a CPU machine (generate, then train): each may use every core while it works.
            cores = os.cpu_count() or 1
        elif self.cfg.trainer.offload_optimizer and self.role != "reference":
            # Ray gives an actor of num_cpus=1 OMP_NUM_THREADS=1, which would leave DeepSpeed's CPU
            # Adam (OpenMP) stepping the offloaded optimizer states on one core; the ranks share the
            # machine's cores instead (the engines beside them are asleep while they step).
            cores = (os.cpu_count() or 1) // self.world_size
        if cores is not None:
            threads = os.environ.get("RLHF_CPU_THREADS") or str(max(1, int(opts.get("num_cpus") or 1), cores))
            env.setdefault("OMP_NUM_THREADS", threads)
        runtime_env["env_vars"] = env
        opts["runtime_env"] = runtime_env
        return opts

    @property
    def actors(self) -> list:
        return list(self._actors)

    # ------------------------------------------------------------------ planning
    def plan(self, batch: TrainBatch) -> tuple[list[TrainBatch], list[list[dict[str, Any]]]]:
        """Per-rank shards and step lists for `train` (see `plan_steps`)."""
        alg = self.cfg.algorithm
        seed = self.cfg.seed * 1_000_003 + self._train_calls * 1009
        _, shards, steps = plan_steps(
            batch,
            self.world_size,
            self.micro_batch_tokens,
            alg.ppo_epochs,
            alg.mini_batches,
            seed,
            padded=not self.cfg.trainer.packing,
        )
        return shards, steps

    # ------------------------------------------------------------------ training
    def train(self, batch: TrainBatch) -> dict[str, float]:
        """ppo_epochs x mini_batches optimizer steps on `batch`; stats averaged over steps.

        `loss` is the full (globally normalised) loss; other loss stats are token-weighted means;
        `grad_norm` is the pre-clipping global norm; `lr` the last step's; `num_tokens` the loss tokens
        processed over all steps.
        """
        if self.role == "reference":
            raise ValueError("train: the reference model is frozen")
        shards, steps = self.plan(batch)
        self._train_calls += 1
        results = self.group.call("train", per_rank=list(zip(shards, steps)))
        stats = combine_stats(results)
        stats["padding_frac"] = padding_fraction(shards, steps, packed=self.cfg.trainer.packing)
        return stats

    # ------------------------------------------------------------------ inference
    def logprobs(
        self, batch: TrainBatch, temperature: float | None = None, base: bool = False
    ) -> torch.Tensor:
        """Per-token log-probs [B, T] (aligned with input_ids, 0 off real tokens), CPU float32.

        At the sampling temperature unless `temperature` is given (the audit compares at 1.0, which is
        what the engine's scoring pass returns). `base`: a LoRA policy with its adapters off."""
        if self.role == "critic":
            raise ValueError("logprobs: the critic has no LM head; use values()")
        if base:
            return self._per_token(batch, "logprobs", temperature=temperature, base=True)
        return self._per_token(batch, "logprobs", temperature=temperature)

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """Critic values [B, T]: values[:, t] = V(state before token t)."""
        if self.role != "critic":
            raise ValueError(f"values: only the critic has a value head (this group is the {self.role})")
        return self._per_token(batch, "values")

    def _per_token(self, batch: TrainBatch, method: str, **kwargs) -> torch.Tensor:
        rows_per_rank, shards = shard_batch(batch, self.world_size)
        micro = [
            micro_batches(s, list(range(len(rows))), self.micro_batch_tokens, not self.cfg.trainer.packing)
            for s, rows in zip(shards, rows_per_rank)
        ]
        num_micro = max(len(m) for m in micro)
        outs = self.group.call(method, num_micro, per_rank=list(zip(shards, micro)), **kwargs)
        result = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        for rows, out in zip(rows_per_rank, outs):
            if rows:
                result[rows, : out.shape[1]] = out
        return result

    # ------------------------------------------------------------------ weights, checkpoints
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full HF-named weights (CPU copies) from rank 0; all ranks take part (ZeRO-3 gathers)."""
        return self.group.call("full_state_dict")[0]

    def save(self, directory: str) -> None:
        """DeepSpeed checkpoint + `directory/hf` (HF model). Every rank writes: `directory` is on a file
        system all learner nodes share, or an object-store URI each rank uploads its own files to."""
        from rlhf.production import storage

        if not storage.is_remote(directory):
            os.makedirs(directory, exist_ok=True)
        self.group.call("save", directory)

    def load(self, directory: str) -> int:
        """Restore `save`'s checkpoint; returns the optimizer step count."""
        steps = self.group.call("load", directory)[0]
        # The plan's shuffling seed counts train calls: continue the count, so a resumed run cuts the
        # same mini-batches as the original would have.
        alg = self.cfg.algorithm
        self._train_calls = steps // max(1, alg.ppo_epochs * alg.mini_batches)
        return steps

    def global_steps(self) -> int:
        return self.group.call("global_steps", ranks=[0])[0]

    def offload(self) -> None:
        self.group.call("offload")

    def reload(self) -> None:
        self.group.call("reload")

    def release_cache(self) -> dict[str, float]:
        """`Learner.release_cache` on every rank: the largest figures over ranks."""
        out: dict[str, float] = {}
        for figures in self.group.call("release_cache"):
            for key, value in figures.items():
                out[key] = max(out.get(key, 0.0), value)
        return out

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []


class AdapterOffReference:
    """The reference model of a LoRA run: the policy's own learners with their adapters switched off
    (the frozen base weights), so no reference actors and no second copy of the weights."""

    role = "reference"

    def __init__(self, policy: LearnerGroup):
        self.policy = policy

    def logprobs(self, batch: TrainBatch, temperature: float | None = None) -> torch.Tensor:
        return self.policy.logprobs(batch, temperature, base=True)


def padding_fraction(shards: list[TrainBatch], steps: list[list[dict[str, Any]]], packed: bool) -> float:
    """The share of the tokens the learners compute that are padding: 0 for packed micro-batches,
    else 1 - real tokens / (rows x longest row) summed over the micro-batches of every step."""
    if packed:
        return 0.0
    real = computed = 0
    for shard, rank_steps in zip(shards, steps):
        lengths = row_lengths(shard)
        for step in rank_steps:
            for rows in step["micro_batches"]:
                real += sum(lengths[i] for i in rows)
                computed += len(rows) * max(lengths[i] for i in rows)
    return 1.0 - real / computed if computed else 0.0


def combine_stats(results: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Per-rank per-step sums -> per-step global stats -> mean over steps."""
    per_step = []
    for ranks in zip(*results):
        tokens = sum(r["num_tokens"] for r in ranks)
        step = {"loss": sum(r["loss"] for r in ranks)}
        weighted: dict[str, float] = defaultdict(float)
        for r in ranks:
            for key, value in r["weighted"].items():
                weighted[key] += value
        step.update({key: value / max(tokens, 1.0) for key, value in weighted.items()})
        step.update(grad_norm=ranks[0]["grad_norm"], lr=ranks[0]["lr"], num_tokens=tokens)
        step["skipped_steps"] = ranks[0].get("skipped", 0.0)
        per_step.append(step)
    if not per_step:
        return {"optimizer_steps": 0.0}
    keys = {k for s in per_step for k in s}
    out = {k: sum(s.get(k, 0.0) for s in per_step) / len(per_step) for k in keys}
    out["lr"] = per_step[-1]["lr"]
    out["num_tokens"] = sum(s["num_tokens"] for s in per_step)
    out["optimizer_steps"] = float(len(per_step))
    out["skipped_steps"] = sum(s["skipped_steps"] for s in per_step)  # non-finite gradients
    return out
