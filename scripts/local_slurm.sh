#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests marked `slurm` (and for trying
# `hydra/launcher=slurm` without a real cluster).
#
#   scripts/local_slurm.sh start    install what is missing (apt-get), configure, start, and
#                                   wait until the node is idle; a running cluster is left as is
#   scripts/local_slurm.sh stop     cancel every job, stop the daemons this script started
#   scripts/local_slurm.sh status   daemons, sinfo, squeue; exit status 0 when the node is up
#
# Exit status: 0 done, 1 failed, 2 usage, 3 cannot install (no root, no apt-get, apt failed):
# the SLURM tests skip on 3 and fail on 1.
#
# Needs root and apt-get (Debian 12: SLURM 22.05). Installs slurmctld, slurmd, slurm-client,
# munge, slurmdbd and mariadb-server; writes /etc/slurm/slurm.conf and slurmdbd.conf (it
# refuses to replace files it did not write); logs go to /var/log/slurm/.
#
# What the configuration sets, and why:
#   one node with this machine's CPUs and memory (`slurmd -C`), one partition `debug`;
#   SelectType=select/cons_tres with CR_Core_Memory: a task gets the cores and memory it asks
#     for, so the tasks of a sweep run side by side when they fit (task/affinity pins them);
#   ProctrackType=proctrack/linuxproc: no cgroups needed (containers, CI machines);
#   accounting through slurmdbd into a local MariaDB: submitit learns that a task ended from
#     `sacct`. Without accounting sacct fails (a warning at every poll) and a task that dies
#     without writing its result (cancelled, killed, out of memory) is never seen to end, so the
#     sweep would wait forever; the job completion log (`sacct -c`) cannot tell array tasks apart;
#   JobRequeue=1: batch jobs can be requeued (`scontrol requeue`, preemption, submitit's requeue
#     before the time limit);
#   AuthInfo=cred_expire=5: a requeued job may start again 5 s later (default 120 s), and
#     sched_interval=5 looks for such jobs every 5 s (default 60 s);
#   KillWait=10: a task that is cancelled, requeued or past its time limit gets SIGTERM and, 10 s
#     later, SIGKILL (default 30 s); training stops at the next batch and saves in well under that;
#   OverTimeLimit=0: the time limit is the time limit.
# SLURM checks time limits every 30 s, so the signal before the limit (sbatch --signal=USR2@N)
# comes N to N+30 s before it, and a job past its limit is killed up to 30 s late.
set -euo pipefail

CONF_DIR=/etc/slurm
MARK="# Written by prostate-seg scripts/local_slurm.sh: a single-node test cluster."
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
RUN_DIR=/run/local_slurm          # what this script started (so stop leaves the rest alone)
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
DBD_PID=/run/slurmdbd.pid
MUNGE_PID=/run/munge/munged.pid
DB=slurm_acct_db
CLUSTER=local
WAIT_S=60

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: $*" >&2; exit 1; }
cannot_install() { echo "local_slurm: $*" >&2; exit 3; }

alive() {  # alive PIDFILE: the process named in PIDFILE runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for WHAT COMMAND...: retry COMMAND for up to WAIT_S seconds
    local what=$1
    shift
    for _ in $(seq 1 "$WAIT_S"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    die "$what: no answer after ${WAIT_S} s; see $LOG_DIR/"
}

install_missing() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    command -v apt-get >/dev/null \
        || cannot_install "apt-get not found: install ${missing[*]} by hand"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Services are started below, by this script, not by the packages' maintainer scripts.
    local quiet=(-y -q -o Dpkg::Use-Pty=0 --no-install-recommends)
    apt-get install "${quiet[@]}" "${missing[@]}" >/dev/null \
        || { apt-get update -q >/dev/null \
             && apt-get install "${quiet[@]}" "${missing[@]}" >/dev/null; } \
        || cannot_install "apt-get install ${missing[*]} failed"
}

write_file() {  # write_file PATH MODE OWNER TEXT: (re)write a config file that carries MARK
    local path=$1 mode=$2 owner=$3 text=$4
    if [[ -e $path ]] && ! grep -qxF "$MARK" "$path"; then
        die "$path exists and was not written by this script; not replacing it"
    fi
    if [[ ! -e $path ]] || [[ $(cat "$path") != "$text" ]]; then
        say "writing $path"
        printf '%s\n' "$text" > "$path"
    fi
    chmod "$mode" "$path"
    chown "$owner" "$path"
}

