#!/bin/bash
#SBATCH --job-name=longact-235b-a22b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# LongAct on Qwen3-235B-A22B: cold-start SFT -> DAPO + LongAct -> Hugging Face export, one job.
#
#   MODEL_PATH=/models/Qwen3-235B-A22B DATA_DIR=/data/longact OUTPUT_DIR=/ckpt/longact_235b_a22b \
#     sbatch --account=ACCOUNT --partition=PARTITION launch/slurm/longact_235b_a22b.sh
#
# Submit from the repository root. --nodes, --time and a longer stop lead time
# (--signal=B:USR1@600 for slow checkpoints) can be given to sbatch; environment variables
# are listed in common.sh. CPU smoke run without Slurm:
#   LONGACT_DEVICE=cpu bash launch/slurm/longact_235b_a22b.sh
set -euo pipefail

# sbatch runs a copy of this file from its spool directory: find the repository from this
# file when run in place, else from the directory sbatch was called in.
if [[ -z ${REPO_DIR:-} ]]; then
	REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
	[[ -f $REPO_DIR/launch/slurm/common.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$PWD}
fi
if [[ ! -f $REPO_DIR/launch/slurm/common.sh ]]; then
	echo "launch/slurm/common.sh not found under $REPO_DIR: submit from the repository root or set REPO_DIR" >&2
	exit 1
fi
# shellcheck source=launch/slurm/common.sh
source "$REPO_DIR/launch/slurm/common.sh"

LONGACT_RUN_NAME=longact_235b_a22b
PLAN_MODEL=qwen3-235b-a22b
# Layout from the planner's per-GPU estimates (estimates, not measured). Qwen3-235B-A22B does
# NOT fit 8 nodes x 8 x 80 GiB with fp32 grads and fp32 Adam: its 227B expert parameters need
# 227B x 12 B / 64 GPUs = 42 GiB of optimizer state per GPU whatever the EP, and the best
# 8-node layout (TP 8 x PP 2 x CP 4 x EP 32) comes to 100 GiB. On 16 nodes:
#   RL 32K: TP 8 x PP 2 x CP 4 x EP 32 x DP 4, full recompute: 67.6 GiB incl. an 11.8 GiB
#   rollout KV cache (94 layers: PP 2 is the only even split; PP > 1 needs rl.engine=vllm).
# SFT uses the same layout.
SFT_TP=${SFT_TP:-8} SFT_PP=${SFT_PP:-2} SFT_CP=${SFT_CP:-4} SFT_RECOMPUTE=${SFT_RECOMPUTE:-full}
RL_TP=${RL_TP:-8} RL_PP=${RL_PP:-2} RL_CP=${RL_CP:-4} RL_RECOMPUTE=${RL_RECOMPUTE:-full}
# Expert parallel (MoE): experts split over EP ranks carved out of DP, whole inside a rank
# (expert-TP 1); the all-to-all token dispatcher. The planner preflight gets the same EP.
RL_EP=${RL_EP:-32}
if [[ ${LONGACT_DEVICE:-gpu} != cpu ]]; then # the CPU smoke run trains a tiny dense preset
	LONGACT_EXTRA_OVERRIDES="${LONGACT_EXTRA_OVERRIDES:-} parallel.expert_model_parallel_size=$RL_EP parallel.expert_tensor_parallel_size=1"
	LONGACT_PLAN_ARGS="${LONGACT_PLAN_ARGS:-} --ep $RL_EP"
fi
LONGACT_COLLECTIVE_TIMEOUT_S=${LONGACT_COLLECTIVE_TIMEOUT_S:-3600}

longact_main
