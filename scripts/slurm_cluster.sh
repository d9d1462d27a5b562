#!/usr/bin/env bash
# A real single-node SLURM cluster for videofeat's tests and CI (and for trying the SLURM
# commands on a laptop-sized machine).
#
#   bash scripts/slurm_cluster.sh start    # install Debian packages if absent, start munged,
#                                          # slurmctld and slurmd; idempotent
#   bash scripts/slurm_cluster.sh status   # exit 0 when the node accepts jobs
#   bash scripts/slurm_cluster.sh stop     # cancel jobs, shut the daemons down
#
# State, spool, pid and log files live under $VIDEOFEAT_SLURM_DIR (default /tmp/videofeat-slurm).
# The configuration is written there and installed as /etc/slurm/slurm.conf, because the client
# commands (sbatch, squeue, scontrol) read that path; an existing slurm.conf that this script did
# not write is never replaced (export SLURM_CONF=$VIDEOFEAT_SLURM_DIR/slurm.conf instead).
# Needs root (the daemons run as root, munged as the munge user). Debian 12: Slurm 22.05.
#
# Settings that matter (see docs): proctrack/linuxproc and task/none need no cgroups; no
# accounting, so `sacct` does not work and finished tasks are kept in $STATE/jobcomp.txt;
# kill_invalid_depend cancels an afterok job whose dependency failed instead of leaving it
# pending forever; MinJobAge=2 lets tests poll squeue instead of sbatch --wait; a requeued job
# waits cred_expire seconds before it may start again (default 120 s), so it is short here.
set -euo pipefail

STATE="${VIDEOFEAT_SLURM_DIR:-/tmp/videofeat-slurm}"
CONF_SYSTEM=/etc/slurm/slurm.conf
MARK="# written by videofeat scripts/slurm_cluster.sh"
MAX_ARRAY_SIZE="${VIDEOFEAT_SLURM_MAX_ARRAY_SIZE:-1001}"
NODE="$(hostname -s)"

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
  if [ "$(id -u)" -ne 0 ]; then
    die "must run as root (the daemons run as root); try: sudo bash $0 $*"
  fi
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is absent; install slurmctld, slurmd, slurm-client and munge"
  log "installing slurmctld slurmd slurm-client munge (Debian packages)"
  local temp_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Keep the packages' install scripts from starting services (there is no init system here).
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    temp_policy=1
  fi
  local rc=0
  { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           slurmctld slurmd slurm-client munge; } >"$STATE/apt.log" 2>&1 || rc=$?
  if [ "$temp_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  [ "$rc" = 0 ] || { tail -20 "$STATE/apt.log" >&2; die "apt-get install failed (log: $STATE/apt.log)"; }
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --force
  touch "$STATE/munged.started"
  for _ in $(seq 50); do munge_works && return; sleep 0.1; done
  die "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
  # CPUs, sockets and cores as slurmd detects them; memory well below the total, so the node is
  # never rejected for having less than configured (a fraction of MemTotal, not of what is free
  # now, keeps the file identical between calls and `start` idempotent).
  local hw mem_total_mb real_mb
  hw="$(slurmd -C | head -1 | sed -e 's/ RealMemory=[0-9]*//' -e "s/^NodeName=[^ ]*//")"
  mem_total_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
  real_mb=$(( mem_total_mb * 6 / 10 ))
  [ "$real_mb" -ge 512 ] || real_mb=512
  mkdir -p "$STATE/state" "$STATE/spool" "$STATE/log"
  cat > "$STATE/slurm.conf.new" <<EOF
$MARK
ClusterName=videofeat
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.txt
MinJobAge=2
KillWait=5
MaxArraySize=$MAX_ARRAY_SIZE
DependencyParameters=kill_invalid_depend
EnforcePartLimits=ALL
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
NodeName=${NODE} NodeAddr=127.0.0.1 ${hw} RealMemory=${real_mb} State=UNKNOWN
PartitionName=local Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -f "$STATE/slurm.conf" ] && cmp -s "$STATE/slurm.conf.new" "$STATE/slurm.conf"; then
    rm -f "$STATE/slurm.conf.new"
  else
    mv "$STATE/slurm.conf.new" "$STATE/slurm.conf"
  fi
  mkdir -p /etc/slurm
  if [ -e "$CONF_SYSTEM" ] && ! head -1 "$CONF_SYSTEM" | grep -qF "$MARK"; then
    log "$CONF_SYSTEM was not written by this script: leaving it; export SLURM_CONF=$STATE/slurm.conf"
  elif ! cmp -s "$STATE/slurm.conf" "$CONF_SYSTEM" 2>/dev/null; then
    cp "$STATE/slurm.conf" "$CONF_SYSTEM"
  fi
}

# A daemon is alive when its pid file names a live process with the expected name (a stale pid
# file after kill -9 must not count).
daemon_pid() {
  local name="$1" pidfile="$STATE/$1.pid" pid
  [ -f "$pidfile" ] || return 1
  pid="$(cat "$pidfile" 2>/dev/null)"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
  echo "$pid"
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -1; }

cluster_up() {
  daemon_pid slurmctld >/dev/null && daemon_pid slurmd >/dev/null || return 1
  scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
  case "$(node_state)" in idle*|mixed*|allocated*|completing*) return 0 ;; *) return 1 ;; esac
}

start() {
  as_root start
  mkdir -p "$STATE"
  install_packages
  start_munge
  local before=""
  [ -f "$STATE/slurm.conf" ] && before="$(cat "$STATE/slurm.conf")"
  write_conf
  if cluster_up && [ "$before" = "$(cat "$STATE/slurm.conf")" ]; then
    log "already up: node $NODE $(node_state) (state in $STATE)"
    return
  fi
  # Restart whatever half of the cluster is running, so both daemons read this configuration.
  local pid
  for name in slurmd slurmctld; do
    if pid="$(daemon_pid "$name")"; then kill "$pid" 2>/dev/null || true; fi
  done
  for name in slurmd slurmctld; do
    for _ in $(seq 50); do daemon_pid "$name" >/dev/null || break; sleep 0.1; done
    rm -f "$STATE/$name.pid"
  done
  export SLURM_CONF="$STATE/slurm.conf"
  slurmctld -i
  slurmd
  for _ in $(seq 150); do
    case "$(node_state)" in
      idle*|mixed*|allocated*) log "up: node $NODE $(node_state), partition local (state in $STATE)"; return ;;
      down*|drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  tail -20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  die "node $NODE did not become idle in 30 s (logs under $STATE/log)"
}

stop() {
  as_root stop
  if daemon_pid slurmctld >/dev/null; then
    local jobs
    jobs="$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')"
    [ -z "${jobs// /}" ] || scancel $jobs 2>/dev/null || true
    scontrol shutdown 2>/dev/null || true
  fi
  local pid
  for name in slurmd slurmctld; do
    for _ in $(seq 100); do daemon_pid "$name" >/dev/null || break; sleep 0.1; done
    if pid="$(daemon_pid "$name")"; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -f "$STATE/$name.pid"
  done
  if [ -f "$STATE/munged.started" ]; then
    runuser -u munge -- /usr/sbin/munged --stop >/dev/null 2>&1 || true
    rm -f "$STATE/munged.started"
  fi
  log "stopped"
}

status() {
  if ! command -v sbatch >/dev/null; then
    log "SLURM is not installed (bash $0 start installs and starts it)"; return 1
  fi
  if cluster_up; then
    sinfo -N -o '%N %T %c %m %P' || true
    return 0
  fi
  log "not up (bash $0 start)"
  return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
