#!/usr/bin/env bash
# A throwaway one-node SLURM cluster on localhost, for tests of the SLURM engine.
#
#   eval "$(scripts/slurm_cluster.sh start DIR)"  # prints `export SLURM_CONF=DIR/slurm.conf` last
#   scripts/slurm_cluster.sh stop DIR
#   scripts/slurm_cluster.sh status DIR
#
# Everything lives in DIR: slurm.conf, a private munge key and socket, state, spool, pid
# and log files. `start` runs a private munged (as the `munge` user, on DIR/munge/munge.socket,
# so any system munged is left alone), then slurmctld and slurmd as root, and waits until the
# node is idle. It is idempotent: daemons of DIR that are already running are kept. `stop`
# cancels the cluster's jobs, then stops only the daemons named by DIR's pid files (checking
# each process's command line names DIR first) and waits for them to exit.
#
# Needs root and Debian's `slurm-wlm` and `munge` (apt-get install -y slurm-wlm munge). Built
# for sandboxes without cgroups: proctrack/linuxproc, task/none, no accounting daemon (so
# `sacct` says accounting is disabled: the SLURM engine then reads job states from squeue).
# Clients (sbatch, squeue, sinfo, scancel, submitit) need SLURM_CONF=DIR/slurm.conf (printed
# by `start`).
set -euo pipefail

# Knobs, read by `start` when it writes a fresh slurm.conf:
readonly WAIT_IDLE_S=${SLURM_CLUSTER_WAIT_S:-30}  # how long to wait for the node to be idle
# ALL: sbatch rejects what the partition can never run (too many CPUs, nodes, time); NO
# (Slurm's default): such a job is accepted and pends forever (Reason=PartitionConfig, ...).
readonly ENFORCE=${SLURM_CLUSTER_ENFORCE_PART_LIMITS:-ALL}
readonly MAX_TIME=${SLURM_CLUSTER_MAX_TIME:-INFINITE}  # the partition's MaxTime (minutes)
readonly FAKE_GPUS=${SLURM_CLUSTER_FAKE_GPUS:-0}  # GRES gpu:N on the node (no devices behind)
readonly MARK=KVB_SLURM_CLUSTER_DIR  # set in the daemons' environment, to find their stepds

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    echo "usage: $0 {start|stop|status} DIR" >&2
    exit 2
}

