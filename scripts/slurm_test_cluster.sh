#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for ipsweep's tests (Debian 12 packages, run as root).
#
#   scripts/slurm_test_cluster.sh start   # installs the packages if missing, starts 5 daemons, prints SLURM_CONF
#   scripts/slurm_test_cluster.sh stop    # cancels leftover jobs, stops the daemons by their PID files
#
# Everything lives under $IPSWEEP_SLURM_DIR (default /tmp/ipsweep-slurm). Accounting (slurmdbd + MariaDB)
# is required: without it sacct fails and submitit never sees a job finish. Throwaway settings only
# (MariaDB with --skip-grant-tables on 127.0.0.1): never use this on a shared machine.
set -euo pipefail

DIR=${IPSWEEP_SLURM_DIR:-/tmp/ipsweep-slurm}
export SLURM_CONF=$DIR/etc/slurm.conf
PACKAGES="slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core"

log() { echo "slurm_test_cluster: $*" >&2; }

wait_for() {  # wait_for <seconds> <description> <command...>
  local limit=$1 what=$2; shift 2
  for _ in $(seq "$((limit * 5))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out waiting for $what; logs in $DIR/log"; tail -n 20 "$DIR"/log/* >&2 || true; return 1
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
    && command -v munged >/dev/null && command -v sbatch >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { log "needs root to install: $PACKAGES"; exit 1; }
  log "installing $PACKAGES"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
}

write_config() {
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.85}' /proc/meminfo)
  mkdir -p "$DIR"/{etc,log,db,spool/ctld,spool/d,run}
  install -d -m 0755 "$DIR/munge"  # munged refuses a socket dir with mode 0700
  [ -f "$DIR/etc/munge.key" ] || { head -c 1024 /dev/urandom > "$DIR/etc/munge.key"; chmod 0600 "$DIR/etc/munge.key"; }
  cat > "$DIR/etc/slurm.conf" <<EOF
ClusterName=ipsweeptest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
KillWait=5
SchedulerParameters=batch_sched_delay=0
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoragePass=$DIR/munge/munge.socket
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3307
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 0600 "$DIR/etc/slurmdbd.conf"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install_packages
  write_config
  running "$DIR/run/munged.pid" || munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/etc/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed" --force
  if ! running "$DIR/run/mariadb.pid"; then
    # An empty datadir is fine: with --skip-grant-tables MariaDB starts, and slurmdbd creates its own database.
    nohup mariadbd --no-defaults --user=root --datadir="$DIR/db" --socket="$DIR/run/mysql.sock" \
      --port=3307 --bind-address=127.0.0.1 --skip-grant-tables --pid-file="$DIR/run/mariadb.pid" \
      --log-error="$DIR/log/mariadb.log" >/dev/null 2>&1 &
    wait_for 30 "MariaDB on 127.0.0.1:3307" bash -c '</dev/tcp/127.0.0.1/3307'
  fi
  running "$DIR/run/slurmdbd.pid" || slurmdbd
  wait_for 30 "slurmdbd on port 6819" bash -c '</dev/tcp/127.0.0.1/6819'
  running "$DIR/run/slurmctld.pid" || slurmctld
  wait_for 30 "slurmctld" scontrol ping
  running "$DIR/run/slurmd.pid" || slurmd -N localhost
  wait_for 60 "node localhost to be idle" bash -c 'sinfo -h -N -o %t | grep -qx idle'
  wait_for 30 "accounting (sacct)" sacct -n -X -S now
  log "up; use: export SLURM_CONF=$SLURM_CONF"
  echo "$SLURM_CONF"
}

stop() {
  if running "$DIR/run/slurmctld.pid"; then scancel --user="$(id -un)" 2>/dev/null || true; fi
  for d in slurmd slurmctld slurmdbd mariadb munged; do
    if running "$DIR/run/$d.pid"; then
      pid=$(cat "$DIR/run/$d.pid"); kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$DIR/run/$d.pid"
  done
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
