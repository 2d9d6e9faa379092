# shellcheck shell=bash
# Shared logic of the LongAct Slurm jobs. Sourced by longact_{4b,8b,32b,cpu}.sh; not run alone.
#
# One job runs its stages in order; each is skipped when $OUTPUT_DIR/stages/<stage>.done
# exists, so a requeued or resubmitted job continues where the last one stopped:
#   data    (CPU runs without DATA_DIR) synthetic data set   -> $OUTPUT_DIR/data
#   sft     cold-start SFT from the Hugging Face base model  -> $OUTPUT_DIR/sft/checkpoints
#   rl      DAPO + LongAct from the SFT checkpoint          -> $OUTPUT_DIR/rl/checkpoints
#   export  final RL checkpoint -> Hugging Face format      -> $OUTPUT_DIR/hf
# Inside a stage, `longact sft|rl` resumes from the `latest` checkpoint in checkpoint.save_dir.
#
# Environment (all optional unless marked):
#   MODEL_PATH        HF directory of the base model (required on GPU; config.json, safetensors,
#                     tokenizer): SFT starts from its weights. CPU runs without it use the preset
#   DATA_DIR          dataset root holding sft_train.jsonl, sft_val.jsonl, rl_train.jsonl,
#                     rl_val.jsonl (the names `longact data` writes); or set SFT_TRAIN_PATH,
#                     SFT_VAL_PATH, RL_TRAIN_PATH, RL_VAL_PATH one by one. Without either the
#                     configs' paths are used; CPU runs then make the synthetic set
#                     (LONGACT_DATA_ARGS: its `longact data` flags, default the quickstart's)
#   OUTPUT_DIR        checkpoints, TensorBoard logs, stage markers, export ($REPO_DIR/outputs/<run>)
#   SFT_CONFIG, RL_CONFIG   run configs (GPU: examples/longact_{sft,rl}.yaml;
#                     CPU: examples/quickstart_cpu.yaml, examples/quickstart_rl_cpu.yaml)
#   LONGACT_EXTRA_OVERRIDES dotted overrides appended to every stage, space separated
#   LONGACT_PAPER_SETTINGS  1 (default on GPU): pass the paper's hyper-parameters as overrides
#   SFT_TP SFT_PP SFT_CP SFT_RECOMPUTE / RL_TP RL_PP RL_CP RL_RECOMPUTE  parallel layout;
#                     SFT_VPP virtual pipeline stages of SFT (RL runs without them)
#   GPUS_PER_NODE     GPUs per node (GPU, default 8) or processes per node (CPU, default 2)
#   LAUNCHER          torchrun (one srun task per node running torchrun), srun (one task per
#                     GPU), local (torchrun on this host, no Slurm); default torchrun under
#                     Slurm, local otherwise
#   CONTAINER_IMAGE   run every step in this pyxis/enroot image; CONTAINER_MOUNTS overrides the
#                     default mounts (repo, output, data and model directories at the same paths)
#   LONGACT_DEVICE    gpu (default) or cpu: the tiny CPU configs on gloo, no preflight
#   LONGACT_SKIP_PLAN 1 skips the planner preflight; GPU_MEM_GIB is its memory budget (80);
#                     LONGACT_PLAN_ARGS adds planner flags (e.g. "--rollout-batch 8 --rollout-sleep")
#   LONGACT_DETERMINISTIC 1: deterministic NCCL/cuDNN/cuBLAS algorithms (slower)
#   LONGACT_COLLECTIVE_TIMEOUT_S  GPU: parallel.collective_timeout_s of the sft and rl stages,
#                     seconds a stalled or dead rank can hold the job (per-model default; 600)
#   PYTHON            interpreter with megatron_longact installed (python)
# ACCOUNT/PARTITION/nodes/time are sbatch flags: sbatch --account=A --partition=P --nodes=N ...

# Exit status of `longact sft|rl` that stopped on a signal after saving a checkpoint
# (megatron_longact.runtime.signals.STOP_EXIT_CODE; 0 means the stage finished), and of this
# script when a stage was stopped to be resumed and the job could not requeue itself.
readonly LONGACT_EXIT_STOPPED=75
# Seconds torchrun gives the workers to checkpoint after the stop signal before SIGKILL; below
# the 120 s lead time of `#SBATCH --signal=B:USR1@120`.
readonly LONGACT_STOP_GRACE_S=100

LONGACT_STOP_REQUESTED=0
LONGACT_CHILD_PID=""
LONGACT_CMD=()

