"""Methods mixed into every vLLM worker (`LLM(worker_extension_cls=...)`), called via `collective_rpc`.

vLLM adds this class to its worker's bases, so `self` is the worker: `self.model_runner` holds the
model and `self.rank` is the worker's tensor-parallel rank. Names must not clash with the worker's
own methods (vLLM asserts that), hence the `rlhf_` prefix on helpers.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from rlhf.sync.engine_replay import WeightReplay, bucket_layout
from rlhf.sync.engine_side import (
    adapter_directory,
    receive_adapter,
    receive_buckets,
    swap_adapter,
    write_adapter,
)
from rlhf.sync.fp8 import FP8_ONLINE_METHODS
from rlhf.sync.wire import ENGINE_RELOADS, as_spec


def _layerwise_reload_api():
    """Recent vLLM (0.32 here) post-processes weights after loading (e.g. CPU kernel repacking) and strips
    the per-parameter loaders; reloading then has to go through its layerwise-reload hooks.
    Older versions load straight into the parameters. Returns (begin, finish) or None."""
    try:
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
    except ImportError:
        return None
    return initialize_layerwise_reload, finalize_layerwise_reload


def _tied_followers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers whose parameter belongs to an earlier layer too: a tied lm_head shares embed_tokens.weight.

    The checkpoint (and our sync) carries the weight once, under the owner's name, so the layerwise
    reload never "loads" the follower: its parameter is updated through the owner, but whatever it
    derived from the weight after loading (vLLM's CPU backend prepacks the lm_head for its GEMM) is not.
    """
    seen: set[int] = set()
    followers = []
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if any(id(p) in seen for p in params):
            followers.append(module)
        seen.update(id(p) for p in params)
    return followers


