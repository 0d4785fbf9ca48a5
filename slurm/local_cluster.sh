#!/usr/bin/env bash
# Stand up (or tear down) a real one-node SLURM cluster with accounting, entirely under one folder.
#
#   slurm/local_cluster.sh start STATE_DIR    # munged, mariadbd, slurmdbd, slurmctld, slurmd; writes STATE_DIR/env.sh
#   slurm/local_cluster.sh stop  STATE_DIR    # stops exactly the daemons recorded in STATE_DIR/pids (idempotent)
#   slurm/local_cluster.sh status STATE_DIR   # prints each recorded daemon and whether it is alive
#
# Sourced (as slurm/with_cluster.sh does), it only defines cluster_start, cluster_stop and cluster_status, so the
# daemons become children of the sourcing shell, which then reaps them when they stop.
#
# Needs root and Debian's `slurm-wlm munge slurmdbd mariadb-server` (no systemd). Every file (configs, munge key,
# database, spool, logs, pid files, sockets) lives under STATE_DIR, and the daemons listen on free ports picked at
# start, so several clusters can run side by side. Each daemon is started in the foreground by this script, its
# PID recorded in STATE_DIR/pids/NAME.pid, and waited for by polling its own readiness check under a bounded
# timeout. Clients need only `source STATE_DIR/env.sh` (it exports SLURM_CONF).
#
# HPCKD_SLURM_NODES=N (1-4, default 1) makes N nodes, each its own `slurmd -N <host>-nI` on its own port under the
# one controller, so multi-node jobs (sbatch --nodes=2, a sweep stage with nodes: 2) run for real on one machine.
#
# Accounting (slurmdbd + MariaDB) is not optional: without it `sacct` fails and submitit never notices a job that
# was cancelled from outside.

SCRIPT_NAME="local_cluster.sh"
LOCAL_CLUSTER_SH="${BASH_SOURCE[0]}"
CLUSTER_NAME="hpckd"
PARTITION_NAME="debug"
# Bounded readiness timeouts (seconds); each daemon normally becomes ready in well under a second or two.
READY_TIMEOUT_S="${HPCKD_SLURM_READY_TIMEOUT:-30}"
STOP_TIMEOUT_S="${HPCKD_SLURM_STOP_TIMEOUT:-20}"
# HPCKD_SLURM_NODES=2: that many nodes, each its own slurmd on this machine (one port each, same controller), so a
# multi-node job (sbatch --nodes=2) runs for real; nodes are then named <host>-n0, <host>-n1, ...
NODES="${HPCKD_SLURM_NODES:-1}"
POLL_S=0.1
# Stop order: reverse of the start order, so clients of a daemon go before the daemon itself.
DAEMONS_STOP_ORDER=(slurmd slurmd-1 slurmd-2 slurmd-3 slurmctld slurmdbd mariadbd munged)
STATE=""
LAUNCHED=0 # set once this process has started a daemon: only then may a failed start stop anything

log() { printf '[%s] %s\n' "$SCRIPT_NAME" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    cat >&2 <<EOF
usage: $0 start|stop|status STATE_DIR
  start   stand up munged, mariadbd, slurmdbd, slurmctld and slurmd under STATE_DIR and wait until the node is idle
  stop    stop exactly the daemons whose PIDs are recorded in STATE_DIR/pids (safe to run twice)
  status  show the recorded daemons and whether they are alive
EOF
    exit 2
}

# ---------------------------------------------------------------------------------------------------- helpers

