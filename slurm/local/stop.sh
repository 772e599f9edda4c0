#!/usr/bin/env bash
# Stop mmdiff's local SLURM test cluster: cancel every job, stop slurmd, slurmctld and munged.
# The next start.sh begins with an empty queue.
#
#   slurm/local/stop.sh          stop; keep /etc/slurm/*.conf, the logs in /var/log/slurm and the
#                                controller state (so job ids keep counting up and never repeat)
#   slurm/local/stop.sh --purge  also remove the generated configs, the state and the logs
#
# Safe to run when nothing is running. Only stops daemons through the pid files start.sh uses.
set -euo pipefail

CONF_DIR=/etc/slurm
STATE=/var/spool/mmdiff-slurm
LOG=/var/log/slurm
RUN=/run/slurm
PURGE=0
[[ ${1:-} == --purge ]] && PURGE=1

say() { printf '[slurm/local/stop] %s\n' "$*"; }
[[ $(id -u) -eq 0 ]] || { say "error: must run as root." >&2; exit 1; }

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {  # name pidfile
    if pid_alive "$2"; then
        local pid
        pid=$(cat "$2")
        say "stopping $1 (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            say "$1 still running after 10s; sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
    else
        say "$1 is not running"
    fi
    rm -f "$2"
}

if pid_alive "$RUN/slurmctld.pid" && command -v squeue >/dev/null 2>&1; then
    jobs=$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        say "cancelling jobs: $jobs"
        scancel $jobs 2>/dev/null || true
        # Give the jobs' processes KillWait seconds to exit before the daemons go away.
        for _ in $(seq 30); do
            [[ -z $(squeue -h -o '%i' 2>/dev/null) ]] && break
            sleep 1
        done
    else
        say "no jobs in the queue"
    fi
fi

stop_daemon slurmd "$RUN/slurmd.pid"
stop_daemon slurmctld "$RUN/slurmctld.pid"
stop_daemon munged /run/munge/munged.pid

say "removing runtime files in $RUN"
rm -rf "$RUN"
rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
if [[ $PURGE -eq 1 ]]; then
    for name in slurm.conf cgroup.conf; do
        if [[ -f $CONF_DIR/$name ]] && grep -q "slurm/local/start.sh" "$CONF_DIR/$name"; then
            say "removing $CONF_DIR/$name"
            rm -f "$CONF_DIR/$name"
            if [[ -f $CONF_DIR/$name.orig ]]; then
                say "restoring $CONF_DIR/$name from $CONF_DIR/$name.orig"
                mv "$CONF_DIR/$name.orig" "$CONF_DIR/$name"
            fi
        fi
    done
    say "removing state in $STATE (job ids start from 1 again) and logs in $LOG"
    rm -rf "$STATE" "$LOG"
fi
say "stopped."