longact_log() { printf '[longact %(%F %T)T] %s\n' -1 "$*" >&2; }
longact_die() {
	longact_log "error: $*"
	exit 1
}

# Settings: environment variables with defaults. The per-model script sets LONGACT_RUN_NAME,
# PLAN_MODEL and the SFT_/RL_ layout defaults before calling this.
longact_configure() {
	LONGACT_DEVICE=${LONGACT_DEVICE:-gpu}
	case $LONGACT_DEVICE in
	gpu)
		GPUS_PER_NODE=${GPUS_PER_NODE:-8}
		SFT_CONFIG=${SFT_CONFIG:-examples/longact_sft.yaml}
		RL_CONFIG=${RL_CONFIG:-examples/longact_rl.yaml}
		LONGACT_PAPER_SETTINGS=${LONGACT_PAPER_SETTINGS:-1}
		[[ -n ${MODEL_PATH:-} ]] ||
			longact_die "set MODEL_PATH to the Hugging Face directory of the $PLAN_MODEL base model (config.json, weights, tokenizer)"
		;;
	cpu)
		GPUS_PER_NODE=${GPUS_PER_NODE:-2}
		SFT_CONFIG=${SFT_CONFIG:-examples/quickstart_cpu.yaml}
		RL_CONFIG=${RL_CONFIG:-examples/quickstart_rl_cpu.yaml}
		LONGACT_PAPER_SETTINGS=${LONGACT_PAPER_SETTINGS:-0}
		;;
	*) longact_die "LONGACT_DEVICE must be gpu or cpu, got '$LONGACT_DEVICE'" ;;
	esac
	[[ -f $SFT_CONFIG ]] || longact_die "SFT config $SFT_CONFIG not found (relative to $REPO_DIR); set SFT_CONFIG"
	[[ -f $RL_CONFIG ]] || longact_die "RL config $RL_CONFIG not found (relative to $REPO_DIR); set RL_CONFIG"

	NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
	OUTPUT_DIR=${OUTPUT_DIR:-$REPO_DIR/outputs/$LONGACT_RUN_NAME}
	LONGACT_MAKE_DATA=0
	if [[ $LONGACT_DEVICE == cpu && -z ${DATA_DIR:-} ]]; then
		DATA_DIR=$OUTPUT_DIR/data
		LONGACT_MAKE_DATA=1
	fi
	SFT_TRAIN_PATH=${SFT_TRAIN_PATH:-${DATA_DIR:+$DATA_DIR/sft_train.jsonl}}
	SFT_VAL_PATH=${SFT_VAL_PATH:-${DATA_DIR:+$DATA_DIR/sft_val.jsonl}}
	# GPU recipes name their RL sources in rl.datasets (DocQA-RL-1.6K + MemAgent); a DATA_DIR
	# file replaces them only when RL_TRAIN_PATH is set explicitly.
	if [[ $LONGACT_DEVICE == cpu ]]; then
		RL_TRAIN_PATH=${RL_TRAIN_PATH:-${DATA_DIR:+$DATA_DIR/rl_train.jsonl}}
		RL_VAL_PATH=${RL_VAL_PATH:-${DATA_DIR:+$DATA_DIR/rl_val.jsonl}}
	fi
	RL_TRAIN_PATH=${RL_TRAIN_PATH:-}
	RL_VAL_PATH=${RL_VAL_PATH:-}
	PYTHON=${PYTHON:-python}
	LONGACT_CLI_MODULE=${LONGACT_CLI_MODULE:-megatron_longact.cli}
	GPU_MEM_GIB=${GPU_MEM_GIB:-80}
	LONGACT_COLLECTIVE_TIMEOUT_S=${LONGACT_COLLECTIVE_TIMEOUT_S:-600}
	read -r -a LONGACT_EXTRA <<<"${LONGACT_EXTRA_OVERRIDES:-}"
	read -r -a LONGACT_PLAN_EXTRA <<<"${LONGACT_PLAN_ARGS:-}"

	if [[ -n ${SLURM_JOB_ID:-} ]] && command -v srun >/dev/null; then
		LAUNCHER=${LAUNCHER:-torchrun}
		local hosts
		mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
		MASTER_ADDR=${hosts[0]}
		# Distinct per job so that jobs sharing a node do not collide; +0/+1/+2 per stage.
		MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000 * 3))}
	else
		LAUNCHER=${LAUNCHER:-local}
		MASTER_ADDR=127.0.0.1
		MASTER_PORT=${MASTER_PORT:-29500}
	fi
	case $LAUNCHER in
	torchrun | srun)
		[[ -n ${SLURM_JOB_ID:-} ]] || longact_die "LAUNCHER=$LAUNCHER needs a Slurm allocation; use LAUNCHER=local"
		;;
	local)
		((NNODES == 1)) || longact_die "LAUNCHER=local runs on one host but the job has $NNODES nodes"
		;;
	*) longact_die "LAUNCHER must be torchrun, srun or local, got '$LAUNCHER'" ;;
	esac
	export MASTER_ADDR

	LONGACT_SRUN_CONTAINER=()
	if [[ -n ${CONTAINER_IMAGE:-} ]]; then
		local mounts=${CONTAINER_MOUNTS:-}
		if [[ -z $mounts ]]; then
			local dir
			for dir in "$REPO_DIR" "$OUTPUT_DIR" "${DATA_DIR:-}" "${MODEL_PATH:-}"; do
				[[ -n $dir && ,$mounts, != *",$dir:$dir,"* ]] && mounts+=${mounts:+,}$dir:$dir
			done
		fi
		# A named container is imported once per job and reused by every later step.
		LONGACT_SRUN_CONTAINER=(
			--container-image="$CONTAINER_IMAGE"
			--container-mounts="$mounts"
			--container-workdir="$REPO_DIR"
			--container-name="longact-${SLURM_JOB_ID:-local}"
		)
	fi
}

