#!/bin/bash
#SBATCH --job-name=longact-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# The whole pipeline (SFT -> RL -> export) on the tiny CPU configs with gloo: a CI check of the
# job machinery on a CPU-only Slurm cluster, or without Slurm:
#   OUTPUT_DIR=/tmp/longact_cpu bash launch/slurm/longact_cpu.sh
# GPUS_PER_NODE is the number of processes per node here (default 2).
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

LONGACT_DEVICE=${LONGACT_DEVICE:-cpu}
LONGACT_RUN_NAME=longact_cpu
PLAN_MODEL=tiny
SFT_TP=1 SFT_PP=1 SFT_CP=1
RL_TP=1 RL_PP=1 RL_CP=1

longact_main
