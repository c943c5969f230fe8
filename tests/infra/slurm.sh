#!/usr/bin/env bash
# Bring up (or stop) a real single-node Slurm with accounting on a Debian machine, as root.
# Usage: tests/infra/slurm.sh up|down|status
# Facts this relies on are in shared/notes/local-slurm.md: no systemd, so each daemon is started
# by hand in dependency order (munge, MariaDB, slurmdbd, slurmctld, slurmd) and waited for.
# Like PACE it enforces accounting (AccountingStorageEnforce=associations,limits,qos, EnforcePartLimits=ALL):
# a job naming an unknown account or QOS, or over a partition's memory or GPU limit, is refused at sbatch.
# The account `fathompipe` with QOS `fathompipe` (MaxTRESPerJob gpu=1) and `fathompipe-3jobs`
# (MaxSubmitJobsPerUser=3) is there for tests to name; root keeps
# its default account `root`, so a job that names no account still runs. `up` is idempotent: on a cluster
# that is already up it changes only what differs and applies it with `scontrol reconfigure` (a slurmctld
# restart, which keeps queued and running jobs, only if reconfigure cannot apply it).
set -euo pipefail

NODE=$(hostname -s)
CONF=/etc/slurm
DB_PASS=fathompipe-slurm
CPUS=${FATHOMPIPE_SLURM_CPUS:-8}
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))

log() { echo "[slurm.sh] $*" >&2; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "timed out after ${limit}s waiting for $what"; return 1
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null \
     && command -v munged >/dev/null; then return; fi
  log "installing munge, slurm and mariadb from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    munge slurmctld slurmd slurm-client mariadb-server slurmdbd >/dev/null
}

GPU_MAX_MEM_MB=$(( MEM_MB * 9 / 10 ))
CPU_MAX_MEM_MB=$(( MEM_MB * 3 / 4 ))

write_config() {
  install -d -m0755 $CONF /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
  cat > $CONF/slurm.conf.new <<CONF
ClusterName=localcluster
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MailProg=/bin/true
MpiDefault=none
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageEnforce=associations,limits,qos
AccountingStorageTRES=gres/gpu
EnforcePartLimits=ALL
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
DefMemPerCPU=512
ReturnToService=2
MinJobAge=300
KillWait=5
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE MaxMemPerNode=$CPU_MAX_MEM_MB State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE MaxMemPerNode=$GPU_MAX_MEM_MB State=UP
CONF
  if cmp -s $CONF/slurm.conf.new $CONF/slurm.conf && pgrep -x slurmctld >/dev/null && enforcing; then rm $CONF/slurm.conf.new; CHANGED=0
  else mv $CONF/slurm.conf.new $CONF/slurm.conf; CHANGED=1; fi
  cat > $CONF/gres.conf <<CONF
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
CONF
  cat > $CONF/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
CONF
  chown root:root $CONF/slurmdbd.conf
  chmod 600 $CONF/slurmdbd.conf
}

setup_accounts() {  # idempotent: sacctmgr answers "Nothing new added" for what exists
  sacctmgr -i add qos fathompipe >/dev/null 2>&1 || true
  sacctmgr -i modify qos fathompipe set MaxTRESPerJob=gres/gpu=1 >/dev/null
  # a QOS that admits 3 queued jobs per user: sbatch --test-only passes, the 4th real sbatch is refused
  sacctmgr -i add qos fathompipe-3jobs >/dev/null 2>&1 || true
  sacctmgr -i modify qos fathompipe-3jobs set MaxSubmitJobsPerUser=3 >/dev/null
  sacctmgr -i add account fathompipe Description=fathompipe-tests Organization=fathompipe >/dev/null 2>&1 || true
  sacctmgr -i add user root Account=root DefaultAccount=root >/dev/null 2>&1 || true
  sacctmgr -i add user root Account=fathompipe >/dev/null 2>&1 || true
  sacctmgr -i modify user root where account=fathompipe set QOS=normal,fathompipe,fathompipe-3jobs DefaultQOS=normal >/dev/null
}

enforcing() {
  scontrol show config | grep -E '^AccountingStorageEnforce' | grep -q qos \
    && scontrol show config | grep -E '^AccountingStorageTRES' | grep -q gres/gpu
}

node_idle() { sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'; }

up() {
  install_packages
  write_config
  if ! pgrep -x munged >/dev/null; then
    install -d -o munge -g munge -m0755 /run/munge
    su -s /bin/sh munge -c '/usr/sbin/munged --force'
  fi
  if ! pgrep -x mariadbd >/dev/null; then
    install -d -o mysql -g mysql /run/mysqld
    setsid mariadbd --user=mysql </dev/null >/var/log/slurm/mariadb.log 2>&1 &
    wait_for 60 "MariaDB" mariadb-admin ping
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  if ! pgrep -x slurmdbd >/dev/null; then slurmdbd; fi
  wait_for 60 "slurmdbd" sacctmgr -n list cluster
  sacctmgr -i add cluster localcluster >/dev/null 2>&1 || true
  if ! pgrep -x slurmctld >/dev/null; then slurmctld
  elif [ "$CHANGED" = 1 ]; then
    scontrol reconfigure
    if ! enforcing; then  # some settings need a restart; slurmctld keeps its jobs in StateSaveLocation
      log "restarting slurmctld to apply the new slurm.conf"
      pkill -x slurmctld; wait_for 30 "slurmctld to stop" bash -c "! pgrep -x slurmctld"; slurmctld
    fi
  fi
  wait_for 60 "slurmctld" bash -c "scontrol ping | grep -q UP"
  enforcing || { log "accounting enforcement is not on"; return 1; }
  setup_accounts
  if ! pgrep -x slurmd >/dev/null; then slurmd; fi
  wait_for 30 "slurmd to register" bash -c "sinfo -h -N | grep -q ."
  if ! node_idle; then scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true; fi
  wait_for 60 "node $NODE to be idle" node_idle
  log "up: $(sinfo -h -o '%P %a %D %t' | tr '\n' ' ')"
}

down() {
  for d in slurmd slurmctld slurmdbd mariadbd munged; do pkill -x $d 2>/dev/null || true; done
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo && sacct -n -X -S now-1hour | tail -5 ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
