#!/usr/bin/env bash
# A one-node Slurm cluster with accounting on 127.0.0.1, for the tests marked `slurm`.
#
#   tests/slurm_cluster.sh install   apt packages (Debian 12: slurm-wlm 22.05, munge, MariaDB)
#   tests/slurm_cluster.sh start     write the configs, start munged, MariaDB, slurmdbd, slurmctld, slurmd
#   tests/slurm_cluster.sh stop      stop them (by their pid files)
#   tests/slurm_cluster.sh status    print the daemons and `sinfo`; exit 0 when jobs can run
#
# Runs as root, without systemd: each daemon is started directly. Every command is
# idempotent and every wait is bounded. MariaDB listens on its unix socket only
# (--skip-networking); slurmdbd on 127.0.0.1:6819. NeMo-Run's SlurmExecutor reads job
# states with `sacct`, hence the accounting database.
#
# Cluster `aigc`, partition `debug`, account `aigc` (user root); node = this host,
# CPUs=2, RealMemory = 3/4 of the machine's. Logs: /var/log/slurm/.
set -euo pipefail

CLUSTER=aigc
PARTITION=debug
ACCOUNT=aigc
NODE=$(hostname -s)
DB_PASS=aigc-slurmdbd
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
RUN=/run/slurm
LOG=/var/log/slurm
MYSQL_SOCK=/run/mysqld/mysqld.sock

say() { echo "[slurm_cluster] $*"; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND once a second; fail after SECONDS.
wait_for() {
  local limit=$1 what=$2; shift 2
  for _ in $(seq "$limit"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  say "timed out after ${limit}s waiting for $what"
  return 1
}

# alive PIDFILE: the process named in PIDFILE is running.
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

cmd_install() {
  local tool missing=""
  for tool in slurmctld slurmd sbatch sacct munged slurmdbd mariadbd; do
    command -v "$tool" >/dev/null || missing=1
  done
  if [[ -z $missing ]]; then
    say "packages already installed"
    return 0
  fi
  # Keep apt from starting the daemons (no init system here): policy-rc.d refuses.
  local policy=/usr/sbin/policy-rc.d made_policy=""
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  [[ -n $made_policy ]] && rm -f "$policy"
  say "installed ${PACKAGES[*]}"
}

write_configs() {
  local mem_mb
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 3 / 4)}' /proc/meminfo)
  mkdir -p /etc/slurm "$RUN" "$LOG" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
  chown slurm:slurm "$RUN" "$LOG" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
  getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts
  cat >/etc/slurm/slurm.conf <<EOF
# Written by tests/slurm_cluster.sh: a one-node cluster on loopback.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
ReturnToService=2
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=2 RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  cat >/etc/slurm/slurmdbd.conf <<EOF
# Written by tests/slurm_cluster.sh: accounting in MariaDB over its unix socket.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  chown slurm:slurm /etc/slurm/slurmdbd.conf
  chmod 600 /etc/slurm/slurmdbd.conf
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [[ -s /etc/munge/munge.key ]] || mungekey --create
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- munged
  wait_for 15 munged sh -c 'munge -n | unmunge'
}

start_mariadb() {
  if [[ -S $MYSQL_SOCK ]] && mariadb-admin --socket="$MYSQL_SOCK" ping >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  nohup mariadbd --user=mysql --skip-networking --socket="$MYSQL_SOCK" \
    --pid-file=/run/mysqld/mysqld.pid --log-error=$LOG/mariadb.log >/dev/null 2>&1 &
  wait_for 60 MariaDB mariadb-admin --socket="$MYSQL_SOCK" ping
  mariadb --socket="$MYSQL_SOCK" <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurmdbd() {
  alive $RUN/slurmdbd.pid || slurmdbd
  wait_for 30 slurmdbd sacctmgr -n show cluster
  if [[ -z $(sacctmgr -n -P show cluster "$CLUSTER" format=cluster) ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurm() {
  alive $RUN/slurmctld.pid || slurmctld -i
  wait_for 30 slurmctld scontrol ping
  alive $RUN/slurmd.pid || slurmd -N "$NODE"
  wait_for 30 "node $NODE" sh -c "sinfo -h -n $NODE -o %t | grep -Eq '^(idle|mix|alloc)'" || {
    scontrol update nodename="$NODE" state=resume || true
    wait_for 15 "node $NODE" sh -c "sinfo -h -n $NODE -o %t | grep -Eq '^(idle|mix|alloc)'"
  }
  if [[ -z $(sacctmgr -n -P show account "$ACCOUNT" format=account) ]]; then
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="aigc tests" organization=aigc >/dev/null
  fi
  if [[ -z $(sacctmgr -n -P show assoc user=root account="$ACCOUNT" format=user) ]]; then
    sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
  fi
}

cmd_start() {
  command -v slurmctld >/dev/null || { say "Slurm is not installed: run '$0 install' first"; return 1; }
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurm
  say "up: cluster $CLUSTER, partition $PARTITION, account $ACCOUNT, node $NODE"
}

cmd_stop() {
  local f
  for f in $RUN/slurmd.pid $RUN/slurmctld.pid $RUN/slurmdbd.pid /run/mysqld/mysqld.pid /run/munge/munged.pid; do
    if alive "$f"; then
      local pid; pid=$(cat "$f")
      kill "$pid"
      wait_for 30 "pid $pid to exit" sh -c "! kill -0 $pid"
    fi
  done
  say "stopped"
}

cmd_status() {
  local f ok=0
  for f in /run/munge/munged.pid /run/mysqld/mysqld.pid $RUN/slurmdbd.pid $RUN/slurmctld.pid $RUN/slurmd.pid; do
    if alive "$f"; then say "$(basename "$f" .pid): running (pid $(cat "$f"))"; else say "$(basename "$f" .pid): down"; ok=1; fi
  done
  command -v sinfo >/dev/null && sinfo 2>&1 || ok=1
  sinfo -h -n "$NODE" -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)' || ok=1
  sacct -n -X -S now-1minutes >/dev/null 2>&1 || { say "sacct: accounting unreachable"; ok=1; }
  return $ok
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
