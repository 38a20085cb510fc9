#!/usr/bin/env bash
# Stop the single-node test cluster started by start_cluster.sh
# (slurmd, slurmctld, munged).  Best effort; always exits 0.

set -u

log() { echo "[stop_cluster] $*"; }

alive() {  # running and not a zombie waiting to be reaped
    kill -0 "$1" 2>/dev/null && ! grep -qE '^State:[[:space:]]+[ZX]' "/proc/$1/status" 2>/dev/null
}

stop_pidfile() {  # pidfile name
    local pf=$1 name=$2 pid
    [[ -r $pf ]] || { log "$name: no pid file"; return 0; }
    pid=$(cat "$pf" 2>/dev/null)
    if [[ ! $pid =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null \
       || grep -qE '^State:[[:space:]]+[ZX]' "/proc/$pid/status" 2>/dev/null \
       || [[ $(cat "/proc/$pid/comm" 2>/dev/null) != "$name"* ]]; then
        log "$name: not running"
        rm -f "$pf"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.2; done
    if alive "$pid"; then
        log "$name did not exit, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pf"
    return 0
}

stop_pidfile /run/slurmd.pid slurmd
stop_pidfile /run/slurmctld.pid slurmctld
stop_pidfile /run/munge/munged.pid munged
exit 0
