"""Typed configuration tree; mirrors the YAML recipes in configs/ one section per dataclass.

The dataclasses below are the contract every role reads. Loading, overrides, includes and
validation live in `rlhf.config.loader`; `load_config` is re-exported here for convenience.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Device = Literal["auto", "cpu", "cuda"]


@dataclass
class ModelConfig:
    # HF hub id (online users), a local directory, or a built-in name ("smollm2-135m-instruct").
    path: str = "smollm2-135m-instruct"
    # "auto": bfloat16 on GPU, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    # Where built-in models are materialised (None: $RLHF_CACHE or ~/.cache/rlhf).
    cache_dir: str | None = None


@dataclass
class DataConfig:
    # "builtin:arithmetic", "builtin:countdown", a local .jsonl/.parquet/.arrow file or dir, or a hub dataset name.
    source: str = "builtin:arithmetic"
    split: str = "train"
    # Keyword arguments of the built-in task generator (e.g. {"difficulty": 1}).
    task_args: dict[str, Any] = field(default_factory=dict)
    input_key: str = "prompt"
    label_key: str = "answer"
    apply_chat_template: bool = True
    system_prompt: str | None = None
    max_prompt_tokens: int = 256
    # Built-in generators: how many training prompts to generate.
    num_train: int = 20000
    # Held-out prompts used for evaluation (taken from a disjoint seed / split).
    num_eval: int = 64
    seed: int = 0


@dataclass
class SamplingConfig:
    n: int = 4  # samples per prompt (the group size for GRPO/RLOO)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens


@dataclass
class EnvironmentConfig:
    """Multi-turn episodes (docs/agents.md): the policy talks with an environment, turn by turn."""

    # null: single-turn sampling. A built-in ("guess_number", "calculator") or "pkg.module:Class".
    name: str | None = None
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the environment class
    max_turns: int = 4  # assistant turns per episode
    max_tokens: int = 512  # every token an episode adds after its first prompt (policy + environment)
    step_timeout_s: float = 10.0  # an env step (tools included) past it is abandoned: the episode ends
    # Tools the model may call: "python", "calculator" or "pkg.module:function".
    tools: list[str] = field(default_factory=list)
    # auto: the chat template's tool-call format where it has one, else <tool_call>{json}</tool_call>.
    tool_call_format: Literal["auto", "tags"] = "auto"
    tool_timeout_s: float = 5.0  # per tool call (the python sandbox's wall-clock limit)
    tool_memory_mb: int = 512  # address-space limit of the python sandbox


@dataclass
class AgentConfig:
    """Train the user's own agent code through an OpenAI-compatible endpoint (docs/agents.md)."""

    # null: no agent. "pkg.module:function", called as function(prompt, base_url, **args) per episode;
    # returns the episode's reward (a number) or (reward, info dict).
    function: str | None = None
    args: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the function
    timeout_s: float = 300.0  # an episode still running after it is abandoned and counted as an error
    max_calls: int = 32  # chat completions per episode; more are refused with HTTP 429
    host: str = "127.0.0.1"  # where each engine's endpoint listens (the agent must reach it)


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    # Greedy evaluation on held-out prompts.
    eval_temperature: float = 0.0
    tensor_parallel: int = 1
    # On GPU: fraction of GPU memory; on CPU: fraction of host RAM used for the KV cache.
    gpu_memory_utilization: float | None = None  # None: 0.85 on GPU (0.45 colocated), 0.1 on CPU
    max_model_len: int = 1024
    enforce_eager: bool | None = None  # None: True on CPU
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None  # vLLM's concurrent sequences (None: vLLM's default)
    # Whether the engines can return sampled-token logprobs. They need vLLM's "processed_logprobs" mode
    # (after temperature, as the learner computes them), in which vLLM's sampler takes a full-vocabulary
    # log-softmax at every decode step whether or not a request asks for logprobs. None: only where the
    # run asks for them (engine pi_old, an off-policy correction, rollout.agent); true: always.
    engine_logprobs: bool | None = None
    # Release weights and KV cache while learners train (colocated GPU mode).
    sleep_between_steps: bool | None = None  # None: True when colocated on GPU
    load_format: str = "auto"  # "dummy" for throughput benchmarks
    # Extra keyword arguments of vLLM's engine (vllm EngineArgs), applied over ours, e.g.
    # {max_num_batched_tokens: 16384, kv_cache_dtype: fp8}. Keys the framework owns (model,
    # tokenizer, worker_extension_cls, tensor_parallel_size, enable_sleep_mode) are refused.
    vllm_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # A prompt's samples depend only on the weights, the seed and the prompt, so a resumed run
    # regenerates the original samples. None: on for CPU engines (free), off on GPU (vLLM's per-request
    # seeds take a slower sampling path there).
    reproducible_sampling: bool | None = None
    # Asynchronous RL (docs/async.md): 0 = synchronous loop. k >= 1: the engines keep generating the next
    # batches while the learner trains, and a sample generated more than k policy versions before the
    # learner's current one is dropped (its prompt is served again).
    max_staleness: int = 0
    # Asynchronous runs: generate in chunks of partial_chunk_tokens so a weight push is loaded between
    # two chunks, mid-response (paused, updated, resumed), instead of after the engine's whole batch.
    # Each token records the policy version that sampled it (docs/async.md).
    partial_rollouts: bool = False
    partial_chunk_tokens: int = 128
    # Self-healing: a dead engine is restarted (current weights loaded, unfinished prompts re-sent);
    # more than max_restarts restarts of one engine within restart_window_s stop the run.
    max_restarts: int = 3
    restart_window_s: float = 3600.0


