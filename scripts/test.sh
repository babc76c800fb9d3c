#!/usr/bin/env bash
# The test command: brings up MongoDB and Redis if they are not running
# (scripts/services.sh), then runs every test of the workspace against them.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test cached`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/services.sh up
export MONGODB_URI="${MONGODB_URI:-mongodb://127.0.0.1:27017}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
cargo test --workspace "$@"
