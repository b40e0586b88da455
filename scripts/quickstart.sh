#!/usr/bin/env bash
# The quickstart: set up the CPU environment, show the placement plan, then train
# SmolLM2-135M-Instruct with GRPO on the built-in arithmetic task (about 9 minutes on 2 cores once set up;
# the first setup adds about 2.5).
#   bash scripts/quickstart.sh [key=value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
.venv/bin/rlhf plan configs/quickstart.yaml "$@"
.venv/bin/rlhf train configs/quickstart.yaml "$@"
