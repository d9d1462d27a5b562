#!/usr/bin/env bash
# A real SLURM cluster on one machine for videofeat's tests and CI (and for trying the SLURM
# commands on a laptop-sized machine): one node, or several nodes of one cluster.
#
#   bash scripts/slurm_cluster.sh start [--nodes N]   # install Debian packages if absent, start
#                                                      # munged, slurmctld and slurmd(s); idempotent
#   bash scripts/slurm_cluster.sh status [--nodes N]  # exit 0 when every node accepts jobs
#   bash scripts/slurm_cluster.sh stop [--nodes N]    # cancel jobs, shut the daemons down
#   bash scripts/slurm_cluster.sh conf [--nodes N]    # print the slurm.conf that start would write
#   bash scripts/slurm_cluster.sh kill-node NAME --nodes N   # lose a node: SIGKILL its slurmd and
#                                                      # every job step on it (start brings it back)
#
# One node (the default): state, spool, pid and log files live under $VIDEOFEAT_SLURM_DIR (default
# /tmp/videofeat-slurm), on SLURM's default ports. The configuration is written there and
# installed as /etc/slurm/slurm.conf, because the client commands (sbatch, squeue, scontrol) read
# that path; an existing slurm.conf that this script did not write is never replaced (export
# SLURM_CONF=$VIDEOFEAT_SLURM_DIR/slurm.conf instead).
#
# N nodes (--nodes 2): a second cluster that runs beside a single-node one and never touches it:
# state under $VIDEOFEAT_SLURM_DIR (default /tmp/videofeat-slurmN), slurmctld on port
# $VIDEOFEAT_SLURM_PORT (default 6827) and slurmd i on that port + i, nodes vfnode1..vfnodeN on
# 127.0.0.2, 127.0.0.3, ... (loopback only). Its slurm.conf is never installed in /etc/slurm: client
# commands reach it with SLURM_CONF=$VIDEOFEAT_SLURM_DIR/slurm.conf. Each slurmd runs in its own
# UTS and mount namespace: its hostname is its node name (so `hostname`, torchrun's rendezvous and
# the shard stats tell the nodes apart, as on a real cluster) and it sees a private /etc/hosts
# that resolves every node name to its address. Both clusters share the one munged.
# Needs root (the daemons run as root, munged as the munge user). Debian 12: Slurm 22.05.
#
# Settings that matter (see docs): proctrack/linuxproc and task/none need no cgroups; no
# accounting, so `sacct` does not work and finished tasks are kept in $STATE/jobcomp.txt;
# kill_invalid_depend cancels an afterok job whose dependency failed instead of leaving it
# pending forever; MinJobAge=2 lets tests poll squeue instead of sbatch --wait; a requeued job
# waits cred_expire seconds before it may start again (default 120 s), so it is short here. With
# several nodes, SlurmdTimeout is short so that a lost node is marked down (and its batch jobs,
# all submitted with --requeue, requeued onto the others) within seconds, and ReturnToService=2
# lets it rejoin as soon as its slurmd registers again.
set -euo pipefail

usage() {
  echo "usage: $0 start|stop|status|restart|conf [--nodes N]   or   $0 kill-node NAME --nodes N" >&2
  exit 2
}

