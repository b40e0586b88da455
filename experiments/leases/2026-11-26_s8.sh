#!/usr/bin/env bash
# Session 8's GPU lease (2026-11-26): what issue 10 still lacked. Started by one call once the
# wheelhouse is installed (experiments/README.md), from a copy of the repo; later calls only
# `gpu_lease.sh wait` and `collect`. The benchmark needs no SmolLM2 and no peer: the install skips both.
#   GPU 0 (queue one):     raw vLLM (with and without logprobs, alternated) and raw DeepSpeed; then
#                          1 GPU colocated with weights written by the recorded replay
#                          (sync.engine_reload=replay) and by vLLM's loaders (the default)
#   GPUs 2-3 (queue two):  the same pair on 2 GPUs colocated (the 50 ms sync target), then replay into
#                          both shards of a TP = 2 engine. Runs beside queue one: the host's CPUs are
#                          shared, as in session 7; it starts 90 s later, so vLLM compiles once.
#   GPUs 0-3 (queue four): after both, one TP = 2 engine on GPUs 0-1 and two learner ranks on GPUs 2-3,
#                          NCCL broadcast into both shards (item 3 of the issue, never run before).
set -u
L=experiments/gpu_lease.sh
export LEASE=${LEASE:-/root/lease} PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled
nvidia-smi -L
SHARED="--shape qwen2.5-0.5b --n 8 --new-tokens 512 --steps 3 --micro-batch-tokens 16384 --prompts 64"
M="python3 experiments/bench/run_matrix.py --timeout 200 --first-extra 170"
$L start one 0 "$M --out \$LEASE/one/matrix.json --shared '$SHARED' raw='--parts a,b' \
  gpu1_replay='--parts c --sleep --override sync.engine_reload=replay' gpu1='--parts c --sleep'"
$L start two 2,3 "sleep 90; $M --out \$LEASE/two/matrix.json --shared '$SHARED' \
  gpu2_replay='--parts c --sleep --gpus 2 --override sync.engine_reload=replay' gpu2='--parts c --sleep --gpus 2' \
  tp2_replay='--parts c --sleep --gpus 2 --tp 2 --override sync.engine_reload=replay'"
$L start four 0,1,2,3 after=one,two "$M --out \$LEASE/four/matrix.json --shared '$SHARED' \
  disagg_tp2='--parts c --mode disaggregated --gpus 4 --tp 2'"
# Added by hand once these were done (each its own call, nothing else running on the host), as run:
#   gpu_lease.sh start alt 0,1 "python3 experiments/bench/run_matrix.py --timeout 200 --first-extra 60 \
#     --out \$LEASE/alt/matrix.json --shared '$SHARED' gpu2_replay_a='--parts c --sleep --gpus 2 \
#     --override sync.engine_reload=replay' gpu2_direct_b='--parts c --sleep --gpus 2' \
#     gpu2_replay_c='--parts c --sleep --gpus 2 --override sync.engine_reload=replay'"
#   gpu_lease.sh start alt1 0 "python3 experiments/bench/run_matrix.py --timeout 180 --first-extra 30 \
#     --out \$LEASE/alt1/matrix.json --shared '$SHARED' gpu1_direct='--parts c --sleep' \
#     gpu1_replay='--parts c --sleep --override sync.engine_reload=replay'"
# Note: since this lease `sync.engine_reload=auto` is replay on a GPU, so `direct` must now be asked for.