def _reprocess(layers: list[torch.nn.Module]) -> None:
    """Redo the post-load processing of layers whose weights changed through another layer."""
    for layer in layers:
        method = getattr(layer, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(layer)


def reload_mode(model: torch.nn.Module, requested: str = "auto", quantized: bool = False) -> str:
    """ "direct": `model.load_weights` writes each tensor straight into the live parameter through its
    own weight loader (no reallocation: what vLLM's own RLHF examples do on GPU). "replay": direct
    for the first push of each bucket layout, whose parameter copies are recorded and replayed as one
    batched copy afterwards (`rlhf.sync.engine_replay`; falls back to direct where the recording does
    not explain the whole load).
    "layerwise": vLLM's layer-wise reload, which rebuilds each layer and redoes its post-load
    processing; needed where loading transformed the weights (the CPU backend repacks its GEMM
    weights and drops the loaders; quantized models). "auto" picks replay on a GPU unless the model
    is quantized (measured: docs/weight_sync.md), else layer-wise (direct where vLLM has no layer-wise
    reload at all). Parameters created without a
    loader (vLLM 0.26's RMSNorm weights on GPU, 49 in Qwen2.5-0.5B) take `default_weight_loader`,
    a plain copy, inside `load_weights`, so they do not call for the layer-wise path."""
    if requested not in ENGINE_RELOADS:
        raise ValueError(f"sync.engine_reload: expected one of {ENGINE_RELOADS}, got {requested!r}")
    if requested != "auto":
        return requested
    params = list(model.parameters())
    if params and params[0].device.type == "cuda" and not quantized:
        return "replay"
    return "direct" if _layerwise_reload_api() is None else "layerwise"


class WeightUpdateExtension:
    def rlhf_model(self) -> torch.nn.Module:
        runner = self.model_runner
        # GPU runners wrap the model (CUDA graphs); get_model() returns the bare nn.Module.
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def receive_weights(self, routes: list, payload: Any = None) -> dict[str, int]:
        """Load one push of weights (every bucket) into this worker's model.

        `routes[self.rank]` is this worker's (channel spec, rank in the channel); vLLM's RPC may
        deliver the specs as dicts and the pairs as lists."""
        spec, rank = routes[int(getattr(self, "rank", 0))]
        spec = as_spec(spec)
        model = self.rlhf_model()
        device = next(model.parameters()).device
        loaded: set[str] = set()

        def load_weights(named_tensors):
            names = model.load_weights(named_tensors)
            if names:
                loaded.update(names)

        quantized = bool(getattr(self.vllm_config.model_config, "quantization", None))
        mode = reload_mode(model, spec.engine_reload, quantized)
        if mode != "layerwise" and self.vllm_config.model_config.quantization in FP8_ONLINE_METHODS:
            mode = self.rlhf_quantized_reload(mode)
        reload_api = _layerwise_reload_api() if mode == "layerwise" else None
        tied = _tied_followers(model) if reload_api else []
        load_bucket = None
        if mode == "replay":
            replay = self.rlhf_replay()
            replayed_before = replay.replayed

            def load_bucket(packed, tensors):
                layout = bucket_layout(packed.metas)
                if replay.load(layout, packed.buffer, tensors, load_weights):  # else load_weights reported
                    loaded.update(replay.params_written(layout))

        with self.rlhf_config_context(), torch.no_grad():
            if reload_api:
                reload_api[0](model)
            stats = receive_buckets(
                spec, payload, load_weights, device=device, rank=int(rank), load_bucket=load_bucket
            )
            if reload_api:
                reload_api[1](model, self.vllm_config.model_config)
                _reprocess(tied)
        stats["reload_direct"] = int(reload_api is None)
        if mode == "replay":
            stats["buckets_replayed"] = replay.replayed - replayed_before
        stats["params_without_loader"] = sum(1 for p in model.parameters() if not hasattr(p, "weight_loader"))
        stats["params_loaded"] = len(loaded)
        stats["params_total"] = sum(1 for _ in model.named_parameters())
        return stats

    def receive_adapter(
        self,
        routes: list,
        payload: Any = None,
        directory: str | None = None,
        lora_id: int | None = None,
    ) -> dict:
        """Receive one LoRA adapter push (`spec.adapter` set): the base weights stay as they are.

        With `lora_id` (an adapter the engine already serves) every worker swaps the pushed tensors
        into its LoRA layers in place (`rlhf.sync.engine_side.swap_adapter`: no file, no new adapter
        id); a worker whose swap fails writes the push to a fresh directory of its own instead (each
        worker holds the whole adapter) and returns it with the error, for the engine to register.
        Without it, tensor-parallel worker 0 writes the adapter to `directory` (PEFT format), from
        which the engine then registers it as a new vLLM LoRA adapter (each worker loads its own
        shard of it): the directory must be visible to every worker of the engine (one node)."""
        worker = int(getattr(self, "rank", 0))
        spec, rank = routes[worker]
        spec = as_spec(spec)
        device = next(self.rlhf_model().parameters()).device
        if lora_id is None:
            stats, _ = receive_adapter(
                spec, payload, directory if worker == 0 else None, device=device, rank=int(rank)
            )
            return stats
        stats, tensors = receive_adapter(spec, payload, None, device=device, rank=int(rank), keep=True)
        start = time.perf_counter()
        try:
            swap_adapter(self, int(lora_id), tensors, spec.adapter)
        except Exception as exc:  # an engine whose LoRA internals differ: fall back to the file path
            stats["in_place_error"] = f"{type(exc).__name__}: {exc}"
            write_start = time.perf_counter()
            stats["fallback_directory"] = adapter_directory()
            stats["adapter_bytes"] = write_adapter(stats["fallback_directory"], tensors, spec.adapter)
            stats["write_s"] = time.perf_counter() - write_start
            return stats
        stats["swap_s"] = time.perf_counter() - start
        stats["load_s"] += stats["swap_s"]
        return stats

    def rlhf_quantized_reload(self, requested: str) -> str:
        """A quantized engine (FP8) must re-quantize what it receives: only vLLM's layer-wise reload
        reruns each layer's quantization (and copies the result into the live FP8 tensors). `direct`
        would write bf16 tensors through loaders the quantized layers no longer have, and `replay`
        records those writes; both are replaced, with one line."""
        if _layerwise_reload_api() is None:
            raise RuntimeError(
                "sync: a quantized engine needs vLLM's layer-wise reload "
                "(vllm.model_executor.model_loader.reload), which this vLLM lacks"
            )
        if not getattr(self, "_rlhf_quantized_warned", False):
            import logging

            logging.getLogger(__name__).warning(
                "sync.engine_reload=%s: the engine is quantized, so pushes go through vLLM's layer-wise "
                "reload (which re-quantizes each layer) instead",
                requested,
            )
            self._rlhf_quantized_warned = True
        return "layerwise"

    def rlhf_replay(self) -> WeightReplay:
        """This worker's recorded bucket loads (`sync.engine_reload=replay`), kept across pushes."""
        if getattr(self, "_rlhf_weight_replay", None) is None:
            self._rlhf_weight_replay = WeightReplay(self.rlhf_model())
        return self._rlhf_weight_replay

    def rlhf_device_uuid(self) -> str | None:
        """This worker's GPU (CUDA device UUID), None on CPU: the sync planner matches it to learners."""
        device = next(self.rlhf_model().parameters()).device
        return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None

    def rlhf_config_context(self):
        try:
            from vllm.config import set_current_vllm_config
        except ImportError:
            return contextlib.nullcontext()
        return set_current_vllm_config(self.vllm_config)

    def rlhf_weight_checksum(self) -> float:
        """Sum of all parameters in float64: a cheap cross-process "did the weights change" probe."""
        model = self.rlhf_model()
        return float(sum(p.detach().double().sum() for p in model.parameters()))