@dataclass
class RewardSourceConfig:
    # rule:     a built-in rule ("task" = the data task's checker, "format") or a function "pkg.mod:fn"
    # model:    a reward-model actor (AutoModelForSequenceClassification at `path`)
    # http:     POST to `url`
    kind: Literal["rule", "model", "http"] = "rule"
    name: str = "task"
    weight: float = 1.0
    path: str | None = None
    url: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    sources: list[RewardSourceConfig] = field(default_factory=lambda: [RewardSourceConfig()])
    # What to do when a reward function raises or returns NaN: fail the step with a clear error,
    # score the sample 0, or leave its whole group out of training; counted in `reward/errors`
    # (and `reward/dropped_groups`).
    on_error: Literal["raise", "zero", "drop"] = "raise"
    batch_size: int = 32  # reward-model batch size
    # User reward functions ("pkg.module:fn") are untrusted: a call that takes longer is abandoned and
    # its sample follows on_error (null: no limit).
    timeout_s: float | None = 10.0


@dataclass
class AlgorithmConfig:
    # grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline | gae (PPO with critic)
    advantage: str = "grpo"
    # PPO clip range; clip_high > clip_low gives DAPO's decoupled clip ("clip-higher").
    clip_low: float = 0.2
    clip_high: float = 0.2
    # Importance ratio per token (PPO/GRPO) or per sequence (GSPO).
    ratio_level: Literal["token", "sequence"] = "token"
    # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    loss_agg: str = "token_mean"
    loss_agg_constant: float | None = None  # the constant for seq_mean_token_sum_norm (None: max_new_tokens)
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in: Literal["loss", "reward"] = "loss"
    entropy_coef: float = 0.0
    # Where pi_old comes from (rlhf/algorithms/old_logprobs.py). null: the learner's own logprobs,
    # from the training pass when the batch feeds one optimizer step, else from one forward pass before
    # training; true: always that extra pass; false: the engine's sampled-token logprobs (the engines
    # then return logprobs, which costs generation time). With tis_cap set the engines return logprobs
    # and truncated importance sampling weights each token by min(exp(old - engine), tis_cap).
    recompute_old_logprobs: bool | None = None
    tis_cap: float | None = None
    # How samples from another policy than pi_old are corrected (docs/algorithms.md): none; tis
    # (weight min(pi_old / pi_engine, tis_cap)); decoupled_ppo (weight pi_old / pi_engine, tokens above
    # tis_cap dropped). auto: tis when tis_cap is set, decoupled_ppo when rollout.max_staleness >= 1.
    off_policy_correction: Literal["auto", "none", "tis", "decoupled_ppo"] = "auto"
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer steps per rollout batch (per epoch)
    # GAE (advantage: gae)
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    # DAPO dynamic sampling: drop groups whose rewards are all equal, oversample until the batch is full.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    # DAPO overlong handling
    overlong_filter: bool = False  # mask truncated responses out of the loss
    overlong_buffer: int = 0  # soft penalty over the last `overlong_buffer` tokens before max_new_tokens
    overlong_penalty: float = 1.0
    # Global reward normalisation for REINFORCE++ etc. uses this epsilon everywhere.
    eps: float = 1e-6


@dataclass
class CriticConfig:
    enabled: bool = False
    path: str | None = None  # None: initialise from the policy (value head on the policy architecture)
    lr: float = 5e-6
    warmup_steps: int = 0


@dataclass
class TrainerConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = 1e-6
    min_lr_ratio: float = 1.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    # Micro-batches are packed by token budget (prompt + response tokens per rank).
    micro_batch_tokens: int = 4096
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    # Colocated on GPUs: move the policy's weights, gradients and optimizer states to host memory
    # while vLLM generates (more KV cache for the engines), back before the learners compute. Costs a
    # host round trip per step; pays only when the engines are short of memory (docs/trainer.md).
    offload_during_generation: bool = False
    # Colocated on GPUs, without offload: the learners hand their allocator's cached, unused blocks back
    # to CUDA before the engines wake, for vLLM's allocations during generation (the next training step
    # allocates again). Off: on an H200 it freed 9 GB and generation was no faster (docs/trainer.md).
    release_cache_before_wake: bool = False
    # Half-precision learners (ZeRO 1, 2, 3): start DeepSpeed's fp32 master weights from the checkpoint's fp32 values
    # (where it stores fp32) instead of the bf16-rounded module; small updates then show in the bf16
    # weights from the first step (trainer/masters.py, docs/trainer.md).
    masters_from_checkpoint: bool = True
    # GPU learners: torch.compile the per-token logprob/entropy kernels (fused passes over the logits).
    compile_logprobs: bool = True
    # Name the parameters whose gradients turned inf/NaN when an optimizer step is skipped (small cost).
    debug_nonfinite_grads: bool = False
    critic: CriticConfig = field(default_factory=CriticConfig)