# Time in microseconds from bash's own clock (no process per poll); elapsed_s prints seconds with one decimal.
now_us() { echo "${EPOCHREALTIME/./}"; }
elapsed_s() {
    local d=$(($(now_us) - $1))
    printf '%d.%d' $((d / 1000000)) $((d % 1000000 / 100000))
}
# True once more than SECONDS (a decimal) have passed since T0_US.
past_deadline() {
    local t0="$1" secs="$2"
    local whole="${secs%%.*}" frac="${secs#*.}"
    [[ "$secs" == *.* ]] || frac=0
    frac="${frac}000000"
    (($(now_us) - t0 >= 10#${whole:-0} * 1000000 + 10#${frac:0:6}))
}

pid_file() { printf '%s/pids/%s.pid' "$STATE" "$1"; }
log_file() { printf '%s/log/%s.log' "$STATE" "$1"; }

# True when PID is alive and provably ours: its command line or environment names this STATE folder
# (guards against killing an unrelated process that reused a recorded PID).
pid_is_ours() {
    local pid="$1"
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
    grep -qaF -- "$STATE" "/proc/$pid/cmdline" 2>/dev/null && return 0
    grep -qaF -- "HPCKD_LOCAL_CLUSTER=$STATE" "/proc/$pid/environ" 2>/dev/null
}

recorded_pid() {
    local f
    f="$(pid_file "$1")"
    [[ -f "$f" ]] && cat "$f" || true
}

# Print the last lines of every log of daemon NAME (its own log file and its captured stdout/stderr).
show_log_tail() {
    local name="$1" f
    # The daemon's own log, or what it printed before opening it (e.g. a fatal config error).
    f="$(log_file "$name")"
    [[ -s "$f" ]] || f="$STATE/log/$name.out"
    if [[ -s "$f" ]]; then
        log "---- last lines of $f ----"
        tail -n 25 "$f" >&2
    fi
}

# Called when a start step fails: show why, stop whatever was started, exit non-zero.
fail_start() {
    local name="$1" why="$2"
    log "ERROR: $name $why"
    show_log_tail "$name"
    log "stopping the daemons started so far"
    stop_cluster || true
    exit 1
}

# Run daemon NAME in the background with stdout/stderr captured; record its PID ($! is the daemon itself: every
# command given here execs it in place). HPCKD_LOCAL_CLUSTER marks the process as belonging to this cluster.
# MYSQL_UNIX_PORT points slurmdbd's MariaDB client library at the private server's socket.
launch() {
    local name="$1"
    shift
    HPCKD_LOCAL_CLUSTER="$STATE" SLURM_CONF="$STATE/etc/slurm.conf" MYSQL_UNIX_PORT="$STATE/mysql/mysqld.sock" \
        "$@" >"$STATE/log/$name.out" 2>&1 </dev/null &
    echo $! >"$(pid_file "$name")"
    LAUNCHED=1
}

# Poll CHECK (a shell command) until it succeeds; fail early if daemon NAME died, fail after READY_TIMEOUT_S.
wait_ready() {
    local name="$1" check="$2" pid t0
    pid="$(recorded_pid "$name")"
    t0="$(now_us)"
    while true; do
        if eval "$check" >/dev/null 2>&1; then
            log "$name ready (pid $pid, $(elapsed_s "$t0") s)"
            return 0
        fi
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            fail_start "$name" "exited before becoming ready"
        fi
        if past_deadline "$t0" "$READY_TIMEOUT_S"; then
            fail_start "$name" "not ready after ${READY_TIMEOUT_S} s (check: $check)"
        fi
        sleep "$POLL_S"
    done
}

# Print N consecutive TCP ports that nothing listens on, below Linux's ephemeral range (32768-60999), read from
# /proc/net/tcp* (state 0A = LISTEN), so several clusters can run side by side without fixed ports.
free_ports() {
    local n="$1" port i ok line fields
    local -A listening=()
    for f in /proc/net/tcp /proc/net/tcp6; do
        [[ -r "$f" ]] || continue
        while read -r line; do
            read -ra fields <<<"$line"
            [[ "${fields[3]}" == 0A ]] && listening[$((16#${fields[1]##*:}))]=1
        done < <(tail -n +2 "$f")
    done
    port=$((20000 + RANDOM % 12000))
    while true; do
        ok=1
        for ((i = 0; i < n; i++)); do
            [[ -z "${listening[$((port + i))]:-}" ]] || ok=0
        done
        if ((ok)); then
            seq -s ' ' "$port" $((port + n - 1))
            return 0
        fi
        port=$((port + n))
    done
}

check_prerequisites() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (the daemons run as root/munge); use sudo"
    local b missing=()
    for b in munged munge unmunge mungekey setpriv mariadbd mariadb-install-db mysqladmin \
        slurmdbd slurmctld slurmd sacctmgr scontrol sinfo squeue scancel; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    ((${#missing[@]} == 0)) || die "missing programs: ${missing[*]}; install them with:" \
        "apt-get install -y slurm-wlm munge slurmdbd mariadb-server"
}

# ---------------------------------------------------------------------------------------------------- configs

write_configs() {
    local host="$1" cpus="$2" ctld_port="$3" slurmd_port="$4" dbd_port="$5" mpi_default="$6"
    local node_lines node_names i slurmd_files="slurmd"
    ((NODES == 1)) || slurmd_files="slurmd-%n"
    # One node: named after the host, as a laptop's cluster is. Several: one slurmd each (slurmd -N NAME) on its own
    # port, with its own spool, pid and log file (%n: the node name).
    if ((NODES == 1)); then
        node_lines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN"
        node_names="$host"
    else
        node_lines="" node_names=""
        for ((i = 0; i < NODES; i++)); do
            node_lines+="NodeName=$host-n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((slurmd_port + i)) CPUs=$cpus State=UNKNOWN"$'\n'
            node_names+="${node_names:+,}$host-n$i"
        done
    fi
    local munge_sock="$STATE/munge/munge.socket"

    cat >"$STATE/mysql/my.cnf" <<EOF
# Private MariaDB for slurmdbd: unix socket only, no TCP at all.
[mariadbd]
datadir=$STATE/mysql/data
socket=$STATE/mysql/mysqld.sock
pid-file=$STATE/mysql/mysqld.pid
log-error=$(log_file mariadbd)
skip-networking
user=root
# slurmdbd logs "Database settings not recommended values: innodb_log_file_size" below 64M; a tiny test database
# does not need it, and the smaller redo log makes mariadb-install-db several seconds faster.
innodb_buffer_pool_size=128M
innodb_log_file_size=16M
innodb_lock_wait_timeout=900
[client]
socket=$STATE/mysql/mysqld.sock
user=root
EOF

    cat >"$STATE/etc/slurm.conf" <<EOF
# Generated by slurm/local_cluster.sh for a one-node test cluster; all paths under $STATE.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$munge_sock
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/$slurmd_files
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/$slurmd_files.pid
SlurmctldLogFile=$(log_file slurmctld)
SlurmdLogFile=$STATE/log/$slurmd_files.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$STATE/etc/plugstack.conf
# No cgroups in containers/CI: track processes by parent PID, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=$mpi_default
SchedulerType=sched/backfill
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
KillWait=5
# Keep finished jobs in slurmctld long enough for tests to query them.
MinJobAge=3600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
# For connections to slurmdbd, Slurm clients take the munge socket from AccountingStoragePass, not AuthInfo.
AccountingStoragePass=$munge_sock
JobCompType=jobcomp/none
$node_lines
PartitionName=$PARTITION_NAME Nodes=$node_names Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

    # An empty plugin stack, so the host's /etc/slurm/plugstack.conf.d is not picked up.
    : >"$STATE/etc/plugstack.conf"

    cat >"$STATE/etc/slurmdbd.conf" <<EOF
# Generated by slurm/local_cluster.sh.
AuthType=auth/munge
AuthInfo=socket=$munge_sock
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
LogFile=$(log_file slurmdbd)
PidFile=$STATE/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
# libmariadb connects through the socket named by MYSQL_UNIX_PORT (set by this script) when the host is localhost.
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    # slurmdbd refuses a world-readable config (it may hold the database password).
    chmod 600 "$STATE/etc/slurmdbd.conf"

    cat >"$STATE/env.sh" <<EOF
# Source this to use the local SLURM cluster in $STATE.
export SLURM_CONF='$STATE/etc/slurm.conf'
export HPCKD_SLURM_PARTITION='$PARTITION_NAME'
EOF
}

# slurm's pmix plugin is what Debian's OpenMPI needs under srun (pmi2/none fail); offer it, default to none.
mpi_default() {
    local plugdir
    plugdir="$(dirname "$(find /usr/lib -name 'mpi_none.so' -path '*slurm*' -print -quit 2>/dev/null || true)")"
    if [[ -n "$plugdir" && -e "$plugdir/mpi_pmix.so" ]]; then
        log "slurm pmix plugin found in $plugdir: \`srun --mpi=pmix\` is available (MpiDefault=none)"
    else
        log "slurm pmix plugin not found: only MpiDefault=none"
    fi
    echo none
}

# ---------------------------------------------------------------------------------------------------- start

start_munged() {
    local sock="$STATE/munge/munge.socket"
    mungekey --create --keyfile="$STATE/munge/munge.key" >/dev/null
    chown -R munge:munge "$STATE/munge"
    chmod 755 "$STATE/munge"  # munged insists clients can reach its socket folder
    chmod 600 "$STATE/munge/munge.key"
    # setpriv execs munged in place, so $! is munged itself; munged refuses to run as root.
    launch munged setpriv --reuid=munge --regid=munge --clear-groups \
        munged --foreground --socket="$sock" --key-file="$STATE/munge/munge.key" \
        --log-file="$(log_file munged)" --pid-file="$STATE/munge/munged.pid" \
        --seed-file="$STATE/munge/munged.seed"
    wait_ready munged "munge -S '$sock' -n | unmunge -S '$sock'"
}

start_mariadbd() {
    local cnf="$STATE/mysql/my.cnf"
    if ! mariadb-install-db --defaults-file="$cnf" --auth-root-authentication-method=socket \
        --skip-test-db >"$STATE/log/mariadb-install.out" 2>&1; then
        show_log_tail mariadb-install
        fail_start mariadbd "database initialisation (mariadb-install-db) failed"
    fi
    launch mariadbd mariadbd --defaults-file="$cnf"
    wait_ready mariadbd "mysqladmin --defaults-file='$cnf' ping"
}

start_slurmdbd() {
    launch slurmdbd slurmdbd -D
    # sacctmgr succeeds only once slurmdbd answers (and has created its tables).
    wait_ready slurmdbd "sacctmgr -n list cluster format=cluster"
    if ! sacctmgr -i add cluster "$CLUSTER_NAME" >"$STATE/log/sacctmgr.out" 2>&1; then
        show_log_tail sacctmgr
        fail_start slurmdbd "could not register cluster $CLUSTER_NAME"
    fi
    if ! sacctmgr -i add account "$CLUSTER_NAME" Description="hpckd tests" Organization=hpckd \
        >>"$STATE/log/sacctmgr.out" 2>&1 ||
        ! sacctmgr -i add user root Account="$CLUSTER_NAME" >>"$STATE/log/sacctmgr.out" 2>&1; then
        show_log_tail sacctmgr
        fail_start slurmdbd "could not create the default account"
    fi
}

start_slurmctld() {
    launch slurmctld slurmctld -D -f "$STATE/etc/slurm.conf"
    wait_ready slurmctld "scontrol ping | grep -q UP"
}

start_slurmd() {
    local node="$1" name="$2"
    launch "$name" slurmd -D -f "$STATE/etc/slurm.conf" -N "$node"
    wait_ready "$name" "[ \"\$(sinfo -h -n '$node' -o %T)\" = idle ]"
}

start_cluster() {
    check_prerequisites
    if [[ -d "$STATE/pids" ]]; then
        local name
        for name in "${DAEMONS_STOP_ORDER[@]}"; do
            if pid_is_ours "$(recorded_pid "$name")"; then
                die "a cluster is already running in $STATE ($name alive); stop it first: $LOCAL_CLUSTER_SH stop $STATE"
            fi
        done
    fi
    if [[ -n "$(ls -A "$STATE")" ]]; then
        die "STATE_DIR $STATE is not empty; give a new or empty folder (a stopped cluster's folder can be deleted)"
    fi
    local t0 host cpus mpi ctld_port slurmd_port dbd_port
    t0="$(now_us)"
    host="$(hostname -s)"
    cpus="$(nproc)"
    # ctld, dbd, then one slurmd port per node
    read -r ctld_port dbd_port slurmd_port _ <<<"$(free_ports $((2 + NODES)))"
    ((NODES >= 1 && NODES <= 4)) || die "HPCKD_SLURM_NODES must be 1 to 4, got $NODES"
    mkdir -p "$STATE"/{pids,log,etc,run,ctld,spool/slurmd,munge,mysql/data}
    # munged runs as the munge user and must reach its folder; nothing under STATE is writable by others.
    chmod 755 "$STATE"
    chmod 700 "$STATE/ctld" "$STATE/mysql"
    mpi="$(mpi_default)"
    write_configs "$host" "$cpus" "$ctld_port" "$slurmd_port" "$dbd_port" "$mpi"
    log "starting cluster '$CLUSTER_NAME' in $STATE ($NODES node(s) on $host, $cpus CPUs each, ports ctld=$ctld_port" \
        "slurmd=$slurmd_port dbd=$dbd_port)"
    export SLURM_CONF="$STATE/etc/slurm.conf"
    start_munged
    start_mariadbd
    start_slurmdbd
    start_slurmctld
    if ((NODES == 1)); then
        start_slurmd "$host" slurmd
    else
        local i name
        for ((i = 0; i < NODES; i++)); do
            name=slurmd
            ((i == 0)) || name="slurmd-$i"
            start_slurmd "$host-n$i" "$name"
        done
    fi
    log "cluster up in $(elapsed_s "$t0") s; use it with: source $STATE/env.sh"
}

# ---------------------------------------------------------------------------------------------------- stop

# Cancel every job so slurmd's job steps (slurmstepd and the job's processes) end before the daemons do.
cancel_all_jobs() {
    local ctld_pid
    ctld_pid="$(recorded_pid slurmctld)"
    pid_is_ours "$ctld_pid" || return 0
    [[ -f "$STATE/etc/slurm.conf" ]] || return 0
    export SLURM_CONF="$STATE/etc/slurm.conf"
    local jobs t0
    jobs="$(squeue -h -o %A 2>/dev/null || true)"
    [[ -n "$jobs" ]] || return 0
    log "cancelling jobs still in the queue: $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    t0="$(now_us)"
    while [[ -n "$(squeue -h -o %A 2>/dev/null || true)" ]]; do
        if past_deadline "$t0" "$STOP_TIMEOUT_S"; then
            log "warning: jobs still listed after ${STOP_TIMEOUT_S} s; stopping the daemons anyway"
            return 0
        fi
        sleep "$POLL_S"
    done
}

# Send TERM, wait (bounded) for the process to exit, then KILL.
stop_pid() {
    local name="$1" pid="$2" t0
    kill -TERM "$pid" 2>/dev/null || true
    t0="$(now_us)"
    while pid_is_ours "$pid"; do
        if past_deadline "$t0" "$STOP_TIMEOUT_S"; then
            log "warning: $name (pid $pid) ignored TERM for ${STOP_TIMEOUT_S} s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep "$POLL_S"
    done
}

stop_cluster() {
    [[ -d "$STATE/pids" ]] || {
        log "nothing recorded in $STATE/pids; nothing to stop"
        return 0
    }
    cancel_all_jobs
    local name pid stopped=()
    for name in "${DAEMONS_STOP_ORDER[@]}"; do
        pid="$(recorded_pid "$name")"
        [[ -n "$pid" ]] || continue
        if pid_is_ours "$pid"; then
            stop_pid "$name" "$pid"
            stopped+=("$name:$pid")
        fi
        rm -f "$(pid_file "$name")"
    done
    if ((${#stopped[@]})); then
        log "stopped ${stopped[*]}"
    else
        log "no recorded daemon was running in $STATE"
    fi
}

status_cluster() {
    local name pid rc=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        pid="$(recorded_pid "$name")"
        if pid_is_ours "$pid"; then
            echo "$name pid=$pid running"
        else
            echo "$name ${pid:+pid=$pid }not running"
            rc=1
        fi
    done
    return "$rc"
}

# ---------------------------------------------------------------------------------------------------- public

# Resolve STATE_DIR to an absolute path (creating it when CREATE=1); returns 1 when it does not exist.
set_state() {
    local dir="$1" create="$2"
    if [[ "$create" == 1 ]]; then
        mkdir -p "$dir" || die "cannot create STATE_DIR $dir"
    elif [[ ! -d "$dir" ]]; then
        log "STATE_DIR $dir does not exist; nothing to do"
        return 1
    fi
    STATE="$(cd "$dir" && pwd -P)"
}

cluster_start() { set_state "$1" 1 && start_cluster; }
cluster_stop() { set_state "$1" 0 || return 0; stop_cluster; }
cluster_status() { set_state "$1" 0 && status_cluster; }

# On a failed `start` (any step, even one without its own check), stop whatever did start before exiting.
stop_after_failed_start() {
    local rc=$?
    if ((rc != 0 && LAUNCHED)) && [[ -n "$(ls -A "$STATE/pids" 2>/dev/null)" ]]; then
        log "start failed (exit $rc); stopping the daemons started so far"
        stop_cluster || true
    fi
    return "$rc"
}

main() {
    (($# == 2)) || usage
    case "$1" in
    start)
        trap stop_after_failed_start EXIT
        cluster_start "$2"
        ;;
    stop) cluster_stop "$2" ;;
    status) cluster_status "$2" ;;
    *) usage ;;
    esac
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    main "$@"
fi
