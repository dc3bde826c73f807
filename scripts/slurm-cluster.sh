#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for testing the sweep scripts against the real thing
# (make slurm-test). Needs root (the daemons run as root) and Debian's slurm-wlm and munge,
# which `start` installs when they are missing.
#
#   scripts/slurm-cluster.sh start|stop|status      (state in $SLURM_TEST_DIR, default /tmp/dialora-slurm)
#
# Partitions: `low` (default; preemptible: PreemptMode=REQUEUE, 20 s grace) and `high` (a
# higher PriorityTier: its jobs preempt `low` jobs). RequeueExit=75 requeues a job that ends
# with the trainer's "interrupted, checkpoint saved" status, as a cluster admin can configure.
# Clients need `export SLURM_CONF=$SLURM_TEST_DIR/slurm.conf` (printed by `start`).
set -euo pipefail
DIR=${SLURM_TEST_DIR:-/tmp/dialora-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

need() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm-cluster: installing slurm-wlm and munge (Debian packages)" >&2
    # a fresh machine may have no package lists yet
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || {
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    }
  fi
  [ "$(id -u)" = 0 ] || { echo "slurm-cluster: the test cluster's daemons need root" >&2; exit 1; }
}

start() {
  need
  mkdir -p "$DIR/state" "$DIR/spool"
  # munge: the key Debian's package made, or a fresh one
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  if ! munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
  fi
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
  cat >"$CONF" <<EOF
ClusterName=dialora-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6917
SlurmdPort=6918
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
RequeueExit=75
KillWait=30
MinJobAge=600
MessageTimeout=20
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
NodeName=dialora NodeHostname=$(hostname) NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=low Nodes=dialora Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=high Nodes=dialora MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  slurmctld -f "$CONF"
  slurmd -f "$CONF" -N dialora
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "slurm-cluster: up ($cpus CPUs, ${mem} MB); export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 1
  done
  echo "slurm-cluster: the node did not come up; logs in $DIR" >&2
  tail -5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
  return 1
}

stop() {
  for p in slurmd slurmctld; do
    if [ -f "$DIR/$p.pid" ]; then kill "$(cat "$DIR/$p.pid")" 2>/dev/null || true; fi
  done
  sleep 1
  pkill -f "slurmd -f $CONF" 2>/dev/null || true
  pkill -f "slurmctld -f $CONF" 2>/dev/null || true
  echo "slurm-cluster: stopped (state kept in $DIR)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo; squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
