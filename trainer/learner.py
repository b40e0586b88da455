"""One data-parallel rank of a learner role (policy, reference or critic), driven step by step.

`LearnerGroup` wraps this class with `ray.remote` and owns the plan (which rows each rank trains on,
packed into micro-batches); a `Learner` executes it: forward/backward over its micro-batches with the
globally normalised loss, then one DeepSpeed optimizer step.

Conventions
* Log-probs are those of the sampling distribution: logits / `rollout.sampling.temperature` (1 when
  the temperature is 0, i.e. greedy), so they are comparable with the rollout engine's logprobs.
* Critic values are aligned like log-probs: `values[:, t]` is V(state before token t), the value head
  applied to the hidden state at position t - 1; position 0 is 0.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rlhf.trainer.packing import ValueModel, pack_micro_batches, pack_rows, row_lengths, unpack_rows
from torch import nn

from rlhf.config.schema import RunConfig
from rlhf.types import TrainBatch

ROLES = ("policy", "reference", "critic")
CHECKPOINT_TAG = "deepspeed"


class Learner:
    """One DP rank. Every public method is called on all ranks of the group at once (collectives)."""

    def __init__(
        self,
        cfg: RunConfig,
        model_path: str,
        role: str,
        device: str,
        rank: int,
        world_size: int,
        master_addr: str | None = None,
        master_port: int | None = None,
    ):
        """Cheap; the process group and model come in `setup` (run at once when the address is given).

        Two phases let the group ask rank 0's actor for its node address and a free port first.
        """
        if role not in ROLES:
            raise ValueError(f"learner role must be one of {ROLES}, got {role!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"learner device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cpu":
            # DeepSpeed picks its accelerator when first imported; the group sets this in runtime_env.
            assert os.environ.get("DS_ACCELERATOR") == "cpu", (
                "CPU learners need DS_ACCELERATOR=cpu in the actor env"
            )
        self.cfg, self.model_path, self.role = cfg, model_path, role
        from rlhf.production import storage

        storage.set_endpoint(cfg.logging.storage_endpoint)  # checkpoints on an s3:// run directory
        self.device_name, self.rank, self.world_size = device, rank, world_size
        if master_addr is not None and master_port is not None:
            self.setup(master_addr, master_port)

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the training process group, load the model, build the DeepSpeed engine."""
        cfg, role, rank, world_size, device = (
            self.cfg,
            self.role,
            self.rank,
            self.world_size,
            self.device_name,
        )
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",  # Ray gives every rank its own visible GPU(s)
            LOCAL_WORLD_SIZE="1",
        )
        import deepspeed
        from rlhf.trainer.ds_config import make_ds_config, make_optimizer, make_scheduler

        from rlhf.data.models import model_dtype

        if device == "cuda":
            torch.cuda.set_device(0)
            self.device = torch.device("cuda", 0)
        else:
            self.device = torch.device("cpu")
        deepspeed.init_distributed(
            dist_backend="nccl" if device == "cuda" else "gloo",
            auto_mpi_discovery=False,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            verbose=False,
        )
        torch.manual_seed(cfg.seed)
        self.dtype = model_dtype(cfg.model.dtype, device)
        temperature = cfg.rollout.sampling.temperature
        self.temperature = float(temperature) if temperature and temperature > 0 else 1.0
        self.zero_stage = int(cfg.trainer.zero_stage)
        self.compile_logprobs = device == "cuda" and cfg.trainer.compile_logprobs
        self.packing = cfg.trainer.packing
        self.trainable = role != "reference"
        # LoRA: the policy trains adapters on frozen base weights (trainer/lora.py).
        self.lora = cfg.trainer.lora if role == "policy" and cfg.trainer.lora.rank > 0 else None
        from rlhf.placement.inventory import estimate_params

        ds_config = make_ds_config(
            cfg.trainer,
            device,
            self.dtype,
            world_size,
            train=self.trainable,
            num_params=estimate_params(self.model_path),
        )
        if self.zero_stage == 3:
            # Makes from_pretrained build the model already partitioned (deepspeed.zero.Init); keep it alive.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)

        model = self._build_model()
        optimizer = scheduler = None
        if self.trainable:
            if cfg.trainer.gradient_checkpointing:
                self.hf_model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            alg = cfg.algorithm
            total_steps = cfg.steps * max(1, alg.ppo_epochs) * max(1, alg.mini_batches)
            lr, warmup = cfg.trainer.lr, cfg.trainer.warmup_steps
            if role == "critic":
                lr, warmup = cfg.trainer.critic.lr, cfg.trainer.critic.warmup_steps
            optimizer = make_optimizer(model.parameters(), cfg.trainer, device, lr)
            scheduler = make_scheduler(optimizer, warmup, total_steps, cfg.trainer.min_lr_ratio)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        if not self.trainable:
            self.engine.eval()
        self.rotary_restored = 0
        if self.zero_stage == 3:  # zero.Init made the rotary frequencies in the training dtype
            from rlhf.trainer.rotary import restore_rotary_fp32

            self.rotary_restored = restore_rotary_fp32(self.engine.module)
        self.masters_restored = 0
        if role == "policy" and self.dtype != torch.float32 and cfg.trainer.masters_from_checkpoint:
            from rlhf.trainer.masters import restore_fp32_masters

            self.masters_restored = restore_fp32_masters(self.engine.module, self.model_path)
        self._nonfinite = (
            self._watch_gradients() if self.trainable and cfg.trainer.debug_nonfinite_grads else None
        )
        # Loss settings the batch alone does not carry.
        from rlhf.algorithms.losses import resolved_algorithm

        self.algorithm = resolved_algorithm(cfg)

    def _watch_gradients(self) -> tuple[list[str], torch.Tensor]:
        """Hooks that flag, on the device and without a host sync, each parameter that receives a
        non-finite gradient (before DeepSpeed's reduction, which would only say "overflow")."""
        names, params = zip(*[(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad])
        flags = torch.zeros(len(names), dtype=torch.bool, device=self.device)

        def hook(index: int):
            def flag(grad: torch.Tensor) -> None:
                flags[index] |= ~torch.isfinite(grad).all()

            return flag

        for i, p in enumerate(params):
            p.register_hook(hook(i))
        return list(names), flags

    # ------------------------------------------------------------------ model
    def _build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        kwargs = dict(dtype=self.dtype, trust_remote_code=self.cfg.model.trust_remote_code)
        if self.packing:  # each packed sequence attends to itself only, at its own length's cost
            from rlhf.trainer.attention import register

            kwargs["attn_implementation"] = register()
        if self.role != "critic":
            model = AutoModelForCausalLM.from_pretrained(self.model_path, **kwargs)
            model.config.use_cache = False
            self.hf_model = model  # with LoRA: the same model, its linear layers wrapped in place
            if self.lora is not None:
                from rlhf.trainer.lora import add_adapters

                return add_adapters(model, self.lora)
            return model
        critic_path = self.cfg.trainer.critic.path
        seq_model = AutoModelForSequenceClassification.from_pretrained(
            critic_path or self.model_path, num_labels=1, **kwargs
        )
        seq_model.config.use_cache = False
        value_model = ValueModel(seq_model)
        if critic_path is None:
            # A fresh head on the policy backbone: start from V = 0 so early advantages are the rewards.
            import deepspeed

            head = value_model.head
            with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=0), torch.no_grad():
                for p in head.parameters():
                    p.zero_()
        self.hf_model = seq_model
        self.critic_path = critic_path or self.model_path
        return value_model

    def _token_pass(
        self, mb: TrainBatch, temperature: float | None = None, entropy: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass over a micro-batch; per-token results in its padded layout [b, W]: the
        critic's values, or log-probs at `temperature` (default: the sampling one) and, when `entropy`
        is "logged" (detached) or "loss" (through autograd), the entropies.

        With `trainer.packing` the rows run as one row of their real tokens (`pack_rows`)."""
        from rlhf.algorithms.losses import token_entropy, token_logprobs, token_logprobs_and_entropy

        ids, positions, packed = mb.input_ids, None, {}
        if self.packing:
            from rlhf.trainer.attention import sequence_bounds

            ids, positions = pack_rows(mb.input_ids, mb.attention_mask)
            bounds, longest = sequence_bounds(positions)
            packed = dict(
                cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest
            )
        if self.role == "critic":
            if positions is None:
                return self.engine(ids, attention_mask=mb.attention_mask), None
            values = self.engine(ids, position_ids=positions, **packed)
            return unpack_rows(values, mb.attention_mask), None
        # Padded batches are right-padded, so with the causal mask alone no real token ever attends to a
        # pad: passing no attention mask gives the same values on real tokens and lets SDPA use its
        # flash/causal kernels instead of a dense [B, 1, T, T] mask.
        logits = self.engine(input_ids=ids, position_ids=positions, use_cache=False, **packed).logits
        temperature = temperature or self.temperature
        compiled = self.compile_logprobs
        if entropy is None:
            logprobs = token_logprobs(logits, ids, temperature=temperature, compiled=compiled)
            entropies = None
        else:
            logprobs, entropies = token_logprobs_and_entropy(
                logits, ids, temperature=temperature, compiled=compiled
            )
            if entropy == "loss":
                entropies = token_entropy(logits, temperature=temperature)
        if positions is not None:  # the first token of each sequence is predicted by nothing: 0
            starts = positions == 0
            logprobs = unpack_rows(logprobs.masked_fill(starts, 0.0), mb.attention_mask)
            if entropies is not None:
                entropies = unpack_rows(entropies.masked_fill(starts, 0.0), mb.attention_mask)
        return logprobs, entropies

    def _micro_batch(self, shard: TrainBatch, rows: list[int] | None) -> TrainBatch:
        """Rows of the shard on the device, trimmed to their longest row. `None`: a filler micro-batch
        (the shortest row, loss-masked out) that keeps this rank's collectives in step with the others."""
        if rows is not None:
            mb = shard.select(rows)
        else:
            shortest = min(range(len(shard)), key=lambda i: int(shard.attention_mask[i].sum()))
            mb = shard.select([shortest])
            mb.loss_mask = torch.zeros_like(mb.loss_mask)
        if self.device.type == "cuda":  # asynchronous copy: the host goes on queueing kernels
            return mb.pin_memory().to(self.device, non_blocking=True)
        return mb.to(self.device)

    @staticmethod
    def _padded(micro_batches: list[list[int]], num_micro: int | None) -> list[list[int] | None]:
        num_micro = len(micro_batches) if num_micro is None else num_micro
        if num_micro < len(micro_batches):
            raise ValueError(
                f"num_micro={num_micro} is less than this rank's {len(micro_batches)} micro-batches"
            )
        return list(micro_batches) + [None] * (num_micro - len(micro_batches))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def logprobs(
        self,
        shard: TrainBatch,
        micro_batches: list[list[int]] | None = None,
        num_micro: int | None = None,
        temperature: float | None = None,
        base: bool = False,
    ) -> torch.Tensor:
        """log p(token_t | tokens < t) at the sampling temperature (or `temperature`), [B, T] float32 on CPU.

        `base`: with the LoRA adapters switched off, i.e. the base model (the reference of a LoRA run)."""
        if self.role == "critic":
            raise ValueError("logprobs: the critic has no LM head; use values()")
        if not base:
            return self._per_token(shard, micro_batches, num_micro, temperature)
        if self.lora is None:
            raise ValueError("logprobs(base=True): this learner has no LoRA adapters to switch off")
        with self.engine.module.disable_adapter():
            return self._per_token(shard, micro_batches, num_micro, temperature)

    @torch.no_grad()
    def values(
        self, shard: TrainBatch, micro_batches: list[list[int]] | None = None, num_micro: int | None = None
    ) -> torch.Tensor:
        """Critic values V(state before token t), [B, T] float32 on CPU (0 off real tokens)."""
        if self.role != "critic":
            raise ValueError(f"values: only the critic has a value head (this is the {self.role})")
        return self._per_token(shard, micro_batches, num_micro)

    def _per_token(self, shard: TrainBatch, micro_batches, num_micro, temperature=None) -> torch.Tensor:
        if micro_batches is None:
            micro_batches = pack_micro_batches(
                row_lengths(shard), self.cfg.trainer.micro_batch_tokens, padded=not self.packing
            )
        was_training = self.engine.training
        self.engine.eval()
        out = torch.zeros(shard.input_ids.shape, dtype=torch.float32)
        for rows in self._padded(micro_batches, num_micro):
            mb = self._micro_batch(shard, rows)
            result, _ = self._token_pass(mb, temperature)
            if rows is not None:
                width = mb.input_ids.shape[1]
                out[rows, :width] = (result.float() * mb.attention_mask).cpu()
        self.engine.train(was_training)
        return out

    # ------------------------------------------------------------------ training
    def train(self, shard: TrainBatch, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run optimizer steps on this rank's shard; `steps[i]` holds `micro_batches` (row indices into
        the shard), `num_micro` (same on every rank), `global_num_tokens`, `global_num_sequences`.

        Returns one dict per step of rank-local sums (the group combines ranks): `loss` (this rank's
        share of the globally normalised loss), `num_tokens`, `weighted` (stat x tokens), `grad_norm`, `lr`.
        """
        if not self.trainable:
            raise ValueError("train: the reference model is frozen")
        self.engine.train()
        return [self._train_step(shard, step) for step in steps]

    def _train_step(self, shard: TrainBatch, step: dict[str, Any]) -> dict[str, Any]:
        micro = self._padded(step["micro_batches"], step["num_micro"])
        lr = float(self.engine.get_lr()[0])
        # Sums stay on the device until the step ends: a .item() per micro-batch would make the host
        # wait for the GPU before it can queue the next forward.
        loss_sum, tokens, weighted = 0.0, 0.0, defaultdict(float)
        for i, rows in enumerate(micro):
            # Gradients are reduced across ranks (and the optimizer step allowed) only on the last one.
            self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            mb = self._micro_batch(shard, rows)
            loss, stats = self._loss(mb, step["global_num_tokens"], step["global_num_sequences"])
            # DeepSpeed averages gradients over ranks; our loss is already a share of the global
            # normalised loss, so undo the average: summed shares = the gradient of the full batch.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            n = mb.loss_mask.sum()
            loss_sum = loss_sum + loss.detach()
            tokens = tokens + n
            for key, value in stats.items():
                if key != "num_tokens":
                    weighted[key] = weighted[key] + value * n
        own_norm = None
        if not hasattr(self.optimizer, "_global_grad_norm"):
            # Plain fp32 ZeRO-0: DeepSpeed clips with torch but does not keep the norm. The grads are
            # already all-reduced here (on the boundary backward), so the norm is global.
            grads = [p.grad.float().norm() for p in self.engine.module.parameters() if p.grad is not None]
            own_norm = torch.linalg.vector_norm(torch.stack(grads))
        if own_norm is not None and not torch.isfinite(own_norm):
            # Skip the update as DeepSpeed does on overflow with ZeRO >= 1 (it would apply it here).
            self.engine.zero_grad()
            self.engine.global_steps += 1
            self.engine.skipped_steps += 1
        else:
            self.engine.step()
        grad_norm = own_norm if own_norm is not None else self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            # DeepSpeed skips the update when a gradient is inf/NaN (ZeRO >= 1); so do we with ZeRO-0.
            detail = ""
            if self._nonfinite is not None:
                names, flags = self._nonfinite
                bad = [names[i] for i in flags.nonzero().flatten().tolist()]
                detail = f"; non-finite gradients in {len(bad)} parameters: {', '.join(bad[:8])}"
                if not torch.isfinite(loss_sum):
                    detail += f" (the loss itself is {float(loss_sum)})"
            print(
                f"[trainer] {self.role} rank {self.rank}: non-finite gradient norm ({grad_norm}); "
                f"the optimizer step was skipped{detail}"
            )
        if self._nonfinite is not None:
            self._nonfinite[1].zero_()
        return {
            "loss": float(loss_sum),
            "num_tokens": float(tokens),
            "weighted": {key: float(value) for key, value in weighted.items()},
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped": 0.0 if math.isfinite(grad_norm) else 1.0,
        }

    def _loss(self, mb: TrainBatch, num_tokens: float, num_sequences: float) -> tuple[torch.Tensor, dict]:
        from rlhf.algorithms.losses import policy_loss, value_loss

        if self.role == "critic":
            if mb.values is None or mb.returns is None:
                raise ValueError(
                    "critic train: the batch needs `values` (old values) and `returns` (from GAE)"
                )
            values, _ = self._token_pass(mb)
            return value_loss(
                values, mb.values, mb.returns, mb.loss_mask, self.algorithm.value_clip, num_tokens=num_tokens
            )
        alg = self.algorithm
        # The entropy is detached (logged only) unless it is in the loss: then through autograd.
        logprobs, entropy = self._token_pass(mb, entropy="loss" if alg.entropy_coef != 0 else "logged")
        # pi_old (rlhf/algorithms/old_logprobs.py): a learner pass, the engine's, or this very pass
        # (one optimizer step per batch: the weights have not moved yet); `behaviour` feeds TIS.
        if mb.old_logprobs is not None:
            old, behaviour = mb.old_logprobs, mb.rollout_logprobs
        elif alg.recompute_old_logprobs is False:
            if mb.rollout_logprobs is None:
                raise ValueError(
                    "algorithm.recompute_old_logprobs=false needs the engine's logprobs, but the batch has none"
                )
            old, behaviour = mb.rollout_logprobs, None
        else:
            old, behaviour = logprobs.detach(), mb.rollout_logprobs
        return policy_loss(
            logprobs,
            old,
            mb.advantages,
            mb.loss_mask,
            alg,
            ref_logprobs=mb.ref_logprobs,
            entropy=entropy,
            rollout_logprobs=behaviour,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        )

    # ------------------------------------------------------------------ weights out
    def named_weight_buckets(
        self, bucket_bytes: int, adapter_only: bool = False
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full HF-named tensors in buckets of ~bucket_bytes, in the training dtype, on the device.

        With LoRA the full weights are the base weights with the adapters merged in; `adapter_only`:
        the adapters' tensors alone, named as PEFT saves them (trainer/lora.py).
        Every rank must iterate it to the end together: under ZeRO-3 each bucket is all-gathered.
        """
        from rlhf.trainer.lora import adapter_tensors, merged_tensors

        if adapter_only and self.lora is None:
            raise ValueError("named_weight_buckets(adapter_only=True): this learner has no LoRA adapters")
        if self.zero_stage == 3:
            # A forward pass outside training (logprobs, the audit) can leave ZeRO-3's prefetcher with
            # parameters still being gathered; gathering them again fails ("Cannot partition a param
            # in flight"). Settle and release them first (the engine's own empty_partition_cache also
            # runs gc.collect(): not on every push).
            release = getattr(self.engine.optimizer, "empty_partition_cache", None)
            if release is not None:
                release()
        if adapter_only:
            entries = adapter_tensors(self.hf_model)
        elif self.lora is not None:
            entries = merged_tensors(self.hf_model)
        else:
            entries = ((name, [param], None) for name, param in self.hf_model.named_parameters())
        bucket: list = []
        size = 0
        for name, params, merge in entries:
            nbytes = getattr(params[0], "ds_numel", params[0].numel()) * params[0].element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield self._gather(bucket)
                bucket, size = [], 0
            bucket.append((name, params, merge))
            size += nbytes
        if bucket:
            yield self._gather(bucket)

    def _gather(self, bucket: list) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of each (name, params, merge) entry: params[0] itself, or `merge(*params)`
        (a LoRA layer's merged weight); under ZeRO-3 gathered first (and copied: the gathered storage
        is released when the context exits)."""

        def value(params, merge, copy):
            if merge is not None:
                return merge(*params)
            return params[0].detach().clone() if copy else params[0].detach()

        if self.zero_stage != 3:
            return [(name, value(params, merge, False)) for name, params, merge in bucket]
        import deepspeed

        every = [p for _, params, _ in bucket for p in params]
        with deepspeed.zero.GatheredParameters(every, modifier_rank=None):
            return [(name, value(params, merge, True)) for name, params, merge in bucket]

    def adapter_config(self) -> dict | None:
        """The PEFT adapter config (what adapter_config.json holds), None without LoRA."""
        if self.lora is None:
            return None
        from rlhf.trainer.lora import adapter_config

        return adapter_config(self.engine.module)

    def send_weights(
        self,
        specs: list,
        bucket_bytes: int | None = None,
        background: bool = False,
        adapter_only: bool = False,
    ) -> list | None:
        """Weight-sync sender: ship the weights over each channel this rank feeds (`specs`, planned
        by rlhf.sync.routes; may be empty), one payload per spec. Every rank calls it together: under
        ZeRO-3 each bucket is all-gathered.

        `background`: copy the weights (a staging copy on the same device), return None at once and
        send the copy from a thread on its own CUDA stream while this rank trains on; `finish_send`
        returns the payloads. The asynchronous loop uses it so that training never waits for an
        engine to finish the generate call it is in. `adapter_only`: a LoRA policy's adapters alone
        (engines that serve LoRA load them as their active adapter)."""
        from rlhf.sync.learner_side import BackgroundSend, send_to_channels

        specs = list(specs)
        if bucket_bytes is None:
            bucket_bytes = specs[0].bucket_bytes if specs else int(self.cfg.sync.bucket_mb * 2**20)
        buckets = self.named_weight_buckets(bucket_bytes, adapter_only=adapter_only)
        if not background:
            return send_to_channels(specs, buckets)
        self.finish_send()
        staged = [
            [(name, tensor.detach().clone()) for name, tensor in bucket]
            for bucket in buckets  # every rank: ZeRO-3 gathers
            if specs
        ]
        self._sending = BackgroundSend(specs, staged, self.device)
        return None

    def finish_send(self) -> list:
        """Wait for the background send started by `send_weights(background=True)`; its payloads."""
        sending, self._sending = getattr(self, "_sending", None), None
        return sending.result() if sending is not None else []

    def device_uuid(self) -> str | None:
        """This rank's GPU (CUDA device UUID), None on CPU: the sync planner matches it to engines."""
        return str(torch.cuda.get_device_properties(self.device).uuid) if self.device.type == "cuda" else None

    def full_state_dict(
        self, bucket_bytes: int = 256 * 2**20, all_ranks: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """The full HF state (CPU copies) on rank 0 (every rank with `all_ranks`), None elsewhere;
        all ranks must call it."""
        keep = all_ranks or self.rank == 0
        state = {}
        for bucket in self.named_weight_buckets(bucket_bytes):
            if keep:
                state.update({name: t.detach().to("cpu", copy=True) for name, t in bucket})
        return state if keep else None

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, scheduler, step) + an HF model in `directory/hf`
        (with LoRA: the adapters merged in, and the adapters alone in PEFT's format in
        `directory/adapter`). `directory` may be an object-store URI: this rank then writes to a
        local staging directory and uploads its own files from its own node."""
        if not self.trainable:
            raise ValueError("save: the reference model is never trained, there is nothing to save")
        from rlhf.production import storage

        with storage.staged(directory, f"{self.role}-rank{self.rank}") as local:
            self._save_local(str(local))

    def _save_local(self, directory: str) -> None:
        import torch.distributed as dist

        # LoRA: the frozen base weights are the model at model.path (the manifest hashes it); the
        # DeepSpeed checkpoint keeps the adapters and their optimizer state only.
        self.engine.save_checkpoint(
            directory,
            tag=CHECKPOINT_TAG,
            client_state={"role": self.role},
            exclude_frozen_parameters=self.lora is not None,
        )
        merged = self.lora is None or self.cfg.checkpoint.export_merged
        state = self.full_state_dict() if merged else None
        adapter = None
        if self.lora is not None:
            adapter = {}
            for bucket in self.named_weight_buckets(256 * 2**20, adapter_only=True):
                adapter.update({name: t.detach().to("cpu", copy=True) for name, t in bucket})
        if self.rank == 0:
            if merged:
                hf_dir = Path(directory) / "hf"
                self.hf_model.save_pretrained(hf_dir, state_dict=state, safe_serialization=True)
                self._save_tokenizer(hf_dir)
            if adapter is not None:
                from rlhf.trainer.lora import write_adapter

                config = dict(self.adapter_config(), base_model_name_or_path=str(self.model_path))
                write_adapter(Path(directory) / "adapter", adapter, config)
        dist.barrier()

    def _save_tokenizer(self, hf_dir: Path) -> None:
        source = Path(self.critic_path if self.role == "critic" else self.model_path)
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.json",
            "merges.txt",
            "tokenizer.model",
            "chat_template.jinja",
            "generation_config.json",
        ):
            if (source / name).is_file() and not (hf_dir / name).exists():
                shutil.copy2(source / name, hf_dir / name)

    def load(self, directory: str) -> int:
        """Restore a `save` checkpoint (weights, optimizer, scheduler); returns the optimizer step count.
        From an object-store URI this rank downloads the DeepSpeed files (not the HF export) first."""
        from rlhf.production import storage

        with storage.local_copy(directory, keep=lambda rel: not rel.startswith("hf/"), label="load") as local:
            return self._load_local(str(local), directory)

    def _load_local(self, directory: str, shown: str) -> int:
        path, _ = self.engine.load_checkpoint(
            directory,
            tag=CHECKPOINT_TAG,
            load_optimizer_states=self.trainable,
            load_lr_scheduler_states=self.trainable,
            load_module_strict=self.lora is None,  # LoRA checkpoints hold the adapters only
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) in {shown}")
        return int(self.engine.global_steps)

    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    # ------------------------------------------------------------------ colocation
    def offload(self) -> None:
        """Free the GPU for colocated vLLM engines: params, grads and optimizer states go to CPU."""
        if self.device.type != "cuda":
            return
        if self.trainable and self.zero_stage > 0 and hasattr(self.optimizer, "offload_states"):
            self.engine.offload_states()
        else:
            self._move_all("cpu")
        torch.cuda.empty_cache()

    def release_cache(self) -> dict[str, float]:
        """Give the allocator's cached blocks back to CUDA (colocated engines are about to wake);
        returns this rank's reserved memory in GiB before and after."""
        if self.device.type != "cuda":
            return {}
        before = torch.cuda.memory_reserved(self.device) / 2**30
        torch.cuda.empty_cache()
        after = torch.cuda.memory_reserved(self.device) / 2**30
        return {"learner_reserved_gb": before, "learner_released_gb": before - after}

    def reload(self) -> None:
        if self.device.type != "cuda":
            return
        if self.trainable and self.zero_stage > 0 and hasattr(self.optimizer, "reload_states"):
            self.engine.reload_states()
        else:
            self._move_all(self.device)
        torch.cuda.synchronize()

    def _move_all(self, device) -> None:
        self.engine.module.to(device)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        state[key] = value.to(device, non_blocking=True)

    def ready(self) -> bool:
        return True

    @staticmethod
    def node_ip_and_free_port() -> tuple[str, int]:
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port
