#!/usr/bin/env bash
# A single-node SLURM on this machine, for `make test-slurm`: Debian's slurmctld,
# slurmd and munge (SLURM 22.05 on Debian 12), one node with this machine's CPUs
# and memory, one partition `debug`, no accounting.
#   scripts/slurm.sh up     install (once), write the config, start munge and the daemons,
#                           wait until the node is idle
#   scripts/slurm.sh down   stop the daemons this script started (the packages stay)
#   scripts/slurm.sh env    print `export SLURM_CONF=...` for the test cluster
#   scripts/slurm.sh test CMD...
#                           up, CMD with SLURM_CONF set, down (also on failure), then
#                           check that nothing outside $ROOT was touched: a stand-in
#                           process named slurmd is still alive, /etc/slurm/slurm.conf is
#                           byte-identical, and no slurm-*.out appeared in this folder
# Everything lives under $ROOT (config, munge key and socket, state, logs, pid files);
# clients reach the test cluster through SLURM_CONF=$ROOT/slurm.conf, whose AuthInfo
# names the private munge socket. Nothing under /etc is written, ports are not the
# defaults, and `down` kills only pids from its own pid files (a real SLURM or munge
# on this machine is left alone). If a SLURM already answers, `up` refuses unless
# SLURM_TEST_USE_EXISTING=1 (then it uses that one and `down` touches nothing).
# Root is required: it installs packages and starts daemons as root.
set -euo pipefail
ROOT=${FASTMIX_SLURM_ROOT:-/tmp/fastmix-slurm}
CONF=$ROOT/slurm.conf
MUNGE_SOCKET=$ROOT/munge/munge.socket
CTLD_PORT=16817
D_PORT=16818
USED_EXISTING=$ROOT/using-existing  # marker: `down` must not stop anything

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: scripts/slurm.sh needs root (it installs SLURM and starts its daemons); run make test-slurm as root" >&2
    exit 2
  fi
}

# a SLURM other than ours answers with the default config, or our ports are taken
existing_slurm() {
  if command -v sinfo >/dev/null && env -u SLURM_CONF timeout 10 sinfo -h >/dev/null 2>&1; then
    echo "sinfo answers with the default config"; return 0
  fi
  if command -v ss >/dev/null && ss -ltnH "( sport = :$CTLD_PORT or sport = :$D_PORT )" 2>/dev/null | grep -q .; then
    echo "port $CTLD_PORT or $D_PORT is in use"; return 0
  fi
  return 1
}

install_packages() {
  # Debian's postinst scripts would start the system munge/slurm services: forbid that
  # for the install (policy-rc.d exit 101 = "do not start"), then put things back.
  local policy=/usr/sbin/policy-rc.d had=0
  [ -e "$policy" ] && { had=1; cp -p "$policy" "$ROOT/policy-rc.d.saved"; }
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"
  local rc=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; } || rc=$?
  if [ "$had" = 1 ]; then mv "$ROOT/policy-rc.d.saved" "$policy"; else rm -f "$policy"; fi
  if [ "$rc" != 0 ]; then echo "error: apt-get install of slurmctld slurmd slurm-client munge failed (rc $rc); install them by hand" >&2; exit 1; fi
}

# start PROGRAM ARGS..., record nothing: the daemons write their own pid files
up() {
  need_root
  mkdir -p "$ROOT"
  down quiet  # ours, left by a run that was killed: not "a SLURM already runs here"
  if [ -z "${SLURM_TEST_USE_EXISTING:-}" ] || [ "$SLURM_TEST_USE_EXISTING" = 0 ]; then
    rm -f "$USED_EXISTING"
    if why=$(existing_slurm); then
      echo "error: a SLURM already runs here ($why); stop it, or set SLURM_TEST_USE_EXISTING=1 to test against it" >&2
      exit 1
    fi
  else
    touch "$USED_EXISTING"
    echo "slurm: using the existing SLURM (SLURM_TEST_USE_EXISTING=1); down will not stop it"
    return 0
  fi
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    install_packages
  fi
  mkdir -p "$ROOT"/{ctld,d,log,munge}
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > "$CONF" <<CONF
ClusterName=fastmix
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$ROOT/ctld
SlurmdSpoolDir=$ROOT/d
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
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
  if [ ! -s "$ROOT/munge/munge.key" ]; then
    dd if=/dev/urandom bs=1 count=1024 of="$ROOT/munge/munge.key" 2>/dev/null
  fi
  chmod 700 "$ROOT/munge"; chmod 400 "$ROOT/munge/munge.key"
  # munged as root (--force: it accepts root-owned files under /tmp)
  munged --force --socket="$MUNGE_SOCKET" --key-file="$ROOT/munge/munge.key" \
    --pid-file="$ROOT/munged.pid" --log-file="$ROOT/log/munged.log" --seed-file="$ROOT/munge/munge.seed"
  # from $ROOT: whatever a daemon writes to its working folder stays in the test's folder
  (cd "$ROOT" && SLURM_CONF=$CONF slurmctld -f "$CONF" && SLURM_CONF=$CONF slurmd -f "$CONF")
  for _ in $(seq 60); do
    if SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "slurm: node $host idle ($cpus CPUs, ${mem} MB), partition debug; SLURM_CONF=$CONF"
      return 0
    fi
    sleep 1
  done
  echo "error: the SLURM node did not come up in 60 s; see $ROOT/log/slurmctld.log and slurmd.log" >&2
  SLURM_CONF=$CONF sinfo >&2 || true
  exit 1
}

