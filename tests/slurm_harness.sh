#!/usr/bin/env bash
# A one-node SLURM on localhost for tests: Debian's slurm-wlm (22.05) and munge, with every file in DIR
# (config, key, sockets, state, logs, pid files) and free ports, so it touches nothing of the machine's own.
#
#   tests/slurm_harness.sh start DIR   # then: export SLURM_CONF=DIR/slurm.conf; sbatch/squeue/scancel work
#   tests/slurm_harness.sh stop DIR    # stops the daemons it started, by their pid files
#
# Needs root (slurmd launches jobs as any user; munged is started as the munge user). On failure it prints
# one line saying why and exits 1; tests turn that line into a skip reason.
set -uo pipefail
cmd=${1:-}; dir=${2:-}
fail() { echo "slurm harness: $*" >&2; exit 1; }
[ -n "$dir" ] || fail "usage: $0 start|stop DIR"

stop() {
    # jobs first: their processes outlive slurmd, so cancel them and wait until SLURM has cleaned up
    if [ -f "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
        export SLURM_CONF=$dir/slurm.conf
        ids=$(squeue -h -o %i 2>/dev/null)
        if [ -n "$ids" ]; then
            scancel $ids
            for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
        fi
    fi
    pids=()
    for name in slurmd slurmctld munged; do   # all at once: each takes a second or two to go
        pid=$(cat "$dir/run/$name.pid" 2>/dev/null) || continue
        kill "$pid" 2>/dev/null && pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
}

start() {
    [ "$(id -u)" = 0 ] || fail "needs root (slurmd and munged must run as root and munge)"
    for bin in munged slurmctld slurmd sbatch squeue scontrol runuser; do
        command -v "$bin" >/dev/null || fail "$bin not found (apt-get install slurm-wlm slurmd slurm-client munge)"
    done
    id munge >/dev/null 2>&1 || fail "no munge user (is the munge package installed?)"
    mkdir -p "$dir"/{munge,state,spool,log,run}
    # munged runs as munge and wants its socket directory searchable by all but writable by no one else
    chmod 755 "$dir"; chown munge:munge "$dir/munge"; chmod 755 "$dir/munge"
    key=$dir/munge/munge.key
    [ -f "$key" ] || { head -c 1024 /dev/urandom > "$key"; chown munge:munge "$key"; chmod 400 "$key"; }
    touch "$dir/run/munged.pid"; chown munge:munge "$dir/run/munged.pid"
    runuser -u munge -- munged --socket="$dir/munge/socket" --key-file="$key" --pid-file="$dir/run/munged.pid" \
        --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed" \
        || fail "munged did not start: $(tail -n1 "$dir/munge/munged.log" 2>/dev/null)"
    read -r ctld_port slurmd_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
    cpus=$(nproc)
    memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat > "$dir/slurm.conf" <<CONF
ClusterName=nmgtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds (default 120) before it may start again
AuthInfo=socket=$dir/munge/socket,cred_expire=5
# schedule pending jobs every second (a test waits for them), not every minute
SchedulerParameters=sched_interval=1,bf_interval=1
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start: $(tail -n1 "$dir/log/slurmctld.log" 2>/dev/null)"
    slurmd -f "$SLURM_CONF" -N localhost || fail "slurmd did not start: $(tail -n1 "$dir/log/slurmd.log" 2>/dev/null)"
    for _ in $(seq 100); do
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n1)
        [ "$state" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 0.2
    done
    stop
    fail "node not idle after 20 s (state '${state:-none}'): $(tail -n1 "$dir/log/slurmctld.log" 2>/dev/null)"
}

case $cmd in
    start) start ;;
    stop) stop ;;
    *) fail "usage: $0 start|stop DIR" ;;
esac
