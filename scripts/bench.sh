#!/usr/bin/env bash
# The benchmarks: brings up MongoDB and Redis if needed (scripts/services.sh),
# then runs every side-by-side comparison in benches/cache.rs and prints a
# Markdown table (the one in BENCHMARKS.md). It also writes the rows and the
# latency distributions as JSON (benches/results/latest.json) and draws the
# distributions as an SVG (benches/results/hit-latency.svg, shown in
# BENCHMARKS.md). `scripts/bench.sh --quick` for a
# short smoke run; one group alone, printed and not written: `--local` (the
# in-process tier), `--feed`, `--batch` (find_many_by_ids), `--cluster` (a
# private three-master Redis Cluster against one server), `--monitor` (the
# consistency monitor's cost); diagnostics:
# `--micro`, `--micro-batch` (a cold batch's lookup in redis-rs alone), and
# for `perf record`: `--profile-hit`, `--profile-local`, `--profile-batch`. The benchmarks start their own redis-server processes; they
# need redis-server and redis-benchmark (Debian: redis-server, redis-tools).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/services.sh up
export MONGODB_URI="${MONGODB_URI:-mongodb://127.0.0.1:27017}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
cargo bench --quiet -p earnorm-bench -- "$@"
