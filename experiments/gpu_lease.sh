#!/usr/bin/env bash
# Several job queues at once on one leased multi-GPU host, each on its own GPUs, detached from the
# command that starts them (a lease is released 30 s after its last call, so later calls only wait
# and collect). State lives in $LEASE (default /root/lease): NAME.log, NAME.done (the exit code).
#
#   gpu_lease.sh start NAME GPUS [after=A,B] 'commands'   run 'commands' with CUDA_VISIBLE_DEVICES=GPUS
#                                                         (and a Ray temp dir of its own), after queues A, B
#   gpu_lease.sh wait SECONDS                             until every queue is done or SECONDS pass
#   gpu_lease.sh status                                   one line per queue, with its log's last line
#   gpu_lease.sh collect DEST                             DEST/NAME.tgz of $LEASE/NAME/ per queue, + logs
set -u
LEASE=${LEASE:-/root/lease}
mkdir -p "$LEASE"
cmd=${1:-}
shift || true

status() {
    for log in "$LEASE"/*.log; do
        [ -e "$log" ] || continue
        name=$(basename "$log" .log)
        state=running
        [ -e "$LEASE/$name.done" ] && state="done rc=$(cat "$LEASE/$name.done")"
        echo "$name: $state | $(tail -c 2000 "$log" | tr '\r' '\n' | grep -v '^\s*$' | tail -1 | cut -c1-160)"
    done
}

case "$cmd" in
start)
    name=$1 gpus=$2
    shift 2
    after=""
    if [[ "${1:-}" == after=* ]]; then after=${1#after=}; shift; fi
    script="$LEASE/$name.sh"
    {
        echo "set -u"
        for dep in ${after//,/ }; do echo "until [ -e '$LEASE/$dep.done' ]; do sleep 5; done"; done
        echo "export CUDA_VISIBLE_DEVICES=$gpus RAY_TMPDIR=/tmp/ray_$name"
        echo "mkdir -p '$LEASE/$name' /tmp/ray_$name"
        echo "cd '$PWD'"
        echo "echo \"[\$(date +%T)] $name starts on GPUs $gpus\""
        echo "( $* )"
        echo "rc=\$?; echo \"[\$(date +%T)] $name ends rc=\$rc\"; echo \$rc >'$LEASE/$name.done'"
    } >"$script"
    rm -f "$LEASE/$name.done"
    setsid nohup bash "$script" >"$LEASE/$name.log" 2>&1 </dev/null &
    echo "started $name on GPUs $gpus${after:+ after $after}"
    ;;
wait)
    limit=$1 t0=$SECONDS
    while [ $((SECONDS - t0)) -lt "$limit" ]; do
        pending=0
        for log in "$LEASE"/*.log; do
            [ -e "$log" ] && [ ! -e "${log%.log}.done" ] && pending=1
        done
        [ $pending = 0 ] && break
        sleep "${LEASE_POLL_S:-10}"
    done
    status
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
    ;;
status) status ;;
collect)
    dest=$1
    mkdir -p "$dest"
    for log in "$LEASE"/*.log; do
        name=$(basename "$log" .log)
        [ -d "$LEASE/$name" ] && tar czf "$dest/$name.tgz" --exclude='*.safetensors' --exclude='*.bin' \
            --exclude='*.pt' --exclude='*.pth' -C "$LEASE" "$name"
    done
    tar czf "$dest/logs.tgz" -C "$LEASE" $(cd "$LEASE" && ls *.log *.sh 2>/dev/null)
    ls -la "$dest"
    ;;
*)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
