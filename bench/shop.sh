#!/usr/bin/env bash
# The stateful figures (BENCHMARKS.md, "Stateful: PostgreSQL from Debian
# packages"), through the kiln binary (release build), sandbox driver:
#
#   bench/shop.sh downtime  # PostgreSQL unavailable during one replacement
#                           # (config change -> recreate), median of RUNS (10)
#   bench/shop.sh build     # the PostgreSQL image from a warm .deb cache, kiln
#                           # vs `debootstrap --variant=minbase` with the same
#                           # packages (warm --cache-dir): time and size,
#                           # median of BUILD_RUNS (3)
#   bench/shop.sh all
#
# downtime: a poller asks the web service's /ready (a fresh PostgreSQL
# connection and `SELECT 1`, through kiln's route and the db's tcp route)
# every 5 ms while `kiln apply -y` replaces the database; the unavailability
# is the time from the last success before the first failure to the first
# success after the last failure (stop -> new instance accepting
# connections, as a client sees it).
# As root, with python3 and network access to the Debian archive
# (debootstrap is installed with apt-get when missing).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHAT=${1:-all}
case $WHAT in downtime | build | all) ;; *)
  echo "usage: bench/shop.sh downtime|build|all" >&2
  exit 2
  ;;
esac
RUNS=${RUNS:-10}
BUILD_RUNS=${BUILD_RUNS:-3}
cd "$ROOT"
cargo build --release --locked -q -p kiln -p shop
KILN=$ROOT/target/release/kiln
WORK=$(mktemp -d /var/tmp/kiln-bench-shop.XXXXXX)
PROJECT=$WORK/shop
cleanup() {
  "$KILN" down "$PROJECT" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

cp -r examples/shop "$PROJECT"
rm -rf "$PROJECT/.kiln" "$PROJECT/bin"
mkdir -p "$PROJECT/bin"
cp target/release/shop-web target/release/shop-worker "$PROJECT/bin/"
WEB_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
DB_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -i -e "s/127.0.0.1:8088/127.0.0.1:$WEB_PORT/" -e "s/127.0.0.1:15432/127.0.0.1:$DB_PORT/" \
  -e "s/DATABASE_PORT = \"15432\"/DATABASE_PORT = \"$DB_PORT\"/g" "$PROJECT/kiln.toml"

downtime() {
  echo "== PostgreSQL unavailability during one replacement (median of $RUNS)"
  "$KILN" apply "$PROJECT" -y >/dev/null
  python3 "$ROOT/bench/shop.py" downtime "$KILN" "$PROJECT" "$WEB_PORT" "$RUNS"
}

build() {
  echo "== PostgreSQL image from a warm .deb cache (median of $BUILD_RUNS)"
  command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
  python3 "$ROOT/bench/shop.py" build "$KILN" "$PROJECT" "$BUILD_RUNS" "$WORK"
}

case $WHAT in
downtime) downtime ;;
build) build ;;
all)
  build
  downtime
  ;;
esac
