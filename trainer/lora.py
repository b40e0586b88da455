"""LoRA on the policy learner: PEFT adapters on frozen base weights, and the weights that leave it.

The adapters are trained in the module's dtype (bf16 on GPU) so that DeepSpeed treats them as it
treats a full model: fp32 master copies and Adam moments for the adapters only; the base weights
have no gradients and no optimizer state. PEFT wraps the linear layers of the HF model in place, so
the learner's `hf_model` holds `...q_proj.base_layer.weight` beside `...q_proj.lora_A.default.weight`.
Two views leave the learner:

* `merged_tensors`: the HF-named full weights with each adapter merged in (W + scale x B A), for
  engines that load full weights and for the `hf/` checkpoint;
* `adapter_tensors`: the adapters alone, named as PEFT saves them
  (`base_model.model.<module>.lora_A.weight`), for adapter-only weight pushes and `adapter/`.

The reference model of a LoRA run is the same module with its adapters switched off
(`Learner.logprobs(base=True)`).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.config.schema import LoraConfig

ADAPTER = "default"  # PEFT's name of the one adapter we train
PEFT_PREFIX = "base_model.model."
# One entry per tensor that leaves the learner: (name, the parameters it is computed from, how;
# None: the first parameter itself).
Entry = tuple[str, list[nn.Parameter], Callable[..., torch.Tensor] | None]


def lora_alpha(lora: LoraConfig) -> float:
    return float(lora.alpha) if lora.alpha is not None else 2.0 * lora.rank


def add_adapters(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """`model` wrapped by PEFT with trainable adapters on `lora.target_modules`; everything else frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = list(lora.target_modules)
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora_alpha(lora),
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype=False: adapters in the module's dtype (DeepSpeed keeps their fp32 masters).
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def _lora_layer(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def merged_tensors(model: nn.Module) -> Iterator[Entry]:
    """Full HF-named weights of a PEFT-wrapped `model`: each wrapped layer's weight with its adapter
    merged in, every other parameter as it is."""
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        if ".base_layer." not in name:
            yield name, [param], None
            continue
        path, _, leaf = name.partition(".base_layer.")
        hf_name = f"{path}.{leaf}"
        if leaf != "weight":
            yield hf_name, [param], None
            continue
        layer = _lora_layer(model, path)
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        yield hf_name, [param, a, b], _merger(float(layer.scaling[ADAPTER]))


def _merger(scale: float) -> Callable[..., torch.Tensor]:
    def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        delta = (b.detach().float() @ a.detach().float()) * scale
        return (weight.detach().float() + delta).to(weight.dtype)

    return merge


def adapter_tensors(model: nn.Module) -> Iterator[Entry]:
    """The adapters of a PEFT-wrapped `model`, named as PEFT's adapter_model.safetensors names them."""
    for name, param in model.named_parameters():
        if ".lora_" in name:
            yield PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."), [param], None


def adapter_config(peft_model: nn.Module) -> dict[str, Any]:
    """adapter_config.json's content: PEFT's LoraConfig, its target modules as the layer names they
    resolved to (`all-linear` becomes per-layer paths in PEFT; PEFT and vLLM both read short names)."""
    config = _json_safe(peft_model.peft_config[ADAPTER].to_dict())
    targets = config.get("target_modules")
    if isinstance(targets, list):
        config["target_modules"] = sorted({t.rsplit(".", 1)[-1] for t in targets})
    return config


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def write_adapter(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """The adapter in PEFT's format (adapter_config.json, adapter_model.safetensors): what
    `PeftModel.from_pretrained` and vLLM's LoRA loader read."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        directory / "adapter_model.safetensors",
    )
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return directory


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """The full HF model of a PEFT adapter (`adapter_config.json`'s base model + the adapter, merged),
    with the base model's tokenizer files; written once to `out_dir`."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    base_path = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    merged.save_pretrained(tmp, safe_serialization=True)
    for name in Path(base_path).glob("*"):
        if (
            name.is_file()
            and not (tmp / name.name).exists()
            and not name.name.endswith((".safetensors", ".bin"))
        ):
            shutil.copy2(name, tmp / name.name)
    tmp.rename(out_dir)
    return out_dir
