#!/bin/bash
#SBATCH --job-name=longact-8b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# LongAct on Qwen3-8B-Base: cold-start SFT -> DAPO + LongAct -> Hugging Face export, one job.
#
#   MODEL_PATH=/models/Qwen3-8B-Base DATA_DIR=/data/longact OUTPUT_DIR=/ckpt/longact_8b \
#     sbatch --account=ACCOUNT --partition=PARTITION launch/slurm/longact_8b.sh
#
# Submit from the repository root. --nodes, --time and a longer stop lead time
# (--signal=B:USR1@600 for slow checkpoints) can be given to sbatch; environment variables
# are listed in common.sh. CPU smoke run without Slurm:
#   LONGACT_DEVICE=cpu bash launch/slurm/longact_8b.sh
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

LONGACT_RUN_NAME=longact_8b
PLAN_MODEL=qwen3-8b
# Layouts chosen in docs/planner.md from the planner's per-GPU estimates (8 nodes x 8 x 80 GiB).
#   SFT 16K: TP 2 x CP 2 x DP 16, no recompute: 58.6 GiB
#   RL  32K: TP 4 x CP 2 x DP 8, no recompute: 64.2 GiB incl. a 9.0 GiB rollout KV cache
#   (TP 2 x CP 4 comes to 75.7 GiB once the RL logits peak is counted: under 10% headroom)
# TP x CP = 8 keeps all TP and CP traffic on a node's NVLink; only DP crosses nodes.
SFT_TP=${SFT_TP:-2} SFT_PP=${SFT_PP:-1} SFT_CP=${SFT_CP:-2}
RL_TP=${RL_TP:-4} RL_PP=${RL_PP:-1} RL_CP=${RL_CP:-2}
# parallel.collective_timeout_s: the longest wait for the slowest rank (DP ranks' rollout
# skew, a checkpoint write) before a stalled or dead rank fails the job.
LONGACT_COLLECTIVE_TIMEOUT_S=${LONGACT_COLLECTIVE_TIMEOUT_S:-900}

longact_main