# Communication and runtime settings; each honours a value already set in the environment,
# and srun passes the whole environment on to every task.
longact_export_env() {
	# Megatron overlaps TP/SP communication with the GEMMs only when the GPU runs kernels in
	# the order the host issued them; a single hardware queue per device guarantees that.
	export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
	# Free the buffers of async NCCL collectives when the collective completes instead of
	# tagging them with recordStream, which keeps them alive longer and raises peak memory.
	export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
	# A failed or timed-out collective aborts the process, so a dead rank ends the stage (and
	# the job can be requeued) instead of hanging until the time limit.
	export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
	# InfiniBand between nodes (H800 HGX: one 400G NIC per GPU). NCCL_IB_HCA (e.g. mlx5),
	# NCCL_SOCKET_IFNAME (bootstrap interface) and NCCL_IB_GID_INDEX (RoCE, often 3) depend on
	# the fabric: set them in the environment before sbatch when NCCL's auto-detection fails.
	export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
	# IB retransmission timeout 4.096 us * 2^22 (~17 s): large jobs see transient congestion.
	export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
	export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
	# Transformer Engine attention backends: cuDNN fused attention and flash attention both
	# allowed, TE picks per shape. Context parallel and packed (THD) sequences need one of them.
	# With TP communication overlap (userbuffers), NVTE_FWD/BWD_LAYERNORM_SM_MARGIN reserve SMs
	# for the communication kernels; not set here because the overlap is off by default.
	export NVTE_FUSED_ATTN=${NVTE_FUSED_ATTN:-1}
	export NVTE_FLASH_ATTN=${NVTE_FLASH_ATTN:-1}
	if [[ ${LONGACT_DETERMINISTIC:-0} == 1 ]]; then
		# Bit-identical reruns on the same hardware: no atomics in cuDNN attention backward,
		# a fixed NCCL reduction order, deterministic cuBLAS workspaces.
		export NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 NCCL_ALGO=Ring CUBLAS_WORKSPACE_CONFIG=:4096:8
	fi
	# Rollout and packed-sequence shapes change every step; expandable segments let the caching
	# allocator grow blocks in place instead of fragmenting GPU memory.
	# vLLM (>= 0.32) switches it off around its sleep-mode pool itself (device_allocator/cumem.py).
	export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
	# torchrun pins OMP_NUM_THREADS to 1; give each local process its share of the node's cores
	# for CPU-side tokenization and packing, without oversubscribing.
	local cores=${SLURM_CPUS_ON_NODE:-$(nproc)}
	export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / GPUS_PER_NODE > 0 ? cores / GPUS_PER_NODE : 1))}
	# HF tokenizers' thread pool deadlocks in forked data-loader workers.
	export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
	export PYTHONUNBUFFERED=1
	# Compute nodes read the model from MODEL_PATH, never from the Hub.
	export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
	# torchrun forwards these signals to its workers and waits LONGACT_STOP_GRACE_S before
	# SIGKILL (PET_* feed the flags of recent torchrun; older ones read the TORCHELASTIC_ names).
	export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
	export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
	export PET_SHUTDOWN_TIMEOUT=$LONGACT_STOP_GRACE_S
	export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$LONGACT_STOP_GRACE_S
	export LONGACT_DEVICE
	if [[ $LONGACT_DEVICE == cpu ]]; then
		export CUDA_VISIBLE_DEVICES=""
	fi
}

