#!/usr/bin/env bash
# Throwaway single-node SLURM cluster (munged + slurmctld + slurmd, Debian's slurm-wlm) for tests/test_slurm.py.
#
#   eval "$(bash .ci/slurm.sh)"        start (installing slurmctld slurmd slurm-client munge if missing) and export
#                                      SLURM_CONF (the cluster's slurm.conf) and STEEL_TEST_SLURM_DIR (its directory)
#   bash .ci/slurm.sh stop [DIR]       cancel its jobs, stop its daemons (by their pid files only), delete DIR
#
# Only `export ...` lines go to stdout; all else to stderr. Must run as root (SlurmUser=root, munge key). One node =
# this host (all its CPUs, memory minus 1 GiB, no GPUs) in partition `debug`; addresses pinned to 127.0.0.1.
# cred_expire=5 and a 2-s scheduling loop let a requeued job start again within ~8 s (SLURM's defaults: 121-180 s).
# Env: STEEL_SLURM_DIR (default /tmp/steel-slurm), STEEL_SLURM_NO_INSTALL=1 (fail instead of apt-get install).
set -euo pipefail
exec 3>&1 1>&2

BASE="${STEEL_SLURM_DIR:-/tmp/steel-slurm}"
ETC=$BASE/etc RUN=$BASE/run LOG=$BASE/log STATE=$BASE/state SPOOL=$BASE/spool
export SLURM_CONF=$ETC/slurm.conf
MUNGE_SOCK=/run/munge/munge.socket.2 # slurm's auth/munge uses this path by default
t0=$(date +%s)
say() { echo "slurm.sh [$(($(date +%s) - t0))s] $*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() { # stop NAME: SIGTERM the pid in RUN/NAME.pid, wait up to 15 s, then SIGKILL
  local pidf=$RUN/$1.pid pid
  if alive "$pidf"; then
    pid=$(cat "$pidf")
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    say "stopped $1 ($pid)"
  fi
  rm -f "$pidf"
}

if [ "${1:-}" = stop ]; then
  BASE="${2:-$BASE}"
  ETC=$BASE/etc RUN=$BASE/run
  export SLURM_CONF=$ETC/slurm.conf
  if alive "$RUN/slurmctld.pid"; then # cancel what is left, so no job process outlives the daemons
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel --full $jobs 2>/dev/null || true
      for _ in $(seq 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  stop_daemon slurmd
  stop_daemon slurmctld
  stop_daemon munged
  [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$ETC/slurm.conf" ] && rm -f /etc/slurm/slurm.conf
  rm -rf "$BASE"
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "slurm.sh: must run as root (SlurmUser=root, munge key ownership)"; exit 1; }
fail() { # a half-started cluster is stopped again: nothing is left running for the caller to clean up
  echo "slurm.sh: $1"
  [ -n "${2:-}" ] && tail -20 "$2"
  stop_daemon slurmd
  stop_daemon slurmctld
  stop_daemon munged
  exit 1
}
mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$SPOOL/d"

# 1. packages (Debian 12: slurm 22.05, munge 0.5.15); a policy-rc.d stops their postinst from starting services
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sinfo >/dev/null \
  || ! command -v munged >/dev/null; then
  if [ "${STEEL_SLURM_NO_INSTALL:-0}" = 1 ] || ! command -v apt-get >/dev/null; then
    echo "slurm.sh: SLURM is not installed (and STEEL_SLURM_NO_INSTALL=1 or no apt-get)"; exit 1
  fi
  say "installing slurmctld slurmd slurm-client munge"
  had_policy=0
  [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  [ $had_policy = 0 ] && { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge >>"$BASE/apt.log" 2>&1; }
  ok=1
  install || { apt-get update -qq >>"$BASE/apt.log" 2>&1 && install; } || ok=0
  [ $had_policy = 0 ] && rm -f /usr/sbin/policy-rc.d
  [ $ok = 1 ] || { tail -20 "$BASE/apt.log"; exit 1; }
fi

# 2. munge: key + daemon (pid/log/seed under $BASE)
mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
  else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
fi
chown root:root /etc/munge /etc/munge/munge.key /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! alive "$RUN/munged.pid"; then
  munged --force --socket="$MUNGE_SOCK" --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" \
    --seed-file="$STATE/munge.seed" --key-file=/etc/munge/munge.key </dev/null 3>&-
fi
for _ in $(seq 50); do munge -n -S "$MUNGE_SOCK" 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1 && break; sleep 0.2; done
munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK" >/dev/null || fail "munge does not work" "$LOG/munged.log"

# 3. slurm.conf
HOST=$(hostname -s)
MEM=$(($(free -m | awk '/^Mem:/{print $2}') - 1024))
[ "$MEM" -lt 512 ] && MEM=512
cat >"$ETC/slurm.conf" <<EOF
ClusterName=steeltest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
MaxArraySize=1001
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
# the Debian client tools read /etc/slurm/slurm.conf unless SLURM_CONF is set: point it at ours
mkdir -p /etc/slurm
if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf; fi

# 4. daemons (restarted, so they read this config)
stop_daemon slurmd
stop_daemon slurmctld
slurmctld -f "$SLURM_CONF" </dev/null 3>&- # daemonises, writes SlurmctldPidFile; 3>&-: the daemon must not hold the pipe of $(...)
for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
scontrol ping | grep -q UP || fail "slurmctld not responding" "$LOG/slurmctld.log"
slurmd -f "$SLURM_CONF" </dev/null 3>&-

# 5. the node idle (resumed if a previous run left it down/drained), then one srun as a smoke test
state=""
for _ in $(seq 120); do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1)
  case "$state" in
    idle | mixed | allocated) break ;;
    down* | drain*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case "$state" in idle | mixed | allocated) ;; *) fail "node $HOST is '$state', not idle" "$LOG/slurmd.log" ;; esac
out=$(timeout 60 srun -n1 -t 1 hostname) || fail "srun failed" "$LOG/slurmd.log"
say "node $HOST $state, $(nproc) CPUs, ${MEM} MB; srun -> $out; $(sinfo -V)"
printf 'export SLURM_CONF=%s\nexport STEEL_TEST_SLURM_DIR=%s\n' "$SLURM_CONF" "$BASE" >&3