COMMAND="${1:-}"
[ $# -gt 0 ] && shift
LOST_NODE=""
if [ "$COMMAND" = kill-node ]; then
  [ $# -gt 0 ] || usage
  LOST_NODE="$1"; shift
fi
NODES=1
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) [ $# -ge 2 ] || usage; NODES="$2"; shift 2 ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    *) usage ;;
  esac
done
case "$NODES" in ''|*[!0-9]*) usage ;; esac
# Node i (1-based) of a multi-node cluster listens on 127.0.0.(i+1): at most 253 of them.
[ "$NODES" -ge 1 ] && [ "$NODES" -le 253 ] || usage

MARK="# written by videofeat scripts/slurm_cluster.sh"
MAX_ARRAY_SIZE="${VIDEOFEAT_SLURM_MAX_ARRAY_SIZE:-1001}"
CONF_SYSTEM=/etc/slurm/slurm.conf
if [ "$NODES" = 1 ]; then
  STATE="${VIDEOFEAT_SLURM_DIR:-/tmp/videofeat-slurm}"
  NODE_NAMES=("$(hostname -s)")
  NODE_ADDRS=(127.0.0.1)
  CTLD_ADDR=127.0.0.1
  INSTALL_CONF=1
else
  STATE="${VIDEOFEAT_SLURM_DIR:-/tmp/videofeat-slurm$NODES}"
  CTLD_PORT="${VIDEOFEAT_SLURM_PORT:-6827}"
  NODE_NAMES=(); NODE_ADDRS=(); NODE_PORTS=()
  for i in $(seq "$NODES"); do
    NODE_NAMES+=("vfnode$i"); NODE_ADDRS+=("127.0.0.$(( i + 1 ))"); NODE_PORTS+=("$(( CTLD_PORT + i ))")
  done
  # slurmctld binds to the address its own host name resolves to (127.0.0.1 here), whatever
  # SlurmctldHost says; its own port keeps it apart from a single-node cluster's controller.
  CTLD_ADDR=127.0.0.1
  # Seconds without an answer before a node is marked down (SLURM's default is 300), so that a
  # lost node's jobs are requeued within ~25 s: the failing ping itself takes MessageTimeout
  # (10 s), which dominates; lower values gain little and risk marking a busy node down.
  SLURMD_TIMEOUT="${VIDEOFEAT_SLURMD_TIMEOUT:-10}"
  INSTALL_CONF=0
fi
# Every client command below (sinfo, scontrol, squeue, scancel) talks to this cluster only.
if [ "$NODES" != 1 ] || [ -f "$STATE/slurm.conf" ]; then export SLURM_CONF="$STATE/slurm.conf"; fi

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


# The slurm.conf of this cluster on stdout: the same text for the same machine and options, so
# that `start` is idempotent.
render_conf() {
  # CPUs, sockets and cores as slurmd detects them; memory well below the total, so the node is
  # never rejected for having less than configured (a fraction of MemTotal, not of what is free
  # now, keeps the file identical between calls and `start` idempotent). Several nodes each
  # claim the whole machine: they stand for machines of one cluster, not for a split of this one.
  local hw mem_total_mb real_mb i
  hw="$(slurmd -C | head -1 | sed -e 's/ RealMemory=[0-9]*//' -e "s/^NodeName=[^ ]*//")"
  mem_total_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
  real_mb=$(( mem_total_mb * 6 / 10 ))
  [ "$real_mb" -ge 512 ] || real_mb=512
  local cluster=videofeat spool="$STATE/spool" slurmd_pid="$STATE/slurmd.pid" slurmd_log="$STATE/log/slurmd.log"
  if [ "$NODES" != 1 ]; then
    # %n is the node name: each slurmd on this machine keeps its own spool, pid and log file.
    cluster="videofeat$NODES"; spool="$STATE/spool/%n"
    slurmd_pid="$STATE/slurmd.%n.pid"; slurmd_log="$STATE/log/slurmd.%n.log"
  fi
  cat <<CONF
$MARK
ClusterName=$cluster
SlurmctldHost=$(hostname -s)($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$slurmd_log
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
CONF
  if [ "$NODES" = 1 ]; then
    cat <<CONF
NodeName=${NODE_NAMES[0]} NodeAddr=127.0.0.1 ${hw} RealMemory=${real_mb} State=UNKNOWN
PartitionName=local Nodes=${NODE_NAMES[0]} Default=YES MaxTime=INFINITE State=UP
CONF
    return
  fi
  local names
  names="$(IFS=,; echo "${NODE_NAMES[*]}")"
  cat <<CONF
SlurmctldPort=$CTLD_PORT
SlurmdTimeout=$SLURMD_TIMEOUT
JobRequeue=1
CONF
  for i in "${!NODE_NAMES[@]}"; do
    echo "NodeName=${NODE_NAMES[$i]} NodeAddr=${NODE_ADDRS[$i]} Port=${NODE_PORTS[$i]} ${hw} RealMemory=${real_mb} State=UNKNOWN"
  done
  # LLN: each job goes to the least loaded node, so the tasks of an array spread over the nodes
  # (instead of filling the first node's CPUs) as they would over a busy cluster's free nodes.
  echo "PartitionName=local Nodes=$names Default=YES MaxTime=INFINITE State=UP LLN=YES"
}

write_conf() {
  mkdir -p "$STATE/state" "$STATE/spool" "$STATE/log"
  render_conf > "$STATE/slurm.conf.new"
  if [ -f "$STATE/slurm.conf" ] && cmp -s "$STATE/slurm.conf.new" "$STATE/slurm.conf"; then
    rm -f "$STATE/slurm.conf.new"
  else
    mv "$STATE/slurm.conf.new" "$STATE/slurm.conf"
  fi
  [ "$NODES" = 1 ] || return 0
  mkdir -p /etc/slurm
  if [ -e "$CONF_SYSTEM" ] && ! head -1 "$CONF_SYSTEM" | grep -qF "$MARK"; then
    log "$CONF_SYSTEM was not written by this script: leaving it; export SLURM_CONF=$STATE/slurm.conf"
  elif ! cmp -s "$STATE/slurm.conf" "$CONF_SYSTEM" 2>/dev/null; then
    cp "$STATE/slurm.conf" "$CONF_SYSTEM"
  fi
}

slurmd_pidfile() {
  if [ "$NODES" = 1 ]; then echo "$STATE/slurmd.pid"; else echo "$STATE/slurmd.$1.pid"; fi
}

# A daemon is alive when its pid file names a live process with the expected name (a stale pid
# file after kill -9 must not count).
pid_of() {
  local name="$1" pidfile="$2" pid
  [ -f "$pidfile" ] || return 1
  pid="$(cat "$pidfile" 2>/dev/null)"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
  echo "$pid"
}
ctld_pid() { pid_of slurmctld "$STATE/slurmctld.pid"; }
slurmd_pid() { pid_of slurmd "$(slurmd_pidfile "$1")"; }

# Bounded: a client command waits minutes for a controller that does not answer.
node_state() { timeout 10 sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -1; }

node_up() {
  case "$(node_state "$1")" in idle*|mixed*|allocated*|completing*) return 0 ;; *) return 1 ;; esac
}