@dataclass
class RolePlacement:
    replicas: int = 1
    gpus: float = 0.0  # per replica (fractions allowed when colocated)
    cpus: float = 1.0  # per replica
    accelerator_type: str | None = None  # Ray accelerator type, e.g. "H100", "L4"
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per replica
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


@dataclass
class PlacementConfig:
    device: Device = "auto"
    rollout: RolePlacement = field(default_factory=RolePlacement)
    learner: RolePlacement = field(default_factory=RolePlacement)
    reference: RolePlacement = field(default_factory=RolePlacement)
    critic: RolePlacement = field(default_factory=RolePlacement)
    reward_model: RolePlacement = field(default_factory=RolePlacement)
    evaluation: RolePlacement = field(default_factory=RolePlacement)  # with evaluation.separate_engines
    # Groups of roles that share the same GPUs, e.g. [["rollout", "learner", "reference"]].
    colocate: list[list[str]] = field(default_factory=list)
    # A YAML file describing the cluster (nodes, GPUs, types) for `rlhf plan` without a live cluster.
    inventory: str | None = None


@dataclass
class SyncConfig:
    # auto: cuda_ipc when colocated on a GPU, broadcast (NCCL) across GPUs, object_store on CPU.
    transport: Literal["auto", "object_store", "broadcast", "cuda_ipc"] = "auto"
    bucket_mb: int = 256
    # How engines write received weights: direct (each parameter's loader into the live tensor, fast),
    # replay (direct on the first push, whose parameter copies are then replayed as one batched copy),
    # layerwise (vLLM's layer-wise reload with post-load processing: CPU, quantized), auto (replay
    # where nothing is post-processed: an unquantized model on a GPU).
    engine_reload: Literal["auto", "direct", "replay", "layerwise"] = "auto"
    audit: bool = True  # compare engine and learner logprobs on a probe batch after each sync
    audit_samples: int = 4
    audit_every: int | None = None  # steps between audits (None: 1 synchronous, 10 asynchronous; 0: never)
    audit_tolerance: float | None = None  # warn above this mean |diff| (None: 5e-3 fp32, 5e-2 bf16)


@dataclass
class LoggingConfig:
    project: str = "rlhf"
    run_name: str | None = None  # None: <config stem>-<timestamp>
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff WANDB_API_KEY
    output_dir: str = "runs"
    log_every: int = 1
    plot: bool = True  # reward curve PNG in the run directory
    samples_per_step: int = 16  # sampled responses written to samples.jsonl each step (0: none)
    # Warn (naming the phase) when no step has finished in stall_factor x the median step time (and at
    # least a minute); 0: never.
    stall_factor: float = 5.0


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep_last: int = 2
    save_optimizer: bool = True


@dataclass
class EvalSetConfig:
    name: str = "held_out"  # metrics are logged as eval/<name>/...
    # null: the run's held-out prompts (data.num_eval of data.source); "builtin:<task>"; a local data file.
    source: str | None = None
    task_args: dict[str, Any] = field(
        default_factory=dict
    )  # built-in generator args; a file's checker: {task: arithmetic}
    input_key: str = "prompt"
    label_key: str = "answer"
    # "task": the set's task checker; "format"; "pkg.module:fn" (a user rule); "reward": the run's reward sources.
    reward: str = "task"
    num_prompts: int | None = None  # null: every prompt of the source (held-out: data.num_eval)
    samples_per_prompt: int = 1
    temperature: float | None = None  # null: rollout.eval_temperature
    max_new_tokens: int | None = None  # null: rollout.sampling.max_new_tokens
    pass_k: list[int] = field(default_factory=list)  # pass@k for each k (<= samples_per_prompt)
    correct_threshold: float = 1.0  # a sample solves its prompt (pass@k, solved_frac) when reward >= this
    seed: int = 0  # generation seed of a built-in task's evaluation prompts


@dataclass
class EvaluationConfig:
    # Evaluated every `eval_every` steps, before the first and after the last step. Empty: one set,
    # "held_out" (the data's held-out prompts, the run's reward, rollout.eval_temperature).
    sets: list[EvalSetConfig] = field(default_factory=list)
    # false: evaluate on the rollout engines between steps. true: engines of its own
    # (placement.evaluation) get a snapshot of the weights and evaluate while training goes on.
    separate_engines: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    steps: int = 10
    eval_every: int = 0  # 0: evaluate only before the first and after the last step
    seed: int = 0
    resume: str | None = None  # a run directory to continue
    # Filled by the loader: the file the config came from (for messages and run names).
    source_file: str | None = None


def load_config(path, overrides=()) -> RunConfig:
    """Load, merge and validate a YAML recipe (see `rlhf.config.loader`)."""
    from rlhf.config.loader import load_config as _load

    return _load(path, overrides)
