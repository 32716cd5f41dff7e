#!/usr/bin/env bash
# A single-node SLURM on this machine, for `make test-slurm`: Debian's slurmctld,
# slurmd and munge (SLURM 22.05 on Debian 12), one node with this machine's CPUs
# and memory, one partition `debug`, no accounting.
#   scripts/slurm.sh up     install (once), write the config, start munge and the daemons,
#                           wait until the node is idle
#   scripts/slurm.sh down   stop the daemons (the packages stay)
# Root is required: it installs packages and starts system daemons.
set -euo pipefail
STATE=/tmp/fastmix-slurm
CONF=/etc/slurm/slurm.conf

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: scripts/slurm.sh needs root (it installs SLURM and starts its daemons); run make test-slurm as root" >&2
    exit 2
  fi
}

up() {
  need_root
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
  down quiet
  mkdir -p "$STATE"/{ctld,d} /etc/slurm /var/log/slurm /run/munge /etc/munge
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > "$CONF" <<CONF
ClusterName=fastmix
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SlurmUser=root
SlurmdUser=root
MinJobAge=600
KillWait=5
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  cp "$CONF" "$STATE/slurm.conf"
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- munged --force 2>/dev/null || munged --force
  slurmctld
  slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "slurm: node $host idle ($cpus CPUs, ${mem} MB), partition debug"
      return 0
    fi
    sleep 1
  done
  echo "error: the SLURM node did not come up in 60 s; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
  sinfo >&2 || true
  exit 1
}

down() {
  for d in slurmd slurmctld; do
    pkill -x "$d" 2>/dev/null || true
  done
  for _ in $(seq 20); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
    sleep 0.5
  done
  pkill -x munged 2>/dev/null || true
  rm -rf "$STATE/ctld" "$STATE/d"
  [ "${1:-}" = quiet ] || echo "slurm: stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: scripts/slurm.sh up|down" >&2; exit 2 ;;
esac