# Set LONGACT_CMD to run `$PYTHON -m $LONGACT_CLI_MODULE ARGS...` on NODES x PROCS processes.
# Usage: longact_build_launch NODES PROCS_PER_NODE PORT_OFFSET ARGS...
longact_build_launch() {
	local nodes=$1 procs=$2 port=$((MASTER_PORT + $3))
	shift 3
	local module=(-m "$LONGACT_CLI_MODULE" "$@")
	# torchrun's flags, but one-line errors, the workers' exit status passed through (75 for a
	# saved stop) and stop signals forwarded to the workers (megatron_longact/runtime/launch.py).
	local torchrun=(-m megatron_longact.runtime.launch)
	# A single-node step hosts its own rendezvous, whichever node srun picked.
	local addr=$MASTER_ADDR
	((nodes == 1)) && addr=127.0.0.1
	local remote
	case $LAUNCHER in
	local)
		LONGACT_CMD=("$PYTHON" "${torchrun[@]}" --nnodes=1 --nproc-per-node="$procs"
			--master-addr="$addr" --master-port="$port" "${module[@]}")
		;;
	torchrun)
		# SLURM_NODEID is expanded by each task on its own node: static rendezvous, node ranks
		# in allocation order, so global ranks of one node are contiguous (TP stays on NVLink).
		remote="$(printf '%q ' "$PYTHON" "${torchrun[@]}" --nnodes="$nodes" \
			--nproc-per-node="$procs" --master-addr="$addr" --master-port="$port")"
		# shellcheck disable=SC2016  # expanded by the remote shell
		remote+='--node-rank="$SLURM_NODEID" '
		remote+="$(printf '%q ' "${module[@]}")"
		LONGACT_CMD=(srun "${LONGACT_SRUN_CONTAINER[@]}" --nodes="$nodes" --ntasks="$nodes"
			--ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$remote")
		;;
	srun)
		# One task per GPU; the torch.distributed env:// variables come from Slurm's.
		# shellcheck disable=SC2016  # expanded by the remote shell
		remote='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; '
		remote+="export LOCAL_WORLD_SIZE=$procs MASTER_ADDR=$(printf '%q' "$addr") MASTER_PORT=$port; "
		remote+="exec $(printf '%q ' "$PYTHON" "${module[@]}")"
		LONGACT_CMD=(srun "${LONGACT_SRUN_CONTAINER[@]}" --nodes="$nodes"
			--ntasks=$((nodes * procs)) --ntasks-per-node="$procs" --kill-on-bad-exit=1
			bash -c "$remote")
		;;
	esac
}

# Set LONGACT_CMD to run one process: directly, or as a one-task Slurm step.
longact_build_single() {
	if [[ $LAUNCHER == local ]]; then
		LONGACT_CMD=("$@")
	else
		LONGACT_CMD=(srun "${LONGACT_SRUN_CONTAINER[@]}" --nodes=1 --ntasks=1 "$@")
	fi
}

# USR1 arrives LEAD seconds before the time limit (#SBATCH --signal=B:USR1@LEAD). Forward it
# to the running stage: srun passes it to its tasks, torchrun to its workers, and the CLI
# saves a checkpoint and exits. The stage is then not marked done and the job requeues.
longact_on_usr1() {
	LONGACT_STOP_REQUESTED=1
	longact_log "USR1: time limit near, asking the running stage to checkpoint and stop"
	if [[ -n $LONGACT_CHILD_PID ]]; then
		kill -USR1 "$LONGACT_CHILD_PID" 2>/dev/null || true
	fi
}

longact_stop_and_requeue() {
	if [[ -n ${SLURM_JOB_ID:-} ]] && command -v scontrol >/dev/null; then
		longact_log "requeueing job $SLURM_JOB_ID; finished stages will be skipped"
		scontrol requeue "$SLURM_JOB_ID" && exit 0
		longact_log "scontrol requeue failed; resubmit the job to resume"
	else
		longact_log "stopped outside Slurm; run the script again to resume"
	fi
	exit "$LONGACT_EXIT_STOPPED"
}

