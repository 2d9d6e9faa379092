#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests/slurm (the real sbatch/requeue path of
# launch/slurm/). Installs Debian's slurmctld, slurmd and munge, writes a minimal slurm.conf
# for this host and starts the daemons directly (CI machines and containers have no systemd).
# Idempotent: does nothing when the node already answers as idle. Needs root and apt.
#
#   bash .ci/slurm_setup.sh && python -m pytest tests/slurm -m slow
#
# SLURM_SETUP_WAIT_S bounds the wait for the node to come up (default 120).
set -euo pipefail

readonly SLURM_CONF=/etc/slurm/slurm.conf
readonly MUNGE_KEY=/etc/munge/munge.key
readonly LOG_DIR=/var/log/slurm
# Memory left to the OS and the daemons: Slurm drains a node whose RealMemory exceeds what
# slurmd measures, and `free -m` reports slightly more than slurmd's view.
readonly MEM_MARGIN_MB=1024
WAIT_S=${SLURM_SETUP_WAIT_S:-120}
NODE=$(hostname -s)

log() { printf '[slurm_setup] %s\n' "$*" >&2; }

node_state() { sinfo --noheader --nodes="$NODE" --format=%t 2>/dev/null | head -n1; }

if command -v sinfo >/dev/null && [[ $(node_state) == idle* ]]; then
	log "node $NODE already idle; nothing to do"
	exit 0
fi

if ((EUID != 0)); then
	log "needs root: installs packages, writes /etc/slurm and runs the daemons as root"
	exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
	! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
	log "installing slurmctld, slurmd, slurm-client, munge"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# The split packages, not the slurm-wlm meta package: it adds docs and the REST daemon.
	apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# munge authenticates every Slurm RPC; one key shared by all daemons and clients on the host.
if [[ ! -s $MUNGE_KEY ]]; then
	log "creating $MUNGE_KEY"
	mkdir -p "$(dirname "$MUNGE_KEY")"
	dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
	log "starting munged"
	runuser -u munge -- munged
fi

# Written once: a re-run must not change the configuration under running daemons.
if [[ ! -f $SLURM_CONF ]] || ! grep -q "^NodeName=$NODE " "$SLURM_CONF"; then
	cpus=$(nproc)
	mem_mb=$(free -m | awk '/^Mem:/ {print $2}')
	mem_mb=$((mem_mb - MEM_MARGIN_MB))
	log "writing $SLURM_CONF: node $NODE, $cpus CPUs, $mem_mb MB"
	mkdir -p "$(dirname "$SLURM_CONF")"
	cat >"$SLURM_CONF" <<EOF
# One-node test cluster written by .ci/slurm_setup.sh.
ClusterName=longact-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups: containers rarely delegate them, and the tests need no isolation.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Jobs may requeue themselves (scontrol requeue) after a stop signal.
JobRequeue=1
# No slurmdbd here, so no sacct: finished jobs stay visible to \`scontrol show job\` for an
# hour, and every finished job gets a line in the completion log.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MinJobAge=3600
# A node that restarts comes back in service by itself.
ReturnToService=2
SlurmdTimeout=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
fi
mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"

# Both daemons fork into the background themselves.
if ! scontrol ping 2>/dev/null | grep -q UP; then
	log "starting slurmctld"
	slurmctld
fi
if ! pgrep -x slurmd >/dev/null; then
	log "starting slurmd"
	slurmd
fi

log "waiting up to ${WAIT_S}s for node $NODE to be idle"
deadline=$((SECONDS + WAIT_S))
while [[ $(node_state) != idle* ]]; do
	state=$(node_state)
	# A node left down or drained by an earlier run (e.g. a restarted slurmd) is usable again.
	if [[ $state == down* || $state == drain* ]]; then
		scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
	fi
	if ((SECONDS >= deadline)); then
		log "node $NODE not idle after ${WAIT_S}s (state '${state:-none}'); logs in $LOG_DIR"
		sinfo -N -l >&2 || true
		tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
		exit 1
	fi
	sleep 1
done
sinfo -N >&2
log "ready"
