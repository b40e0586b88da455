#!/usr/bin/env bash
# Submit a training run to an existing Ray cluster (local or remote) with a runtime environment.
#   RAY_ADDRESS=http://HEAD:8265 bash experiments/launch/ray_job_submit.sh configs/grpo.yaml steps=100
# The working directory (minus .gitignore'd files such as .venv and runs/) is uploaded to the cluster;
# the nodes need the stack installed (pip install -e ".[gpu]" in the image, or add "pip" to the runtime env).
set -euo pipefail
config="${1:?usage: $0 CONFIG [key=value ...]}"; shift
ray job submit \
  --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --working-dir . \
  --runtime-env-json '{"env_vars": {"WANDB_PROJECT": "rlhf", "TOKENIZERS_PARALLELISM": "false"}}' \
  -- python -m rlhf train "$config" "$@"