# Run LONGACT_CMD as stage STAGE unless its marker exists; mark it done on success.
longact_run_stage() {
	local stage=$1 marker="$OUTPUT_DIR/stages/$1.done"
	if [[ -f $marker ]]; then
		longact_log "stage $stage: already done ($marker), skipping"
		return 0
	fi
	((LONGACT_STOP_REQUESTED == 0)) || longact_stop_and_requeue
	longact_log "stage $stage: $(printf '%q ' "${LONGACT_CMD[@]}")"
	"${LONGACT_CMD[@]}" &
	LONGACT_CHILD_PID=$!
	local rc
	while :; do
		rc=0
		wait "$LONGACT_CHILD_PID" || rc=$?
		# wait returns >128 when a trapped signal interrupts it; the stage may still run.
		if ((rc > 128)) && kill -0 "$LONGACT_CHILD_PID" 2>/dev/null; then
			continue
		fi
		break
	done
	LONGACT_CHILD_PID=""
	# 75: the stage saved a checkpoint on a stop signal (our USR1, or Slurm's SIGTERM on
	# preemption); a stop we asked for that ended otherwise still resumes from the last save.
	if ((rc == LONGACT_EXIT_STOPPED)); then
		longact_log "stage $stage: stopped after saving a checkpoint (exit $rc)"
		longact_stop_and_requeue
	fi
	if ((LONGACT_STOP_REQUESTED && rc != 0)); then
		longact_log "stage $stage: stopped (exit $rc) before the time limit"
		longact_stop_and_requeue
	fi
	((rc == 0)) || longact_die "stage $stage failed with exit status $rc"
	printf 'job %s restart %s host %s at %(%F %T)T\n' "${SLURM_JOB_ID:-local}" \
		"${SLURM_RESTART_COUNT:-0}" "$(hostname)" -1 >"$marker"
	longact_log "stage $stage: done"
}

# Check a stage's layout with the planner before any GPU time is spent; abort on a bad one.
# Usage: longact_preflight STAGE --config CONFIG OVERRIDES...  (the stage's own arguments)
longact_preflight() {
	local stage=$1
	shift
	[[ $LONGACT_DEVICE == gpu && ${LONGACT_SKIP_PLAN:-0} != 1 ]] || return 0
	[[ -f $OUTPUT_DIR/stages/$stage.done ]] && return 0
	local model=(--model "$PLAN_MODEL")
	[[ -f $MODEL_PATH/config.json ]] && model=(--hf-config "$MODEL_PATH/config.json")
	longact_log "preflight: planning the $stage layout"
	longact_build_single "$PYTHON" -m megatron_longact.plan.cli \
		--nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE" --gpu-mem-gib "$GPU_MEM_GIB" \
		"${model[@]}" "${LONGACT_PLAN_EXTRA[@]}" "$@"
	"${LONGACT_CMD[@]}" ||
		longact_die "the $stage layout does not work (see above); fix SFT_*/RL_* or the config"
}

# Dotted overrides for a parallel layout: longact_layout_overrides TP PP CP RECOMPUTE
longact_layout_overrides() {
	local sp=false
	(($1 > 1)) && sp=true
	LONGACT_LAYOUT=(parallel.tensor_model_parallel_size="$1" parallel.pipeline_model_parallel_size="$2"
		parallel.context_parallel_size="$3" parallel.sequence_parallel="$sp")
	[[ -n $4 ]] && LONGACT_LAYOUT+=(train.recompute="$4")
	return 0
}

