#!/usr/bin/env bash
# The demo: brings up MongoDB and Redis if needed, then runs
# examples/quickstart.rs (derive a model, save, cached calls, update, stats):
# once with Redis, once without it (the in-process tier alone).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/services.sh up
export MONGODB_URI="${MONGODB_URI:-mongodb://127.0.0.1:27017}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
cargo run --quiet --example quickstart
echo
echo "== again with redis_uri: None (the embedded mode: cached in process)"
cargo run --quiet --example quickstart -- --no-redis