configure() {
    [[ -s /etc/munge/munge.key ]] || { say "writing /etc/munge/munge.key"; mungekey --create; }
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$RUN_DIR"
    chown slurm:slurm "$LOG_DIR" "$STATE_DIR/slurmctld"
    local host node
    host=$(hostname -s)
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1
    # RealMemory=24105": what slurmd finds on this machine
    node=$(slurmd -C | head -n 1)
    [[ $node == NodeName=* ]] || die "slurmd -C did not describe this machine: $node"
    write_file "$CONF_DIR/slurm.conf" 0644 root:root "$MARK
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
KillWait=10
OverTimeLimit=0
$node
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"
    # slurmdbd runs as SlurmUser and logs into MariaDB through its socket as that user.
    write_file "$CONF_DIR/slurmdbd.conf" 0600 slurm:slurm "$MARK
DbdHost=localhost
SlurmUser=slurm
AuthType=auth/munge
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StorageLoc=$DB
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$DBD_PID"
}

start_mariadb() {
    if ! mariadb-admin ping >/dev/null 2>&1; then
        say "starting mariadb"
        /etc/init.d/mariadb start >/dev/null
        touch "$RUN_DIR/mariadb"
    fi
    mariadb -e "CREATE DATABASE IF NOT EXISTS $DB;
                CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
                GRANT ALL ON $DB.* TO 'slurm'@'localhost';"
}

node_state() {
    sinfo --noheader --Node --format=%T 2>/dev/null | head -n 1
}

node_ready() {
    [[ $(node_state) =~ ^(idle|mixed|allocated)$ ]]
}

start() {
    [[ $(id -u) -eq 0 ]] \
        || cannot_install "must run as root (it installs packages and starts daemons)"
    install_missing
    configure
    if ! alive "$MUNGE_PID"; then
        say "starting munged"
        mkdir -p /run/munge
        chown munge:munge /run/munge
        runuser -u munge -- /usr/sbin/munged
    fi
    start_mariadb
    if ! alive "$DBD_PID"; then
        say "starting slurmdbd"
        /usr/sbin/slurmdbd
        wait_for slurmdbd sacctmgr --noheader list cluster
    fi
    if ! alive "$CTLD_PID"; then
        say "starting slurmctld"
        /usr/sbin/slurmctld
    fi
    if ! alive "$SLURMD_PID"; then
        say "starting slurmd"
        /usr/sbin/slurmd
    fi
    for _ in $(seq 1 "$WAIT_S"); do
        node_ready && break
        if [[ $(node_state) =~ ^(down|drain) ]]; then
            scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 1
    done
    node_ready || die "node $(hostname -s) not idle after ${WAIT_S} s (state: $(node_state));" \
        "see $LOG_DIR/slurmctld.log and slurmd.log"
    # slurmctld adds the cluster to the accounting database when it first registers
    wait_for "accounting" bash -c \
        "sacctmgr --noheader --parsable2 list cluster format=cluster | grep -qx $CLUSTER"
    say "node $(hostname -s) is $(node_state); sacct answers"
}

stop_daemon() {  # stop_daemon NAME PIDFILE
    alive "$2" || return 0
    local pid
    pid=$(cat "$2")
    say "stopping $1 ($pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 $((WAIT_S * 5))); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    die "$1 ($pid) still runs ${WAIT_S} s after SIGTERM"
}

stop() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    if alive "$CTLD_PID" && [[ -n $(squeue --noheader --format=%i 2>/dev/null) ]]; then
        say "cancelling $(squeue --noheader --format=%i | wc -l) jobs"
        squeue --noheader --format=%i | xargs --no-run-if-empty scancel --full || true
        for _ in $(seq 1 "$WAIT_S"); do
            [[ -z $(squeue --noheader --format=%i 2>/dev/null) ]] && break
            sleep 1
        done
    fi
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    stop_daemon slurmdbd "$DBD_PID"
    if [[ -e $RUN_DIR/mariadb ]]; then
        say "stopping mariadb"
        /etc/init.d/mariadb stop >/dev/null
        rm -f "$RUN_DIR/mariadb"
    fi
    stop_daemon munged "$MUNGE_PID"
}

status() {
    local entry down=0
    for entry in munged:$MUNGE_PID slurmdbd:$DBD_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        if alive "${entry#*:}"; then
            say "${entry%%:*} runs ($(cat "${entry#*:}"))"
        else
            say "${entry%%:*} stopped"
            down=1
        fi
    done
    (( down == 0 )) && sinfo && squeue
    (( down == 0 )) && node_ready
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