longact_main() {
	cd "$REPO_DIR" || longact_die "cannot enter $REPO_DIR"
	longact_configure
	longact_export_env
	trap longact_on_usr1 USR1
	mkdir -p "$OUTPUT_DIR/stages"

	local sft_dir=$OUTPUT_DIR/sft rl_dir=$OUTPUT_DIR/rl
	local sft_args=(--config "$SFT_CONFIG") rl_args=(--config "$RL_CONFIG")
	local export_args=(--config "$RL_CONFIG" --direction mcore2hf --load "$rl_dir/checkpoints"
		--out "$OUTPUT_DIR/hf")
	if [[ $LONGACT_DEVICE == gpu ]]; then
		longact_layout_overrides "$SFT_TP" "$SFT_PP" "$SFT_CP" "${SFT_RECOMPUTE:-}"
		sft_args+=("${LONGACT_LAYOUT[@]}")
		[[ -n ${SFT_VPP:-} ]] && sft_args+=(parallel.virtual_pipeline_model_parallel_size="$SFT_VPP")
		longact_layout_overrides "$RL_TP" "$RL_PP" "$RL_CP" "${RL_RECOMPUTE:-}"
		rl_args+=("${LONGACT_LAYOUT[@]}" parallel.collective_timeout_s="$LONGACT_COLLECTIVE_TIMEOUT_S")
		sft_args+=(parallel.collective_timeout_s="$LONGACT_COLLECTIVE_TIMEOUT_S")
		# The export runs as one process; the checkpoint format is layout independent.
		export_args+=(parallel.tensor_model_parallel_size=1 parallel.pipeline_model_parallel_size=1
			parallel.context_parallel_size=1 parallel.sequence_parallel=false)
	fi
	if [[ $LONGACT_PAPER_SETTINGS == 1 ]]; then
		# LongAct paper, section 4.1: cold-start SFT, then DAPO with LongAct (lambda = 0.3).
		sft_args+=(optim.lr=2e-5 optim.warmup_ratio=0.03 data.seq_length=16384
			train.train_steps=900)
		rl_args+=(optim.lr=1e-6 rl.max_seq_length=32768 rl.prompts_per_step=8
			rl.rollouts_per_prompt=16 rl.temperature=1.0 rl.max_new_tokens=4096)
		# LongAct's lambda = 0.3 and strategy come from the recipe, so ablations keep theirs.
	fi
	if [[ -n ${MODEL_PATH:-} ]]; then
		# SFT starts from MODEL_PATH's weights (model.init=auto: the HF safetensors, streamed
		# at the stage's TP/PP); RL from SFT's checkpoint; a requeued stage from its save_dir.
		local model=(model.hf_path="$MODEL_PATH" data.tokenizer_path="$MODEL_PATH")
		sft_args+=("${model[@]}")
		rl_args+=("${model[@]}")
		export_args+=("${model[@]}")
		longact_log "weights: SFT from $MODEL_PATH, RL from $sft_dir/checkpoints"
	fi
	[[ -n $SFT_TRAIN_PATH ]] && sft_args+=(data.train_path="$SFT_TRAIN_PATH")
	[[ -n $SFT_VAL_PATH ]] && sft_args+=(data.val_path="$SFT_VAL_PATH")
	[[ -n $RL_TRAIN_PATH ]] && rl_args+=("rl.datasets=[]" data.train_path="$RL_TRAIN_PATH")
	[[ -n $RL_VAL_PATH ]] && rl_args+=(data.val_path="$RL_VAL_PATH")
	sft_args+=(checkpoint.save_dir="$sft_dir/checkpoints"
		logging.tensorboard_dir="$sft_dir/tensorboard")
	# RL starts from the SFT weights; after a requeue the CLI prefers save_dir's `latest`.
	rl_args+=(checkpoint.load_dir="$sft_dir/checkpoints" checkpoint.save_dir="$rl_dir/checkpoints"
		logging.tensorboard_dir="$rl_dir/tensorboard")
	sft_args+=("${LONGACT_EXTRA[@]}")
	rl_args+=("${LONGACT_EXTRA[@]}")
	export_args+=("${LONGACT_EXTRA[@]}")

	longact_log "run $LONGACT_RUN_NAME: job ${SLURM_JOB_ID:-local} restart ${SLURM_RESTART_COUNT:-0}," \
		"$NNODES node(s) x $GPUS_PER_NODE, launcher $LAUNCHER, device $LONGACT_DEVICE, output $OUTPUT_DIR"
	# Both layouts are checked before SFT starts: a bad RL layout must not wait hours for it.
	longact_preflight sft "${sft_args[@]}"
	longact_preflight rl "${rl_args[@]}"

	if ((LONGACT_MAKE_DATA)); then
		local data_args
		# The quickstart's data set (examples/quickstart_cpu.sh): fits its 512-token sequences.
		read -r -a data_args <<<"${LONGACT_DATA_ARGS:---context-tokens 256 --sft-train 1200 --sft-val 40 --rl-train 400 --rl-val 64}"
		longact_build_single "$PYTHON" -m "$LONGACT_CLI_MODULE" data --out-dir "$DATA_DIR" \
			"${data_args[@]}"
		longact_run_stage data
	fi
	longact_build_launch "$NNODES" "$GPUS_PER_NODE" 0 sft "${sft_args[@]}"
	longact_run_stage sft
	longact_build_launch "$NNODES" "$GPUS_PER_NODE" 1 rl "${rl_args[@]}"
	longact_run_stage rl
	longact_build_launch 1 1 2 convert "${export_args[@]}"
	longact_run_stage export
	longact_log "all stages done; Hugging Face model in $OUTPUT_DIR/hf"
}
