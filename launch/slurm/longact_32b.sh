#!/bin/bash
#SBATCH --job-name=longact-32b
#SBATCH --nodes=8
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
# LongAct on Qwen3-32B: cold-start SFT -> DAPO + LongAct -> Hugging Face export, one job.
#
#   MODEL_PATH=/models/Qwen3-32B DATA_DIR=/data/longact OUTPUT_DIR=/ckpt/longact_32b \
#     sbatch --account=ACCOUNT --partition=PARTITION launch/slurm/longact_32b.sh
#
# Submit from the repository root. --nodes, --time and a longer stop lead time
# (--signal=B:USR1@600 for slow checkpoints) can be given to sbatch; environment variables
# are listed in common.sh. CPU smoke run without Slurm:
#   LONGACT_DEVICE=cpu bash launch/slurm/longact_32b.sh
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

LONGACT_RUN_NAME=longact_32b
PLAN_MODEL=qwen3-32b
# Layouts chosen in docs/planner.md from the planner's per-GPU estimates (8 nodes x 8 x 80 GiB).
#   SFT 16K: TP 8 x CP 2 x DP 4, no recompute: 55.3 GiB
#   RL  32K: TP 8 x CP 4 x DP 2, full recompute: 52.8 GiB incl. a 16.0 GiB rollout KV cache
#   (73.3 GiB without recompute: under 10% headroom; TP 8 x CP 8 x DP 1 is 61.0 GiB but
#   sends CP traffic over 8 nodes)
# TP 8 fills a node's NVLink; CP spans node pairs / quads; no PP so decoding never pipelines.
SFT_TP=${SFT_TP:-8} SFT_PP=${SFT_PP:-1} SFT_CP=${SFT_CP:-2}
RL_TP=${RL_TP:-8} RL_PP=${RL_PP:-1} RL_CP=${RL_CP:-4} RL_RECOMPUTE=${RL_RECOMPUTE:-full}
# parallel.collective_timeout_s: 32B rollouts decode ~4x slower than 8B, so DP ranks can
# drift further apart; a stalled or dead rank fails the job after this long.
LONGACT_COLLECTIVE_TIMEOUT_S=${LONGACT_COLLECTIVE_TIMEOUT_S:-1800}

longact_main