cluster_up() {
  ctld_pid >/dev/null || return 1
  local node
  for node in "${NODE_NAMES[@]}"; do slurmd_pid "$node" >/dev/null || return 1; done
  timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
  for node in "${NODE_NAMES[@]}"; do node_up "$node" || return 1; done
}

# /etc/hosts as a node sees it: this machine's file and every node name. A node's own name
# resolves to its NodeAddr while its slurmd starts, because slurmd listens (NoInAddrAny) on the
# address of its host name; then to 127.0.0.1 (as Debian puts a host's own name on 127.0.1.1),
# because srun listens on that address too, and slurmstepd and slurmctld call srun back at the
# address its requests came from, which the kernel always takes as 127.0.0.1 on loopback.
write_hosts() {  # node own_address
  local node="$1" own="$2" i
  # Rewritten in place, never replaced: the node's mount namespace holds this very inode.
  { cat /etc/hosts
    for i in "${!NODE_NAMES[@]}"; do
      if [ "${NODE_NAMES[$i]}" = "$node" ]; then echo "$own $node"; else echo "${NODE_ADDRS[$i]} ${NODE_NAMES[$i]}"; fi
    done
  } > "$STATE/hosts.$node.new"
  cat "$STATE/hosts.$node.new" > "$STATE/hosts.$node"
  rm -f "$STATE/hosts.$node.new"
}

node_addr() {
  local i
  for i in "${!NODE_NAMES[@]}"; do [ "${NODE_NAMES[$i]}" != "$1" ] || echo "${NODE_ADDRS[$i]}"; done
}

start_slurmd() {
  local node="$1"
  rm -f "$(slurmd_pidfile "$node")"
  if [ "$NODES" = 1 ]; then
    slurmd
    return
  fi
  mkdir -p "$STATE/spool/$node"
  write_hosts "$node" "$(node_addr "$node")"
  # New UTS and mount namespaces (no new pid or network namespace: the nodes share this
  # machine's loopback). slurmd forks into the background inside them, and every job step it
  # starts inherits both: the node's hostname and its /etc/hosts.
  unshare --uts --mount --propagation private -- /bin/sh -c \
    'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -N "$1"' slurmd-ns "$node" "$STATE/hosts.$node"
  # slurmd writes its pid file once its socket listens.
  local pid=""
  for _ in $(seq 100); do pid="$(slurmd_pid "$node")" && break; sleep 0.1; done
  [ -n "$pid" ] || die "slurmd of $node did not start (log: $STATE/log/slurmd.$node.log)"
  write_hosts "$node" 127.0.0.1
  # The namespace, recorded so that kill-node finds the node's job steps after its slurmd is gone.
  readlink "/proc/$pid/ns/uts" > "$STATE/$node.uts"
}

stop_daemon() {  # name pidfile
  local pid
  if pid="$(pid_of "$1" "$2")"; then kill "$pid" 2>/dev/null || true; fi
  for _ in $(seq 50); do pid_of "$1" "$2" >/dev/null || break; sleep 0.1; done
  if pid="$(pid_of "$1" "$2")"; then kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$2"
}