# the pid in FILE if that process is still PROGRAM (a stale pid may have been reused)
own_pid() {
  local file=$1 prog=$2 pid
  [ -s "$file" ] || return 1
  pid=$(tr -dc 0-9 < "$file")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$prog" ] && echo "$pid"
}

stop() {  # stop FILE PROGRAM: TERM, wait up to 10 s, then KILL
  local pid
  pid=$(own_pid "$1" "$2") || { rm -f "$1"; return 0; }
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 20); do [ -d "/proc/$pid" ] || break; sleep 0.5; done
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

down() {
  if [ -e "$USED_EXISTING" ]; then
    rm -f "$USED_EXISTING"
    [ "${1:-}" = quiet ] || echo "slurm: the existing SLURM was used; nothing stopped"
    return 0
  fi
  stop "$ROOT/slurmd.pid" slurmd
  stop "$ROOT/slurmctld.pid" slurmctld
  stop "$ROOT/munged.pid" munged
  rm -rf "$ROOT/ctld" "$ROOT/d"
  [ "${1:-}" = quiet ] || echo "slurm: stopped"
}

env_line() {
  if [ -e "$USED_EXISTING" ]; then echo "# the existing SLURM: its own config"; else echo "export SLURM_CONF=$CONF"; fi
}

# `test CMD...`: the isolation check of issue 22 around a run of CMD on the test cluster
run_test() {
  need_root
  local guard=$ROOT/guard site=/etc/slurm/slurm.conf planted=0 rc=0 before after strays
  mkdir -p "$guard"
  # a stand-in for a site's slurmd: any long-running process with that name
  cp "$(command -v sleep)" "$guard/slurmd"
  "$guard/slurmd" 100000 </dev/null >/dev/null 2>&1 & FAKE=$!
  trap 'kill "$FAKE" 2>/dev/null || true' EXIT  # also when a step below stops the script
  # a site's config; where there is none, a sentinel one (removed at the end if still ours)
  if [ ! -e "$site" ]; then
    mkdir -p /etc/slurm
    printf '# fastmix make test-slurm: a stand-in for a site config; must survive byte-identical\n' > "$site"
    planted=1
  fi
  before=$(sha256sum "$site" | cut -d' ' -f1)
  strays=$(find . -maxdepth 1 -name 'slurm-*.out' | wc -l)
  if (up); then
    if [ -e "$USED_EXISTING" ]; then "$@" || rc=$?; else SLURM_CONF=$CONF "$@" || rc=$?; fi
  else
    rc=1
  fi
  down
  after=$(sha256sum "$site" | cut -d' ' -f1)
  if [ "$(cat "/proc/$FAKE/comm" 2>/dev/null)" != slurmd ]; then
    echo "error: the stand-in slurmd (pid $FAKE) was killed: the test cluster touched a process it did not start" >&2; rc=1
  else
    kill "$FAKE" 2>/dev/null || true
  fi
  if [ "$before" != "$after" ]; then
    echo "error: $site changed during the test: the test cluster must not write outside $ROOT" >&2; rc=1
  fi
  [ "$planted" = 1 ] && [ "$before" = "$after" ] && rm -f "$site"
  if [ "$(find . -maxdepth 1 -name 'slurm-*.out' | wc -l)" != "$strays" ]; then
    echo "error: slurm-*.out files appeared in $(pwd): job output must go to the job's folder" >&2; rc=1
  fi
  [ "$rc" = 0 ] && echo "slurm: isolation checked (stand-in slurmd alive, $site unchanged, no stray output)"
  return "$rc"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) env_line ;;
  test) shift; [ $# -gt 0 ] || { echo "usage: scripts/slurm.sh test CMD..." >&2; exit 2; }; run_test "$@" ;;
  *) echo "usage: scripts/slurm.sh up|down|env|test CMD..." >&2; exit 2 ;;
esac
