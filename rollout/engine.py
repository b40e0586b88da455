"""One vLLM engine (`vllm.LLM`) behind a plain class; `RolloutGroup` wraps it in `ray.remote`.

Logprob conventions (see docs/weight_sync.md):
* `generate` returns, for every sampled token, the logprob under the distribution it was sampled
  from: log_softmax(logits / temperature) after top-k/top-p filtering (vLLM
  `logprobs_mode="processed_logprobs"`). With top_p=1, top_k=-1 that is exactly what a learner
  computes from `logits / temperature`. Greedy decoding (temperature 0) reports temperature 1.
* `logprobs` scores given sequences with the raw model: log_softmax(logits) at temperature 1
  (vLLM prompt logprobs never go through the sampler), the quantity the sync audit compares.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Any

from rlhf.rollout.lora import AdapterSlot, vllm_lora_rank

from rlhf.config.schema import RolloutConfig, SamplingConfig
from rlhf.sync.wire import SyncPayload, SyncSpec, as_spec, bucket_to_bytes
from rlhf.types import Prompt, Sample

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "rlhf.sync.engine_extension.WeightUpdateExtension"


def tensor_parallel_compilation() -> dict[str, Any]:
    """vLLM compilation settings for a tensor-parallel engine on GPUs.

    On Hopper and Blackwell vLLM 0.26 fuses each all-reduce with the following RMSNorm through
    FlashInfer, whose default "mnnvl" workspace maps NVLink multicast memory (`cuMulticastCreate`).
    Multicast can take a shared host's GPUs out of service and is switched off on the hosts we test
    on; with it off the fused workspace broke engine start (`CUBLAS_STATUS_INTERNAL_ERROR` in
    `cublasCreate` on every TP worker, 2026-11-25 and 2026-11-26). Without the fusion the all-reduce
    goes through vLLM's custom (CUDA IPC) kernel or NCCL."""
    # a FlashInfer workspace made anyway (another fusion pass) takes the IPC-only backend
    os.environ.setdefault("VLLM_FLASHINFER_ALLREDUCE_BACKEND", "trtllm")
    return {"pass_config": {"fuse_allreduce_rms": False}}


# What the engine needs to work as ours (weight sync, placement, sleep): not for rollout.vllm_kwargs.
RESERVED_VLLM_KWARGS = (
    "model",
    "tokenizer",
    "worker_extension_cls",
    "tensor_parallel_size",
    "enable_sleep_mode",
)