start() {
  as_root start
  mkdir -p "$STATE"
  install_packages
  start_munge
  local before="" node
  [ -f "$STATE/slurm.conf" ] && before="$(cat "$STATE/slurm.conf")"
  write_conf
  export SLURM_CONF="$STATE/slurm.conf"
  if cluster_up && [ "$before" = "$(cat "$STATE/slurm.conf")" ]; then
    log "already up: $(nodes_line) (state in $STATE)"
    return
  fi
  if [ "$before" != "$(cat "$STATE/slurm.conf")" ] || { [ "$NODES" = 1 ] && ! cluster_up; }; then
    # A new configuration (or a half-up single node): restart every daemon so all read this file.
    for node in "${NODE_NAMES[@]}"; do stop_daemon slurmd "$(slurmd_pidfile "$node")"; done
    stop_daemon slurmctld "$STATE/slurmctld.pid"
  fi
  # Otherwise start only what is not running: a node lost with kill-node rejoins the cluster
  # beside the running ones, which keep their jobs.
  ctld_pid >/dev/null || { rm -f "$STATE/slurmctld.pid"; slurmctld -i; }
  for node in "${NODE_NAMES[@]}"; do slurmd_pid "$node" >/dev/null || start_slurmd "$node"; done
  local waiting deadline=$(( SECONDS + 30 ))
  while [ "$SECONDS" -lt "$deadline" ]; do
    waiting=0
    for node in "${NODE_NAMES[@]}"; do
      case "$(node_state "$node")" in
        idle*|mixed*|allocated*) ;;
        down*|drain*) waiting=1; scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
        *) waiting=1 ;;
      esac
    done
    if [ "$waiting" = 0 ]; then
      log "up: $(nodes_line), partition local (state in $STATE)"
      [ "$INSTALL_CONF" = 1 ] || log "client commands: export SLURM_CONF=$STATE/slurm.conf"
      return
    fi
    sleep 0.2
  done
  tail -20 "$STATE"/log/*.log >&2 || true
  die "not every node became idle in 30 s: $(nodes_line) (logs under $STATE/log)"
}

nodes_line() {
  local node out=""
  for node in "${NODE_NAMES[@]}"; do out+="node $node $(node_state "$node"), "; done
  echo "${out%, }"
}

stop() {
  as_root stop
  if ctld_pid >/dev/null; then
    local jobs
    jobs="$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ')"
    [ -z "${jobs// /}" ] || scancel $jobs 2>/dev/null || true
    scontrol shutdown 2>/dev/null || true
  fi
  local node pid
  for node in "${NODE_NAMES[@]}"; do
    for _ in $(seq 100); do slurmd_pid "$node" >/dev/null || break; sleep 0.1; done
    stop_daemon slurmd "$(slurmd_pidfile "$node")"
  done
  for _ in $(seq 100); do ctld_pid >/dev/null || break; sleep 0.1; done
  stop_daemon slurmctld "$STATE/slurmctld.pid"
  [ "$NODES" = 1 ] || kill_leftover_steps
  if [ -f "$STATE/munged.started" ]; then
    # munged is shared: leave it to a cluster that still runs beside this one.
    if pgrep -x slurmctld >/dev/null; then
      log "munged left running: another cluster's slurmctld still uses it"
    else
      runuser -u munge -- /usr/sbin/munged --stop >/dev/null 2>&1 || true
      rm -f "$STATE/munged.started"
    fi
  fi
  log "stopped"
}

# Every process in a node's UTS namespace: its slurmd, its slurmstepds and whatever they run.
node_processes() {
  local node="$1" ns pid
  [ -f "$STATE/$node.uts" ] || return 0
  ns="$(cat "$STATE/$node.uts")"
  for pid in /proc/[0-9]*; do
    pid="${pid#/proc/}"
    [ "$(readlink "/proc/$pid/ns/uts" 2>/dev/null)" = "$ns" ] && echo "$pid"
  done
  return 0
}

kill_leftover_steps() {
  local node pids
  for node in "${NODE_NAMES[@]}"; do
    pids="$(node_processes "$node" | tr '\n' ' ')"
    [ -z "${pids// /}" ] || kill -9 $pids 2>/dev/null || true
  done
}

kill_node() {
  as_root kill-node
  [ "$NODES" != 1 ] || die "kill-node needs a multi-node cluster (--nodes 2)"
  local known=0 node pids
  for node in "${NODE_NAMES[@]}"; do [ "$node" = "$LOST_NODE" ] && known=1; done
  [ "$known" = 1 ] || die "no node $LOST_NODE in this cluster (nodes: ${NODE_NAMES[*]})"
  # SIGKILL, all at once, as a power cut would: nothing on the node gets to clean up or report.
  pids="$(node_processes "$LOST_NODE" | tr '\n' ' ')"
  [ -n "${pids// /}" ] || die "no process of $LOST_NODE is running"
  kill -9 $pids 2>/dev/null || true
  rm -f "$(slurmd_pidfile "$LOST_NODE")"
  log "killed node $LOST_NODE (pids $pids); bring it back with: bash $0 start --nodes $NODES"
}

status() {
  if ! command -v sbatch >/dev/null; then
    log "SLURM is not installed (bash $0 start installs and starts it)"; return 1
  fi
  if cluster_up; then
    sinfo -N -o '%N %T %c %m %P' || true
    return 0
  fi
  if [ "$NODES" = 1 ]; then log "not up (bash $0 start)"; else log "not up (bash $0 start --nodes $NODES)"; fi
  return 1
}

case "$COMMAND" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start ;;
  conf) render_conf ;;
  kill-node) kill_node ;;
  *) usage ;;
esac
