#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for the tests and for developers, without systemd:
#
#   eval "$(.ci/slurm_cluster.sh start [DIR])"   # prints `export SLURM_CONF=DIR/slurm.conf`
#   sbatch --wait --nodes 2 --ntasks-per-node 1 --cpus-per-task 1 --gpus-per-node 0 \
#       config_hub/slurm/litllm.sbatch pretrain --config ...
#   .ci/slurm_cluster.sh stop [DIR]              # stops every daemon by the PID it recorded
#
# munged, slurmctld and two slurmd (`-N n1`, `-N n2`: Debian builds Slurm with multiple-slurmd
# support) run as the current user (root in CI). Both nodes are this host (NodeHostname) and are
# reached at NodeAddr=127.0.0.1 on their own ports; the controller is addressed at 127.0.0.1 too.
# Config, munge key and socket, state, spool and logs all live in DIR (default /tmp/litllm-slurm).
# Needs Debian's `slurmctld slurmd slurm-client munge` packages (.ci/run installs them).
set -euo pipefail

action=${1:?usage: slurm_cluster.sh start|stop|status [DIR]}
dir=${2:-${LITLLM_SLURM_DIR:-/tmp/litllm-slurm}}

stop_pid_file() {  # stop the process whose PID the file holds (only if it is still that daemon)
    local file=$1 name=$2 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && grep -q "$name" "/proc/$pid/cmdline" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$file"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case $action in
stop)
    for node in n2 n1; do stop_pid_file "$dir/slurmd-$node.pid" slurmd; done
    stop_pid_file "$dir/slurmctld.pid" slurmctld
    stop_pid_file "$dir/munged.pid" munged
    echo "stopped the Slurm cluster in $dir" >&2
    exit 0
    ;;
status)
    SLURM_CONF=$dir/slurm.conf sinfo -N -o '%N %T %c'
    exit 0
    ;;
start) ;;
*) echo "usage: slurm_cluster.sh start|stop|status [DIR]" >&2; exit 2 ;;
esac

for tool in munged mungekey slurmctld slurmd sbatch scontrol; do
    command -v "$tool" >/dev/null || { echo "slurm_cluster.sh: $tool not found (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 1; }
done
"$0" stop "$dir" 2>/dev/null  # a cluster left over in the same folder
rm -rf "$dir"
mkdir -p "$dir"/{munge,state,log,spool/n1,spool/n2}
chmod 700 "$dir/munge"
host=$(hostname -s)
user=$(id -un)

# ---- munge: its own key and socket, so nothing under /etc or /run is touched
mungekey --create --keyfile="$dir/munge/munge.key" --force >/dev/null
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munge.seed"

# ---- slurm.conf
ctld_port=$(free_port); n1_port=$(free_port); n2_port=$(free_port)
cat >"$dir/slurm.conf" <<EOF
ClusterName=litllm-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=10
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n1_port CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$n2_port CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$dir/slurm.conf

slurmctld -f "$SLURM_CONF"
for node in n1 n2; do slurmd -f "$SLURM_CONF" -N "$node"; done

# wait until both nodes are idle (slurmctld and the slurmds register within seconds)
for _ in $(seq 60); do
    if [[ $(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle') == 2 ]]; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "slurm_cluster.sh: the nodes did not come up; see $dir/log/" >&2
sinfo -N >&2 || true
tail -n 5 "$dir"/log/*.log >&2 || true
exit 1
