#!/usr/bin/env bash
# Start mmdiff's one-node local SLURM test cluster (run as root, after slurm/local/install.sh).
#
#   1. creates a MUNGE key if there is none, starts munged as the munge user;
#   2. writes /etc/slurm/slurm.conf and cgroup.conf from the templates next to this script, with
#      this machine's short hostname, CPU count and memory;
#   3. starts slurmctld and slurmd and waits until `sinfo` shows the node idle.
#
# Safe to run again: daemons already running with the same config are left alone; a changed config
# restarts them. Settings (environment variables, defaults in brackets):
#   MMDIFF_SLURM_CRED_EXPIRE [5]    AuthInfo=cred_expire: also the wait before a requeued job may
#                                   start again (Slurm's default 120 s is the "2 minute" delay)
#   MMDIFF_SLURM_SCHED_INTERVAL [2] seconds between full scheduler passes (default 60 / 30 s)
#   MMDIFF_SLURM_KILL_WAIT [5]      seconds between SIGTERM and SIGKILL (default 30)
#   MMDIFF_SLURM_MIN_JOB_AGE [60]   seconds a finished job stays visible to scontrol (default 300)
#   MMDIFF_SLURM_TIMEOUT [60]       seconds to wait for the node to become idle
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF_DIR=/etc/slurm
STATE=/var/spool/mmdiff-slurm
LOG=/var/log/slurm
RUN=/run/slurm
CRED_EXPIRE=${MMDIFF_SLURM_CRED_EXPIRE:-5}
SCHED_INTERVAL=${MMDIFF_SLURM_SCHED_INTERVAL:-2}
KILL_WAIT=${MMDIFF_SLURM_KILL_WAIT:-5}
MIN_JOB_AGE=${MMDIFF_SLURM_MIN_JOB_AGE:-60}
TIMEOUT=${MMDIFF_SLURM_TIMEOUT:-60}

say() { printf '[slurm/local/start] %s\n' "$*"; }
die() { say "error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root."
for bin in munged slurmctld slurmd sinfo scontrol; do
    command -v "$bin" >/dev/null 2>&1 || die "'$bin' not found; run slurm/local/install.sh first."
done

[[ $CRED_EXPIRE =~ ^[0-9]+$ ]] && ((CRED_EXPIRE >= 5)) ||
    die "MMDIFF_SLURM_CRED_EXPIRE must be a whole number >= 5 (Slurm ignores smaller values and uses 120)."

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ------------------------------------------------------------------------------------ munge
install -d -o munge -g munge -m 0700 /etc/munge
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating MUNGE key /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

if pid_alive /run/munge/munged.pid && munge -n </dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running (pid $(cat /run/munge/munged.pid))"
else
    say "starting munged as user munge"
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munged did not start; see /var/log/munge/munged.log."
    say "munged running (pid $(cat /run/munge/munged.pid))"
fi

# ---------------------------------------------------------------------------------- config
HOST=$(hostname -s)
ADDR=$(getent hosts "$HOST" | awk '{print $1; exit}')
ADDR=${ADDR:-127.0.0.1}
# slurmd -C prints what slurmd will detect; a node configured with more than that is drained.
DETECTED=$(slurmd -C 2>/dev/null | head -n1 || true)
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$DETECTED")
MEMORY_MB=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$DETECTED")
CPUS=${CPUS:-$(nproc --all)}
MEMORY_MB=${MEMORY_MB:-$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)}
# Leave a little memory to the system so the node is never "low RealMemory" drained.
MEMORY_MB=$((MEMORY_MB * 95 / 100))
MEM_PER_CPU_MB=$((MEMORY_MB / CPUS))
say "node $HOST ($ADDR): $CPUS CPUs, ${MEMORY_MB} MB for jobs"

render() {
    sed -e "s|@HOST@|$HOST|g" -e "s|@ADDR@|$ADDR|g" -e "s|@CPUS@|$CPUS|g" \
        -e "s|@MEMORY_MB@|$MEMORY_MB|g" -e "s|@MEM_PER_CPU_MB@|$MEM_PER_CPU_MB|g" -e "s|@STATE@|$STATE|g" -e "s|@LOG@|$LOG|g" \
        -e "s|@RUN@|$RUN|g" -e "s|@CRED_EXPIRE@|$CRED_EXPIRE|g" \
        -e "s|@SCHED_INTERVAL@|$SCHED_INTERVAL|g" -e "s|@KILL_WAIT@|$KILL_WAIT|g" \
        -e "s|@MIN_JOB_AGE@|$MIN_JOB_AGE|g" "$1"
}

mkdir -p "$CONF_DIR" "$STATE/slurmctld" "$STATE/slurmd" "$LOG" "$RUN"
changed=0
for name in slurm.conf cgroup.conf; do
    new=$(render "$HERE/$name.in")
    if [[ -f $CONF_DIR/$name ]] && [[ $(cat "$CONF_DIR/$name") == "$new" ]]; then
        say "$CONF_DIR/$name is up to date"
    else
        if [[ -f $CONF_DIR/$name ]] && ! grep -q "slurm/local/start.sh" "$CONF_DIR/$name"; then
            say "keeping a copy of the existing $CONF_DIR/$name as $CONF_DIR/$name.orig"
            cp -n "$CONF_DIR/$name" "$CONF_DIR/$name.orig"
        fi
        printf '%s\n' "$new" >"$CONF_DIR/$name"
        say "wrote $CONF_DIR/$name"
        changed=1
    fi
done

# --------------------------------------------------------------------------------- daemons
stop_daemon() {  # name pidfile
    if pid_alive "$2"; then
        say "stopping $1 (pid $(cat "$2")) to apply the new config"
        kill "$(cat "$2")" 2>/dev/null || true
        for _ in $(seq 100); do pid_alive "$2" || break; sleep 0.1; done
        if pid_alive "$2"; then kill -9 "$(cat "$2")" 2>/dev/null || true; fi
    fi
    rm -f "$2"
}

if [[ $changed -eq 1 ]]; then
    stop_daemon slurmd "$RUN/slurmd.pid"
    stop_daemon slurmctld "$RUN/slurmctld.pid"
fi

if pid_alive "$RUN/slurmctld.pid"; then
    say "slurmctld already running (pid $(cat "$RUN/slurmctld.pid"))"
else
    say "starting slurmctld (log $LOG/slurmctld.log)"
    slurmctld -f "$CONF_DIR/slurm.conf"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q "is UP" || die "slurmctld is not answering; see $LOG/slurmctld.log."

if pid_alive "$RUN/slurmd.pid"; then
    say "slurmd already running (pid $(cat "$RUN/slurmd.pid"))"
else
    say "starting slurmd (log $LOG/slurmd.log)"
    slurmd -f "$CONF_DIR/slurm.conf"
fi

# ------------------------------------------------------------------------------ wait idle
say "waiting up to ${TIMEOUT}s for node $HOST to be idle"
deadline=$((SECONDS + TIMEOUT))
state=""
while ((SECONDS < deadline)); do
    state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -n1)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*|fail*)
            say "node is '$state'; resuming it"
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
case "$state" in
    idle|mixed|allocated|completing) ;;
    *) die "node $HOST is '${state:-unknown}' after ${TIMEOUT}s; see $LOG/slurmd.log and $LOG/slurmctld.log." ;;
esac

say "cluster up:"
sinfo
say "requeue delay settings: cred_expire=${CRED_EXPIRE}s sched_interval=${SCHED_INTERVAL}s kill_wait=${KILL_WAIT}s"
say "try: sbatch --wrap 'srun hostname' ; squeue ; stop with slurm/local/stop.sh"
