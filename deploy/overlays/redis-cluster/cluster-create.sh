#!/bin/sh
# Forms a Redis Cluster out of fresh nodes, once (the redis-cluster-create Job runs it; so does
# tests/deploy/check, against six local redis-server processes).
#
#   REDIS_NODES     host:port of every node, separated by spaces or newlines (required)
#   REDIS_REPLICAS  replicas per master (default 1: six nodes make three masters)
#   WAIT_SECONDS    how long to wait for the nodes, and then for cluster_state:ok (default 600)
#
# 1. Waits until every node answers PING.
# 2. If any node already belongs to a cluster (knows other nodes or owns slots), changes nothing:
#    it reports whether that cluster is healthy (as in 3, waiting up to 60 s), lists nodes still
#    outside it, and exits 0.
# 3. Otherwise runs `redis-cli --cluster create ... --cluster-replicas R --cluster-yes` with each
#    node's announced IP (CLUSTER MEET takes IPs, not names), then waits until the cluster is
#    healthy: every node reports cluster_state:ok and knows all the others, `redis-cli --cluster
#    check` passes, and every node sees the same masters and replicas.
# POSIX sh: runs in the redis alpine image (busybox) as well as with bash or dash.
set -eu

: "${REDIS_NODES:?REDIS_NODES: host:port of every node}"
replicas=${REDIS_REPLICAS:-1}
wait_seconds=${WAIT_SECONDS:-600}
started=$(date +%s)

log() { echo "cluster-create: $*"; }

# cli HOST:PORT ARGS...: one redis-cli command, bounded in time (a pod that is not up yet can
# leave a connect hanging).
cli() {
  node=$1
  shift
  timeout 10 redis-cli -h "${node%:*}" -p "${node##*:}" "$@"
}

# info_field HOST:PORT FIELD: a number from CLUSTER INFO (empty if the node does not answer).
info_field() {
  cli "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n "s/^$2:\([0-9]*\)$/\1/p"
}

out_of_time() {
  [ $(($(date +%s) - started)) -ge "$wait_seconds" ]
}

count=0
for node in $REDIS_NODES; do
  count=$((count + 1))
  until [ "$(cli "$node" ping 2>/dev/null | tr -d '\r')" = PONG ]; do
    if out_of_time; then
      log "$node did not answer PING within ${wait_seconds} s"
      exit 1
    fi
    sleep 2
  done
done
log "all $count nodes answer"

# view HOST:PORT: the cluster as one node sees it, one "id role master-id" line per node, sorted.
view() {
  cli "$1" cluster nodes 2>/dev/null | tr -d '\r' \
    | awk '{ role = ($3 ~ /master/) ? "master" : "replica"; print $1, role, $4 }' | sort
}

# healthy WANT: every listed node reports cluster_state:ok and knows WANT nodes, `redis-cli
# --cluster check` finds every slot covered and one slot map, and all nodes see the same roles
# (a replica's role reaches the others by gossip a moment after the create).
healthy() {
  for node in $REDIS_NODES; do
    cli "$node" cluster info 2>/dev/null | tr -d '\r' | grep -q '^cluster_state:ok$' || return 1
    [ "$(info_field "$node" cluster_known_nodes)" = "$1" ] || return 1
  done
  for first in $REDIS_NODES; do break; done
  timeout 20 redis-cli --cluster check "$first" >/dev/null 2>&1 || return 1
  seen=$(view "$first")
  [ -n "$seen" ] || return 1
  for node in $REDIS_NODES; do
    [ "$(view "$node")" = "$seen" ] || return 1
  done
}

# wait_ok WANT: waits until healthy; after WAIT_SECONDS shows why not and exits 1.
wait_ok() {
  until healthy "$1"; do
    if out_of_time; then
      log "no healthy cluster of $1 nodes within ${wait_seconds} s:"
      for first in $REDIS_NODES; do break; done
      timeout 20 redis-cli --cluster check "$first" 2>&1 | tail -8
      exit 1
    fi
    sleep 1
  done
}

members=""
outside=""
for node in $REDIS_NODES; do
  known=$(info_field "$node" cluster_known_nodes)
  slots=$(info_field "$node" cluster_slots_assigned)
  if [ "${known:-1}" -gt 1 ] || [ "${slots:-0}" -gt 0 ]; then
    members="${members:+$members }$node"
    if [ -z "${first_known:-}" ]; then first_known=$known; fi
  else
    outside="${outside:+$outside }$node"
  fi
done

if [ -n "$members" ]; then
  log "a cluster exists (${members%% *} knows ${first_known} nodes): nothing to create"
  # Reported, not repaired: a degraded cluster is left as it is and the Job still succeeds.
  REDIS_NODES=$members
  started=$(date +%s)
  wait_seconds=60
  if (wait_ok "$first_known"); then
    log "the existing cluster is healthy"
  else
    log "the existing cluster is not healthy (left as it is; see redis-cli --cluster check)"
  fi
  if [ -n "$outside" ]; then
    log "not in the cluster (empty nodes, e.g. a lost volume claim): $outside"
    log "add each with: redis-cli --cluster add-node NEW_IP:PORT MEMBER_IP:PORT --cluster-slave"
  fi
  exit 0
fi

addrs=""
for node in $REDIS_NODES; do
  ip=$(cli "$node" config get cluster-announce-ip | tr -d '\r' | sed -n 2p)
  addrs="$addrs ${ip:-${node%:*}}:${node##*:}"
done
log "creating the cluster:$addrs (replicas per master: $replicas)"
# shellcheck disable=SC2086 # one argument per address
redis-cli --cluster create $addrs --cluster-replicas "$replicas" --cluster-yes
wait_ok "$count"
log "cluster formed and healthy: $count nodes"
