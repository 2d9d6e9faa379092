#!/bin/bash
#SBATCH --job-name=longact-70b
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
# LongAct on Llama-3.1-70B: cold-start SFT -> DAPO + LongAct -> Hugging Face export, one job.
#
#   MODEL_PATH=/models/Llama-3.1-70B DATA_DIR=/data/longact OUTPUT_DIR=/ckpt/longact_70b \
#     sbatch --account=ACCOUNT --partition=PARTITION launch/slurm/longact_70b.sh
#
# Submit from the repository root. --nodes, --time and a longer stop lead time
# (--signal=B:USR1@600 for slow checkpoints) can be given to sbatch; environment variables
# are listed in common.sh. CPU smoke run without Slurm:
#   LONGACT_DEVICE=cpu bash launch/slurm/longact_70b.sh
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

LONGACT_RUN_NAME=longact_70b
PLAN_MODEL=llama3.1-70b
# Layout from the planner's per-GPU estimates (8 nodes x 8 x 80 GiB; estimates, not measured):
#   RL 32K: TP 8 x PP 2 x CP 4 x DP 2, full recompute: 71.8 GiB incl. a 20.0 GiB rollout KV
#   cache (10% headroom). PP > 1: generation needs rl.engine=vllm (the native engine does not
#   pipeline). RL runs plain 1F1B: virtual pipeline stages are wired for SFT only.
#   SFT 16K: the same TP 8 x PP 2 x CP 4 x DP 1 with 5 virtual stages per PP rank (interleaved
#   1F1B, 8 layers a chunk): the bubble (PP-1)/(VPP x m) falls from 3.1% to 0.6% of a step's
#   32 micro-batches for 42.2 GiB (+0.25 GiB of in-flight activations over VPP 1).
SFT_TP=${SFT_TP:-8} SFT_PP=${SFT_PP:-2} SFT_CP=${SFT_CP:-4} SFT_RECOMPUTE=${SFT_RECOMPUTE:-full}
SFT_VPP=${SFT_VPP:-5}
RL_TP=${RL_TP:-8} RL_PP=${RL_PP:-2} RL_CP=${RL_CP:-4} RL_RECOMPUTE=${RL_RECOMPUTE:-full}
LONGACT_COLLECTIVE_TIMEOUT_S=${LONGACT_COLLECTIVE_TIMEOUT_S:-2400}

longact_main
