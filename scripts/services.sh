#!/usr/bin/env bash
# Makes sure MongoDB and Redis answer where the tests and the demo look for
# them, starting whatever is missing.
#
#   scripts/services.sh up      detect, install and start what is missing
#   scripts/services.sh status  say what answers
#   scripts/services.sh down    stop what `up` started
#
# Addresses: MONGODB_URI (default mongodb://127.0.0.1:27017) and REDIS_URL
# (default redis://127.0.0.1:6379/0). Order of preference for each service:
# something already answering (your own server, or `docker compose up -d`),
# then Docker Compose if a Docker engine runs, then a local process:
# Debian's redis-server, and for MongoDB the wire-compatible `secantusd-rs`
# (crate secantus-mdb, built once with cargo; it needs cmake).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.services"
MONGODB_URI="${MONGODB_URI:-mongodb://127.0.0.1:27017}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
SECANTUS_VERSION="0.5.3-beta.196"
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }

# host and port of the first host in a URL
host_of() { local a="${1#*://}"; a="${a%%/*}"; a="${a%%\?*}"; a="${a##*@}"; a="${a%%,*}"; echo "${a%%:*}"; }
port_of() {
  local a="${1#*://}"; a="${a%%/*}"; a="${a%%\?*}"; a="${a##*@}"; a="${a%%,*}"
  if [[ "$a" == *:* ]]; then echo "${a##*:}"; else echo "$2"; fi
}
is_local() { [[ "$1" == "127.0.0.1" || "$1" == "localhost" || "$1" == "::1" ]]; }

tcp_answers() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }
redis_answers() {
  # Any reply (PONG, or NOAUTH from a server with a password) means Redis is up.
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2; printf 'PING\r\n' >&3; head -c 1 <&3" 2>/dev/null | grep -q '[+-]'
}
wait_for() { # description seconds command...
  local what="$1" secs="$2"; shift 2
  for _ in $(seq 1 $((secs * 5))); do "$@" && return 0; sleep 0.2; done
  return 1
}
docker_engine() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

apt_install() {
  [[ "$(id -u)" == 0 ]] || die "$* is missing and this is not root: install it (Debian: apt-get install $*)"
  say "installing $* from Debian packages"
  if [[ ! -f "$STATE/.apt-updated" ]]; then
    apt-get update -qq >/dev/null && touch "$STATE/.apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

redis_up() {
  local host port; host="$(host_of "$REDIS_URL")"; port="$(port_of "$REDIS_URL" 6379)"
  if redis_answers "$host" "$port"; then say "Redis answers at $host:$port"; return; fi
  is_local "$host" || die "Redis at $host:$port (REDIS_URL) does not answer, and it is not local so it cannot be started here"
  if docker_engine; then
    say "starting Redis with Docker Compose"; docker compose -f "$ROOT/docker-compose.yml" up -d --wait redis
  else
    command -v redis-server >/dev/null || apt_install redis-server
    say "starting redis-server on $host:$port"
    mkdir -p "$STATE/redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
      --dir "$STATE/redis" --logfile "$STATE/redis.log" --pidfile "$STATE/redis.pid" >/dev/null
  fi
  wait_for "Redis" 20 redis_answers "$host" "$port" || die "Redis did not come up on $host:$port (see $STATE/redis.log)"
  say "Redis is up at $host:$port"
}

secantus_install() {
  command -v secantusd-rs >/dev/null && return
  command -v cmake >/dev/null || apt_install cmake
  command -v cargo >/dev/null || die "cargo is needed to build the MongoDB-compatible server (secantus-mdb)"
  say "building the MongoDB-compatible server secantus-mdb $SECANTUS_VERSION (once, about 3 minutes)"
  cargo install secantus-mdb --version "$SECANTUS_VERSION" --ignore-rust-version --locked --quiet \
    || die "could not install secantus-mdb; install MongoDB yourself and set MONGODB_URI"
}

mongo_up() {
  local host port; host="$(host_of "$MONGODB_URI")"; port="$(port_of "$MONGODB_URI" 27017)"
  if tcp_answers "$host" "$port"; then say "MongoDB answers at $host:$port"; return; fi
  is_local "$host" || die "MongoDB at $host:$port (MONGODB_URI) does not answer, and it is not local so it cannot be started here"
  if docker_engine; then
    say "starting MongoDB with Docker Compose"; docker compose -f "$ROOT/docker-compose.yml" up -d --wait mongodb
  else
    secantus_install
    say "starting secantusd-rs (MongoDB wire protocol) on $host:$port"
    mkdir -p "$STATE/mongo-data"
    setsid nohup secantusd-rs --host 127.0.0.1 --port "$port" --storage-path "$STATE/mongo-data" --cache-size 256M \
      </dev/null >"$STATE/mongo.log" 2>&1 &
    echo $! >"$STATE/mongo.pid"
  fi
  wait_for "MongoDB" 60 tcp_answers "$host" "$port" || die "MongoDB did not come up on $host:$port (see $STATE/mongo.log)"
  say "MongoDB is up at $host:$port"
}

status() {
  local rh rp mh mp
  rh="$(host_of "$REDIS_URL")"; rp="$(port_of "$REDIS_URL" 6379)"
  mh="$(host_of "$MONGODB_URI")"; mp="$(port_of "$MONGODB_URI" 27017)"
  if redis_answers "$rh" "$rp"; then say "Redis: up at $rh:$rp"; else say "Redis: DOWN at $rh:$rp"; fi
  if tcp_answers "$mh" "$mp"; then say "MongoDB: up at $mh:$mp"; else say "MongoDB: DOWN at $mh:$mp"; fi
}

down() {
  for f in "$STATE/mongo.pid" "$STATE/redis.pid"; do
    if [[ -f "$f" ]]; then kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; say "stopped $(basename "$f" .pid)"; fi
  done
}

mkdir -p "$STATE"
case "${1:-up}" in
  up) redis_up; mongo_up ;;
  status) status ;;
  down) down ;;
  *) die "usage: $0 up|status|down" ;;
esac