need_binaries() {
    local missing=() b
    for b in munged munge slurmctld slurmd sbatch sinfo squeue scancel scontrol; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    if ((${#missing[@]})); then
        die "missing ${missing[*]} on PATH (install: apt-get install -y slurm-wlm munge)"
    fi
}

# pid_of NAME: the pid in DIR's pid file for NAME if that process is alive and its command
# line names DIR (so a stale pid file whose pid was reused never matches); else nothing.
pid_of() {
    local pidfile pid state cmdline
    case $1 in
        munged) pidfile=$DIR/munge/munged.pid ;;
        *) pidfile=$DIR/run/$1.pid ;;
    esac
    [[ -s $pidfile ]] || return 0
    pid=$(tr -dc 0-9 2>/dev/null <"$pidfile") || return 0
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 0
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 0
    [[ $state != Z && $state != X ]] || return 0
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 0
    [[ $cmdline == *"$1"* && $cmdline == *"$DIR/"* ]] || return 0
    echo "$pid"
}

# port_in_use PORT: whether something listens on (or accepts at) 127.0.0.1:PORT.
port_in_use() {
    if command -v ss >/dev/null 2>&1; then
        ss -Htln 2>/dev/null | awk '{print $4}' | grep -Eq "[:.]$1\$" && return 0
    fi
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() {  # free_port [EXCLUDE]: a random unused TCP port in 20000-59999
    local p i
    for i in $(seq 200); do
        p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        [[ $p != "${1:-}" ]] && ! port_in_use "$p" && { echo "$p"; return; }
    done
    die "no free TCP port found"
}

tails() {  # the daemons' log tails, for a failed start
    local f
    for f in "$DIR/munge/munged.log" "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log"; do
        [[ -f $f ]] || continue
        echo "----- tail $f" >&2
        tail -n 25 "$f" >&2
    done
}

write_config() {
    local host=$1 cpus mem detected topo ctld_port slurmd_port i
    cpus=$(nproc)
    detected=$(slurmd -C 2>/dev/null | head -n 1) || true
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")
    [[ -n $mem ]] || mem=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    mem=$((mem * 9 / 10))  # a bit below the machine's, so slurmd never reports less
    # The hardware's layout when it has exactly nproc CPUs (else nproc is limited by affinity
    # or quota and a plain CPUs= count is safe).
    topo="CPUs=$cpus"
    if [[ $detected == *" CPUs=$cpus "* ]]; then
        topo=$(grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$detected") || topo="CPUs=$cpus"
    fi
    ctld_port=$(free_port)
    slurmd_port=$(free_port "$ctld_port")
    : >"$DIR/plugstack.conf"  # no SPANK plugins (the default would read /etc/slurm's)
    local gres=
    if ((FAKE_GPUS > 0)); then
        # Slurm drops a GPU without a device file, and wants a character or block device:
        # links to /dev/null stand in for /dev/nvidia*.
        mkdir -p "$DIR/dev"
        for ((i = 0; i < FAKE_GPUS; i++)); do ln -sfn /dev/null "$DIR/dev/gpu$i"; done
        gres=" Gres=gpu:$FAKE_GPUS"
        echo "NodeName=$host Name=gpu File=$DIR/dev/gpu[0-$((FAKE_GPUS - 1))]" >"$DIR/gres.conf"
    else
        : >"$DIR/gres.conf"
    fi
    cat >"$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a one-node test cluster, everything under $DIR.
ClusterName=kvbtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
# No cgroups in the sandbox, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# A job without --mem gets its CPUs' share, so jobs of one CPU each run side by side.
DefMemPerCPU=$((mem / cpus))
SchedulerType=sched/backfill
# Schedule a batch job when it is submitted (the default waits up to 3 s).
SchedulerParameters=batch_sched_delay=0
EnforcePartLimits=$ENFORCE
ReturnToService=2
MailProg=/bin/true
InactiveLimit=0
KillWait=2
# squeue keeps finished jobs this long (the engine reads their end from it).
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
${gres:+GresTypes=gpu}
NodeName=$host NodeAddr=127.0.0.1 $topo RealMemory=$mem$gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=$MAX_TIME State=UP
EOF
}

start_munged() {
    local user=root
    getent passwd munge >/dev/null 2>&1 && user=munge
    mkdir -p "$DIR/munge"
    chmod 711 "$DIR/munge"
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chmod 400 "$DIR/munge/munge.key"
    chown -R "$user:" "$DIR/munge"
    rm -f "$DIR/munge/munged.pid"
    # munged wants every directory above its socket searchable by all.
    runuser -u "$user" -- munged \
        --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" 9>&- ||
        { tails; die "munged failed to start (every directory above $DIR must be o+x)"; }
    local i
    for i in $(seq 50); do
        [[ -n $(pid_of munged) && -S $DIR/munge/munge.socket ]] && return
        sleep 0.1
    done
    tails
    die "munged did not come up"
}

lock() {  # one start or stop of DIR at a time (the daemons must not inherit fd 9)
    if [[ -d $DIR/run ]] && command -v flock >/dev/null 2>&1; then
        exec 9>"$DIR/run/lock"
        flock -w 120 9 || die "$DIR is locked by another start or stop"
    fi
}

node_state() {
    SLURM_CONF=$CONF sinfo -h -N -n "$1" -o %t 2>/dev/null | head -n 1 || true
}

cmd_start() {
    local host state i
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd runs jobs as their users)"
    need_binaries
    DIR=$(realpath -m "$DIR")
    CONF=$DIR/slurm.conf
    host=$(hostname -s)
    # sun_path holds 107 bytes: slurmstepd's sockets are DIR/spool/HOST_JOBID.STEPID.
    local max=$((107 - 29 - ${#host}))
    ((${#DIR} <= max)) || die "DIR too long for unix sockets (${#DIR} > $max chars): $DIR"
    mkdir -p "$DIR"/{state,spool,run,log}
    chmod a+x "$DIR"  # munged (as user munge) must reach DIR/munge; nothing else is opened
    lock

    [[ -n $(pid_of munged) ]] || start_munged
    local clear=()
    if [[ -n $(pid_of slurmctld) || -n $(pid_of slurmd) ]]; then
        [[ -f $CONF ]] || die "daemons of $DIR run but $CONF is gone: run stop first"
    else
        write_config "$host"
        clear=(-c)  # a new cluster: forget the jobs and node states (a drain) of an old one
    fi
    if [[ -z $(pid_of slurmctld) ]]; then
        env "$MARK=$DIR" SLURM_CONF="$CONF" slurmctld -f "$CONF" "${clear[@]}" 9>&- ||
            { tails; die "slurmctld failed to start"; }
    fi
    if [[ -z $(pid_of slurmd) ]]; then
        env "$MARK=$DIR" SLURM_CONF="$CONF" slurmd -f "$CONF" -N "$host" 9>&- ||
            { tails; die "slurmd failed to start"; }
    fi

    for ((i = 0; i < WAIT_IDLE_S * 5; i++)); do
        state=$(node_state "$host")
        case $state in
            idle | mix | alloc | comp) break ;;
        esac
        sleep 0.2
    done
    case $state in
        idle | mix | alloc | comp) ;;
        *)
            log "node $host is '${state:-unreachable}' after ${WAIT_IDLE_S}s"
            SLURM_CONF=$CONF scontrol show node "$host" >&2 2>/dev/null || true
            tails
            cmd_stop >/dev/null
            die "cluster in $DIR did not come up (stopped it again)"
            ;;
    esac
    log "node $host is $state (slurmctld $(pid_of slurmctld), slurmd $(pid_of slurmd)," \
        "munged $(pid_of munged))"
    echo "export SLURM_CONF=$CONF"
}

# stop_pid NAME PID: TERM, wait up to 15 s, then KILL.
stop_pid() {
    local i
    kill -TERM "$2" 2>/dev/null || return 0
    for ((i = 0; i < 150; i++)); do
        [[ -z $(pid_of "$1") ]] && return 0
        sleep 0.1
    done
    log "$1 ($2) ignored SIGTERM: killing it"
    kill -KILL "$2" 2>/dev/null || true
    sleep 0.2
}

# Processes (slurmstepd) that inherited the marker of DIR from slurmd.
marked_pids() {
    local e pid
    for e in /proc/[0-9]*/environ; do
        pid=${e#/proc/}
        pid=${pid%/environ}
        [[ $pid == "$$" ]] && continue
        tr '\0' '\n' 2>/dev/null <"$e" | grep -qxF "$MARK=$DIR" && echo "$pid"
    done
    return 0
}

cmd_stop() {
    local pid name jobs i
    [[ -d $DIR ]] || { log "no $DIR: nothing to stop"; return 0; }
    DIR=$(cd "$DIR" && pwd -P)
    CONF=$DIR/slurm.conf
    lock
    if [[ -n $(pid_of slurmctld) ]] && command -v squeue >/dev/null 2>&1; then
        jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null | tr '\n' ' ') || jobs=
        if [[ -n ${jobs// /} ]]; then
            # shellcheck disable=SC2086  # one job id a word
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do  # wait up to 10 s for them to end
                [[ -z $(SLURM_CONF=$CONF squeue -h -t R,CG,S -o %A 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    for name in slurmd slurmctld munged; do
        pid=$(pid_of "$name")
        [[ -n $pid ]] || continue
        stop_pid "$name" "$pid"
        log "stopped $name ($pid)"
    done
    for pid in $(marked_pids); do
        log "killing leftover process $pid ($(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline"))"
        kill -KILL "$pid" 2>/dev/null || true
    done
    return 0
}

cmd_status() {
    local name pid rc=0
    [[ -d $DIR ]] || die "no $DIR"
    DIR=$(cd "$DIR" && pwd -P)
    for name in munged slurmctld slurmd; do
        pid=$(pid_of "$name")
        echo "$name: ${pid:-not running}"
        [[ -n $pid ]] || rc=1
    done
    return "$rc"
}

(($# == 2)) || usage
DIR=$2
[[ -n $DIR ]] || usage
CONF=
case $1 in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) usage ;;
esac