def with_vllm_kwargs(kwargs: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` updated with the user's `rollout.vllm_kwargs` (they win over our choices), after
    checking each key is an argument of vLLM's engine and not one the framework must own."""
    if not extra:
        return kwargs
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    for key in extra:
        if key in RESERVED_VLLM_KWARGS:
            raise ValueError(
                f"rollout.vllm_kwargs.{key}: set by the framework; use the rollout/placement keys instead"
            )
        if key not in known:
            raise ValueError(f"rollout.vllm_kwargs.{key}: not an argument of vLLM's engine (vllm EngineArgs)")
    return {**kwargs, **extra}


def quantization_kwargs(cfg: RolloutConfig, device: str) -> dict[str, Any]:
    """vLLM arguments of `rollout.quantization` and `rollout.kv_cache_dtype`.

    `fp8` quantizes the bf16 checkpoint online, per tensor (`rlhf.sync.fp8.vllm_quantization`: vLLM 0.32
    names it `fp8_per_tensor`, 0.26 `fp8`); each push is re-quantized by the engine (docs/fp8.md)."""
    kwargs: dict[str, Any] = {}
    if cfg.kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = cfg.kv_cache_dtype
    if cfg.quantization == "none":
        return kwargs
    if cfg.quantization != "fp8":
        raise ValueError(f"rollout.quantization: expected 'none' or 'fp8', got {cfg.quantization!r}")
    if device != "cuda":
        raise ValueError("rollout.quantization: fp8 needs GPU engines (vLLM's CPU build has no online FP8)")
    import torch

    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        raise ValueError(
            f"rollout.quantization: fp8 needs a GPU of compute capability >= 8.0, this one is {capability}"
        )
    from rlhf.sync.fp8 import vllm_quantization

    kwargs["quantization"] = vllm_quantization("tensor")
    return kwargs


def resolve_dtype(dtype: str, device: str) -> str:
    """ "auto" -> float32 on CPU (vLLM's CPU kernels and exact audits), bfloat16 on GPU."""
    if dtype in (None, "auto"):
        return "float32" if device == "cpu" else "bfloat16"
    return dtype


# Each request mode and the engine method that serves it directly (the name errors report).
GENERATE_METHODS = {"tokens": "generate", "episodes": "generate_episodes", "agent": "generate_agent_episodes"}


@dataclasses.dataclass
class GenerateRequest:
    """One engine's share of a generate call: n samples of each prompt, served by `RolloutEngine.serve`.

    `mode`: "tokens" (one batched vLLM call), "episodes" (multi-turn with rollout.environment,
    rollout/episodes.py) or "agent" (the user's agent over HTTP with rollout.agent,
    rollout/agent_runner.py). `Sample.group` of prompt i is `groups[i]`, default group_offset + i."""

    prompts: list[Prompt]
    sampling: SamplingConfig | None = None  # None: rollout.sampling
    n: int | None = None  # None: sampling.n
    temperature: float | None = None  # None: sampling.temperature
    group_offset: int = 0
    groups: list[int] | None = None
    logprobs: bool = False  # each sampled token's engine logprob (Sample.logprobs), else None
    mode: str = "tokens"

    def group_ids(self) -> list[int]:
        if self.groups is None:
            return [self.group_offset + i for i in range(len(self.prompts))]
        if len(self.groups) != len(self.prompts):
            raise ValueError(f"rollout: {len(self.groups)} group ids for {len(self.prompts)} prompts")
        return list(self.groups)

    @property
    def method(self) -> str:
        return GENERATE_METHODS[self.mode]


class RolloutEngine:
    def __init__(
        self,
        model_path: str,
        cfg: RolloutConfig,
        device: str = "cpu",
        seed: int | None = None,
        dtype: str = "auto",
        tensor_parallel: int | None = None,
        colocated: bool = False,
        engine_index: int = 0,
        trust_remote_code: bool = False,
        sampled_logprobs: bool = True,
        lora_rank: int = 0,
        lora_targets: list[str] | None = None,
    ):
        """`lora_rank` > 0: the engine serves LoRA adapters of up to that rank on the modules
        `lora_targets` (`lora_target_modules`; None: every module vLLM supports), pushed by the learner
        (`receive_weights` of an adapter push); before the first push it serves the base model."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"RolloutEngine: device must be 'cpu' or 'cuda', got {device!r}")
        on_cpu = device == "cpu"
        if on_cpu:
            # In-process engine: collective_rpc then hands Python objects (tensors, ObjectRefs)
            # straight to the worker; the multiprocess engine would serialize them.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.device = device
        self.sampled_logprobs = sampled_logprobs
        self.dtype = resolve_dtype(dtype, device)
        self.engine_index = engine_index
        self.colocated = colocated and not on_cpu
        self.tensor_parallel = 1 if on_cpu else int(tensor_parallel or cfg.tensor_parallel)
        if on_cpu and (tensor_parallel or cfg.tensor_parallel) > 1:
            raise ValueError("rollout.tensor_parallel > 1 is not supported on CPU")
        memory = cfg.gpu_memory_utilization
        if memory is None:
            memory = 0.1 if on_cpu else (0.45 if self.colocated else 0.85)
        enforce_eager = cfg.enforce_eager if cfg.enforce_eager is not None else on_cpu
        kwargs: dict[str, Any] = dict(
            model=model_path,
            tokenizer=model_path,
            dtype=self.dtype,
            seed=seed if seed is not None else (cfg.seed or 0),
            max_model_len=cfg.max_model_len,
            enforce_eager=enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            tensor_parallel_size=self.tensor_parallel,
            load_format=cfg.load_format,
            trust_remote_code=trust_remote_code,
            worker_extension_cls=WORKER_EXTENSION,
            # Sampled-token logprobs after temperature, as the learner computes them. vLLM's sampler then
            # takes a full-vocabulary log-softmax at every decode step, asked for or not, so engines of
            # runs that never ask for them keep vLLM's default (rollout.engine_logprobs).
            logprobs_mode="processed_logprobs" if sampled_logprobs else "raw_logprobs",
        )
        if cfg.max_num_seqs:
            kwargs["max_num_seqs"] = cfg.max_num_seqs
        kwargs.update(quantization_kwargs(cfg, device))
        if on_cpu:
            kwargs["distributed_executor_backend"] = "uni"
            # vLLM-CPU reads gpu_memory_utilization as the whole process's share of the NUMA node
            # (imports and weights included), which breaks on small hosts: size the KV cache instead.
            import psutil

            kwargs["kv_cache_memory_bytes"] = int(memory * psutil.virtual_memory().total)
        else:
            kwargs["gpu_memory_utilization"] = memory
            if self.tensor_parallel > 1:
                # Workers as Ray actors in this engine's placement bundles (VLLM_RAY_BUNDLE_INDICES,
                # set by rlhf.placement.ray_groups), so colocated learners and engine workers share each GPU.
                kwargs["distributed_executor_backend"] = "ray"
                kwargs["compilation_config"] = tensor_parallel_compilation()
        if self.colocated:
            kwargs["enable_sleep_mode"] = True
        if lora_rank > 0:  # one adapter at a time: the policy's latest
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank), max_loras=1)
            if lora_targets:
                kwargs["lora_target_modules"] = list(lora_targets)
        self.lora_rank = lora_rank
        self.adapter = AdapterSlot() if lora_rank > 0 else None  # the pushed adapter every call uses
        self.cfg = cfg
        self.llm = LLM(**with_vllm_kwargs(kwargs, cfg.vllm_kwargs))
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        self._asleep: set[str] = set()  # memory tags currently released ("weights", "kv_cache")
        self.weight_version = 0  # pushes received; every sample is tagged with it (asynchronous RL)
        self.monitor = _start_monitor(self.llm, engine_index)  # queue / KV-cache figures for Prometheus
        self.model_path, self.trust_remote_code = model_path, trust_remote_code
        self._runner = None  # multi-turn episodes (generate_episodes), built on first use
        self._agent_runner = None  # the user's agent over HTTP (generate_agent_episodes), same

    def ready(self) -> bool:
        return True

    def _generate(self, inputs, params, use_tqdm: bool = False):
        """Every vLLM call of the engine: with the active LoRA adapter, if one was pushed."""
        lora = self.adapter.request if getattr(self, "adapter", None) is not None else None
        if lora is None:
            return self.llm.generate(inputs, params, use_tqdm=use_tqdm)
        return self.llm.generate(inputs, params, use_tqdm=use_tqdm, lora_request=lora)

    # ------------------------------------------------------------------------------------------
    # Generation and scoring

    def sampling_params(
        self,
        sampling: SamplingConfig,
        n: int | None = None,
        temperature: float | None = None,
        logprobs: bool = False,
    ):
        """vLLM sampling parameters; `logprobs` asks for each sampled token's logprob, which at a
        large vocabulary costs more than half of the generation time (see docs/weight_sync.md)."""
        from vllm import SamplingParams

        if logprobs and not getattr(self, "sampled_logprobs", True):
            raise ValueError(
                "rollout: sampled-token logprobs were asked of an engine built without them; set "
                "rollout.engine_logprobs=true (the run's algorithm does not need them, so they are off)"
            )
        stop = list(sampling.stop) or None
        return SamplingParams(
            # vLLM would detokenize every token as it is generated (and every logprob's token): Python
            # work per token that costs more than the logprobs themselves at a large vocabulary. Without
            # stop strings (which need the text as it grows) the engine decodes each response once.
            detokenize=stop is not None,
            flat_logprobs=logprobs,  # a few flat lists per response instead of a dict per token
            n=sampling.n if n is None else n,
            temperature=sampling.temperature if temperature is None else temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_new_tokens,
            stop=stop,
            ignore_eos=sampling.ignore_eos,
            logprobs=0 if logprobs else None,  # 0: only the sampled token's logprob
        )

    def serve(self, request: GenerateRequest) -> list[Sample]:
        """Every generate call goes through here (`RolloutGroup` sends one request per engine)."""
        if request.mode not in GENERATE_METHODS:
            raise ValueError(
                f"rollout: generate mode must be one of {tuple(GENERATE_METHODS)}, got {request.mode!r}"
            )
        if not request.prompts:
            return []
        groups = request.group_ids()
        sampling = request.sampling or self.cfg.sampling
        n = sampling.n if request.n is None else request.n
        if request.mode == "episodes":
            return self._episodes(request, groups, sampling, n)
        if request.mode == "agent":
            return self._agent_episodes(request, groups, sampling, n)
        return self._samples(request, groups, sampling, n)

    def generate(
        self,
        prompts: list[Prompt],
        sampling: SamplingConfig | None = None,
        n: int | None = None,
        temperature: float | None = None,
        group_offset: int = 0,
        groups: list[int] | None = None,
        logprobs: bool = False,
    ) -> list[Sample]:
        """n samples per prompt, prompt-major (`serve` of a "tokens" `GenerateRequest`)."""
        return self.serve(GenerateRequest(prompts, sampling, n, temperature, group_offset, groups, logprobs))

    def generate_episodes(
        self,
        prompts: list[Prompt],
        sampling: SamplingConfig | None = None,
        n: int | None = None,
        temperature: float | None = None,
        group_offset: int = 0,
        groups: list[int] | None = None,
        logprobs: bool = False,
    ) -> list[Sample]:
        """n multi-turn episodes per prompt (`serve` of an "episodes" `GenerateRequest`)."""
        request = GenerateRequest(
            prompts, sampling, n, temperature, group_offset, groups, logprobs, "episodes"
        )
        return self.serve(request)

    def generate_agent_episodes(
        self,
        prompts: list[Prompt],
        sampling: SamplingConfig | None = None,
        n: int | None = None,
        temperature: float | None = None,
        group_offset: int = 0,
        groups: list[int] | None = None,
        logprobs: bool = False,
    ) -> list[Sample]:
        """n runs of the user's agent per prompt (`serve` of an "agent" `GenerateRequest`)."""
        request = GenerateRequest(prompts, sampling, n, temperature, group_offset, groups, logprobs, "agent")
        return self.serve(request)

    def _samples(
        self, request: GenerateRequest, groups: list[int], sampling: SamplingConfig, n: int
    ) -> list[Sample]:
        """One batched vLLM call. With `request.logprobs` each sample carries its tokens' engine
        logprobs, else None."""
        prompts, logprobs = request.prompts, request.logprobs
        params = self.sampling_params(sampling, n, request.temperature, logprobs)
        empty = [p.index for p in prompts if not p.token_ids]
        if empty:
            raise ValueError(
                f"rollout: prompt(s) {empty[:5]} have no tokens (check data.input_key and the tokenizer)"
            )
        inputs = [{"prompt_token_ids": list(p.token_ids)} for p in prompts]
        params = self._seeded(params, prompts)
        version = self.weight_version
        started = time.perf_counter()
        outputs = self._generate(inputs, params, use_tqdm=False)
        generated = time.perf_counter()
        completions = [c for output in outputs for c in output.outputs]
        texts = self._texts(
            completions, detokenized=(params[0] if isinstance(params, list) else params).detokenize
        )
        samples = []
        for group, prompt, output in zip(groups, prompts, outputs):
            for completion in output.outputs:
                token_ids = list(completion.token_ids)
                samples.append(
                    Sample(
                        group=group,
                        prompt=prompt,
                        response_ids=token_ids,
                        response_text=texts[id(completion)],
                        logprobs=_token_logprobs(completion.logprobs, token_ids, 0) if logprobs else None,
                        finish_reason=completion.finish_reason or "length",
                        policy_version=version,
                    )
                )
        self.last_timing = {"vllm_s": generated - started, "post_s": time.perf_counter() - generated}
        return samples

    def generate_timing(self) -> dict[str, float]:
        """Seconds of the last `generate` call inside vLLM (`vllm_s`) and building its samples
        (`post_s`): what the driver's generate phase spends beyond them is Ray and the driver."""
        return dict(getattr(self, "last_timing", {}))

    def continue_samples(
        self,
        samples: list[Sample],
        sampling: SamplingConfig | None = None,
        max_tokens: int = 1,
        temperature: float | None = None,
        logprobs: bool = False,
    ) -> list[Sample]:
        """Extend each sample by up to `max_tokens` tokens with the weights loaded now (partial
        rollouts, rollout/partial.py): the request is the prompt plus the response so far, so a
        weight push loaded since the last chunk shapes the rest of the response. Each new token is
        tagged with this engine's weight version (`Sample.token_versions`)."""
        if not samples:
            return []
        base = self.sampling_params(sampling or self.cfg.sampling, 1, temperature, logprobs)
        base.max_tokens = max_tokens
        inputs = [{"prompt_token_ids": list(s.prompt.token_ids) + list(s.response_ids)} for s in samples]
        params: Any = base
        if self._reproducible():
            if self.in_process:
                import torch

                torch.manual_seed(self._prompt_seed(samples[0].prompt) ^ len(samples[0].response_ids))
            else:  # distinct streams per sample: the n samples of a prompt must not share their draws
                params = []
                for j, s in enumerate(samples):
                    one = base.clone()
                    one.seed = (self._prompt_seed(s.prompt) + 7919 * j + 104729 * len(s.response_ids)) % 2**32
                    params.append(one)
        version = self.weight_version
        outputs = self._generate(inputs, params, use_tqdm=False)
        tokenizer = self.llm.get_tokenizer()
        extended = []
        for sample, output in zip(samples, outputs):
            completion = output.outputs[0]
            new_ids = list(completion.token_ids)
            before = sample.token_versions or [sample.policy_version] * len(sample.response_ids)
            ids = list(sample.response_ids) + new_ids
            extended.append(
                dataclasses.replace(
                    sample,
                    response_ids=ids,
                    response_text=tokenizer.decode(ids, skip_special_tokens=True),
                    logprobs=(sample.logprobs or []) + _token_logprobs(completion.logprobs, new_ids, 0)
                    if logprobs
                    else None,
                    finish_reason=completion.finish_reason or "length",
                    token_versions=before + [version] * len(new_ids),
                )
            )
        return extended

    def _texts(self, completions: list, detokenized: bool) -> dict[int, str]:
        """Response text of each completion (by id): vLLM's when it detokenized, else one batched decode."""
        if detokenized:
            return {id(c): c.text for c in completions}
        tokenizer = self.llm.get_tokenizer()
        decoded = tokenizer.batch_decode([list(c.token_ids) for c in completions], skip_special_tokens=True)
        return {id(c): text for c, text in zip(completions, decoded)}

    def _seeded(self, params, prompts: list[Prompt]):
        """`rollout.reproducible_sampling`: the samples of a prompt depend only on the weights, the
        run's seed and the prompt (its dataset index and epoch), so a resumed run regenerates what
        the original run generated. CPU: the in-process engine samples from torch's global generator,
        reseeded per call from the call's prompts (free). GPU: one vLLM per-request seed per prompt
        (vLLM then samples seeded requests on a slower path: off by default there)."""
        if not self._reproducible():
            return params
        if self.in_process:
            import torch

            torch.manual_seed(self._prompt_seed(prompts[0]) ^ len(prompts))
            return params
        seeded = []
        for p in prompts:
            one = params.clone()
            one.seed = self._prompt_seed(p)
            seeded.append(one)
        return seeded

    def _reproducible(self) -> bool:
        wanted = self.cfg.reproducible_sampling
        return self.device == "cpu" if wanted is None else wanted

    def _prompt_seed(self, p: Prompt) -> int:
        key = (self.cfg.seed or 0, p.index, int(p.metadata.get("epoch", 0)), p.metadata.get("split", ""))
        return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=4).digest(), "little")

    def _episodes(
        self, request: GenerateRequest, groups: list[int], sampling: SamplingConfig, n: int
    ) -> list[Sample]:
        """Multi-turn episodes with rollout.environment (rollout/episodes.py): n episodes per prompt,
        each turn of all live episodes one batched `llm.generate` call."""
        from rlhf.rollout.episodes import Completion

        prompts, temperature, logprobs = request.prompts, request.temperature, request.logprobs
        base = self.sampling_params(sampling, 1, temperature, logprobs)
        base.include_stop_str_in_output = True  # the text an environment reads is exactly the kept ids
        first_seed, turn = self._prompt_seed(prompts[0]), [0]

        def generate(inputs: list[list[int]], budgets: list[int]) -> list[Completion]:
            params = []
            for i, budget in enumerate(budgets):
                one = base.clone()
                one.max_tokens = budget
                if self._reproducible() and not self.in_process:
                    one.seed = (first_seed + 1_000_003 * turn[0] + i) % 2**32
                params.append(one)
            if self._reproducible() and self.in_process:
                import torch

                torch.manual_seed(first_seed ^ len(prompts) ^ (turn[0] * 0x9E3779B1))
            turn[0] += 1
            outputs = self._generate([{"prompt_token_ids": ids} for ids in inputs], params, use_tqdm=False)
            completions = [out.outputs[0] for out in outputs]
            texts = self._texts(completions, detokenized=base.detokenize)
            done = []
            for c in completions:
                ids = list(c.token_ids)
                lps = _token_logprobs(c.logprobs, ids, 0) if logprobs else None
                done.append(Completion(ids, texts[id(c)], lps, c.finish_reason or "length"))
            return done

        return self._episode_runner().run(
            prompts, groups, n, generate, sampling.max_new_tokens, logprobs, self.weight_version
        )

    def _agent_episodes(
        self, request: GenerateRequest, groups: list[int], sampling: SamplingConfig, n: int
    ) -> list[Sample]:
        """Runs of the user's agent with rollout.agent (rollout/agent_runner.py): n per prompt against
        this engine's OpenAI-compatible endpoint, served for the duration of the call. Sampling is
        rollout.sampling's (the request's temperature etc. are not read); batches follow the agents'
        timing, so it is not reproducible."""
        from rlhf.rollout.episodes import Completion

        prompts, temperature, logprobs = request.prompts, request.temperature, request.logprobs

        def generate(calls: list[tuple[list[int], int, list[str]]]) -> list[Completion]:
            params = [  # the request's own stop strings join rollout.sampling.stop; every call is recorded
                self.sampling_params(
                    dataclasses.replace(sampling, max_new_tokens=budget, stop=[*sampling.stop, *stop]),
                    1,
                    temperature,
                    logprobs=True,
                )
                for _, budget, stop in calls
            ]
            outputs = self._generate(
                [{"prompt_token_ids": ids} for ids, _, _ in calls], params, use_tqdm=False
            )
            done = []
            for out, one in zip(outputs, params):
                c = out.outputs[0]
                ids = list(c.token_ids)
                text = self._texts([c], detokenized=one.detokenize)[id(c)]
                done.append(
                    Completion(ids, text, _token_logprobs(c.logprobs, ids, 0), c.finish_reason or "length")
                )
            return done

        return self._agent().run(
            prompts, groups, n, generate, sampling.max_new_tokens, logprobs, self.weight_version
        )

    def _agent(self):
        """Built on first use: the agent function and the tokenizer's chat template."""
        if self._agent_runner is None:
            from rlhf.rollout.agent_runner import AgentRunner
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                self.model_path, trust_remote_code=self.trust_remote_code
            )
            self._agent_runner = AgentRunner(
                self.cfg.agent, tokenizer, self.cfg.max_model_len, self.model_path
            )
        return self._agent_runner

    def _episode_runner(self):
        """Built on first use: the environment class, the tokenizer's chat template and the tools."""
        if self._runner is None:
            from rlhf.rollout.environments import resolve_environment_class
            from rlhf.rollout.episodes import EpisodeRunner
            from transformers import AutoTokenizer

            env_cfg = self.cfg.environment
            tokenizer = AutoTokenizer.from_pretrained(
                self.model_path, trust_remote_code=self.trust_remote_code
            )
            toolbox = None
            if env_cfg.tools:
                from rlhf.rollout.tools import ToolBox

                toolbox = ToolBox.from_config(env_cfg, tokenizer)
            cls = resolve_environment_class(env_cfg.name)
            self._runner = EpisodeRunner(env_cfg, cls, tokenizer, self.cfg.max_model_len, toolbox)
        return self._runner

    def logprobs(self, seqs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Raw (temperature 1) logprob of each response token given prompt + earlier response."""
        from vllm import SamplingParams

        if not seqs:
            return []
        for prompt_ids, _ in seqs:
            if not prompt_ids:
                raise ValueError("RolloutEngine.logprobs: every sequence needs at least one prompt token")
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, flat_logprobs=True, detokenize=False
        )
        inputs = [{"prompt_token_ids": list(p) + list(r)} for p, r in seqs]
        outputs = self._generate(inputs, params, use_tqdm=False)
        return [_token_logprobs(out.prompt_logprobs, list(r), len(p)) for (p, r), out in zip(seqs, outputs)]

    # ------------------------------------------------------------------------------------------
    # Weights and memory

    def receive_weights(
        self, routes: list[tuple[SyncSpec, int]], payload: SyncPayload | list | None = None
    ) -> dict[str, int]:
        """Load one weight push (see rlhf.sync) into every worker, then drop stale KV.

        `routes[w]` = (channel spec, rank in that channel) of tensor-parallel worker w (planned by
        rlhf.sync.routes)."""
        start = time.perf_counter()
        if "weights" in self._asleep:
            self.llm.wake_up(tags=["weights"])  # KV cache may stay released while weights load
            self._asleep.discard("weights")
        spec = as_spec(routes[0][0])
        transport = spec.transport
        if spec.adapter is not None:
            stats = self._receive_adapter(routes, payload)
        elif transport == "object_store" and not self.in_process:
            # Worker processes are not Ray workers and vLLM serializes RPC args: fetch here and
            # ship plain bytes, one bucket per call.
            import ray

            refs = payload.refs if isinstance(payload, SyncPayload) else payload
            stats: dict[str, int] = {}
            for ref in refs:
                bucket = bucket_to_bytes(ray.get(ref))
                results = self.llm.collective_rpc("receive_weights", args=(routes, [bucket]))
                for key, value in results[0].items():
                    stats[key] = value if key.startswith("params") else stats.get(key, 0) + value
        else:
            # broadcast / cuda_ipc read the store, not the payload (which would not survive serialisation)
            payload = payload if transport == "object_store" else None
            stats = self.llm.collective_rpc("receive_weights", args=(routes, payload))[0]
        self.llm.reset_prefix_cache()
        self.weight_version = int(spec.version) + 1
        stats["total_s"] = time.perf_counter() - start
        return stats

    def _receive_adapter(self, routes: list, payload: SyncPayload | list | None) -> dict[str, Any]:
        if self.adapter is None:
            raise RuntimeError(
                "rollout: an adapter push reached an engine built without LoRA (lora_rank=0); the "
                "engines and the weight sync disagree on trainer.lora.sync"
            )
        return self.adapter.receive(self.llm, routes, payload)

    def active_adapter(self) -> dict[str, Any] | None:
        """The LoRA adapter every call uses now (name, id, directory), None for the base model."""
        return self.adapter.describe() if self.adapter is not None else None

    def device_uuids(self) -> list[str | None]:
        """The CUDA device UUID of each tensor-parallel worker (None on CPU), for sync routing."""
        return list(self.llm.collective_rpc("rlhf_device_uuid"))

    def sleep(self, level: int = 1) -> bool:
        """Release weights (level 1: offload to host, level 2: discard) and the KV cache.

        Only for colocated GPU engines (built with `enable_sleep_mode`). On CPU it is a no-op that
        returns False: vLLM's sleep mode relies on the CUDA memory allocator, and CPU engines keep
        their small fixed KV cache in host RAM anyway.
        """
        if not self.colocated:
            return False
        self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        return True

    def wake(self, tags: list[str] | None = None) -> bool:
        """Reallocate released memory (all of it by default); no-op returning False when not asleep."""
        if not self.colocated or not self._asleep:
            return False
        wanted = set(tags) if tags else set(self._asleep)
        self.llm.wake_up(tags=sorted(wanted & self._asleep))
        self._asleep -= wanted
        return True

    def shutdown(self) -> None:
        if getattr(self, "adapter", None) is not None:
            self.adapter.close()
        if getattr(self, "monitor", None) is not None:
            self.monitor.stop()
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None


def _start_monitor(llm: Any, engine_index: int):
    """The engine's Ray metrics poller (rlhf.production.monitoring), only inside a Ray actor."""
    import ray

    if not ray.is_initialized():
        return None
    from rlhf.rollout.engine_stats import read_engine_stats

    from rlhf.production.monitoring import EngineMonitor

    return EngineMonitor(lambda: read_engine_stats(llm), engine_index).start()


def _token_logprobs(per_position: Any, token_ids: list[int], start: int) -> list[float]:
    """Logprob of token_ids[i] at position start+i from vLLM's per-position {token_id: Logprob}.

    Works for both vLLM containers (list of dicts, and the newer FlatLogprobs sequence).
    """
    if per_position is None:
        raise RuntimeError("vLLM returned no logprobs; was logprobs/prompt_logprobs set?")
    flat_starts = getattr(per_position, "start_indices", None)
    if flat_starts is not None:  # FlatLogprobs: the sampled (or given) token comes first at each position
        ids, values = per_position.token_ids, per_position.logprobs
        first = [flat_starts[start + i] for i in range(len(token_ids))]
        if all(ids[j] == token for j, token in zip(first, token_ids)):
            return [float(values[j]) for j in first]
    out = []
    for i, token in enumerate(token_ids):
        entry = per_position[start + i]
        value = entry[token]
        out.append(float(getattr(value, "logprob", value)))
    return out
