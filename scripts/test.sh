#!/usr/bin/env bash
# The test command: brings up MongoDB and Redis if they are not running
# (scripts/services.sh), then runs every test of the workspace against them;
# then runs the cache, `#[cached]`, record-cache and ORM tests again against
# a local Redis Cluster (scripts/cluster.sh: three masters on ports
# 7100-7102, stopped afterwards: idle, its gossip still costs CPU that the
# timed fault tests of a later run would miss). Extra arguments go to
# `cargo test` and skip the cluster run (e.g. `scripts/test.sh --test cached`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/services.sh up
export MONGODB_URI="${MONGODB_URI:-mongodb://127.0.0.1:27017}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
cargo test --workspace "$@"
if [ $# -eq 0 ]; then
  cluster_url="$(scripts/cluster.sh up)"
  trap 'scripts/cluster.sh down' EXIT
  echo "== the same suites against the Redis Cluster at $cluster_url"
  suites=(cache_consistency cached record_cache local_tier local_coherence refresh
    orm orm_features versions cancelled_writes hostile_input stream metrics traces feed monitor)
  REDIS_URL="$cluster_url" cargo test -p earnorm-workspace "${suites[@]/#/--test=}"
fi
