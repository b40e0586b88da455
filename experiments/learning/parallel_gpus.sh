#!/usr/bin/env bash
# The TRL comparison split over two GPUs of one host: ours on one, TRL on the other, at the same
# time, then every policy scored together (compare_trl.py --merge-from). Meant to be started detached
# (setsid ... &) so that later commands on the host can use its other GPUs meanwhile; `WORK/done`
# appears at the end, the logs are WORK/{ours,trl,eval}.log, the results OUT/summary.json.
#   usage: parallel_gpus.sh GPU_OURS GPU_PEER WORK OUT SEED... [-- extra compare_trl.py arguments]
# The model must be built (rlhf.data.models) before, or both sides would build it at once.
set -u
ours_gpu=$1 trl_gpu=$2 work=$3 out=$4
shift 4
seeds=() extra=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do seeds+=("$1"); shift; done
[ $# -gt 0 ] && shift && extra=("$@")
mkdir -p "$work"
C=(python3 experiments/learning/compare_trl.py --device cuda --timeout 420 --seeds "${seeds[@]}" "${extra[@]}")
# Separate Ray temp dirs: two local Ray instances on one host, each seeing its own GPU.
CUDA_VISIBLE_DEVICES=$ours_gpu RAY_TMPDIR=/tmp/ray_ours "${C[@]}" --only ours --no-eval \
    --work "$work/ours" --out "$work/ours_out" >"$work/ours.log" 2>&1 &
CUDA_VISIBLE_DEVICES=$trl_gpu RAY_TMPDIR=/tmp/ray_trl "${C[@]}" --only trl --no-eval \
    --work "$work/trl" --out "$work/trl_out" >"$work/trl.log" 2>&1 &
wait
CUDA_VISIBLE_DEVICES=$ours_gpu RAY_TMPDIR=/tmp/ray_ours "${C[@]}" --eval-only --work "$work/ours" \
    --merge-from "$work/trl" --out "$out" >"$work/eval.log" 2>&1
echo "rc $?" >"$work/done"
