#!/usr/bin/env bash
# A local Redis Cluster for the tests and benchmarks: three masters on
# loopback, no replicas, nothing persisted.
#
#   scripts/cluster.sh up     start it (or reuse a running one); prints its URL
#   scripts/cluster.sh down   stop it and remove its files
#
# Ports: CLUSTER_PORT (default 7100) and the next two. Files: target/redis-cluster.
# Needs redis-server and redis-cli 7.0 or later (Debian: apt-get install redis-server).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
base="${CLUSTER_PORT:-7100}"
dir="$PWD/target/redis-cluster"
ports=("$base" "$((base + 1))" "$((base + 2))")
url="redis+cluster://127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"

say() { echo "[cluster] $*" >&2; }

healthy() {
  redis-cli -p "${ports[0]}" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

case "${1:-up}" in
  up)
    if healthy; then
      say "a cluster is already up on ${ports[*]}"
      echo "$url"
      exit 0
    fi
    command -v redis-server >/dev/null || { say "redis-server is missing (apt-get install redis-server)"; exit 1; }
    for port in "${ports[@]}"; do
      mkdir -p "$dir/$port"
      rm -f "$dir/$port/nodes.conf"
      redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
        --cluster-config-file nodes.conf --cluster-node-timeout 2000 --cluster-replica-validity-factor 0 \
        --save '' --appendonly no --dir "$dir/$port" \
        --daemonize yes --pidfile "$dir/$port/redis.pid" --logfile "$dir/$port/redis.log"
    done
    for port in "${ports[@]}"; do
      for _ in $(seq 100); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        sleep 0.1
      done
    done
    redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
    for _ in $(seq 100); do
      healthy && break
      sleep 0.2
    done
    healthy || { say "the cluster did not come up; see $dir/*/redis.log"; exit 1; }
    say "up on ${ports[*]}"
    echo "$url"
    ;;
  down)
    for port in "${ports[@]}"; do
      if [ -f "$dir/$port/redis.pid" ]; then
        kill "$(cat "$dir/$port/redis.pid")" 2>/dev/null || true
      fi
    done
    sleep 0.5
    rm -rf "$dir"
    say "down"
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
